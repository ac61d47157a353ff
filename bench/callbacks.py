"""Callbacks applied per second, with durable recording, and their latency.

The daemon's callback listener and a real ledger (synchronous commits) run in this process; a
child process POSTs one callback for each of N placed calls, CONCURRENCY at a time, and reports
each one's latency. Every callback ends its request `unanswered`: a full application, not a
lookup.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from dialerd.callbacks import CallbackListener, StatusUrls, load_secret
from dialerd.config import MAX_CONNECTIONS, Listen, build_config
from dialerd.ledger import Ledger
from dialerd.logs import configure
from dialerd.metrics import Metrics
from dialerd.request import build_request

from .harness import free_port

CALLS = 5000
CONCURRENCY = 64


async def _placed_calls(ledger: Ledger, urls: StatusUrls) -> list[tuple[str, str]]:
    """Each placed call's status_url and callee."""
    config = build_config({"agents": {"a": {"region": "eu", "rate": 5}}, "state_dir": "/"})
    requests = [
        build_request({"to": f"+4477009{index:05d}"}, config, f"bench:{index}")
        for index in range(CALLS)
    ]
    await ledger.add(requests, [], None, 0)
    calls = []
    for seq, request in enumerate(requests, 1):
        token, url = urls.new()
        await ledger.mark_sending(seq, token, 1)
        await ledger.placed(seq, token, time.time() + 600, {}, attempts=1, http_status=200)
        calls.append((url, request.to))
    return calls


async def _load(calls: list[tuple[str, str]]) -> dict:
    """The child's part: POST every call's callback, CONCURRENCY at a time; the time it took and
    each one's latency, in seconds."""
    latencies: list[float] = []
    pending = iter(calls)
    body = {
        "agent_id": "a",
        "conversation_uuid": "CON-1",
        "status": "busy",
        "timestamp": "2026-11-24T12:00:00Z",
    }

    async def worker(http: aiohttp.ClientSession) -> None:
        for url, to in pending:
            started = time.perf_counter()
            async with http.post(url, json={**body, "to": to}) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
        return {"elapsed": time.perf_counter() - started, "latencies": latencies}


async def _serve_and_measure(workdir: Path) -> dict:
    ledger = Ledger(workdir / "state")
    ledger.open()
    port = free_port()
    urls = StatusUrls(f"http://127.0.0.1:{port}", load_secret(ledger.state_dir))
    listener = CallbackListener(
        Listen("127.0.0.1", port),
        urls,
        ledger,
        dict,
        lambda effect, agent: None,
        Metrics(),
        max_connections=MAX_CONNECTIONS,
    )
    try:
        (workdir / "urls.json").write_text(json.dumps(await _placed_calls(ledger, urls)))
        await listener.start()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.callbacks",
            str(workdir / "urls.json"),
            stdout=subprocess.PIPE,
        )
        output, _ = await child.communicate()
        return json.loads(output)
    finally:
        await listener.stop()
        ledger.close()


def run() -> list[str]:
    configure("warning")  # a log line per callback would measure the terminal, not the daemon
    with tempfile.TemporaryDirectory() as tmp:
        measured = asyncio.run(_serve_and_measure(Path(tmp)))
    latencies = sorted(measured["latencies"])
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    rate = len(latencies) / measured["elapsed"]
    return [
        f"Callbacks: {CALLS} POSTed from another process, {CONCURRENCY} at a time, each applied "
        "and committed (synchronous=FULL) before its 200:",
        "",
        "| callbacks | applied/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|",
        f"| {len(latencies)} | {rate:,.0f} | {p50:.1f} | {p99:.1f} |",
    ]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_load(json.loads(Path(sys.argv[1]).read_text())))))
