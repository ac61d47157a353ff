"""Scale: 200 agents x 5 calls/s from one dialerd process, against a bare aiohttp loop.

dialerd is fed 60 s of work for every agent on stdin and runs until all of it is final; the
simulator (its own process, 100-500 ms answers) accepts any agent at 5/s in a strict 1 s window.
The simulator runs on one core and dialerd on the other (taskset), so neither starves the other.
Figures: each agent's achieved rate at the simulator, 429s, dialerd's CPU per send and peak RSS
(from the kernel's accounting of the child), and the same CPU figure for a bare aiohttp POST
loop against the same simulator in the same run, on dialerd's core: the floor any Python client
pays. dialerd runs under bench.traced, which keeps the moment each send left and the event
loop's lag: so dialerd's own spacing per agent is seen apart from the simulator's, and each 429
can be told to come from a departure too early or from an arrival stamped late.
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
from collections import defaultdict
from pathlib import Path

import aiohttp
import yaml

from dialerd.simulator import window_violations

from .harness import child_env, fidelity, read_arrivals, simulator_process

AGENTS = 200
RATE = 5
SECONDS = 60
FLOOR_POSTS = 5000
SIMULATOR_CPU, DIALERD_CPU = 0, 1


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


def _run_dialerd(config: Path, requests: Path, trace: Path) -> dict:
    started = time.perf_counter()
    with open(requests, "rb") as stdin:
        process = subprocess.Popen(
            ["taskset", "-c", str(DIALERD_CPU), sys.executable, "-m", "bench.traced", str(trace)]
            + ["--", "run", "-c", str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        _pid, status, usage = os.wait4(process.pid, 0)
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "system_s": usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "exit": os.waitstatus_to_exitcode(status),
    }


def _floor(url: str, loop_factory) -> float:
    """CPU seconds per POST of a plain aiohttp client, run on dialerd's core."""
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {DIALERD_CPU})
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_bare_posts(url))
    finally:
        os.sched_setaffinity(0, cores)


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


def _uvloop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _departures(trace: dict) -> dict[str, list[tuple[str, float, float, float]]]:
    """Per agent, its sends that were written: (to, the client's stamp, monotonic at the stamp,
    monotonic when the bytes were handed to the socket)."""
    by_agent = defaultdict(list)
    for agent, to, stamp, stamped_at, written_at in trace["departures"]:
        if written_at is not None and stamp is not None:
            by_agent[agent].append((to, stamp, stamped_at, written_at))
    return by_agent


def _min_spacing(times: list[float]) -> float:
    ordered = sorted(times)
    return min((b - a for a, b in zip(ordered, ordered[1:], strict=False)), default=0.0)


def _transit(departures: dict, arrivals: dict) -> list[float]:
    """Seconds from each send's write to the simulator's stamp of its arrival (the same clock:
    both are time.monotonic() on one machine), matched by agent, callee and order."""
    left = defaultdict(list)
    for agent, sends in departures.items():
        for to, _stamp, _stamped_at, written_at in sends:
            left[agent, to].append(written_at)
    transit = []
    for agent, seen in arrivals.items():
        came = defaultdict(list)
        for arrival in seen:
            came[agent, arrival["to"]].append(arrival["at"])
        for key, times in came.items():
            transit += [b - a for a, b in zip(left[key], times, strict=False)]
    return sorted(transit)


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _spread(ordered: list[float]) -> str:
    """p50 / p99 / max of sorted seconds, in milliseconds."""
    p50, p99 = _quantile(ordered, 0.5), _quantile(ordered, 0.99)
    return f"{p50 * 1000:.1f} / {p99 * 1000:.1f} / {ordered[-1] * 1000:.1f} ms"


def _departure_figures(trace: dict, arrivals: dict) -> list[str]:
    departures = _departures(trace)
    written = {agent: [sent[3] for sent in sends] for agent, sends in departures.items()}
    stamped = {agent: [sent[1] for sent in sends] for agent, sends in departures.items()}
    spacing = [_min_spacing(times) for times in written.values()]
    stamp_error = sorted(sent[2] - sent[1] for sends in departures.values() for sent in sends)
    write_delay = sorted(sent[3] - sent[2] for sends in departures.values() for sent in sends)
    over = sum(window_violations(times, RATE) for times in written.values())
    over_stamped = sum(window_violations(times, RATE) for times in stamped.values())
    lags = sorted(trace["lags"])
    return [
        f"| dialerd writes per agent: min spacing, min / median over agents | "
        f"{min(spacing) * 1000:.1f} / {statistics.median(spacing) * 1000:.1f} ms |",
        f"| dialerd sends over {RATE} in a 1 s window: as written / as stamped | "
        f"{over} / {over_stamped} |",
        f"| departure stamp behind the clock: p50 / p99 / max | {_spread(stamp_error)} |",
        f"| write after the stamp: p50 / p99 / max | {_spread(write_delay)} |",
        f"| write to the simulator's stamp: p50 / p99 / max | "
        f"{_spread(_transit(departures, arrivals))} |",
        f"| dialerd event-loop lag (10 ms ticks): p50 / p99 / max | {_spread(lags)} |",
        f"| dialerd full garbage collections: count, longest | {_collections(trace)} |",
    ]


def _collections(trace: dict) -> str:
    pauses = trace["full_collections"]
    return f"{len(pauses)}, {max(pauses, default=0.0) * 1000:.1f} ms"


def _simulator_figures(trace: dict) -> list[str]:
    return [
        f"| simulator event-loop lag (10 ms ticks): p50 / p99 / max | "
        f"{_spread(sorted(trace['lags']))} |",
        f"| simulator full garbage collections: count, longest | {_collections(trace)} |",
    ]


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        log = workdir / "arrivals.jsonl"
        _requests(workdir / "requests.jsonl")
        simulator_trace = workdir / "simulator-trace.json"
        simulator = simulator_process(
            {}, log, "0.1-0.5", default_rate=RATE, cpus=str(SIMULATOR_CPU), trace=simulator_trace
        )
        with simulator as base_url:
            url = f"{base_url}/eu/telephony/make-call"
            floor = _floor(url, None)
            floor_uvloop = _floor(url, _uvloop_factory())
            config = _write_config(workdir, base_url)
            measured = _run_dialerd(config, workdir / "requests.jsonl", workdir / "trace.json")
        arrivals = read_arrivals(log)
        trace = json.loads((workdir / "trace.json").read_text())
        simulator_figures = _simulator_figures(json.loads(simulator_trace.read_text()))
    arrivals.pop("floor", None)
    sends = AGENTS * RATE * SECONDS
    per_agent = [fidelity(arrivals.get(f"agent-{n:03d}", []), RATE) for n in range(AGENTS)]
    achieved = [figure.achieved for figure in per_agent]
    placed = sum(figure.placed for figure in per_agent)
    refused = sum(figure.refused_429 for figure in per_agent)
    cpu_per_send = measured["cpu_s"] / sends * 1000
    return [
        f"Scale: {AGENTS} agents x {RATE}/s = {AGENTS * RATE} sends/s for {SECONDS} s from one "
        "dialerd process (simulator in its own process on its own core, 100-500 ms answers):",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| calls placed / requested | {placed} / {sends} |",
        f"| 429s | {refused} |",
        f"| achieved rate per agent: min / median | {min(achieved):.3f} / "
        f"{statistics.median(achieved):.3f} |",
        f"| agents under 0.95 | {sum(1 for a in achieved if a < 0.95)} |",
        *_departure_figures(trace, arrivals),
        *simulator_figures,
        f"| dialerd CPU per send (ledger and intake included): all / in the kernel | "
        f"{cpu_per_send:.3f} / {measured['system_s'] / sends * 1000:.3f} ms |",
        f"| bare aiohttp POST loop, CPU per POST (the floor): asyncio / uvloop | "
        f"{floor * 1000:.3f} / {floor_uvloop * 1000:.3f} ms |",
        f"| dialerd peak RSS | {measured['peak_rss_mb']:.0f} MB |",
        f"| dialerd wall time, exit code | {measured['wall_s']:.0f} s, {measured['exit']} |",
    ]
