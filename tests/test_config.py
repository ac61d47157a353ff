"""The config (SPEC §3): every key, defaults, and every problem named by its key path."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_dialerd, write_config

from dialerd.cli import main
from dialerd.config import (
    DEFAULT_ENDPOINTS,
    AdminConfig,
    ConfigError,
    Listen,
    build_config,
    load_config,
    read_admin_token,
    read_api_key,
    restart_needed,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
SPEC_TOP_KEYS = {
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
}


def minimal(**top: Any) -> dict:
    """The smallest valid document, with `top` keys replacing or adding to it."""
    document: dict[str, Any] = {
        "api": {"key_env": "VGAI_KEY"},
        "agents": {"agent-a": {"region": "eu", "rate": 1}},
    }
    document.update(top)
    return document


def problems_of(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(document)
    assert caught.value.problems, "a ConfigError must list its problems"
    for problem in caught.value.problems:  # each one "key.path: what"
        key, sep, what = problem.partition(": ")
        assert sep and what.strip(), problem
        known = SPEC_TOP_KEYS | {"(top)"} | (set(document) if isinstance(document, dict) else set())
        assert key.split(".")[0] in known, problem
    return caught.value.problems


def keys_of(problems: list[str]) -> list[str]:
    return [p.split(": ", 1)[0] for p in problems]


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


def load_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return caught.value.problems


# --- every key of SPEC §3 ------------------------------------------------------------------------

FULL_YAML = """
api:
  key_env: MY_KEY
  endpoints:
    eu: https://eu.example.test/make-call
    us: http://127.0.0.1:9/us
  timeout_s: 7.5
agents:
  agent-eu:
    region: eu
    rate: 5
    number: "+44 7700 900000"
    margin: 0.1
  agent-us:
    region: us
    rate: 3
    number: 12025550100
default_agent: agent-us
state_dir: /srv/dialerd/state
spool:
  dir: /srv/dialerd/spool
stdin: false
results: /srv/dialerd/results.jsonl
callbacks:
  listen: 0.0.0.0:8081
  max_connections: 1000
  public_url: https://dialer.example.com/
  wait_s: 60
redial:
  busy: {attempts: 3, delay_s: 300}
  timeout: {attempts: 2, delay_s: 600}
  failed: {attempts: 4}
admin:
  listen: "[::1]:9091"
calling_hours:
  start: "08:30"
  end: "21:00"
  days: [mon, TUE, wed, thu, fri, sat]
  default_timezone: Europe/London
dnc_file: /etc/dialerd/dnc.txt
max_calls_per_number: {count: 3, per_s: 86400}
"""


def test_every_key_is_parsed(tmp_path):
    config = load_text(tmp_path, FULL_YAML)
    assert config.path == tmp_path / "config.yaml"
    assert config.api.key_env == "MY_KEY"
    assert config.api.key_file is None
    assert config.api.endpoints["eu"] == "https://eu.example.test/make-call"
    assert config.api.endpoints["us"] == "http://127.0.0.1:9/us"
    assert config.api.timeout_s == 7.5
    assert set(config.agents) == {"agent-eu", "agent-us"}
    eu, us = config.agents["agent-eu"], config.agents["agent-us"]
    assert (eu.id, eu.region, eu.rate, eu.number, eu.margin) == (
        "agent-eu",
        "eu",
        5,
        "447700900000",
        0.1,
    )
    assert (us.region, us.rate, us.number, us.margin) == ("us", 3, "12025550100", 0.03)
    assert config.default_agent == "agent-us"
    assert config.state_dir == Path("/srv/dialerd/state")
    assert config.spool_dir == Path("/srv/dialerd/spool")
    assert config.stdin is False
    assert config.results == "/srv/dialerd/results.jsonl"
    assert config.callbacks.listen == Listen("0.0.0.0", 8081)
    assert config.callbacks.public_url == "https://dialer.example.com"
    assert config.callbacks.wait_s == 60
    assert config.callbacks.max_connections == 1000
    assert set(config.redial) == {"busy", "timeout", "failed"}
    assert (config.redial["busy"].attempts, config.redial["busy"].delay_s) == (3, 300)
    assert (config.redial["timeout"].attempts, config.redial["timeout"].delay_s) == (2, 600)
    assert config.redial["failed"].attempts == 4
    assert config.admin == AdminConfig(Listen("::1", 9091), token_file=None)
    hours = config.calling_hours
    assert (hours.start, hours.end) == (dt.time(8, 30), dt.time(21, 0))
    assert hours.days == frozenset({0, 1, 2, 3, 4, 5})
    assert hours.default_timezone == "Europe/London"
    assert config.dnc_file == Path("/etc/dialerd/dnc.txt")
    assert (config.max_calls_per_number.count, config.max_calls_per_number.per_s) == (3, 86400)
    assert config.agent_by_number("447700900000") is eu
    assert config.agent_by_number("12025550100") is us
    assert config.agent_by_number("447700900001") is None


def test_defaults_of_a_minimal_config():
    config = build_config(minimal(api=None))
    assert config.path is None
    assert config.api.key_env is None and config.api.key_file is None
    assert dict(config.api.endpoints) == dict(DEFAULT_ENDPOINTS)
    assert config.api.endpoints["eu"] == "https://studio-api-eu.ai.vonage.com/telephony/make-call"
    assert config.api.endpoints["us"] == "https://studio-api-us.ai.vonage.com/telephony/make-call"
    assert config.api.timeout_s == 15
    agent = config.agents["agent-a"]
    assert agent.margin == 0.03 and agent.number is None
    assert config.default_agent == "agent-a"  # implicit with a single agent
    assert config.state_dir == Path("/var/lib/dialerd")
    assert config.spool_dir is None
    assert config.stdin == "auto"
    assert config.results is None
    assert config.callbacks is None
    assert dict(config.redial) == {}
    assert config.admin is None
    assert config.calling_hours is None
    assert config.dnc_file is None
    assert config.max_calls_per_number is None


def test_results_default_depends_on_stdin():
    config = build_config(minimal(state_dir="/st"))
    assert config.results_target(stdin_is_source=True) == "-"
    assert config.results_target(stdin_is_source=False) == "/st/results.jsonl"
    explicit = build_config(minimal(results="/r.jsonl"))
    assert explicit.results_target(stdin_is_source=True) == "/r.jsonl"
    assert build_config(minimal(results="-")).results_target(False) == "-"


def test_section_defaults():
    config = build_config(
        minimal(
            callbacks={},
            admin={},
            redial={"busy": {"attempts": 2}},
            calling_hours={"start": "09:00", "end": "17:00"},
        )
    )
    assert config.callbacks.listen == Listen("127.0.0.1", 8080)
    assert config.callbacks.public_url is None
    assert config.callbacks.wait_s == 120
    assert config.callbacks.max_connections == 256
    assert config.admin == AdminConfig(Listen("127.0.0.1", 9090), token_file=None)
    assert config.redial["busy"].delay_s == 300
    assert config.calling_hours.days == frozenset(range(7))
    assert config.calling_hours.default_timezone == "UTC"


def test_endpoint_for_a_new_region_makes_it_usable():
    config = build_config(
        minimal(
            api={"key_env": "K", "endpoints": {"ap": "https://ap.example.test/call"}},
            agents={"a": {"region": "ap", "rate": 1}},
        )
    )
    assert config.agents["a"].region == "ap"
    assert config.api.endpoints["eu"] == DEFAULT_ENDPOINTS["eu"]


def test_the_config_is_frozen():
    config = build_config(minimal())
    with pytest.raises(AttributeError):
        config.state_dir = Path("/elsewhere")
    with pytest.raises(TypeError):
        config.agents["b"] = config.agents["agent-a"]


# --- unknown keys, at every level ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"api": {"key_env": "K", "keyenv": "K"}}, "api.keyenv"),
        ({"agents": {"agent-a": {"region": "eu", "rate": 1, "rte": 3}}}, "agents.agent-a.rte"),
        ({"spool": {"dir": "/s", "mode": 1}}, "spool.mode"),
        ({"callbacks": {"listen": "127.0.0.1:1", "url": "x"}}, "callbacks.url"),
        ({"redial": {"busy": {"attempts": 2, "delay": 3}}}, "redial.busy.delay"),
        ({"redial": {"answered": {"attempts": 2}}}, "redial.answered"),
        ({"admin": {"listen": "127.0.0.1:2", "port": 3}}, "admin.port"),
        ({"calling_hours": {"start": "08:00", "end": "20:00", "tz": "UTC"}}, "calling_hours.tz"),
        ({"max_calls_per_number": {"count": 1, "per_s": 1, "per": 2}}, "max_calls_per_number.per"),
    ],
)
def test_unknown_keys_are_named_by_path(top, key):
    problems = problems_of(minimal(**top))
    assert f"{key}: unknown key" in problems


def test_several_problems_are_reported_together():
    problems = problems_of(
        {
            "api": {"key_env": "K", "timeout_s": -1},
            "agents": {
                "a": {"region": "mars", "rate": 2, "margin": 0.9},
                "b": {"region": "us"},
            },
            "default_agent": "nobody",
            "stdin": "maybe",
            "colour": "blue",
            "callbacks": {"listen": "nohost"},
        }
    )
    keys = keys_of(problems)
    for key in (
        "colour",
        "api.timeout_s",
        "agents.a.region",
        "agents.a.rate",
        "agents.a.margin",
        "agents.b.rate",
        "default_agent",
        "stdin",
        "callbacks.listen",
    ):
        assert key in keys, (key, problems)
    message = str(ConfigError(problems))
    assert "colour: unknown key" in message and "; " in message


def test_a_missing_agents_section_is_reported_along_with_other_problems():
    # Every problem at once: an unknown key must not hide that there are no agents.
    problems = problems_of({"api": {"key_env": "K"}, "colour": "blue"})
    assert "colour: unknown key" in problems
    assert "agents" in keys_of(problems), problems


def test_no_agents_is_refused():
    assert keys_of(problems_of({"api": {"key_env": "K"}})) == ["agents"]
    assert "agents" in keys_of(problems_of(minimal(agents={})))


@pytest.mark.parametrize("document", [None, [], "text", 3])
def test_the_document_must_be_a_mapping(document):
    assert problems_of(document)[0].startswith("(top)")


@pytest.mark.parametrize("section", ["api", "agents", "spool", "callbacks", "admin", "redial"])
def test_a_section_that_is_not_a_mapping(section):
    problems = problems_of(minimal(**{section: ["x"]}))
    assert f"{section}: must be a mapping" in problems


# --- agents --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1, 3, 5])
def test_approved_rates(rate):
    config = build_config(minimal(agents={"a": {"region": "us", "rate": rate}}))
    assert config.agents["a"].rate == rate
    assert isinstance(config.agents["a"].rate, int)


@pytest.mark.parametrize("rate", [0, 2, 4, 6, 10, -1, 1.5, "1", "fast", True, [1]])
def test_other_rates_are_refused(rate):
    problems = problems_of(minimal(agents={"a": {"region": "eu", "rate": rate}}))
    assert keys_of(problems) == ["agents.a.rate"]
    assert "1, 3, 5" in problems[0]


def test_rate_is_required():
    problems = problems_of(minimal(agents={"a": {"region": "eu"}}))
    assert problems == ["agents.a.rate: is required (1, 3 or 5)"]


def test_an_empty_rate_is_not_taken_as_1(tmp_path):
    # `rate:` with nothing after it is YAML null: the approved rate must not be guessed.
    problems = load_problems(
        tmp_path, "api: {key_env: K}\nagents:\n  a:\n    region: eu\n    rate:\n"
    )
    assert "agents.a.rate" in keys_of(problems)


@pytest.mark.parametrize("region", ["mars", "EU", "", 5, ["eu"]])
def test_bad_regions_are_refused(region):
    problems = problems_of(minimal(agents={"a": {"region": region, "rate": 1}}))
    assert set(keys_of(problems)) == {"agents.a.region"}


def test_region_is_required_and_the_message_lists_regions():
    problems = problems_of(minimal(agents={"a": {"rate": 1}}))
    assert problems == ["agents.a.region: is required (one of eu, us)"]
    problems = problems_of(minimal(agents={"a": {"region": "ap", "rate": 1}}))
    assert "eu" in problems[0] and "us" in problems[0] and "'ap'" in problems[0]


@pytest.mark.parametrize("margin", [0, 0.0, 0.03, 0.25, 0.49])
def test_margins_in_range(margin):
    config = build_config(minimal(agents={"a": {"region": "eu", "rate": 1, "margin": margin}}))
    assert config.agents["a"].margin == margin


@pytest.mark.parametrize("margin", [-0.01, 0.5, 1, 3, "3%", True])
def test_margins_out_of_range(margin):
    problems = problems_of(minimal(agents={"a": {"region": "eu", "rate": 1, "margin": margin}}))
    assert keys_of(problems) == ["agents.a.margin"]


def test_agent_numbers_are_normalised_and_unique():
    config = build_config(
        minimal(agents={"a": {"region": "eu", "rate": 1, "number": "+44 (0)7700-900.000"}})
    )
    assert config.agents["a"].number == "447700900000"  # as `from` is read: (0) dropped
    problems = problems_of(
        minimal(
            agents={
                "a": {"region": "eu", "rate": 1, "number": "447700900000"},
                "b": {"region": "eu", "rate": 1, "number": "+44 7700 900000"},
            },
            default_agent="a",
        )
    )
    assert problems == ["agents: number 447700900000 is given to more than one agent"]
    problems = problems_of(minimal(agents={"a": {"region": "eu", "rate": 1, "number": "call me"}}))
    assert keys_of(problems) == ["agents.a.number"]


def test_an_agent_number_that_reads_two_ways_is_refused():
    """Bare digits that are a national number of default_country and another country's valid
    number: requests' `from` would be matched against a number the operator may not mean."""
    agents = {"a": {"region": "eu", "rate": 1, "number": "447400123456"}}
    assert problems_of(minimal(agents=agents, default_country="DE")) == [
        "agents.a.number: '447400123456' reads as +49447400123456 (a national number of DE)"
        " and as +447400123456: write it with + and its country code"
    ]
    for country in (None, "GB"):  # one reading only
        config = build_config(minimal(agents=agents, default_country=country))
        assert config.agents["a"].number == "447400123456"
    agents["a"]["number"] = "+447400123456"
    assert build_config(minimal(agents=agents, default_country="DE")).agents["a"].number == (
        "447400123456"
    )


@pytest.mark.parametrize("agent_id", ["has space", "x" * 129, "slash/no", "tab\there"])
def test_bad_agent_ids(agent_id):
    problems = problems_of(minimal(agents={agent_id: {"region": "eu", "rate": 1}}))
    assert f"agents.{agent_id}" in keys_of(problems)


def test_agent_id_of_128_characters_is_fine():
    agent_id = "A.b_c:d-" * 16
    assert len(agent_id) == 128
    assert agent_id in build_config(minimal(agents={agent_id: {"region": "eu", "rate": 1}})).agents


def test_numeric_agent_ids_become_strings(tmp_path):
    config = load_text(tmp_path, "agents:\n  12345:\n    region: eu\n    rate: 1\n")
    assert list(config.agents) == ["12345"]
    assert config.default_agent == "12345"


# --- default_agent -------------------------------------------------------------------------------


def test_default_agent_is_implicit_with_one_agent():
    assert build_config(minimal()).default_agent == "agent-a"


def test_no_implicit_default_with_several_agents():
    config = build_config(
        minimal(agents={"a": {"region": "eu", "rate": 1}, "b": {"region": "us", "rate": 1}})
    )
    assert config.default_agent is None


def test_explicit_default_agent_among_several():
    config = build_config(
        minimal(
            agents={"a": {"region": "eu", "rate": 1}, "b": {"region": "us", "rate": 1}},
            default_agent="b",
        )
    )
    assert config.default_agent == "b"


@pytest.mark.parametrize("agents", [1, 2])
def test_default_agent_must_exist(agents):
    all_agents = {"a": {"region": "eu", "rate": 1}, "b": {"region": "us", "rate": 1}}
    chosen = dict(list(all_agents.items())[:agents])
    problems = problems_of(minimal(agents=chosen, default_agent="c"))
    assert problems == ["default_agent: 'c' is not under agents"]


def test_default_agent_must_be_a_string():
    assert keys_of(problems_of(minimal(default_agent=["agent-a"]))) == ["default_agent"]


# --- the API key ---------------------------------------------------------------------------------


def test_key_env(monkeypatch):
    api = build_config(minimal(api={"key_env": "DIALERD_TEST_KEY"})).api
    monkeypatch.setenv("DIALERD_TEST_KEY", "secret-1")
    assert read_api_key(api) == "secret-1"


@pytest.mark.parametrize("value", [None, ""])
def test_key_env_missing_or_empty(monkeypatch, value):
    api = build_config(minimal(api={"key_env": "DIALERD_TEST_KEY"})).api
    if value is None:
        monkeypatch.delenv("DIALERD_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("DIALERD_TEST_KEY", value)
    with pytest.raises(ConfigError) as caught:
        read_api_key(api)
    assert caught.value.problems == [
        "api.key_env: the environment variable DIALERD_TEST_KEY is not set"
    ]


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("  secret-1\n", "holds a space at character 1"),
        ("secret-1\n", "holds a line break at character 9"),  # no file: no newline to ignore
        ("secret\t1", "holds a tab at character 7"),
        ("   ", "holds a space at character 1"),
    ],
)
def test_key_env_with_white_space_is_refused_without_showing_the_key(monkeypatch, value, found):
    api = build_config(minimal(api={"key_env": "DIALERD_TEST_KEY"})).api
    monkeypatch.setenv("DIALERD_TEST_KEY", value)
    with pytest.raises(ConfigError) as caught:
        read_api_key(api)
    (problem,) = caught.value.problems
    assert problem.startswith("api.key_env: the environment variable DIALERD_TEST_KEY " + found)
    assert "secret" not in problem


def test_without_key_env_or_key_file_vgai_key_is_used(monkeypatch):
    api = build_config(minimal(api={})).api
    monkeypatch.setenv("VGAI_KEY", "from-default")
    assert read_api_key(api) == "from-default"
    monkeypatch.delenv("VGAI_KEY")
    with pytest.raises(ConfigError, match="VGAI_KEY"):
        read_api_key(api)


def test_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "vgai-key"
    key_file.write_text("file-secret\n")
    monkeypatch.setenv("VGAI_KEY", "env-secret")
    api = build_config(minimal(api={"key_file": str(key_file)})).api
    assert api.key_file == key_file and api.key_env is None
    assert read_api_key(api) == "file-secret"  # the file, not the environment


def test_key_file_missing(tmp_path):
    api = build_config(minimal(api={"key_file": str(tmp_path / "absent")})).api
    with pytest.raises(ConfigError) as caught:
        read_api_key(api)
    assert keys_of(caught.value.problems) == ["api.key_file"]
    assert "absent" in caught.value.problems[0]


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xff\xfe"])
def test_key_file_empty_or_unreadable(tmp_path, content):
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    api = build_config(minimal(api={"key_file": str(key_file)})).api
    with pytest.raises(ConfigError) as caught:
        read_api_key(api)
    assert keys_of(caught.value.problems) == ["api.key_file"]


KEY = "k3y-0123456789abcdef"


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (f"{KEY}\nsecond-line\n", "a line break at character 21 (it has 2 lines)"),
        (f"\n{KEY}\n", "a line break at character 1 (it has 2 lines)"),
        (f"{KEY}\n\n", "a line break at character 21 (it has 2 lines)"),
        (f"{KEY[:4]}\t{KEY[4:]}", "a tab at character 5"),
        (f"  {KEY}", "a space at character 1"),
        (f"{KEY}\r\n", "a carriage return at character 21"),
        (f"\ufeff{KEY}", "zero width no-break space (U+FEFF) at character 1"),
        (f"{KEY[:3]}\x1b{KEY[3:]}", "a control character (U+001B) at character 4"),
        (f"{KEY}\u00a0", "no-break space (U+00A0) at character 21"),
    ],
)
def test_key_file_with_white_space_or_control_characters_is_refused(tmp_path, content, found):
    key_file = tmp_path / "key"
    key_file.write_text(content, encoding="utf-8", newline="")
    api = build_config(minimal(api={"key_file": str(key_file)})).api
    with pytest.raises(ConfigError) as caught:
        read_api_key(api)
    (problem,) = caught.value.problems
    assert problem.startswith(f"api.key_file: {key_file} holds {found}; "), problem
    # Neither the key nor any piece of it that an operator could paste from a log.
    assert not any(KEY[i : i + 4] in problem for i in range(len(KEY) - 3)), problem
    assert "second" not in problem


def test_key_file_without_a_trailing_newline_is_taken_whole(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    assert read_api_key(build_config(minimal(api={"key_file": str(key_file)})).api) == KEY


def test_key_env_and_key_file_together_are_refused():
    problems = problems_of(minimal(api={"key_env": "K", "key_file": "/k"}))
    assert problems == ["api: set key_env or key_file, not both"]


def test_a_literal_key_is_refused_and_not_repeated():
    problems = problems_of(minimal(api={"key": "sk-very-secret"}))
    assert "api.key" in keys_of(problems)
    assert any("key_env" in p and "key_file" in p for p in problems)
    assert not any("sk-very-secret" in p for p in problems)


@pytest.mark.parametrize("api", [{"key_env": ""}, {"key_env": 5}, {"key_file": ""}])
def test_key_env_and_key_file_must_be_strings(api):
    assert keys_of(problems_of(minimal(api=api))) == [f"api.{next(iter(api))}"]


@pytest.mark.parametrize(
    ("api", "key"),
    [
        ({"timeout_s": 0}, "api.timeout_s"),
        ({"timeout_s": "15"}, "api.timeout_s"),
        ({"timeout_s": True}, "api.timeout_s"),
        ({"endpoints": {"eu": "ftp://x/y"}}, "api.endpoints.eu"),
        ({"endpoints": {"us": "not a url"}}, "api.endpoints.us"),
        ({"endpoints": "https://x"}, "api.endpoints"),
    ],
)
def test_bad_api_values(api, key):
    assert key in keys_of(problems_of(minimal(api={"key_env": "K", **api})))


# --- calling hours -------------------------------------------------------------------------------


def test_quoted_times_of_day(tmp_path):
    config = load_text(
        tmp_path,
        'agents: {a: {region: eu, rate: 1}}\ncalling_hours: {start: "22:00", end: "06:30"}\n',
    )
    assert config.calling_hours.start == dt.time(22, 0)
    assert config.calling_hours.end == dt.time(6, 30)  # across midnight is allowed


def test_unquoted_time_read_as_base_60_is_refused_with_the_fix(tmp_path):
    # YAML 1.1 reads an unquoted 21:00 as 21 * 60 = 1260 (and 8:00 as 480).
    assert yaml.safe_load("t: 21:00") == {"t": 1260}
    problems = load_problems(
        tmp_path,
        "agents: {a: {region: eu, rate: 1}}\ncalling_hours:\n  start: 8:00\n  end: 21:00\n",
    )
    start = next(p for p in problems if p.startswith("calling_hours.start: "))
    end = next(p for p in problems if p.startswith("calling_hours.end: "))
    assert "480" in start and '"08:00"' in start and "quote" in start
    assert "1260" in end and '"21:00"' in end and "quote" in end


def test_unquoted_08_00_is_a_string_in_pyyaml_and_understood(tmp_path):
    # A leading 0 keeps PyYAML from reading base 60: "08:00" arrives as text.
    config = load_text(
        tmp_path,
        'agents: {a: {region: eu, rate: 1}}\ncalling_hours: {start: 08:00, end: "20:00"}\n',
    )
    assert config.calling_hours.start == dt.time(8, 0)


def test_an_unquoted_time_gives_no_extra_problem(tmp_path):
    problems = load_problems(
        tmp_path, 'agents: {a: {region: eu, rate: 1}}\ncalling_hours: {start: 9:00, end: "00:00"}\n'
    )
    # start was unreadable, so comparing it with end says nothing useful.
    assert keys_of(problems) == ["calling_hours.start"], problems


@pytest.mark.parametrize("value", ["24:00", "8", "08:60", "8am", "", "08:00:00"])
def test_bad_times_of_day(value):
    problems = problems_of(minimal(calling_hours={"start": value, "end": "20:00"}))
    assert keys_of(problems) == ["calling_hours.start"]


def test_start_and_end_are_required_and_differ():
    problems = problems_of(minimal(calling_hours={"days": ["mon"]}))
    assert set(keys_of(problems)) == {"calling_hours.start", "calling_hours.end"}
    problems = problems_of(minimal(calling_hours={"start": "09:00", "end": "09:00"}))
    assert keys_of(problems) == ["calling_hours"]


@pytest.mark.parametrize("timezone", ["Mars/Olympus", "Europe", "../etc/passwd", "", 5, "/UTC"])
def test_bad_time_zones(timezone):
    problems = problems_of(
        minimal(calling_hours={"start": "09:00", "end": "17:00", "default_timezone": timezone})
    )
    assert keys_of(problems) == ["calling_hours.default_timezone"]


@pytest.mark.parametrize("days", [[], "mon", ["mon", "funday"], [1]])
def test_bad_days(days):
    problems = problems_of(minimal(calling_hours={"start": "09:00", "end": "17:00", "days": days}))
    assert keys_of(problems) == ["calling_hours.days"]


# --- listeners -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "many", 1e400])
def test_max_connections_must_be_a_positive_whole_number(value):
    problems = problems_of(minimal(callbacks={"max_connections": value}))
    assert keys_of(problems) == ["callbacks.max_connections"], problems


def test_a_change_of_max_connections_takes_a_restart():
    running = build_config(minimal(callbacks={}))
    new = build_config(minimal(callbacks={"max_connections": 512}))
    assert restart_needed(running, new) == ["callbacks.max_connections: a change takes a restart"]


def test_admin_and_callbacks_on_the_same_address_are_refused():
    problems = problems_of(
        minimal(callbacks={"listen": "127.0.0.1:8080"}, admin={"listen": "127.0.0.1:8080"})
    )
    assert keys_of(problems) == ["admin.listen"]
    assert "callbacks.listen" in problems[0]


def test_admin_on_the_default_callback_address_is_refused():
    problems = problems_of(minimal(callbacks={}, admin={"listen": "127.0.0.1:8080"}))
    assert keys_of(problems) == ["admin.listen"]


def test_admin_and_callbacks_overlapping_through_a_wildcard_are_refused():
    # 0.0.0.0:8080 takes 127.0.0.1:8080 as well: the admin listener could never bind.
    problems = problems_of(
        minimal(callbacks={"listen": "0.0.0.0:8080"}, admin={"listen": "127.0.0.1:8080"})
    )
    assert keys_of(problems) == ["admin.listen"]


def test_admin_and_callbacks_on_different_ports():
    config = build_config(
        minimal(callbacks={"listen": "0.0.0.0:8080"}, admin={"listen": "127.0.0.1:9090"})
    )
    assert config.callbacks.listen.port != config.admin.listen.port


@pytest.mark.parametrize("listen", ["8080", "host", "host:0", "host:65536", "host:http", 8080])
def test_bad_listen_addresses(listen):
    assert keys_of(problems_of(minimal(admin={"listen": listen}))) == ["admin.listen"]


def test_admin_token_file(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("t0ken-of-admin\n")
    admin = build_config(minimal(admin={"token_file": str(token_file)})).admin
    assert admin == AdminConfig(Listen("127.0.0.1", 9090), token_file=token_file)
    assert read_admin_token(admin) == "t0ken-of-admin"
    assert read_admin_token(build_config(minimal(admin={})).admin) is None
    assert read_admin_token(None) is None


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("\n", "is empty"),
        ("t0ken\nmore\n", "holds a line break at character 6 (it has 2 lines)"),
        ("t0ken \n", "holds a space at character 6"),
    ],
)
def test_a_bad_admin_token_file_is_named_without_the_token(tmp_path, content, found):
    token_file = tmp_path / "admin-token"
    if content is not None:
        token_file.write_text(content)
    admin = build_config(minimal(admin={"token_file": str(token_file)})).admin
    with pytest.raises(ConfigError) as caught:
        read_admin_token(admin)
    (problem,) = caught.value.problems
    assert problem.startswith("admin.token_file: ") and found in problem, problem
    assert "t0ken" not in problem and "more" not in problem


def test_a_new_admin_token_file_is_reloaded_a_new_admin_address_takes_a_restart(tmp_path):
    running = build_config(minimal(admin={"listen": "127.0.0.1:9090"}))
    rotated = build_config(minimal(admin={"listen": "127.0.0.1:9090", "token_file": "/t"}))
    moved = build_config(minimal(admin={"listen": "127.0.0.1:9091"}))
    assert restart_needed(running, rotated) == []
    assert restart_needed(running, moved) == ["admin.listen: a change takes a restart"]
    assert restart_needed(running, build_config(minimal())) == [
        "admin.listen: a change takes a restart"
    ]


def test_listen_without_host_is_loopback():
    admin = build_config(minimal(admin={"listen": ":9999"})).admin
    assert admin.listen == Listen("127.0.0.1", 9999)


@pytest.mark.parametrize("url", ["dialer.example.com", "ftp://dialer.example.com", ""])
def test_bad_public_url(url):
    problems = problems_of(minimal(callbacks={"public_url": url}))
    assert keys_of(problems) == ["callbacks.public_url"]


# --- the other keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [("auto", "auto"), (True, True), (False, False)])
def test_stdin_modes(raw, expected):
    stdin = build_config(minimal(stdin=raw)).stdin
    assert stdin == expected and type(stdin) is type(expected)


@pytest.mark.parametrize("raw", ["yes please", "AUTO", 1, 0, 2])
def test_bad_stdin_modes(raw):
    # 1 and 0 are not true/false: accepted, 1 would be read as "not a source" by the daemon.
    assert keys_of(problems_of(minimal(stdin=raw))) == ["stdin"]


def test_spool_needs_a_dir():
    assert keys_of(problems_of(minimal(spool={}))) == ["spool.dir"]
    assert keys_of(problems_of(minimal(spool={"dir": ""}))) == ["spool.dir"]


@pytest.mark.parametrize(
    ("state_dir", "spool_dir"),
    [
        ("/var/lib/dialerd", "/var/lib/dialerd"),
        ("/var/lib/dialerd", "/var/lib/dialerd/spool"),  # the state beside incoming/'s root
        ("/var/spool/dialerd/incoming", "/var/spool/dialerd"),  # the ledger taken as a spool file
        ("/var/lib/dialerd/", "/var/lib/./dialerd"),
    ],
)
def test_the_spool_and_the_state_are_apart(state_dir, spool_dir):
    problems = problems_of(minimal(state_dir=state_dir, spool={"dir": spool_dir}))
    assert keys_of(problems) == ["spool.dir"] and "state_dir" in problems[0]
    assert build_config(
        minimal(state_dir="/var/lib/dialerd", spool={"dir": "/var/lib/dialerd-spool"})
    )


@pytest.mark.parametrize(
    ("redial", "key"),
    [
        ({"busy": {"delay_s": 5}}, "redial.busy.attempts"),
        ({"busy": {"attempts": 0}}, "redial.busy.attempts"),
        ({"busy": {"attempts": 2.5}}, "redial.busy.attempts"),
        ({"busy": {"attempts": 2, "delay_s": -1}}, "redial.busy.delay_s"),
        ({"busy": 3}, "redial.busy"),
    ],
)
def test_bad_redial(redial, key):
    assert key in keys_of(problems_of(minimal(redial=redial)))


@pytest.mark.parametrize(
    ("cap", "key"),
    [
        ({"count": 3}, "max_calls_per_number.per_s"),
        ({"per_s": 60}, "max_calls_per_number.count"),
        ({"count": 0, "per_s": 60}, "max_calls_per_number.count"),
        ({"count": 1, "per_s": "day"}, "max_calls_per_number.per_s"),
    ],
)
def test_bad_cap(cap, key):
    assert key in keys_of(problems_of(minimal(max_calls_per_number=cap)))


@pytest.mark.parametrize("key", ["state_dir", "results", "dnc_file"])
def test_paths_must_be_non_empty_strings(key):
    assert keys_of(problems_of(minimal(**{key: ""}))) == [key]
    assert keys_of(problems_of(minimal(**{key: ["x"]}))) == [key]


# --- files ---------------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")
    assert caught.value.problems[0].startswith("(file): cannot read")


def test_load_config_bad_yaml_names_the_line(tmp_path):
    problems = load_problems(tmp_path, "api:\n  key_env: K\nagents: [\n")
    assert problems[0].startswith("(file): not valid YAML at line")


def test_load_config_not_utf8(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"agents:\n  \xff: {}\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path / "config.yaml")


def test_example_config_covers_every_key_and_is_valid():
    config = load_config(EXAMPLE)
    assert config.calling_hours is not None and config.max_calls_per_number is not None
    document = yaml.safe_load(EXAMPLE.read_text())
    assert set(document) >= SPEC_TOP_KEYS, SPEC_TOP_KEYS - set(document)
    assert set(document["api"]) >= {"key_env", "endpoints", "timeout_s"}
    assert "key_file" in EXAMPLE.read_text()  # shown, commented out
    agent = next(iter(document["agents"].values()))
    assert set(agent) == {"region", "rate", "number", "margin"}
    assert set(document["callbacks"]) == {"listen", "max_connections", "public_url", "wait_s"}
    assert set(document["calling_hours"]) >= {"start", "end", "days", "default_timezone"}
    assert config.state_dir == Path("/var/lib/dialerd")
    assert config.spool_dir == Path("/var/spool/dialerd")
    assert config.api.key_env == "VGAI_KEY"


# --- `dialerd check` -----------------------------------------------------------------------------


def test_check_ok(tmp_path):
    path = write_config(tmp_path)
    done = run_dialerd("check", "-c", str(path), timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == f"{path}: OK; agents: agent-a (eu, 5/s)"


def example_with_paths_in(tmp_path: Path, **changes: Any) -> Path:
    """config.example.yaml with its paths under tmp_path (and the dnc_file there), changed so."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["state_dir"] = str(tmp_path / "state")
    document["spool"]["dir"] = str(tmp_path / "spool")
    document["results"] = str(tmp_path / "state" / "results.jsonl")
    document["dnc_file"] = str(tmp_path / "dnc.txt")
    (tmp_path / "dnc.txt").write_text("+44 7700 900999\n")
    document.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_check_the_example_config_with_its_paths_made(tmp_path):
    done = run_dialerd("check", "-c", str(example_with_paths_in(tmp_path)), timeout=20)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout.decode()
    assert not (tmp_path / "state").exists()  # check makes nothing


def test_results_that_are_a_directory_are_refused_and_relative_paths_read_as_run_reads_them(
    tmp_path,
):
    (tmp_path / "a-directory").mkdir()
    config = example_with_paths_in(tmp_path, results=str(tmp_path / "a-directory"))
    done = run_dialerd("check", "-c", str(config), timeout=20)
    assert done.returncode == 78
    assert f"results: {tmp_path}/a-directory is not a regular file" in done.stderr.decode()
    # Relative to where it runs, results in a state_dir not made yet: made at start.
    relative = example_with_paths_in(tmp_path, state_dir="state", results="state/results.jsonl")
    done = run_dialerd("check", "-c", str(relative), timeout=20, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_what_run_needs_at_start_is_checked_by_its_key(tmp_path, command):
    """A config `check` accepts starts; one that cannot start says so by key, exit 78, which
    the unit does not restart (a restart every 5 s would mend nothing)."""
    (tmp_path / "a-file").write_text("")
    config = example_with_paths_in(
        tmp_path,
        dnc_file=str(tmp_path / "missing-dnc.txt"),
        state_dir=str(tmp_path / "a-file" / "state"),
        results=str(tmp_path / "no-such-dir" / "results.jsonl"),
    )
    done = run_dialerd(command, "-c", str(config), timeout=20)
    assert done.returncode == 78, done.stderr
    err = done.stderr.decode()
    assert (
        f"dnc_file: cannot read it: No such file or directory ({tmp_path}/missing-dnc.txt)" in err
    )
    state = tmp_path / "a-file" / "state"
    assert f"state_dir: {state} cannot be made: {tmp_path}/a-file is not a directory" in err
    assert f"results: {tmp_path}/no-such-dir is not a directory" in err


def test_check_uses_dialerd_config_from_the_environment(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path)
    monkeypatch.setenv("DIALERD_CONFIG", str(path))
    monkeypatch.setenv("VGAI_KEY", "k")
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: OK")


def test_check_bad_config_lists_every_problem(tmp_path):
    path = write_config(
        tmp_path,
        agents={"a": {"region": "mars", "rate": 2}},
        colour="blue",
    )
    done = run_dialerd("check", "-c", str(path), timeout=20)
    assert done.returncode == 78
    assert done.stdout == b""
    stderr = done.stderr.decode()
    for key in ("agents.a.region:", "agents.a.rate:", "colour: unknown key"):
        assert key in stderr
    assert "Traceback" not in stderr


def test_check_missing_key(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path)
    monkeypatch.delenv("VGAI_KEY", raising=False)
    assert main(["check", "-c", str(path)]) == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "api.key_env" in captured.err and "VGAI_KEY" in captured.err


def test_check_missing_file(tmp_path, capsys):
    assert main(["check", "-c", str(tmp_path / "absent.yaml")]) == 78
    assert "absent.yaml" in capsys.readouterr().err


def test_check_usage_error(capsys):
    assert main(["check", "--frobnicate"]) == 64
    assert "--frobnicate" in capsys.readouterr().err


def test_check_unquoted_time_tells_how_to_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VGAI_KEY", "k")
    path = tmp_path / "config.yaml"
    path.write_text(
        "agents: {a: {region: eu, rate: 1}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        'calling_hours: {start: 9:00, end: "17:00"}\n'
    )
    assert main(["check", "-c", str(path)]) == 78
    err = capsys.readouterr().err
    assert "calling_hours.start: was read as the number 540" in err
    assert '"09:00"' in err


def test_max_queue_s_defaults_to_five_days_and_must_be_positive():
    assert build_config(minimal()).max_queue_s == 432_000
    assert build_config(minimal(max_queue_s=3600)).max_queue_s == 3600
    for bad in (0, -1, "5d", True):
        assert keys_of(problems_of(minimal(max_queue_s=bad))) == ["max_queue_s"], bad
