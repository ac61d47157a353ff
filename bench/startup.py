"""Start-up: `dialerd --help`, and READY with 1,000,000 requests queued in the ledger.

The ledger is filled by the daemon itself (the memory benchmark's intake: `run --simulate`, one
agent, stopped with SIGTERM once stdin is read); then the daemon is started again with
NOTIFY_SOCKET pointing at a socket of the benchmark's, and the figure is the time from its start
to READY=1. The same again on a copy of the ledger turned back into the first version of the
schema, so the first start after an upgrade, which brings the tables up to date, is timed too.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .harness import child_env
from .memory import ingest, state_dir

QUEUED = 1_000_000
HELP_RUNS = 5
READY_DEADLINE_S = 120
# What the first migration added, taken away again: the ledger as the first version left it.
FIRST_VERSION = """
DROP INDEX requests_expiring; DROP INDEX requests_held; DROP INDEX number_calls_by_number;
DROP INDEX number_calls_by_seq; DROP INDEX number_calls_by_age; DROP TABLE number_calls;
ALTER TABLE requests DROP COLUMN held; PRAGMA user_version = 0;
"""


def _help_seconds() -> list[float]:
    times = []
    for _ in range(HELP_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dialerd", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return times


def _config(workdir: Path, state: Path) -> Path:
    path = workdir / f"config-{state.name}.yaml"
    path.write_text(yaml.safe_dump({
        "api": {"key_env": "VGAI_KEY"},
        "agents": {"a": {"region": "eu", "rate": 5}},
        "state_dir": str(state),
        "results": str(workdir / "results.jsonl"),
        "stdin": False,
    }))  # fmt: skip
    return path


def _ready_seconds(workdir: Path, state: Path) -> float:
    """From the start of `dialerd run` to its READY=1 on the notify socket."""
    address = workdir / "notify.sock"
    address.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(address))
        notify.settimeout(READY_DEADLINE_S)
        env = {**child_env(), "NOTIFY_SOCKET": str(address)}
        started = time.perf_counter()
        command = [sys.executable, "-m", "dialerd", "run", "--simulate", "-c"]
        process = subprocess.Popen(
            [*command, str(_config(workdir, state))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            return time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def _queued(state: Path) -> int:
    conn = sqlite3.connect(state / "ledger.sqlite3")
    try:
        return conn.execute("SELECT count(*) FROM requests WHERE state = 'queued'").fetchone()[0]
    finally:
        conn.close()


def _as_first_version(state: Path, copy: Path) -> None:
    shutil.copytree(state, copy)
    conn = sqlite3.connect(copy / "ledger.sqlite3", isolation_level=None)
    try:
        conn.executescript(FIRST_VERSION)
    finally:
        conn.close()


def run() -> list[str]:
    helps = _help_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ingest(workdir, QUEUED)  # the daemon's own intake fills the ledger
        state, old = state_dir(workdir, QUEUED), workdir / "state-first-version"
        _as_first_version(state, old)
        queued = _queued(state)
        ready = [_ready_seconds(workdir, state) for _ in range(3)]
        upgraded = _ready_seconds(workdir, old)
    return [
        "Start-up:",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| `dialerd --help` ({HELP_RUNS} runs) | {min(helps):.2f}–{max(helps):.2f} s |",
        f"| READY with {queued:,} requests queued (3 starts) "
        f"| {min(ready):.2f}–{max(ready):.2f} s |",
        f"| READY with the same ledger in the first version's schema (the upgrade's first start) "
        f"| {upgraded:.2f} s |",
    ]
