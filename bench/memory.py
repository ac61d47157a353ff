"""Memory and ingest: 100,000 and 1,000,000 request lines on stdin, side by side.

dialerd (`run --simulate`, one agent at 5/s) reads the lines into its ledger; the figure is the
time from start to the "stdin ended" log line (every line committed) and the peak RSS of the
process, read from the kernel's accounting once it is stopped with SIGTERM. Flat memory means
the 1M run's peak is close to the 100k run's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .harness import child_env

SIZES = (100_000, 1_000_000)
DEADLINE_S = 600


def given_id(index: int) -> dict:
    """A request as an operator's script writes it: its own id, the number in E.164."""
    return {"id": f"r{index}", "to": f"+4477{index:08d}"}


def _lines(path: Path, count: int, request: Callable[[int], dict]) -> None:
    with open(path, "w") as lines:
        for index in range(count):
            lines.write(json.dumps(request(index)) + "\n")


def state_dir(workdir: Path, count: int) -> Path:
    return workdir / f"state-{count}"


def ingest(
    workdir: Path, count: int, request: Callable[[int], dict] = given_id, **top: object
) -> tuple[float, float]:
    """Seconds to commit `count` lines of `request(index)`, and peak RSS in MB, with `top`
    keys in the config; the ledger is left in state_dir(workdir, count)."""
    config = workdir / f"config-{count}.yaml"
    config.write_text(yaml.safe_dump({
        "api": {"key_env": "VGAI_KEY"},
        "agents": {"a": {"region": "eu", "rate": 5}},
        "state_dir": str(state_dir(workdir, count)),
        "results": str(workdir / f"results-{count}.jsonl"),
        **top,
    }))  # fmt: skip
    requests = workdir / f"requests-{count}.jsonl"
    _lines(requests, count, request)
    log = workdir / f"log-{count}.jsonl"
    with open(requests, "rb") as stdin, open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "--simulate", "-c", str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=child_env(),
        )
        ended = _wait_for_stdin_end(log, process)
        process.send_signal(signal.SIGTERM)
        _pid, _status, usage = os.wait4(process.pid, 0)
    return ended, usage.ru_maxrss / 1024


def _wait_for_stdin_end(log: Path, process: subprocess.Popen) -> float:
    """From the "running" line to the "stdin ended" line, by their timestamps."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and process.poll() is None:
        events = {}
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                events[event["event"]] = dt.datetime.fromisoformat(event["timestamp"])
        if "stdin ended" in events:
            return (events["stdin ended"] - events["running"]).total_seconds()
        time.sleep(0.2)
    raise RuntimeError("dialerd did not finish reading stdin")


def run() -> list[str]:
    table = [
        "Ingest from stdin into the ledger, and peak memory (`run --simulate`, one agent):",
        "",
        "| lines | seconds to commit all | lines/s | peak RSS |",
        "|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for count in SIZES:
            seconds, peak_mb = ingest(Path(tmp), count)
            table.append(
                f"| {count:,} | {seconds:.1f} | {count / seconds:,.0f} | {peak_mb:.0f} MB |"
            )
    return table
