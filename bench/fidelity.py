"""Rate fidelity per tier: dialerd against two common clients, side by side in one run.

Every client dials its own agents on one simulator process that answers in 100-500 ms and
refuses (429) any call over the agent's rate in a strict sliding 1 s window. Figures are what the
simulator saw: placed calls per second divided by the rate, and 429s.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml
from aiolimiter import AsyncLimiter

from .harness import child_env, fidelity, read_arrivals, simulator_process

TIERS = (1, 3, 5)
SECONDS = 20  # of sending per tier and client
LATENCY = "0.1-0.5"
JITTER = 0.02  # each request reaches the API up to 20 ms late, at random
HEADERS = {"X-Vgai-Key": "bench-key", "Content-Type": "application/json"}


def _body(agent_id: str, index: int) -> dict:
    return {"agent_id": agent_id, "to": f"4477009{index:05d}"}


async def naive_sequential(url: str, agent_id: str, rate: int, count: int) -> None:
    """POST, wait for the answer, sleep 1/rate: the usual script."""
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            async with http.post(url, json=_body(agent_id, index), headers=HEADERS) as answer:
                await answer.read()
            await asyncio.sleep(1 / rate)


async def limiter_common_way(url: str, agent_id: str, rate: int, count: int) -> None:
    """AsyncLimiter(rate, 1) around concurrent sends, as its README suggests."""
    limiter = AsyncLimiter(rate, 1)
    async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as group:
        for index in range(count):
            async with limiter:
                group.create_task(_post(http, url, _body(agent_id, index)))


async def _post(http: aiohttp.ClientSession, url: str, body: dict) -> None:
    async with http.post(url, json=body, headers=HEADERS) as answer:
        await answer.read()


def _run_dialerd(workdir: Path, base_url: str) -> subprocess.Popen:
    agents = {f"dialerd-{rate}": {"region": "eu", "rate": rate} for rate in TIERS}
    config = {
        "api": {"key_env": "VGAI_KEY", "endpoints": {"eu": f"{base_url}/eu/telephony/make-call"}},
        "agents": agents,
        "default_agent": "dialerd-1",
        "state_dir": str(workdir / "state"),
        "results": str(workdir / "results.jsonl"),
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        json.dumps({"agent_id": agent_id, "to": f"+4477009{index:05d}"})
        for agent_id, agent in agents.items()
        for index in range(agent["rate"] * SECONDS)
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "dialerd", "run", "-c", str(workdir / "config.yaml")],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    process.stdin.write(("\n".join(lines) + "\n").encode())
    process.stdin.close()
    return process


async def _run_clients(base_url: str) -> None:
    url = f"{base_url}/eu/telephony/make-call"
    async with asyncio.TaskGroup() as group:
        for rate in TIERS:
            group.create_task(naive_sequential(url, f"naive-{rate}", rate, rate * SECONDS))
            group.create_task(limiter_common_way(url, f"limiter-{rate}", rate, rate * SECONDS))


def run() -> list[str]:
    """The fidelity table, as Markdown lines."""
    clients = ("dialerd", "naive", "limiter")
    agents = {f"{client}-{rate}": rate for client in clients for rate in TIERS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        log = workdir / "arrivals.jsonl"
        with simulator_process(agents, log, LATENCY, jitter=JITTER) as base_url:
            dialer = _run_dialerd(workdir, base_url)
            asyncio.run(_run_clients(base_url))
            dialer.wait(timeout=SECONDS * 4)
        arrivals = read_arrivals(log)
    names = {
        "dialerd": "dialerd",
        "naive": "naive sequential (POST, sleep 1/rate)",
        "limiter": "AsyncLimiter(rate, 1), the common way",
    }
    table = [
        f"Rate fidelity, {SECONDS} s of work per tier, API latency {LATENCY} s, arrival jitter "
        f"{JITTER * 1000:.0f} ms "
        "(achieved = placed calls/s at the simulator ÷ rate):",
        "",
        "| client | rate | placed | achieved | 429s |",
        "|---|---:|---:|---:|---:|",
    ]
    for client in clients:
        for rate in TIERS:
            figure = fidelity(arrivals.get(f"{client}-{rate}", []), rate)
            table.append(
                f"| {names[client]} | {rate}/s | {figure.placed} | "
                f"{figure.achieved:.3f} | {figure.refused_429} |"
            )
    return table
