"""`dialerd cancel --campaign` of 100,000 queued requests while two agents send at 5/s and 3/s.

The daemon runs on the simulator (answers in 100-500 ms) with its spool; each agent has priority-9
work of its own for the whole run, and agent-a has 100,000 more of campaign "drop" queued behind
it (priority 0). The cancel runs as an operator would run it, from the command line; measured:
how long the command takes, how long until the last `cancelled` line is in the results file,
and each agent's achieved rate at the simulator (placed/s over its rate) in the seconds before
the cancel and while it runs, side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .harness import child_env, simulator_process

QUEUED = 100_000
RATES = {"agent-a": 5, "agent-b": 3}
BEFORE_S = 20.0  # the window before the cancel, measured as the baseline
WORK_S = 120  # of priority-9 work per agent: longer than the run
DEADLINE_S = 300


def _config(directory: Path, endpoint: str) -> Path:
    document = {
        "api": {"key_env": "VGAI_KEY", "endpoints": {"eu": f"{endpoint}/eu/telephony/make-call"}},
        "agents": {agent: {"region": "eu", "rate": rate} for agent, rate in RATES.items()},
        "state_dir": str(directory / "state"),
        "spool": {"dir": str(directory / "spool")},
        "stdin": False,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _drop(spool: Path, name: str, lines: list[dict]) -> None:
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    aside = spool / f".{name}"
    aside.write_text("".join(json.dumps(line) + "\n" for line in lines))
    aside.rename(incoming / name)


def _work() -> list[dict]:
    lines = []
    for index, (agent, rate) in enumerate(RATES.items()):
        lines += [
            {"to": f"+4477{index}{n:07d}", "agent_id": agent, "priority": 9, "campaign": "keep"}
            for n in range(rate * WORK_S)
        ]
    return lines + [
        {"to": f"+44779{n:07d}", "agent_id": "agent-a", "campaign": "drop"} for n in range(QUEUED)
    ]


def _status(config: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "dialerd", "status", "--json", "-c", str(config)],
        capture_output=True, env=child_env(), timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def _cancelled(results: Path) -> int:
    if not results.exists():
        return 0
    return results.read_bytes().count(b'"outcome": "cancelled"')


def _achieved(log: Path, agent: str, start: float, end: float) -> tuple[float, int]:
    """(placed per second over the agent's rate, 429s) at the simulator between two moments."""
    placed = refused = 0
    with open(log, encoding="utf-8") as lines:
        for line in lines:
            arrival = json.loads(line)
            if arrival["agent_id"] != agent or not start <= arrival["wall"] < end:
                continue
            placed += arrival["placed"]
            refused += arrival["http_status"] == 429
    return placed / (end - start) / RATES[agent], refused


def run() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="dialerd-bench-control-") as name:
        directory = Path(name)
        log = directory / "arrivals.jsonl"
        with simulator_process(RATES, log, "0.1-0.5") as endpoint:
            config = _config(directory, endpoint)
            daemon = subprocess.Popen(
                [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
                env=child_env(), stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                return _measure(directory, config)
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)


def _measure(directory: Path, config: Path) -> list[str]:
    _drop(directory / "spool", "work.jsonl", _work())
    deadline = time.monotonic() + DEADLINE_S
    while _status(config).get("campaigns", {}).get("drop", {}).get("queued", 0) < QUEUED:
        assert time.monotonic() < deadline, "the work was not taken in"
        time.sleep(1)
    time.sleep(BEFORE_S)
    before_end = started = time.time()
    command = subprocess.run(
        [sys.executable, "-m", "dialerd", "cancel", "--campaign", "drop", "-c", str(config)],
        capture_output=True, env=child_env(), timeout=DEADLINE_S, check=True,
    )  # fmt: skip
    command_s = time.time() - started
    results = directory / "state" / "results.jsonl"
    while _cancelled(results) < QUEUED:
        assert time.monotonic() < deadline, "the cancelled results were not all written"
        time.sleep(0.1)
    final_s = time.time() - started
    end = max(time.time(), started + 5.0)
    rows = [
        f"`dialerd cancel --campaign` of {QUEUED:,} queued: the command took {command_s:.1f} s,"
        f" the last `cancelled` result was written {final_s:.1f} s after it began.",
        "",
        "| agent | rate | achieved before | achieved during | 429s |",
        "|---|---:|---:|---:|---:|",
    ]
    for agent, rate in RATES.items():
        before, _ = _achieved(directory / "arrivals.jsonl", agent, before_end - BEFORE_S, started)
        during, refused = _achieved(directory / "arrivals.jsonl", agent, started, end)
        rows.append(f"| {agent} | {rate}/s | {before:.3f} | {during:.3f} | {refused} |")
    rows.append(f"\n`dialerd cancel` printed: {command.stdout.decode().strip()}")
    return rows
