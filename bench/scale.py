"""Scale: 200 agents x 5 calls/s from one dialerd process, against a bare aiohttp loop.

dialerd is fed 60 s of work for every agent on stdin and runs until all of it is final; the
simulator (its own process, 100-500 ms answers) accepts any agent at 5/s in a strict 1 s window.
Figures: each agent's achieved rate at the simulator, 429s, dialerd's CPU per send and peak RSS
(from the kernel's accounting of the child), and the same CPU figure for a bare aiohttp POST
loop against the same simulator in the same run: the floor any Python client pays.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from .harness import child_env, fidelity, read_arrivals, simulator_process

AGENTS = 200
RATE = 5
SECONDS = 60
FLOOR_POSTS = 5000


def _write_config(workdir: Path, base_url: str) -> Path:
    config = {
        "api": {"key_env": "VGAI_KEY", "endpoints": {"eu": f"{base_url}/eu/telephony/make-call"}},
        "agents": {f"agent-{n:03d}": {"region": "eu", "rate": RATE} for n in range(AGENTS)},
        "default_agent": "agent-000",
        "state_dir": str(workdir / "state"),
        "results": str(workdir / "results.jsonl"),
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _requests(path: Path) -> None:
    with open(path, "w") as lines:
        for index in range(RATE * SECONDS):
            for agent in range(AGENTS):
                number = f"+44770{agent:03d}{index:04d}"
                lines.write(json.dumps({"agent_id": f"agent-{agent:03d}", "to": number}) + "\n")


def _run_dialerd(config: Path, requests: Path) -> dict:
    started = time.perf_counter()
    with open(requests, "rb") as stdin:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        _pid, status, usage = os.wait4(process.pid, 0)
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "exit": os.waitstatus_to_exitcode(status),
    }


async def _bare_posts(url: str) -> float:
    """CPU seconds per POST of a plain aiohttp client, 50 in flight at a time."""
    body = {"agent_id": "floor", "to": "447700900000"}
    headers = {"X-Vgai-Key": "bench-key"}
    pending = iter(range(FLOOR_POSTS))
    before = resource.getrusage(resource.RUSAGE_SELF)

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in pending:
            async with http.post(url, json=body, headers=headers) as answer:
                await answer.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(50)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / FLOOR_POSTS


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        log = workdir / "arrivals.jsonl"
        _requests(workdir / "requests.jsonl")
        with simulator_process({}, log, "0.1-0.5", default_rate=RATE) as base_url:
            floor = asyncio.run(_bare_posts(f"{base_url}/eu/telephony/make-call"))
            config = _write_config(workdir, base_url)
            measured = _run_dialerd(config, workdir / "requests.jsonl")
        arrivals = read_arrivals(log)
    sends = AGENTS * RATE * SECONDS
    per_agent = [fidelity(arrivals.get(f"agent-{n:03d}", []), RATE) for n in range(AGENTS)]
    achieved = [figure.achieved for figure in per_agent]
    placed = sum(figure.placed for figure in per_agent)
    refused = sum(figure.refused_429 for figure in per_agent)
    cpu_per_send = measured["cpu_s"] / sends * 1000
    return [
        f"Scale: {AGENTS} agents x {RATE}/s = {AGENTS * RATE} sends/s for {SECONDS} s from one "
        "dialerd process (simulator in its own process, 100-500 ms answers):",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| calls placed / requested | {placed} / {sends} |",
        f"| 429s | {refused} |",
        f"| achieved rate per agent: min / median | {min(achieved):.3f} / "
        f"{statistics.median(achieved):.3f} |",
        f"| agents under 0.95 | {sum(1 for a in achieved if a < 0.95)} |",
        f"| dialerd CPU per send (ledger included) | {cpu_per_send:.3f} ms |",
        f"| bare aiohttp POST loop, CPU per POST (the floor) | {floor * 1000:.3f} ms |",
        f"| dialerd peak RSS | {measured['peak_rss_mb']:.0f} MB |",
        f"| dialerd wall time, exit code | {measured['wall_s']:.0f} s, {measured['exit']} |",
    ]
