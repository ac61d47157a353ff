"""Spool intake: files in incoming/ taken per second, and one file's latency when idle.

dialerd (two agents, on a `dialerd simulate` process) starts on a spool already holding FILES
one-request files for the first agent; the figure is the time from its start until incoming/
is empty (start-up included), with the CPU time the process spent meanwhile (from /proc). Then,
with the spool idle, single files for the second agent (idle itself: the backlog queues for the
first) are renamed in one at a time, more than an interval of its rate apart, and the time until
each leaves incoming/ (its request in the ledger) and until its call reaches the simulator is
measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .harness import child_env, simulator_process

FILES = 100_000
BACKLOG_DEADLINE_S = 600
IDLE_SAMPLES = 100
IDLE_GAP_S = 0.25  # between idle samples: more than an interval at 5/s, so none waits for pacing
SENT_DEADLINE_S = 10


def _drop(incoming: Path, name: str, index: int, agent: str = "a") -> None:
    staged = incoming / f".{name}"
    staged.write_text(json.dumps({"to": f"+4477{index:08d}", "agent_id": agent}) + "\n")
    os.rename(staged, incoming / name)


def _wait_sent(log: Path, to: str) -> float:
    """The wall time at which the simulator received the call to `to`."""
    deadline = time.monotonic() + SENT_DEADLINE_S
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.endswith("}") and (arrival := json.loads(line))["to"] == to:
                return arrival["wall"]
        time.sleep(0.002)
    raise RuntimeError(f"the call to {to} did not reach the simulator in time")


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99) - 1]
    return f"{p50 * 1000:.0f} / {p99 * 1000:.0f} / {ordered[-1] * 1000:.0f} ms"


def _wait_empty(incoming: Path, deadline_s: float) -> float:
    started = time.perf_counter()
    while any(not entry.name.startswith(".") for entry in os.scandir(incoming)):
        if time.perf_counter() - started > deadline_s:
            raise RuntimeError("the spool was not emptied in time")
        time.sleep(0.001)
    return time.perf_counter() - started


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of a running process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        log = workdir / "arrivals.jsonl"
        with simulator_process({"a": 5, "idle": 5}, log, latency="0.01-0.02") as url:
            return _measure(workdir, log, url)


def _measure(workdir: Path, log: Path, url: str) -> list[str]:
    incoming = workdir / "spool" / "incoming"
    incoming.mkdir(parents=True)
    for index in range(FILES):
        _drop(incoming, f"f{index:06d}.json", index)
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "api": {"key_env": "VGAI_KEY", "endpoints": {"eu": f"{url}/eu/telephony/make-call"}},
        "agents": {"a": {"region": "eu", "rate": 5}, "idle": {"region": "eu", "rate": 5}},
        "state_dir": str(workdir / "state"),
        "spool": {"dir": str(workdir / "spool")},
    }))  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    try:
        backlog_s = _wait_empty(incoming, BACKLOG_DEADLINE_S)
        backlog_cpu_s = _cpu_s(process.pid)
        taken, sent = [], []
        for sample in range(IDLE_SAMPLES):
            time.sleep(IDLE_GAP_S)
            index = FILES + sample
            renamed_at, started = time.time(), time.perf_counter()
            _drop(incoming, f"idle{sample:03d}.json", index, agent="idle")
            _wait_empty(incoming, SENT_DEADLINE_S)
            taken.append(time.perf_counter() - started)
            sent.append(_wait_sent(log, f"4477{index:08d}") - renamed_at)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return [
        "Spool intake (one-request files, two agents on a `dialerd simulate` process):",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| {FILES:,} files waiting at start: taken in | {backlog_s:.1f} s "
        f"({FILES / backlog_s:,.0f} files/s) |",
        f"| dialerd CPU per file taken (start-up included) | "
        f"{backlog_cpu_s / FILES * 1e6:.0f} us |",
        f"| one file renamed into an idle spool, until it leaves incoming/: p50 / p99 / max of "
        f"{IDLE_SAMPLES} | {_percentiles(taken)} |",
        f"| the same, until its call reaches the API: p50 / p99 / max | {_percentiles(sent)} |",
    ]
