"""The operator's levers on a running daemon: SIGHUP reload, a forcing second SIGINT, requeue."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import sqlite3
import time
from collections import Counter

import yaml
from conftest import AGENTS, read_results, run_dialerd, sim_config, wait_for

FAST = ("--latency", "0.01-0.03")


def spool_file(tmp_path, name: str, requests: list[dict]) -> None:
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    staged = tmp_path / f".{name}"
    staged.write_text("".join(json.dumps(request) + "\n" for request in requests))
    staged.rename(incoming / name)


def rewrite(config, **changes) -> None:
    document = yaml.safe_load(config.read_text())
    document.update(changes)
    config.write_text(yaml.safe_dump(document))


def outcomes(results_path) -> Counter:
    return Counter(result["outcome"] for result in read_results(results_path))


def test_sighup_applies_new_rates_and_agents_and_refuses_a_bad_config(tmp_path, simulator, daemons):
    sim = simulator(*FAST, "--agent=agent-c=5")
    slow = {"agent-a": {**AGENTS["agent-a"], "rate": 1}}
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")})
    rewrite(config, agents=slow)
    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    spool_file(
        tmp_path, "a.jsonl", [{"id": f"a{n}", "to": f"+4477009001{n:02d}"} for n in range(12)]
    )
    wait_for(lambda: len(read_results(results)) >= 2, 15, "the first calls at 1/s")

    faster = {**slow, "agent-a": {**slow["agent-a"], "rate": 5}, "agent-c": AGENTS["agent-b"]}
    rewrite(config, agents=faster)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"event": "reloaded"' in daemon.stderr, 10, "the reload")
    spool_file(tmp_path, "c.jsonl", [{"id": f"c{n}", "to": f"+4477009002{n:02d}",
                                      "agent_id": "agent-c"} for n in range(5)])  # fmt: skip
    wait_for(lambda: outcomes(results)["dialed"] == 17, 20, "every call, the new agent's too")

    placed_a = sorted(a["at"] for a in sim.arrivals() if a["placed"] and a["agent_id"] == "agent-a")
    gaps = [later - earlier for earlier, later in zip(placed_a, placed_a[1:], strict=False)]
    assert max(gaps) > 0.9, "the first calls went at 1/s"
    assert min(gaps[-5:]) < 0.5, "after the reload agent-a sends at 5/s"
    assert sim.placed().most_common(1)[0][1] == 1, "nothing placed twice across the reload"
    assert sum(a["placed"] for a in sim.arrivals() if a["http_status"] == 429) == 0

    config.write_text("agents: [\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.stderr, 10, "the refusal")
    assert "not valid YAML" in daemon.stderr
    spool_file(tmp_path, "d.jsonl", [{"id": "d1", "to": "+447700900301", "agent_id": "agent-c"}])
    wait_for(lambda: outcomes(results)["dialed"] == 18, 10, "a call under the kept config")
    assert daemon.stop()[0] == 0


def test_an_agent_removed_by_a_reload_keeps_its_requests_queued(tmp_path, simulator, daemons):
    sim = simulator(*FAST)
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")})
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    spool_file(tmp_path, "b.jsonl", [{"id": "b1", "to": "+447700900402", "agent_id": "agent-b",
                                      "not_before": soon}])  # fmt: skip
    results = tmp_path / "state" / "results.jsonl"
    status = lambda: json.loads(run_dialerd("status", "--json", "-c", str(config)).stdout)  # noqa: E731
    wait_for(lambda: status()["agents"].get("agent-b", {}).get("queued") == 1, 10, "b1 queued")
    rewrite(config, agents={"agent-a": AGENTS["agent-a"]})
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"event": "reloaded"' in daemon.stderr, 10, "the reload")
    spool_file(tmp_path, "a.jsonl", [{"id": "a1", "to": "+447700900401"}])
    wait_for(lambda: outcomes(results)["dialed"] == 1, 10, "agent-a's call")
    time.sleep(2)  # past b1's not_before
    assert status()["agents"]["agent-b"]["queued"] == 1, "kept in the ledger, not lost"
    assert daemon.stop()[0] == 0
    assert [arrival["agent_id"] for arrival in sim.arrivals()] == ["agent-a"]
    said = [json.loads(line) for line in daemon.stderr.splitlines() if "not in the config" in line]
    assert [(w["level"], w["agent"], w["queued"]) for w in said] == [("warning", "agent-b", 1)]


def test_a_second_sigint_forces_the_exit_and_the_send_ends_in_doubt(tmp_path, simulator, daemons):
    sim = simulator("--hang-rate", "1")
    config = sim_config(tmp_path, sim, timeout_s=30, spool={"dir": str(tmp_path / "spool")})
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    spool_file(tmp_path, "a.jsonl", [{"id": "hangs", "to": "+447700900501"}])
    wait_for(lambda: sim.arrivals(), 10, "the send to hang at the API")
    daemon.proc.send_signal(signal.SIGINT)
    wait_for(lambda: '"reason": "SIGINT"' in daemon.stderr, 5, "the first SIGINT")
    code, seconds = daemon.stop(signal.SIGINT, timeout=5)
    assert code == 130 and seconds < 2, "the drain would have waited up to 30 s"

    status = run_dialerd("status", "--json", "-c", str(config))
    assert json.loads(status.stdout)["agents"]["agent-a"]["in_flight"] == 1
    restarted = daemons("-c", str(config))
    restarted.wait_running()
    results = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: outcomes(results)["in_doubt"] == 1, 10, "the parked send to be in_doubt")
    assert len(sim.arrivals()) == 1, "an in_doubt send is never resent"


def test_requeue_resends_in_doubt_requests_once_and_only_them(tmp_path, simulator, daemons):
    sim = simulator("--reset-rate", "1", *FAST)
    config = sim_config(tmp_path, sim)
    lines = "".join(
        json.dumps({"id": f"r{n}", "to": f"+4477009006{n:02d}"}) + "\n" for n in range(3)
    )
    first = run_dialerd("run", "-c", str(config), input=lines.encode())
    assert first.returncode == 0
    assert {r["outcome"] for r in map(json.loads, first.stdout.splitlines())} == {"in_doubt"}

    refused = run_dialerd("requeue", "-c", str(config), "r0", "nope")
    assert refused.returncode == 65
    assert "nope: not requeued: no such request" in refused.stderr.decode()
    assert run_dialerd("requeue", "-c", str(config)).returncode == 64

    sim.stop()
    healthy = simulator(*FAST)
    api = {**yaml.safe_load(config.read_text())["api"], "endpoints": healthy.endpoints()}
    results = tmp_path / "results.jsonl"
    rewrite(config, api=api, spool={"dir": str(tmp_path / "spool")}, results=str(results))
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    wait_for(lambda: len(healthy.arrivals()) == 1, 10, "r0, requeued before the start")
    again = run_dialerd("requeue", "-c", str(config), "--in-doubt")
    assert again.returncode == 0 and b"requeued 2 request(s)" in again.stdout
    wait_for(lambda: outcomes(results)["dialed"] == 3, 10, "the two requeued while running")
    assert daemon.stop()[0] == 0
    assert sorted(a["to"] for a in healthy.arrivals()) == [f"4477009006{n:02d}" for n in range(3)]
    assert run_dialerd("requeue", "-c", str(config), "r1").returncode == 65  # dialed now


def test_a_restart_continues_each_agents_spacing(tmp_path, simulator, daemons):
    sim = simulator(*FAST)
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")})
    rewrite(config, agents={"agent-a": {**AGENTS["agent-a"], "rate": 1}})
    spool_file(
        tmp_path, "a.jsonl", [{"id": f"a{n}", "to": f"+4477009007{n:02d}"} for n in range(4)]
    )
    for _run in range(2):  # stopped right after a send, and started again at once
        daemon = daemons("-c", str(config))
        daemon.wait_running()
        count = len(sim.arrivals())
        wait_for(lambda count=count: len(sim.arrivals()) > count, 10, "a send")
        assert daemon.stop()[0] == 0
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    results = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: outcomes(results)["dialed"] == 4, 15, "every call")
    assert daemon.stop()[0] == 0
    placed = sorted(arrival["at"] for arrival in sim.arrivals())
    gaps = [later - earlier for earlier, later in zip(placed, placed[1:], strict=False)]
    assert min(gaps) > 0.95, (
        f"two sends of a 1/s agent closer than a second across restarts: {gaps}"
    )


def test_a_file_recorded_then_moved_before_a_crash_does_not_shadow_a_later_one(
    tmp_path, simulator, daemons
):
    sim = simulator(*FAST)
    # No id, and no dedupe window: the same bytes again are new requests.
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")}, dedupe_window_s=0)
    requests = [{"to": "+447700900801"}]
    spool_file(tmp_path, "same.jsonl", requests)
    daemon = daemons("-c", str(config))
    results = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: outcomes(results)["dialed"] == 1, 10, "the first file")
    assert daemon.stop()[0] == 0
    # As a crash between the move to done/ and forgetting the file would leave the ledger:
    content = (tmp_path / "spool" / "done" / "same.jsonl").read_bytes()
    with sqlite3.connect(tmp_path / "state" / "ledger.sqlite3") as ledger:
        ledger.execute(
            "INSERT INTO spool_files (name, digest) VALUES (?, ?)",
            ("same.jsonl", hashlib.sha256(content).hexdigest()),
        )
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    spool_file(tmp_path, "same.jsonl", requests)
    wait_for(lambda: outcomes(results)["dialed"] == 2, 10, "the later file of the same bytes")
    assert daemon.stop()[0] == 0


def test_sighup_moves_sends_to_new_endpoints(tmp_path, simulator, daemons):
    first, second = simulator(*FAST), simulator(*FAST)
    config = sim_config(tmp_path, first, spool={"dir": str(tmp_path / "spool")})
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    results = tmp_path / "state" / "results.jsonl"
    spool_file(tmp_path, "a.jsonl", [{"id": "a1", "to": "+447700900901"}])
    wait_for(lambda: outcomes(results)["dialed"] == 1, 10, "a call to the first endpoints")

    api = {**yaml.safe_load(config.read_text())["api"], "endpoints": second.endpoints()}
    rewrite(config, api=api)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.stderr.count('"event": "reloaded"') == 1, 10, "the reload")
    spool_file(tmp_path, "b.jsonl", [{"id": "b1", "to": "+447700900902"}])
    wait_for(lambda: outcomes(results)["dialed"] == 2, 10, "a call to the new endpoints")
    assert daemon.stop()[0] == 0
    assert [a["to"] for a in first.arrivals()] == ["447700900901"]
    assert [a["to"] for a in second.arrivals()] == ["447700900902"]
