"""Shared fixtures and helpers: config files, simulators on 127.0.0.1 (in the test's loop or as
their own process), and the real dialerd process."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pg_server import fresh_schema, shared_server_dsn, skip_or_fail, unreachable_reason

from dialerd import clock
from dialerd.config import ClusterConfig
from dialerd.ledger import MIGRATIONS, SCHEMA, Ledger, connect, create_schema, postgres
from dialerd.simulator import Faults, Simulator

TEST_KEY = "test-key-not-secret"


@pytest.fixture(autouse=True)
def host_clock(monkeypatch):
    """Each test starts on this host's clock: a ledger opened on PostgreSQL makes the process
    follow the database's (clock.follow_database)."""
    monkeypatch.setattr(clock, "_database", None)


def write_config(tmp_path: Path, agents: dict[str, dict] | None = None, **top: Any) -> Path:
    """A config in tmp_path: the given agents (default one EU agent at rate 5) and top keys."""
    document = {
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5},
        "agents": agents or {"agent-a": {"region": "eu", "rate": 5}},
        "state_dir": str(tmp_path / "state"),
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    return lambda agents=None, **top: write_config(tmp_path, agents, **top)


@pytest.fixture
async def simulator_factory():
    """Start simulators on 127.0.0.1; all are stopped at the end of the test."""
    started: list[Simulator] = []

    async def start(agents: dict[str, int], faults: Faults | None = None, **kwargs) -> Simulator:
        simulator = Simulator(agents, faults=faults or Faults(), seed=1, **kwargs)
        await simulator.start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        await simulator.stop()


def dialerd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIALERD_", "VGAI_"))}
    # PYTHONFAULTHANDLER: a daemon that does not stop is made to say where it is (Daemon.stop).
    env.update({"VGAI_KEY": TEST_KEY, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}, **extra)
    return env


def dialerd(*args: str, **popen: Any) -> subprocess.Popen:
    """Start the real dialerd process (`python -m dialerd ARGS`)."""
    popen.setdefault("env", dialerd_env())
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "dialerd", *args], **popen)


def run_dialerd(
    *args: str, input: bytes | None = None, timeout: float = 60, **popen: Any
) -> subprocess.CompletedProcess:
    """Run dialerd to its end; stdin is `input` (or /dev/null)."""
    popen.setdefault("env", dialerd_env())
    return subprocess.run(
        [sys.executable, "-m", "dialerd", *args],
        input=input if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        **popen,
    )


def result_lines(text: bytes | str) -> list[dict]:
    if isinstance(text, bytes):
        text = text.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


REPO = Path(__file__).resolve().parent.parent
RESULT_KEYS = {
    "id", "to", "agent_id", "outcome", "attempts", "http_status", "conversation_uuid", "status",
    "error", "meta", "source", "campaign", "at",
}  # fmt: skip
NUMBER_OF_A = "447700900000"
AGENTS = {
    "agent-a": {"region": "eu", "rate": 5, "number": NUMBER_OF_A},
    "agent-b": {"region": "us", "rate": 5},
}
SIM_AGENTS = ("agent-a=5", "agent-b=5")

SUBMIT_AGENTS = {
    "agent-eu": {"region": "eu", "rate": 5, "number": "447700900000"},
    "agent-us": {"region": "us", "rate": 3},
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """For submit: a config with a spool, a default agent and the key in the environment; its
    path."""
    monkeypatch.setenv("VGAI_KEY", "k")
    monkeypatch.delenv("DIALERD_CONFIG", raising=False)
    return write_config(
        tmp_path, SUBMIT_AGENTS, default_agent="agent-eu", spool={"dir": str(tmp_path / "spool")}
    )


# -- the real processes: the simulator and dialerd ---------------------------------------


class SimulatorProcess:
    """`dialerd simulate` as its own process on a free port; one JSON line per arrival in `log`."""

    def __init__(self, directory: Path, agents: tuple[str, ...], *options: str):
        self.log = directory / f"simulator-{time.monotonic_ns()}.jsonl"
        self._stderr_path = self.log.with_suffix(".stderr")
        command = [
            sys.executable,
            "-m",
            "dialerd",
            "simulate",
            "--port",
            "0",
            "--seed",
            "7",
            "--log",
            str(self.log),
            *(f"--agent={agent}" for agent in agents),
            *options,
        ]
        if not any(option.startswith("--latency") for option in options):
            command += ["--latency", "0.05-0.2"]
        with open(self._stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            ready = wait_for(self._ready_line, 15, "the simulator to listen")
        except BaseException:
            self.stop()
            raise
        self.url = ready.group(1)

    def _ready_line(self) -> re.Match | None:
        text = self._stderr_path.read_text(errors="replace")
        if self.proc.poll() is not None:
            raise AssertionError(f"the simulator exited ({self.proc.returncode}): {text}")
        return re.search(r"simulator listening on (http://\S+)", text)

    def endpoints(self) -> dict[str, str]:
        return {region: f"{self.url}/{region}/telephony/make-call" for region in ("eu", "us")}

    def arrivals(self) -> list[dict]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def placed(self) -> Counter:
        """How many calls were placed per callee (`to`)."""
        return Counter(arrival["to"] for arrival in self.arrivals() if arrival["placed"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Callable[..., SimulatorProcess]]:
    """Start `dialerd simulate` processes (default: agent-a and agent-b at 5/s); stopped after."""
    started: list[SimulatorProcess] = []

    def start(*options: str, agents: tuple[str, ...] = SIM_AGENTS) -> SimulatorProcess:
        process = SimulatorProcess(tmp_path, agents, *options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def sim_config(tmp_path: Path, sim: SimulatorProcess, *, timeout_s: float = 5, **top: Any) -> Path:
    """A config with agent-a (EU, number NUMBER_OF_A) and agent-b (US) on the simulator."""
    api = {"key_env": "VGAI_KEY", "timeout_s": timeout_s, "endpoints": sim.endpoints()}
    top.setdefault("default_agent", "agent-a")
    return write_config(tmp_path, AGENTS, api=api, **top)


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `probe` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_results(path: Path) -> list[dict]:
    """The result lines written so far: a line the daemon is writing at this moment (no newline
    yet) is not one yet."""
    text = path.read_text() if path.exists() else ""
    return result_lines(text[: text.rfind("\n") + 1])


class Daemon:
    """`dialerd run` in the background, stdout and stderr in files, stopped at the end."""

    def __init__(
        self,
        directory: Path,
        *args: str,
        stdin: Any = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        name: str = "dialerd",
        journal: bool = False,
        **popen: Any,
    ):
        """`journal`: stderr stands for systemd's journal stream ($JOURNAL_STREAM names it);
        `popen`: more of subprocess.Popen's options (user, group, preexec_fn...)."""
        stamp = time.monotonic_ns()
        self.stdout_path = directory / f"{name}-{stamp}.stdout"
        self.stderr_path = directory / f"{name}-{stamp}.stderr"
        env = env or dialerd_env()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            if journal:
                status = os.fstat(err.fileno())
                env = {**env, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
            self.proc = dialerd("run", *args, stdin=stdin, stdout=out, stderr=err, env=env, **popen)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def wait_running(self, timeout: float = 15) -> None:
        """Until the daemon logs that it runs (its signal handlers are in place by then)."""

        def running() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dialerd exited ({self.proc.returncode}): {self.stderr}")
            return '"event": "running"' in self.stderr

        wait_for(running, timeout, "dialerd to run")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, float]:
        """Send the signal; return the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # the faulthandler prints every thread's stack
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self.kill()
            raise AssertionError(
                f"dialerd did not exit within {timeout} s of {signum}:\n{self.stderr[-6000:]}"
            ) from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start background daemons; any still running at the end is killed."""
    started: list[Daemon] = []

    def start(*args: str, **options: Any) -> Daemon:
        daemon = Daemon(tmp_path, *args, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def check_result_shape(result: dict) -> None:
    assert set(result) == RESULT_KEYS, result
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", result["at"]), result


def ledger_of_version(path: Path, version: int) -> sqlite3.Connection:
    """A ledger as the dialerd of schema `version` made it (its first `version` migrations), for
    a test to fill before the version of now upgrades it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    for number, migration in enumerate(MIGRATIONS[:version], 1):
        conn.executescript(migration) if isinstance(migration, str) else migration(conn)
        conn.execute(f"PRAGMA user_version = {number}")
    return conn


# -- the ledger on either engine ------------------------------------------------------------

BACKENDS = ("sqlite", "postgresql")


@functools.cache
def _shared_postgres_problem() -> str | None:
    return unreachable_reason(shared_server_dsn())


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh schema of its own on the shared PostgreSQL server, dropped after the test. Without
    a server the test fails in CI and is skipped, with the reason, elsewhere."""
    problem = _shared_postgres_problem()
    if problem is not None:
        skip_or_fail(problem)
    with fresh_schema(shared_server_dsn()) as dsn:
        yield dsn


def cluster_of(dsn: str, instance: str = "test-1", lease_s: float = 10.0) -> ClusterConfig:
    return ClusterConfig(dsn, instance, lease_s, None)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each test that asks for it runs on SQLite and on PostgreSQL."""
    return request.param


@pytest.fixture
def pg(pg_dsn: str) -> Iterator[postgres.PgConn]:
    """A connection to a new ledger on PostgreSQL, for what only cluster mode has."""
    conn = postgres.connect(pg_dsn)
    postgres.create_schema(conn)
    yield conn
    conn.close()


@pytest.fixture
def ledger_conn(backend: str, tmp_path: Path, request) -> Iterator[Any]:
    """A connection to a new ledger of the current schema, on the backend's engine."""
    if backend == "postgresql":
        yield request.getfixturevalue("pg")
        return
    conn = connect(tmp_path / "ledger.sqlite3")
    create_schema(conn)
    yield conn
    conn.close()


@pytest.fixture
def new_ledger(backend: str, tmp_path: Path, request) -> Callable[..., Ledger]:
    """Ledger(state_dir), on the backend's engine: the same ledger for every call in a test."""
    cluster = None if backend == "sqlite" else cluster_of(request.getfixturevalue("pg_dsn"))

    def make(state_dir: Path | None = None, **cluster_fields: Any) -> Ledger:
        given = cluster and dataclasses.replace(cluster, **cluster_fields)
        return Ledger(state_dir or tmp_path / "state", given)

    return make


@pytest.fixture
def ledger_where(backend: str, tmp_path: Path, request) -> tuple[Path, ClusterConfig | None]:
    """Where the command line's functions find the ledger_conn's ledger: (state_dir, cluster)."""
    if backend == "sqlite":
        return tmp_path, None
    return tmp_path, cluster_of(request.getfixturevalue("pg_dsn"))


def another_connection(conn: Any, tmp_path: Path) -> Any:
    """A second connection to ledger_conn's ledger, as another process would have."""
    if isinstance(conn, postgres.PgConn):
        return postgres.connect(conn.raw.info.dsn)
    return connect(tmp_path / "ledger.sqlite3")


@pytest.fixture
def sqlite_conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """For what only SQLite has: its query plans, its files, its older schema versions."""
    conn = connect(tmp_path / "ledger.sqlite3")
    create_schema(conn)
    yield conn
    conn.close()
