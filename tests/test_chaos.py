"""Crash safety: the real `dialerd run` killed with SIGKILL at random moments and restarted over
the same state_dir, against `dialerd simulate` as its own process (SPEC §5, §6, §8.2, §8.3).

What a crash may cost, and nothing more: a send marked in the ledger just before the kill that
never reached the API ends `in_doubt` (at most one per agent per kill, since a lane marks one send
at most MARK_LEAD_S before its POST), and a result line written just before the kill may be
written again by the next run (the same line, verbatim). Nothing is lost, nothing is placed twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from conftest import SimulatorProcess, run_dialerd, wait_for

RATE = 5
AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d")  # 4 x 5/s = 20 calls per second in all
SIM_AGENTS = tuple(f"{agent}={RATE}" for agent in AGENTS)
LATENCY = "0.05-0.3"
IN_DOUBT_ERROR_PREFIX = "the daemon stopped while this send was in flight"
# A send is marked at most 50 ms before its POST, and an answer (latency <= 0.3 s) is committed
# in milliseconds: whatever a kill leaves in_doubt was marked or placed this long before it.
KILL_WINDOW_S = 2.0
FINISH_TIMEOUT_S = 60.0


# -- helpers ------------------------------------------------------------------------------------


def write_document(path: Path, tmp_path: Path, sim: SimulatorProcess, **top: Any) -> Path:
    """A config at `path` for AGENTS (EU and US alternately, RATE each) on the simulator."""
    document = {
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()},
        "agents": {
            agent: {"region": ("eu", "us")[index % 2], "rate": RATE}
            for index, agent in enumerate(AGENTS)
        },
        "default_agent": AGENTS[0],
        "state_dir": str(tmp_path / "state"),
        **top,
    }
    path.write_text(yaml.safe_dump(document))
    return path


def make_requests(prefix: str, count: int, first_number: int = 0) -> list[dict]:
    """`count` requests with distinct ids and numbers, spread over AGENTS."""
    return [
        {
            "id": f"{prefix}-{n}",
            "to": f"4477009{first_number + n:05d}",
            "agent_id": AGENTS[n % len(AGENTS)],
            "meta": {"n": n},
        }
        for n in range(count)
    ]


def jsonl(requests: list[dict]) -> bytes:
    return "".join(json.dumps(request) + "\n" for request in requests).encode()


def drop_spool_file(spool: Path, name: str, requests: list[dict]) -> None:
    """Write aside on the same filesystem, then rename into incoming/ as a writer must."""
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    aside = spool / f".writing-{name}"
    aside.write_bytes(jsonl(requests))
    os.rename(aside, incoming / name)


def status_json(config: Path) -> dict:
    run = run_dialerd("status", "-c", str(config), "--json", timeout=20)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout)


def open_count(report: dict) -> int:
    """Requests queued, in flight or awaiting a callback."""
    return sum(
        entry["queued"] + entry["in_flight"] + entry["awaiting_callback"]
        for entry in report["agents"].values()
    )


def known_count(report: dict) -> int:
    """Every request the ledger holds: open, or with a final outcome."""
    return open_count(report) + sum(report["outcomes"].values())


def ids_with_results(path: Path) -> set[str]:
    """Ids with a complete result line so far (the daemon may be writing the last one)."""
    if not path.exists():
        return set()
    ids = set()
    for text in path.read_text().split("\n")[:-1]:  # the part after the last newline is unfinished
        with contextlib.suppress(ValueError, KeyError):  # judged by final_results, at the end
            ids.add(json.loads(text)["id"])
    return ids


def final_results(path: Path) -> tuple[dict[str, dict], int]:
    """The one result per id, and how many lines repeated an earlier line verbatim.

    Fails on a line that is not a whole JSON result, and on two different lines for one id.
    """
    text = path.read_text()
    assert text.endswith("\n"), f"the results file ends in a torn line: {text[-200:]!r}"
    lines_by_id: dict[str, str] = {}
    results: dict[str, dict] = {}
    repeated = 0
    for number, line in enumerate(text.splitlines(), 1):
        try:
            result = json.loads(line)
        except ValueError:
            raise AssertionError(f"results line {number} is not JSON: {line!r}") from None
        earlier = lines_by_id.get(result["id"])
        if earlier is None:
            lines_by_id[result["id"]] = line
            results[result["id"]] = result
        elif earlier == line:  # written again after a kill before its outbox entry was deleted
            repeated += 1
        else:
            raise AssertionError(f"two different results for {result['id']}:\n{earlier}\n{line}")
    return results, repeated


def ledger_sent_at(state_dir: Path) -> dict[str, float | None]:
    """When each request was last marked as being sent (the daemon has stopped)."""
    conn = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, sent_at FROM requests"))
    finally:
        conn.close()


def wait_all_final(config: Path, results_path: Path, ids: set[str], daemon) -> dict:
    """Until every id has a result and the ledger has nothing open or unwritten; the status."""

    def done() -> dict | None:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"dialerd exited ({daemon.proc.returncode}): {daemon.stderr}")
        if not ids <= ids_with_results(results_path):
            return None
        report = status_json(config)
        return report if not open_count(report) and not report["results_unwritten"] else None

    return wait_for(done, FINISH_TIMEOUT_S, "every request to have its result")


def check_crash_outcomes(
    requests: list[dict],
    results_path: Path,
    state_dir: Path,
    sim: SimulatorProcess,
    kills: list[float],
) -> dict[str, int]:
    """Each request: exactly one final result, placed at most once, in_doubt only by a kill."""
    results, repeated = final_results(results_path)
    by_id = {request["id"]: request for request in requests}
    assert set(results) == set(by_id), (
        f"missing: {sorted(set(by_id) - set(results))[:10]}, "
        f"unknown: {sorted(set(results) - set(by_id))[:10]}"
    )
    for id_, result in results.items():
        assert result["to"] == by_id[id_]["to"] and result["meta"] == by_id[id_]["meta"], result
        assert result["outcome"] in ("dialed", "in_doubt"), result

    arrivals = sim.arrivals()
    placed = [arrival for arrival in arrivals if arrival["placed"]]
    placed_count = Counter(arrival["to"] for arrival in placed)
    twice = {to: count for to, count in placed_count.items() if count > 1}
    assert not twice, f"placed more than once: {twice}"
    placed_at = {arrival["to"]: arrival for arrival in placed}
    known_numbers = {request["to"] for request in requests}
    assert set(placed_at) <= known_numbers, set(placed_at) - known_numbers

    sent_at = ledger_sent_at(state_dir)
    in_doubt_placed = in_doubt_unplaced = 0
    unplaced_per_kill: Counter[int] = Counter()
    for id_, result in results.items():
        arrival = placed_at.get(result["to"])
        if result["outcome"] == "dialed":
            assert arrival is not None, f"dialed but never placed: {result}"
            assert result["attempts"] == 1 and result["http_status"] == 200, result
            assert result["conversation_uuid"] == arrival["conversation_uuid"], (result, arrival)
            continue
        # in_doubt: only a send that was in flight at a kill, never resent.
        assert result["attempts"] == 0, result
        assert result["error"].startswith(IN_DOUBT_ERROR_PREFIX), result
        marked = sent_at[id_]
        assert marked is not None, f"in_doubt but never marked as sent: {result}"
        # The kill that cut it off: the first one after it was marked.
        kill = next((k for k, at in enumerate(kills) if at >= marked), None)
        assert kill is not None and kills[kill] - marked <= KILL_WINDOW_S, (
            f"in_doubt, but marked at {marked} and the kills were at {kills}: {result}"
        )
        if arrival is not None:
            in_doubt_placed += 1
            assert kills[kill] - KILL_WINDOW_S <= arrival["wall"] <= kills[kill] + 0.5, (
                arrival,
                kills,
            )
        else:
            in_doubt_unplaced += 1
            unplaced_per_kill[kill] += 1
    # A lane marks one send at a time, at most MARK_LEAD_S before its POST.
    assert max(unplaced_per_kill.values(), default=0) <= len(AGENTS), unplaced_per_kill
    return {
        "requests": len(requests),
        "kills": len(kills),
        "dialed": sum(1 for r in results.values() if r["outcome"] == "dialed"),
        "in_doubt_placed": in_doubt_placed,
        "in_doubt_unplaced": in_doubt_unplaced,
        "repeated_result_lines": repeated,
        "arrivals": len(arrivals),
        "http_429": sum(1 for arrival in arrivals if arrival["http_status"] == 429),
        "min_restart_gap_ms": min_restart_gap_ms(arrivals, kills),
    }


def min_restart_gap_ms(arrivals: list[dict], kills: list[float]) -> int | None:
    """The shortest time from a kill to the next run's first send (as the simulator saw it)."""
    gaps = []
    for kill in kills:
        after = [arrival["wall"] for arrival in arrivals if arrival["wall"] > kill + 0.05]
        if after:
            gaps.append(min(after) - kill)
    return round(min(gaps) * 1000) if gaps else None


# -- the tests ----------------------------------------------------------------------------------

SPOOL_REQUESTS = 400
SPOOL_FILES = 4
KILLS = 6


def test_kill_9_at_random_moments_loses_nothing_and_places_nothing_twice(
    tmp_path, simulator, daemons
):
    started = time.monotonic()
    sim = simulator("--latency", LATENCY, agents=SIM_AGENTS)
    spool = tmp_path / "spool"
    config = write_document(tmp_path / "config.yaml", tmp_path, sim, spool={"dir": str(spool)})
    requests = make_requests("k", SPOOL_REQUESTS)
    per_file = SPOOL_REQUESTS // SPOOL_FILES
    for index in range(SPOOL_FILES):
        drop_spool_file(spool, f"batch-{index}.jsonl", requests[index * per_file :][:per_file])
    rng = random.Random(20261124)

    kills: list[float] = []
    kills_in_start_up = 0
    for _ in range(KILLS):
        daemon = daemons("-c", str(config))
        time.sleep(rng.uniform(0.3, 3.0))  # from start-up to full speed
        assert daemon.proc.poll() is None, f"dialerd exited early: {daemon.stderr}"
        kills.append(time.time())
        daemon.kill()
        assert daemon.proc.returncode == -9
        kills_in_start_up += '"event": "running"' not in daemon.stderr
        assert "Traceback" not in daemon.stderr, daemon.stderr

    last = daemons("-c", str(config))
    report = wait_all_final(
        config,
        tmp_path / "state" / "results.jsonl",
        {request["id"] for request in requests},
        last,
    )
    code, _took = last.stop()
    assert code == 0, last.stderr
    assert "Traceback" not in last.stderr, last.stderr

    assert sorted(os.listdir(spool / "incoming")) == []
    assert sorted(name for name in os.listdir(spool / "done") if name.endswith(".jsonl")) == [
        f"batch-{index}.jsonl" for index in range(SPOOL_FILES)
    ]
    figures = check_crash_outcomes(
        requests, tmp_path / "state" / "results.jsonl", tmp_path / "state", sim, kills
    )
    assert sum(report["outcomes"].values()) == SPOOL_REQUESTS, report
    assert figures["kills"] >= 5
    figures["kills_in_start_up"] = kills_in_start_up
    print(f"\nkill -9 figures: {figures}, {time.monotonic() - started:.1f} s")


STDIN_REQUESTS = 300


def stdin_configs(tmp_path: Path, sim: SimulatorProcess) -> tuple[Path, Path, Path]:
    """A stdin-only config, the same with a spool (for a run that keeps going), the results."""
    results = tmp_path / "results.jsonl"  # one file for both runs
    piped = write_document(tmp_path / "piped.yaml", tmp_path, sim, results=str(results))
    resumed = write_document(
        tmp_path / "resumed.yaml",
        tmp_path,
        sim,
        results=str(results),
        spool={"dir": str(tmp_path / "spool")},
    )
    return piped, resumed, results


def resume_and_check(
    tmp_path: Path, daemons, sim, config: Path, results: Path, requests, kills
) -> dict:
    """Restart over the same state_dir until every request is final; check the outcomes."""
    daemon = daemons("-c", str(config))  # stdin /dev/null, a spool: runs until SIGTERM
    wait_all_final(config, results, {request["id"] for request in requests}, daemon)
    code, _took = daemon.stop()
    assert code == 0, daemon.stderr
    assert "Traceback" not in daemon.stderr, daemon.stderr
    return check_crash_outcomes(requests, results, tmp_path / "state", sim, kills)


def test_piped_requests_committed_before_a_kill_9_are_resumed_by_the_next_run(
    tmp_path, simulator, daemons
):
    started = time.monotonic()
    sim = simulator("--latency", LATENCY, agents=SIM_AGENTS)
    piped, resumed, results = stdin_configs(tmp_path, sim)
    requests = make_requests("p", STDIN_REQUESTS)

    daemon = daemons("-c", str(piped), stdin=subprocess.PIPE)
    daemon.proc.stdin.write(jsonl(requests))  # 300 short lines: fits in the pipe's buffer
    daemon.proc.stdin.flush()  # and stdin stays open: only the kill ends this run
    time.sleep(random.Random(7).uniform(1.0, 2.0))
    assert daemon.proc.poll() is None, f"dialerd exited early: {daemon.stderr}"
    kills = [time.time()]
    daemon.kill()

    # Everything it read more than a second ago is in the ledger, whether sent yet or not.
    after_kill = status_json(piped)
    assert known_count(after_kill) == STDIN_REQUESTS, after_kill
    assert open_count(after_kill) > 0, "the kill came too late to leave work for the next run"
    figures = resume_and_check(tmp_path, daemons, sim, resumed, results, requests, kills)
    figures["open_at_kill"] = open_count(after_kill)
    print(f"\nstdin kill -9 figures: {figures}, {time.monotonic() - started:.1f} s")


def test_lines_read_slowly_are_committed_before_a_kill_9(tmp_path, simulator, daemons):
    sim = simulator("--latency", LATENCY, agents=SIM_AGENTS)
    piped, resumed, results = stdin_configs(tmp_path, sim)
    requests = make_requests("slow", 20, first_number=500)

    daemon = daemons("-c", str(piped), stdin=subprocess.PIPE)
    daemon.wait_running()
    for request in requests:
        daemon.proc.stdin.write(jsonl([request]))
        daemon.proc.stdin.flush()
        time.sleep(0.02)
    time.sleep(0.5)
    kills = [time.time()]
    daemon.kill()

    after_kill = status_json(piped)
    assert known_count(after_kill) == len(requests), after_kill
    figures = resume_and_check(tmp_path, daemons, sim, resumed, results, requests, kills)
    print(f"\nslow stdin kill -9 figures: {figures}")
