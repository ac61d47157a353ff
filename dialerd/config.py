"""The config: YAML into frozen dataclasses, validated in one place, every problem named by key."""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
import socket
import unicodedata
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from .numbers import country_problem, normalise, other_reading

DEFAULT_PATH = "/etc/dialerd/config.yaml"
DEFAULT_ENDPOINTS = MappingProxyType(
    {
        "eu": "https://studio-api-eu.ai.vonage.com/telephony/make-call",
        "us": "https://studio-api-us.ai.vonage.com/telephony/make-call",
    }
)
APPROVED_RATES = (1, 3, 5)
CALLBACK_STATUSES = ("cancelled", "rejected", "busy", "timeout", "failed")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
AGENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_CONNECTIONS = 256  # callbacks.max_connections, by default


class ConfigError(Exception):
    """The config cannot be used; `problems` lists each one as 'key.path: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class ApiConfig:
    key_env: str | None
    key_file: Path | None
    endpoints: Mapping[str, str]
    timeout_s: float


@dataclass(frozen=True)
class AgentConfig:
    id: str
    region: str
    rate: int
    number: str | None
    margin: float  # sends are spaced (1 + margin) / rate apart


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True)
class AdminConfig:
    listen: Listen
    token_file: Path | None  # with it, every request needs its Bearer token
    campaign_metrics: bool = False  # /metrics counts outcomes by campaign too


@dataclass(frozen=True)
class CallbacksConfig:
    listen: Listen
    public_url: str | None
    wait_s: float
    max_connections: int  # open at most; past it new ones wait in the kernel's backlog


@dataclass(frozen=True)
class RedialPolicy:
    attempts: int
    delay_s: float

    def redial_at(self, attempts: int, unreached_at: float) -> float | None:
        """When to call again a callee not reached after `attempts` calls; None: no more."""
        return unreached_at + self.delay_s if attempts < self.attempts else None


@dataclass(frozen=True)
class CallingHours:
    start: dt.time
    end: dt.time
    days: frozenset[int]
    default_timezone: str
    holidays: frozenset[dt.date]


@dataclass(frozen=True)
class NumberCap:
    count: int
    per_s: float


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster mode (SPEC §9): the ledger on PostgreSQL, shared with other daemons."""

    url: str  # postgresql://..., never with a password in it
    instance: str  # this daemon's name among them
    lease_s: float  # how long an agent's lease lasts unrenewed
    password_file: Path | None


@dataclass(frozen=True)
class Config:
    path: Path | None
    api: ApiConfig
    agents: Mapping[str, AgentConfig]
    default_agent: str | None
    state_dir: Path
    spool_dir: Path | None
    stdin: str | bool
    results: str | None
    callbacks: CallbacksConfig | None
    redial: Mapping[str, RedialPolicy]
    admin: AdminConfig | None
    calling_hours: CallingHours | None
    dnc_file: Path | None
    max_calls_per_number: NumberCap | None
    shutdown_timeout_s: float
    default_country: str | None  # ISO 3166-1 alpha-2: where numbers in national format are
    dedupe_window_s: float  # a request without id repeating one taken this recently is a duplicate
    max_queue_s: float = 432_000.0  # a request not sent this long after it was due ends expired
    retention_s: float = 2_592_000.0  # final requests are pruned this long after their outcome
    cluster: ClusterConfig | None = None  # None: the ledger is SQLite in state_dir

    def agent_by_number(self, number: str) -> AgentConfig | None:
        return next((a for a in self.agents.values() if a.number == number), None)

    def results_target(self, stdin_is_source: bool) -> str:
        """Where result lines go: the configured target, else stdout for stdin runs."""
        if self.results is not None:
            return self.results
        return "-" if stdin_is_source else str(self.state_dir / "results.jsonl")


class _Reader:
    """Walks the YAML tree, collecting every problem under its key path instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def mapping(self, node: Any, key: str, allowed: tuple[str, ...] | None) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.fail(key, "must be a mapping")
            return {}
        for name in node:
            if allowed is not None and name not in allowed:
                self.fail(f"{key}.{name}" if key else str(name), "unknown key")
        return node

    def value(
        self, node: dict, key: str, name: str, convert: Callable[[Any], Any], default: Any = None
    ) -> Any:
        if name not in node or node[name] is None:
            return default
        try:
            return convert(node[name])
        except (TypeError, ValueError) as error:
            self.fail(f"{key}.{name}" if key else name, str(error))
            return default


def _positive(kind: type) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"must be a number, not {raw!r}")
        if not math.isfinite(raw):
            raise ValueError(f"must be a finite number, not {raw!r}")
        if kind is int and raw != int(raw):
            raise ValueError(f"must be a whole number, not {raw!r}")
        if raw <= 0:
            raise ValueError(f"must be above 0, not {raw!r}")
        return kind(raw)

    return convert


def _window(raw: Any) -> float:
    """Seconds, 0 meaning off."""
    return 0.0 if raw == 0 and not isinstance(raw, bool) else _positive(float)(raw)


def _country(raw: Any) -> str:
    problem = country_problem(raw)
    if problem:
        raise ValueError(problem)
    return raw.upper()


def _string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a non-empty string, not {raw!r}")
    return raw


def _url(raw: Any) -> str:
    parts = urlsplit(_string(raw))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, not {raw!r}")
    return raw.rstrip("/") if parts.path in ("", "/") else raw


def _listen(raw: Any) -> Listen:
    text = str(raw)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, not {raw!r}")
    return Listen(host.strip("[]") or "127.0.0.1", int(port))


def _same_socket(a: Listen, b: Listen) -> bool:
    """Whether two listeners would take the same port: the same host, or one on every host."""
    wildcards = ("0.0.0.0", "::")
    return a.port == b.port and (a.host == b.host or a.host in wildcards or b.host in wildcards)


def _time_of_day(raw: Any) -> dt.time:
    if isinstance(raw, int) and not isinstance(raw, bool):
        # YAML 1.1 reads an unquoted 08:00 as base 60 (480): say how to write it.
        hours, minutes = divmod(raw, 60)
        raise ValueError(
            f"was read as the number {raw}, as YAML does with an unquoted time; "
            f'write it quoted: "{hours:02d}:{minutes:02d}"'
        )
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", str(raw))
    if not match:
        raise ValueError(f'must be a time of day written "HH:MM", not {raw!r}')
    return dt.time(int(match[1]), int(match[2]))


def _boolean(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"must be true or false, not {raw!r}")
    return raw


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def zone_name(raw: Any) -> str:
    """An IANA time zone's name, as the system's (or tzdata's) zone files know it; ValueError
    otherwise. Looked up among the names, never opened as a path."""
    if not isinstance(raw, str) or raw not in _zone_names():
        raise ValueError(f"is not a known time zone (such as Europe/London): {raw!r}")
    return raw


def _days(raw: Any) -> frozenset[int]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"must be a list of days out of {', '.join(WEEKDAYS)}")
    unknown = [d for d in raw if str(d).lower() not in WEEKDAYS]
    if unknown:
        raise ValueError(f"unknown days {unknown!r}; use {', '.join(WEEKDAYS)}")
    return frozenset(WEEKDAYS.index(str(d).lower()) for d in raw)


def _dates(raw: Any) -> frozenset[dt.date]:
    if not isinstance(raw, list):
        raise ValueError("must be a list of dates (YYYY-MM-DD)")
    dates = set()
    for item in raw:
        if isinstance(item, dt.date):
            dates.add(item)
        else:
            try:
                dates.add(dt.date.fromisoformat(str(item)))
            except ValueError:
                raise ValueError(f"{item!r} is not a date (YYYY-MM-DD)") from None
    return frozenset(dates)


def _stdin_mode(raw: Any) -> str | bool:
    if raw == "auto" or isinstance(raw, bool):  # not `in`: 1 == True, 0 == False
        return raw
    raise ValueError(f"must be auto, true or false, not {raw!r}")


def _margin(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw < 0.5:
        raise ValueError(f"must be a fraction from 0 to 0.5 (0.03 = 3 %), not {raw!r}")
    return float(raw)


def _rate(raw: Any) -> int:
    if raw not in APPROVED_RATES or isinstance(raw, bool):
        raise ValueError(f"must be one of {', '.join(map(str, APPROVED_RATES))}, not {raw!r}")
    return int(raw)


def _read_api(r: _Reader, node: Any) -> ApiConfig:
    api = r.mapping(node, "api", ("key_env", "key_file", "endpoints", "timeout_s"))
    key_env = r.value(api, "api", "key_env", _string)
    key_file = r.value(api, "api", "key_file", lambda v: Path(_string(v)))
    if key_env and key_file:
        r.fail("api", "set key_env or key_file, not both")
    if "key" in api:
        r.fail("api.key", "the key is never written in the config; use key_env or key_file")
    endpoints = dict(DEFAULT_ENDPOINTS)
    for region, url in r.mapping(api.get("endpoints"), "api.endpoints", None).items():
        converted = r.value({region: url}, "api.endpoints", region, _url)
        if converted:
            endpoints[str(region)] = converted
    return ApiConfig(
        key_env=key_env,
        key_file=key_file,
        endpoints=MappingProxyType(endpoints),
        timeout_s=r.value(api, "api", "timeout_s", _positive(float), 15.0),
    )


def _agent_number(raw: str, country: str | None) -> str:
    """An agent's number, which must read one way: requests' `from` is matched against it."""
    number = normalise(raw, country)
    other = other_reading(raw, number, country)
    if other is not None:
        raise ValueError(
            f"{raw!r} reads as +{number} (a national number of {country}) and as +{other}: "
            "write it with + and its country code"
        )
    return number


def _read_agents(
    r: _Reader, node: Any, regions: Mapping[str, str], country: str | None
) -> dict[str, AgentConfig]:
    agents = {}
    before = len(r.problems)
    for agent_id, body in r.mapping(node, "agents", None).items():
        key = f"agents.{agent_id}"
        if not AGENT_ID.fullmatch(str(agent_id)):
            r.fail(key, "an agent id is 1-128 of A-Za-z0-9._:-")
        fields = r.mapping(body, key, ("region", "rate", "number", "margin"))
        region = r.value(fields, key, "region", _string)
        if region is None:
            r.fail(f"{key}.region", "is required (one of " + ", ".join(regions) + ")")
        elif region not in regions:
            r.fail(f"{key}.region", f"{region!r} has no endpoint; use one of {', '.join(regions)}")
        rate = r.value(fields, key, "rate", _rate)
        if fields.get("rate") is None:  # absent, or `rate:` left empty
            r.fail(f"{key}.rate", "is required (1, 3 or 5)")
        number = r.value(fields, key, "number", lambda v: _agent_number(str(v), country))
        agents[str(agent_id)] = AgentConfig(
            id=str(agent_id),
            region=region or "eu",
            rate=rate or 1,
            number=number,
            margin=r.value(fields, key, "margin", _margin, 0.03),
        )
    if not agents and len(r.problems) == before:
        r.fail("agents", "at least one agent is required")
    numbers = [a.number for a in agents.values() if a.number]
    for number in {n for n in numbers if numbers.count(n) > 1}:
        r.fail("agents", f"number {number} is given to more than one agent")
    return agents


def _read_callbacks(r: _Reader, node: Any) -> CallbacksConfig | None:
    if node is None:
        return None
    cb = r.mapping(node, "callbacks", ("listen", "max_connections", "public_url", "wait_s"))
    return CallbacksConfig(
        listen=r.value(cb, "callbacks", "listen", _listen, Listen("127.0.0.1", 8080)),
        public_url=r.value(cb, "callbacks", "public_url", _url),
        wait_s=r.value(cb, "callbacks", "wait_s", _positive(float), 120.0),
        max_connections=r.value(
            cb, "callbacks", "max_connections", _positive(int), MAX_CONNECTIONS
        ),
    )


def _read_redial(r: _Reader, node: Any) -> dict[str, RedialPolicy]:
    policies = {}
    for status, body in r.mapping(node, "redial", CALLBACK_STATUSES).items():
        key = f"redial.{status}"
        fields = r.mapping(body, key, ("attempts", "delay_s"))
        if "attempts" not in fields:
            r.fail(f"{key}.attempts", "is required")
        policies[status] = RedialPolicy(
            attempts=r.value(fields, key, "attempts", _positive(int), 1),
            delay_s=r.value(fields, key, "delay_s", _positive(float), 300.0),
        )
    return policies


def _read_admin(r: _Reader, node: Any) -> AdminConfig | None:
    if node is None:
        return None
    admin = r.mapping(node, "admin", ("listen", "token_file", "campaign_metrics"))
    return AdminConfig(
        listen=r.value(admin, "admin", "listen", _listen, Listen("127.0.0.1", 9090)),
        token_file=r.value(admin, "admin", "token_file", lambda v: Path(_string(v))),
        campaign_metrics=r.value(admin, "admin", "campaign_metrics", _boolean, False),
    )


def _read_calling_hours(r: _Reader, node: Any) -> CallingHours | None:
    if node is None:
        return None
    key = "calling_hours"
    hours = r.mapping(node, key, ("start", "end", "days", "default_timezone", "holidays"))
    for name in ("start", "end"):
        if name not in hours:
            r.fail(f"{key}.{name}", 'is required ("HH:MM")')
    before = len(r.problems)
    start = r.value(hours, key, "start", _time_of_day, dt.time(0))
    end = r.value(hours, key, "end", _time_of_day, dt.time(0))
    if start == end and "start" in hours and "end" in hours and len(r.problems) == before:
        r.fail(key, "start and end are the same time: the window would be empty")
    return CallingHours(
        start=start,
        end=end,
        days=r.value(hours, key, "days", _days, frozenset(range(7))),
        default_timezone=r.value(hours, key, "default_timezone", zone_name, "UTC"),
        holidays=r.value(hours, key, "holidays", _dates, frozenset()),
    )


def _read_cap(r: _Reader, node: Any) -> NumberCap | None:
    if node is None:
        return None
    key = "max_calls_per_number"
    cap = r.mapping(node, key, ("count", "per_s"))
    for name in ("count", "per_s"):
        if name not in cap:
            r.fail(f"{key}.{name}", "is required")
    return NumberCap(
        count=r.value(cap, key, "count", _positive(int), 1),
        per_s=r.value(cap, key, "per_s", _positive(float), 86400.0),
    )


TOP_KEYS = (
    "api",
    "agents",
    "default_agent",
    "state_dir",
    "spool",
    "stdin",
    "results",
    "callbacks",
    "redial",
    "admin",
    "calling_hours",
    "dnc_file",
    "max_calls_per_number",
    "shutdown_timeout_s",
    "default_country",
    "dedupe_window_s",
    "max_queue_s",
    "retention_s",
    "ledger",
    "instance",
    "lease_s",
    "ledger_password_file",
)
CLUSTER_KEYS = ("instance", "lease_s", "ledger_password_file")
INSTANCE = re.compile(r"[A-Za-z0-9._-]{1,64}")
LEASE_S = (2, 300)


def build_config(document: Any, path: Path | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem by key."""
    r = _Reader()
    if not isinstance(document, dict):
        raise ConfigError(["(top): the config must be a YAML mapping"])
    top = r.mapping(document, "", TOP_KEYS)
    api = _read_api(r, top.get("api"))
    country = r.value(top, "", "default_country", _country)
    agents = _read_agents(r, top.get("agents"), api.endpoints, country)
    default_agent = r.value(top, "", "default_agent", _string)
    if default_agent is None and len(agents) == 1:
        default_agent = next(iter(agents))
    elif default_agent is not None and default_agent not in agents:
        r.fail("default_agent", f"{default_agent!r} is not under agents")
    spool = r.mapping(top.get("spool"), "spool", ("dir",))
    if "spool" in top and "dir" not in spool:
        r.fail("spool.dir", "is required when spool is given")
    callbacks = _read_callbacks(r, top.get("callbacks"))
    admin = _read_admin(r, top.get("admin"))
    if callbacks and admin and _same_socket(callbacks.listen, admin.listen):
        r.fail(
            "admin.listen", "must differ from callbacks.listen: admin is never on the callback port"
        )
    config = Config(
        path=path,
        api=api,
        agents=MappingProxyType(agents),
        default_agent=default_agent,
        state_dir=r.value(
            top, "", "state_dir", lambda v: Path(_string(v)), Path("/var/lib/dialerd")
        ),
        spool_dir=r.value(spool, "spool", "dir", lambda v: Path(_string(v))),
        stdin=r.value(top, "", "stdin", _stdin_mode, "auto"),
        results=r.value(top, "", "results", _string),
        callbacks=callbacks,
        redial=MappingProxyType(_read_redial(r, top.get("redial"))),
        admin=admin,
        calling_hours=_read_calling_hours(r, top.get("calling_hours")),
        dnc_file=r.value(top, "", "dnc_file", lambda v: Path(_string(v))),
        max_calls_per_number=_read_cap(r, top.get("max_calls_per_number")),
        shutdown_timeout_s=r.value(top, "", "shutdown_timeout_s", _positive(float), 30.0),
        default_country=country,
        dedupe_window_s=r.value(top, "", "dedupe_window_s", _window, 86400.0),
        max_queue_s=r.value(top, "", "max_queue_s", _positive(float), 432_000.0),
        retention_s=r.value(top, "", "retention_s", _positive(float), 2_592_000.0),
        cluster=_read_cluster(r, top),
    )
    cap = config.max_calls_per_number
    if cap is not None and cap.per_s > config.retention_s:
        r.fail(
            "max_calls_per_number.per_s",
            f"must not exceed retention_s ({config.retention_s:g}): the cap counts the calls the"
            " ledger still remembers",
        )
    if config.spool_dir is not None and _nested(config.spool_dir, config.state_dir):
        r.fail(
            "spool.dir",
            f"must be apart from state_dir ({config.state_dir}): submitters write into the spool,"
            " and the daemon takes files from it",
        )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _read_cluster(r: _Reader, top: dict) -> ClusterConfig | None:
    if top.get("ledger") is None:
        for key in CLUSTER_KEYS:
            if top.get(key) is not None:
                r.fail(key, "is of cluster mode: it needs ledger (a postgresql:// url)")
        return None
    return ClusterConfig(
        url=r.value(top, "", "ledger", _ledger_url, ""),
        instance=r.value(top, "", "instance", _instance, _instance(socket.gethostname())),
        lease_s=r.value(top, "", "lease_s", _lease_s, 10.0),
        password_file=r.value(top, "", "ledger_password_file", lambda v: Path(_string(v))),
    )


def _ledger_url(raw: Any) -> str:
    from psycopg.conninfo import conninfo_to_dict  # psycopg takes 0.1 s: only for a ledger url

    if not isinstance(raw, str) or not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"must be a postgresql:// url, not {raw!r}")
    try:
        fields = conninfo_to_dict(raw)
    except Exception as error:  # psycopg's ProgrammingError names what libpq refused
        raise ValueError(f"is not a url libpq reads: {error}") from None
    if "password" in fields:
        raise ValueError(
            "must not hold a password: give it in ledger_password_file or the PG* environment"
        )
    return raw


def _instance(raw: Any) -> str:
    if not isinstance(raw, str) or not INSTANCE.fullmatch(raw):
        raise ValueError(f"must be 1-64 of A-Za-z0-9._-, not {raw!r}")
    return raw


def _lease_s(raw: Any) -> float:
    seconds = _positive(float)(raw)
    if not LEASE_S[0] <= seconds <= LEASE_S[1]:
        raise ValueError(f"must be from {LEASE_S[0]} to {LEASE_S[1]} seconds, not {raw!r}")
    return seconds


def _nested(a: Path, b: Path) -> bool:
    """Whether one directory is, or is inside, the other (as written, made absolute)."""
    a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    return a.is_relative_to(b) or b.is_relative_to(a)


def restart_needed(running: Config, new: Config) -> list[str]:
    """A problem for each key whose change a reload cannot apply to a running daemon."""

    def fixed(config: Config) -> dict[str, Any]:
        callbacks = config.callbacks
        return {
            "state_dir": config.state_dir,
            "spool.dir": config.spool_dir,
            "stdin": config.stdin,
            "results": config.results,
            "callbacks.listen": callbacks and callbacks.listen,
            "callbacks.max_connections": callbacks and callbacks.max_connections,
            "callbacks.public_url": callbacks and callbacks.public_url,
            "admin.listen": config.admin and config.admin.listen,
            "ledger": config.cluster,  # and instance, lease_s, ledger_password_file
        }

    before, after = fixed(running), fixed(new)
    return [f"{key}: a change takes a restart" for key in before if before[key] != after[key]]


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate the config file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"(file): cannot read {path}: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"(file): {path} is not UTF-8 text"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", error)
        raise ConfigError([f"(file): not valid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError(["(file): not valid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        # PyYAML lets some bad scalars through as plain Python errors: `!!int x`, `!!bool maybe`,
        # `!!timestamp x`, a date like 2024-13-45, an integer of 4300+ digits.
        raise ConfigError([f"(file): not valid YAML: a value cannot be read: {error}"]) from None
    return build_config(document, path)


def read_api_key(api: ApiConfig) -> str:
    """The API key from the environment or the key file; ConfigError if missing or unusable."""
    if api.key_file is not None:
        return _read_secret_file(api.key_file, "api.key_file")
    env_name = api.key_env or "VGAI_KEY"
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError([f"api.key_env: the environment variable {env_name} is not set"])
    _check_secret(key, "api.key_env", f"the environment variable {env_name}")
    return key


def read_admin_token(admin: AdminConfig | None) -> str | None:
    """The admin listener's Bearer token, None without admin.token_file; ConfigError if the
    file cannot be read or the token is unusable."""
    if admin is None or admin.token_file is None:
        return None
    return _read_secret_file(admin.token_file, "admin.token_file")


def _read_secret_file(path: Path, key: str) -> str:
    """A key or token alone in a file, its one trailing newline ignored (editors add one)."""
    try:
        # Bytes decoded, not read_text(): its universal newlines would turn a \r into \n.
        secret = path.read_bytes().decode("utf-8").removesuffix("\n")
    except OSError as error:
        raise ConfigError([f"{key}: cannot read {path}: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{key}: {path} is not UTF-8 text"]) from None
    if not secret:
        raise ConfigError([f"{key}: {path} is empty"])
    _check_secret(secret, key, str(path))
    return secret


# Named for the operator, who cannot see them in an editor.
INVISIBLE_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", " ": "a space"}


def _check_secret(secret: str, key: str, where: str) -> None:
    """Refuse white space and control characters anywhere in a secret: a header cannot carry
    them, and stripping would hide a second line or a pasted tab instead of telling of it. The
    message says what and where, never any part of the secret."""
    for index, char in enumerate(secret):
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            found = f"{_invisible_name(char)} at character {index + 1}"
            lines = secret.count("\n") + 1
            if lines > 1:
                found += f" (it has {lines} lines)"
            raise ConfigError(
                [f"{key}: {where} holds {found}; write it alone on one line, with no white space"]
            )


def _invisible_name(char: str) -> str:
    if char in INVISIBLE_NAMES:
        return INVISIBLE_NAMES[char]
    name = unicodedata.name(char, "a control character").lower()
    return f"{name} (U+{ord(char):04X})"
