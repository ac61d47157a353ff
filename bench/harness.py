"""What the benchmarks share: the simulator as its own process, and reading its arrival log."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def simulator_process(
    agents: dict[str, int],
    log: Path,
    latency: str,
    default_rate: int | None = None,
    jitter: float = 0.0,
    cpus: str | None = None,
    trace: Path | None = None,
) -> Iterator[str]:
    """`dialerd simulate` on 127.0.0.1; yields its base URL, stops it at the end.

    `cpus`: the cores it may run on (taskset's list), so that it never takes another's.
    `trace`: run it under bench.traced, which writes its loop lag there at the end.
    """
    port = free_port()
    program = ["dialerd"] if trace is None else ["bench.traced", str(trace), "--"]
    command = [
        sys.executable,
        "-m",
        *program,
        "simulate",
        "--port",
        str(port),
        "--log",
        str(log),
        "--latency",
        latency,
        "--jitter",
        str(jitter),
    ]
    for agent_id, rate in agents.items():
        command += ["--agent", f"{agent_id}={rate}"]
    if default_rate is not None:
        command += ["--default-rate", str(default_rate)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if "listening" in line:
                break
            if not line and process.poll() is not None:
                raise RuntimeError("the simulator did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass(frozen=True)
class Fidelity:
    placed: int
    refused_429: int
    achieved: float  # placed calls per second at the server, divided by the rate


def read_arrivals(log: Path) -> dict[str, list[dict]]:
    by_agent: dict[str, list[dict]] = defaultdict(list)
    with open(log, encoding="utf-8") as lines:
        for line in lines:
            arrival = json.loads(line)
            by_agent[arrival["agent_id"]].append(arrival)
    return by_agent


def fidelity(arrivals: list[dict], rate: int) -> Fidelity:
    placed = sorted(a["at"] for a in arrivals if a["placed"])
    refused = sum(1 for a in arrivals if a["http_status"] == 429)
    span = placed[-1] - placed[0] if len(placed) > 1 else 0.0
    achieved = (len(placed) - 1) / span / rate if span else 0.0
    return Fidelity(len(placed), refused, achieved)


def child_env() -> dict[str, str]:
    return {**os.environ, "VGAI_KEY": "bench-key", "PYTHONUNBUFFERED": "1"}
