"""Cluster mode (SPEC §9): real `dialerd run` processes sharing one PostgreSQL ledger, against
`dialerd simulate` as its own process. Agents are shared among the daemons by leases; a daemon
killed, or stopped past its lease, loses its agents to the others, and nothing is placed twice,
nothing goes over an agent's rate, every request gets one result, from the daemon that took it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from conftest import SimulatorProcess, read_results, result_lines, run_dialerd, wait_for
from psycopg.conninfo import conninfo_to_dict
from test_lifecycle_callbacks import samples, scrape

RATE = 5
AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d")
SIM_AGENTS = tuple(f"{agent}={RATE}" for agent in AGENTS)
LEASE_S = 2.0
INTERVAL_S = 1.05 / RATE  # the default margin: 5 %


def ledger_url(dsn: str) -> str:
    """The test's schema on the shared server, as the config's `ledger` url names it."""
    fields = conninfo_to_dict(dsn)
    query = f"?options={quote(fields['options'])}" if "options" in fields else ""
    host, port = fields.get("host", "127.0.0.1"), fields.get("port", "5432")
    return f"postgresql://{fields.get('user', 'postgres')}@{host}:{port}/{fields['dbname']}{query}"


def cluster_config(
    tmp_path: Path,
    name: str,
    sim: SimulatorProcess,
    url: str,
    rates: dict[str, int] | None = None,
    **top: Any,
) -> Path:
    """Daemon `name`'s config: its own state_dir, spool and results; the one ledger; `rates`
    (by default, AGENTS at RATE); more `top` keys (None: leave that key out)."""
    rates = rates or dict.fromkeys(AGENTS, RATE)
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    document = {
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()},
        "agents": {
            agent: {"region": ("eu", "us")[index % 2], "rate": rate}
            for index, (agent, rate) in enumerate(rates.items())
        },
        "default_agent": next(iter(rates)),
        "state_dir": str(home / "state"),
        "spool": {"dir": str(home / "spool")},
        "results": str(home / "results.jsonl"),
        "stdin": False,
        "ledger": url,
        "instance": name,
        "lease_s": LEASE_S,
        **top,
    }
    path = home / "config.yaml"
    path.write_text(yaml.safe_dump({key: v for key, v in document.items() if v is not None}))
    return path


def requests(prefix: str, count: int, first_number: int = 0) -> list[dict]:
    return [
        {"id": f"{prefix}-{n}", "to": f"4477009{first_number + n:05d}", "agent_id": AGENTS[n % 4]}
        for n in range(count)
    ]


def drop(tmp_path: Path, name: str, file_name: str, batch: list[dict]) -> None:
    incoming = tmp_path / name / "spool" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    aside = incoming.parent / f".writing-{file_name}"
    aside.write_text("".join(json.dumps(request) + "\n" for request in batch))
    os.rename(aside, incoming / file_name)


def over_rate(arrivals: list[dict], rates: dict[str, int] | None = None) -> dict[str, int]:
    """Per agent, the most sends the simulator saw in any 1 s window, where above its rate."""
    rates = rates or dict.fromkeys(AGENTS, RATE)
    by_agent: dict[str, list[float]] = {}
    for arrival in arrivals:
        by_agent.setdefault(arrival["agent_id"], []).append(arrival["at"])
    worst = {}
    for agent, times in by_agent.items():
        times.sort()
        start, most = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        if most > rates[agent]:
            worst[agent] = most
    return worst


def check_every_request_once(sim: SimulatorProcess, results: list[dict], batch: list[dict]):
    arrivals = sim.arrivals()
    assert not [a for a in arrivals if a["http_status"] == 429], "429s at the simulator"
    assert not over_rate(arrivals)
    twice = {to: n for to, n in Counter(a["to"] for a in arrivals if a["placed"]).items() if n > 1}
    assert not twice, f"placed more than once: {twice}"
    by_id = Counter(result["id"] for result in results)
    assert set(by_id) == {request["id"] for request in batch}
    assert max(by_id.values()) == 1, {i: n for i, n in by_id.items() if n > 1}


def lease_log(daemon) -> list[dict]:
    lines = [json.loads(line) for line in daemon.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event", "").startswith("leases")]


def held(daemon) -> set[str]:
    """The agents a daemon holds, as its log tells: taken, less those given up or lost."""
    agents: set[str] = set()
    for line in lease_log(daemon):
        if line["event"] == "leases taken":
            agents |= set(line["agents"])
        else:
            agents -= set(line["agents"])
    return agents


def two_daemons(tmp_path, simulator, daemons, pg_dsn, monkeypatch):
    """The simulator, and daemons d1 and d2 on the test's ledger, both running."""
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    url = ledger_url(pg_dsn)
    started = []
    for name in ("d1", "d2"):
        started.append(daemons("-c", str(cluster_config(tmp_path, name, sim, url))))
        started[-1].wait_running()
    return sim, *started


def test_two_daemons_share_the_agents_and_each_request_is_sent_once(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    sim, first, second = two_daemons(tmp_path, simulator, daemons, pg_dsn, monkeypatch)
    wait_for(lambda: len(held(first)) == len(held(second)) == 2, 30, "the agents shared")
    config = str(tmp_path / "d1" / "config.yaml")
    report = json.loads(run_dialerd("status", "-c", config, "--json").stdout)["daemons"]
    assert {name: set(entry["agents"]) for name, entry in report.items()} == {
        "d1": held(first),
        "d2": held(second),
    }
    assert all(entry["alive"] and entry["renewed_at"] for entry in report.values()), report
    text = run_dialerd("status", "-c", config).stdout.decode()
    assert f"daemon d2 (pid {second.proc.pid}): renewed" in text, text
    batch = requests("r", 120)
    # All of it taken in by d1; d2's lanes, idle until now, find their agents' share of it.
    drop(tmp_path, "d1", "batch.jsonl", batch)
    # A file of the same name in d2's spool is another file: d2's, with results of its own.
    other = requests("s", 20, first_number=50_000)
    drop(tmp_path, "d2", "batch.jsonl", other)
    results_path = tmp_path / "d1" / "results.jsonl"
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 60, "every result")
    d2_results = tmp_path / "d2" / "results.jsonl"
    wait_for(lambda: len(read_results(d2_results)) >= len(other), 30, "d2's results")
    # Evenly: two agents each, every agent sent for by one daemon at a time.
    holding = [held(first), held(second)]
    assert len(holding[0]) == len(holding[1]) == 2 and not holding[0] & holding[1], holding
    for daemon in (first, second):
        assert daemon.stop()[0] == 0
    check_every_request_once(sim, read_results(results_path), batch)
    # Each daemon's results are those of the requests it took in, whoever dialed them.
    assert {r["id"] for r in read_results(tmp_path / "d2" / "results.jsonl")} == {
        request["id"] for request in other
    }


def test_a_killed_daemons_agents_are_taken_over_within_a_lease(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    sim, first, second = two_daemons(tmp_path, simulator, daemons, pg_dsn, monkeypatch)
    batch = requests("r", 200)
    drop(tmp_path, "d1", "batch.jsonl", batch)
    wait_for(lambda: held(second) and len(sim.arrivals()) > 40, 30, "both sending")
    second_agents = held(second)
    assert second_agents
    second.kill()
    killed_at = time.time()
    results_path = tmp_path / "d1" / "results.jsonl"
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 90, "every result")
    assert first.stop()[0] == 0
    results = read_results(results_path)
    check_every_request_once(sim, results, batch)
    outcomes = Counter(result["outcome"] for result in results)
    assert set(outcomes) <= {"dialed", "in_doubt"} and outcomes["in_doubt"] <= len(AGENTS)
    for agent in second_agents:  # dialed again within lease_s and one interval of the kill
        after = [
            a["wall"] for a in sim.arrivals() if a["agent_id"] == agent and a["wall"] > killed_at
        ]
        assert after and min(after) - killed_at <= LEASE_S + INTERVAL_S + 0.3, (agent, after[:3])


def test_a_daemon_stopped_past_its_lease_sends_nothing_for_the_agents_it_lost(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    url, admin = ledger_url(pg_dsn), f"127.0.0.1:{free_port()}"
    first = daemons("-c", str(cluster_config(tmp_path, "d1", sim, url)))
    first.wait_running()
    config = cluster_config(tmp_path, "d2", sim, url, admin={"listen": admin})
    second = daemons("-c", str(config))
    second.wait_running()
    batch = requests("r", 240)
    drop(tmp_path, "d1", "batch.jsonl", batch)
    # Stopped once each of its lanes has sent a few: each has what it sends next read ahead,
    # and marks it as it goes on, before the lease round that finds the leases gone answers.
    wait_for(lambda: len(sent_for(second)) == 2, 30, "both sending")
    its_agents = held(second)
    second.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    wait_for(lambda: held(first) >= its_agents, 30, "the first daemon to take its agents")
    second.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "leases lost" in second.stderr, 30, "the stopped daemon to find out")
    results_path = tmp_path / "d1" / "results.jsonl"
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 90, "every result")
    fenced = samples(scrape(f"http://{admin}"), "dialerd_fenced_marks_total")
    for daemon in (first, second):
        assert daemon.stop()[0] == 0
    check_every_request_once(sim, read_results(results_path), batch)
    # What it marked after the others took its agents was refused by the epoch check, counted.
    refused = [e for e in events(second) if e["event"].startswith("the agent's lease is")]
    assert sum(fenced.values()) == len(refused)
    # (Unless stopped in a lease round's wait, whose timeout then ran out first: the lanes
    # were stopped before any could mark, since the database had not answered in time.)
    silence = "the ledger's database does not answer"
    if not any(e.get("why") == silence for e in events(second)):
        assert {e["agent"] for e in refused} == its_agents
    # Between finding its leases gone and taking any back, it sent nothing new for them (a
    # send it had made before it was stopped may still have been answered after).
    to_of = {request["id"]: request["to"] for request in batch}
    reached = {a["to"]: a["wall"] for a in sim.arrivals()}
    lost, stale = set(), []
    for event in events(second):
        if event["event"].startswith("leases lost"):
            lost |= set(event["agents"])
        elif event["event"] == "leases taken":
            lost -= set(event["agents"])
        elif (
            event["event"] == "send"
            and event["agent"] in lost
            and reached.get(to_of[event["id"]], 0) > stopped_at
        ):
            stale.append(event)
    assert not stale, stale


def test_a_daemon_paused_past_its_leases_that_nobody_took_goes_on_with_them(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    """Alone in its cluster, stopped (SIGSTOP) past lease_s: its leases ran out but no other
    daemon took them. As it goes on, its marks are refused (run out) and its rounds renew the
    leases under the same epochs: its lanes start again, and every request is dialed."""
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    alone = daemons("-c", str(cluster_config(tmp_path, "d1", sim, ledger_url(pg_dsn))))
    alone.wait_running()
    batch = requests("r", 120)
    drop(tmp_path, "d1", "batch.jsonl", batch)
    wait_for(lambda: len(sent_for(alone)) == len(AGENTS), 30, "every agent sending")
    alone.proc.send_signal(signal.SIGSTOP)
    time.sleep(LEASE_S * 2)  # past its leases, for certain (no one else to take them)
    alone.proc.send_signal(signal.SIGCONT)
    results_path = tmp_path / "d1" / "results.jsonl"
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 60, "every result")
    assert alone.stop()[0] == 0
    check_every_request_once(sim, read_results(results_path), batch)


def sent_for(daemon, at_least: int = 3) -> set[str]:
    """The agents the daemon has sent `at_least` requests for."""
    sends = Counter(e["agent"] for e in events(daemon) if e["event"] == "send")
    return {agent for agent, count in sends.items() if count >= at_least}


def events(daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.stderr.splitlines() if line.startswith("{")]


class NoApi:
    """Endpoints for a config that never sends (`check` reads them, nothing calls them)."""

    @staticmethod
    def endpoints() -> dict[str, str]:
        return {region: f"http://127.0.0.1:9/{region}" for region in ("eu", "us")}


def test_check_connects_to_the_ledger_and_says_when_it_cannot(tmp_path, pg_dsn):
    good = cluster_config(tmp_path, "d1", NoApi(), ledger_url(pg_dsn))
    checked = run_dialerd("check", "-c", str(good))
    assert checked.returncode == 0, checked.stderr
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))  # a port that is taken, and never listened on
    port = nobody.getsockname()[1]
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/test"
        bad = cluster_config(tmp_path, "d2", NoApi(), url)
        checked = run_dialerd("check", "-c", str(bad))
    finally:
        nobody.close()
    assert checked.returncode == 69, checked.stderr
    message = checked.stderr.decode()
    assert message.startswith(f"dialerd: ledger: cannot reach the ledger {url}"), message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_callback_that_reaches_another_daemon_redials_on_the_agents_holder(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    """Both daemons' status_urls name the first's listener (a load balancer would send them to
    either): the callbacks of the second's calls are applied by the first, and the second, which
    holds the agent, makes the redial."""
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator(
        "--unreached", "busy=1", "--callback-delay", "0.2-0.2", "--latency", "0.05",
        agents=SIM_AGENTS,
    )  # fmt: skip
    url, ports = ledger_url(pg_dsn), [free_port(), free_port()]
    started = []
    for name, port in zip(("d1", "d2"), ports, strict=True):
        callbacks = {
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{ports[0]}",
            "wait_s": 10,
        }
        redial = {"busy": {"attempts": 2, "delay_s": 0.5}}
        config = cluster_config(tmp_path, name, sim, url, callbacks=callbacks, redial=redial)
        started.append(daemons("-c", str(config)))
        started[-1].wait_running()
    first, second = started
    wait_for(lambda: len(held(first)) == len(held(second)) == 2, 30, "the agents shared")
    batch = requests("r", 8)
    drop(tmp_path, "d1", "batch.jsonl", batch)
    results_path = tmp_path / "d1" / "results.jsonl"
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 60, "every result")
    second_held = held(second)
    for daemon in started:
        assert daemon.stop()[0] == 0
    results = read_results(results_path)
    assert {(r["outcome"], r["status"], r["attempts"]) for r in results} == {
        ("unanswered", "busy", 2)
    }, results
    calls = Counter(arrival["to"] for arrival in sim.arrivals())
    assert set(calls.values()) == {2}, calls
    redials_by_second = [
        line
        for line in map(json.loads, second.stderr.splitlines())
        if line.get("event") == "send" and line["attempt"] == 2
    ]
    assert {line["agent"] for line in redials_by_second} == second_held


def test_a_daemon_joining_and_one_leaving_move_agents_without_a_long_gap_or_a_send_over_rate(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    url = ledger_url(pg_dsn)
    first = daemons("-c", str(cluster_config(tmp_path, "d1", sim, url)))
    first.wait_running()
    batch = requests("r", 240)  # 60 per agent: 12.6 s of work at 5/s
    drop(tmp_path, "d1", "batch.jsonl", batch)
    wait_for(lambda: len(sim.arrivals()) > 20, 30, "the first daemon sending")
    second = daemons("-c", str(cluster_config(tmp_path, "d2", sim, url)))
    second.wait_running()
    wait_for(lambda: len(held(second)) == 2, 30, "the second daemon's share")
    time.sleep(1.0)  # both send for a while
    assert first.stop()[0] == 0  # leaves: its agents go to the second at once
    results_path = tmp_path / "d1" / "results.jsonl"
    # The first daemon's results wait in the ledger for it: the second sends the rest.
    wait_for(lambda: not second_has_work(sim, batch), 60, "every request sent")
    assert second.stop()[0] == 0
    third = daemons("-c", str(cluster_config(tmp_path, "d1", sim, url)))
    third.wait_running()  # d1 again: it writes the results owed to it
    wait_for(lambda: len(read_results(results_path)) >= len(batch), 30, "every result")
    assert third.stop()[0] == 0
    check_every_request_once(sim, read_results(results_path), batch)
    for agent in AGENTS:  # while an agent had work, no pause longer than lease_s
        times = sorted(a["wall"] for a in sim.arrivals() if a["agent_id"] == agent)
        longest = max(b - a for a, b in zip(times, times[1:], strict=False))
        assert longest <= LEASE_S, (agent, longest)


def second_has_work(sim: SimulatorProcess, batch: list[dict]) -> bool:
    return len({a["to"] for a in sim.arrivals() if a["placed"]}) < len(batch)


def test_a_stdin_run_in_a_cluster_ends_when_what_it_took_in_is_final(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    """Its results come to its stdout, whichever daemon dialed them; it does not wait for the
    work the other daemons took in."""
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    url = ledger_url(pg_dsn)
    other = daemons("-c", str(cluster_config(tmp_path, "d2", sim, url)))
    other.wait_running()
    backlog = requests("backlog", 400)  # 20 s of work for the four agents
    drop(tmp_path, "d2", "backlog.jsonl", backlog)
    wait_for(lambda: len(sim.arrivals()) > 10, 30, "the other daemon sending")
    given = [{**request, "priority": 9} for request in requests("stdin", 20, 50_000)]
    config = cluster_config(tmp_path, "d1", sim, url, stdin=True, results="-", spool=None)
    run = run_dialerd(
        "run", "-c", str(config), input="".join(json.dumps(r) + "\n" for r in given).encode()
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert {line["id"] for line in result_lines(run.stdout)} == {r["id"] for r in given}
    report = json.loads(run_dialerd("status", "-c", str(config), "--json").stdout)
    assert sum(entry["queued"] for entry in report["agents"].values()) > 0, "all of it was done"
    assert other.stop()[0] == 0


def test_survivors_that_take_a_dead_daemons_agents_at_once_take_them_in_one_round(
    tmp_path, simulator, daemons, pg_dsn, monkeypatch
):
    """Two survivors whose leases round at the same moment, each owed one of the dead daemon's
    two agents: both are taken as the leases run out, not one a lease round later (each asks
    first for agents in an order of its own, and one that lost a race rounds again at once)."""
    monkeypatch.setenv("VGAI_KEY", "k")
    sim = simulator("--latency", "0.05-0.1", agents=SIM_AGENTS)
    url = ledger_url(pg_dsn)
    started = []
    for name in ("d1", "d2", "d3"):  # d1 started first: its share is two agents, the others' one
        started.append(daemons("-c", str(cluster_config(tmp_path, name, sim, url))))
        started[-1].wait_running()
    first, *survivors = started
    wait_for(lambda: [len(held(d)) for d in started] == [2, 1, 1], 30, "the agents shared")
    drop(tmp_path, "d1", "batch.jsonl", requests("r", 200))
    wait_for(lambda: len(sim.arrivals()) > 20, 30, "sending")
    orphans = held(first)
    first.kill()
    killed_at = time.time()
    wait_for(lambda: set().union(*(held(d) for d in survivors)) >= orphans, 30, "the takeover")
    takes = [
        event["timestamp"]
        for daemon in survivors
        for event in events(daemon)
        if event["event"] == "leases taken" and set(event["agents"]) & orphans
    ]
    moments = [dt.datetime.fromisoformat(stamp).timestamp() for stamp in takes]
    assert len(moments) == 2 and max(moments) - min(moments) < LEASE_S / 3 / 2, takes
    assert max(moments) - killed_at <= LEASE_S + 0.3, (takes, killed_at)
    for daemon in survivors:
        assert daemon.stop()[0] == 0
