"""Spool intake: files in incoming/ taken per second, and one file's pick-up latency when idle.

dialerd (`run --simulate`, one agent) starts on a spool already holding FILES one-request files;
the figure is the time from its start until incoming/ is empty (start-up included), with the
CPU time the process spent meanwhile (from /proc). Then, with the spool idle, single files are
renamed in one at a time and the time until each leaves incoming/ (its requests in the ledger)
is measured.
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

from .harness import child_env

FILES = 100_000
BACKLOG_DEADLINE_S = 600
IDLE_SAMPLES = 50


def _drop(incoming: Path, name: str, index: int) -> None:
    staged = incoming / f".{name}"
    staged.write_text(json.dumps({"to": f"+4477{index:08d}"}) + "\n")
    os.rename(staged, incoming / name)


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
        incoming = workdir / "spool" / "incoming"
        incoming.mkdir(parents=True)
        for index in range(FILES):
            _drop(incoming, f"f{index:06d}.json", index)
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump({
            "api": {"key_env": "VGAI_KEY"},
            "agents": {"a": {"region": "eu", "rate": 5}},
            "state_dir": str(workdir / "state"),
            "spool": {"dir": str(workdir / "spool")},
        }))  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "--simulate", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        try:
            backlog_s = _wait_empty(incoming, BACKLOG_DEADLINE_S)
            backlog_cpu_s = _cpu_s(process.pid)
            latencies = []
            for sample in range(IDLE_SAMPLES):
                time.sleep(0.05)
                started = time.perf_counter()
                _drop(incoming, f"idle{sample:03d}.json", FILES + sample)
                _wait_empty(incoming, 10)
                latencies.append(time.perf_counter() - started)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    latencies.sort()
    return [
        "Spool intake (`run --simulate`, one-request files):",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| {FILES:,} files waiting at start: taken in | {backlog_s:.1f} s "
        f"({FILES / backlog_s:,.0f} files/s) |",
        f"| dialerd CPU per file taken (start-up included) | "
        f"{backlog_cpu_s / FILES * 1e6:.0f} us |",
        f"| one file renamed into an idle spool, until it leaves incoming/: p50 / max of "
        f"{IDLE_SAMPLES} | {latencies[len(latencies) // 2] * 1000:.0f} / "
        f"{latencies[-1] * 1000:.0f} ms |",
    ]
