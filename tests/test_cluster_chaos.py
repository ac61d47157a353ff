"""Cluster mode under faults (SPEC §9): three real daemons, ten agents at rates 1, 3 and 5, one
PostgreSQL server of the test's own, and `dialerd simulate`. A random daemon is killed (-9) and
started again five times, one is stopped (SIGSTOP) past its lease and let go on, and the
database is restarted under them. What the cluster may cost, and nothing more: a send in
flight at a kill or a stop ends `in_doubt`; nothing is placed twice, no agent goes over its rate,
every request gets one result from the daemon it was given to, and each dead daemon's agents
are dialed again within lease_s and one interval.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import psycopg
from conftest import read_results, wait_for
from pg_server import ThrowawayPostgres, skip_or_fail
from test_cluster import LEASE_S, cluster_config, drop, held, ledger_url, over_rate

RATES = {f"agent-{n}": rate for n, rate in enumerate((1, 3, 5, 1, 3, 5, 1, 3, 5, 5))}
NAMES = ("d1", "d2", "d3")
PER_DAEMON = 200  # requests given to each daemon's spool: about 20 s at the 32 calls/s in all
KILLS = 5
EVENT_EVERY_S = 2.5
IN_DOUBT_PREFIX = "the daemon stopped while this send was in flight"
KILL_WINDOW_S = 1.0  # an in_doubt send was marked this long before a kill or a stop, at most
SLACK_S = 0.5  # beyond lease_s and an interval: a round's commit, a loaded machine's timers


def spread(prefix: str, count: int, first_number: int) -> list[dict]:
    """`count` requests over the agents in proportion to their rates, so that all of them
    have work until near the end."""
    weighted = [agent for agent, rate in RATES.items() for _ in range(rate)]
    agents = itertools.cycle(weighted)
    return [
        {"id": f"{prefix}-{n}", "to": f"4477{first_number + n:08d}", "agent_id": next(agents)}
        for n in range(count)
    ]


class Cluster:
    def __init__(self, tmp_path: Path, daemons, sim, url: str):
        self.configs = {name: cluster_config(tmp_path, name, sim, url, RATES) for name in NAMES}
        self._start_daemon = daemons
        self.running = {name: self.start(name) for name in NAMES}
        self.runs: dict[str, list] = {name: [self.running[name]] for name in NAMES}

    def start(self, name: str):
        daemon = self._start_daemon("-c", str(self.configs[name]))
        daemon.wait_running(timeout=30)
        return daemon

    def restart(self, name: str):
        self.running[name] = self.start(name)
        self.runs[name].append(self.running[name])

    def holding(self) -> dict[str, set[str]]:
        return {name: held(daemon) for name, daemon in self.running.items()}


def test_a_cluster_survives_kills_a_stop_and_a_database_restart(
    tmp_path, simulator, daemons, monkeypatch
):
    problem = ThrowawayPostgres.available()
    if problem is not None:
        skip_or_fail(problem)
    server = ThrowawayPostgres(tmp_path)
    server.start()
    try:
        summary = run_the_chaos(tmp_path, simulator, daemons, monkeypatch, server)
    finally:
        server.close()
    print(json.dumps(summary))


def run_the_chaos(tmp_path, simulator, daemons, monkeypatch, server) -> dict:
    monkeypatch.setenv("VGAI_KEY", "k")
    rng = random.Random(15)
    sim = simulator("--latency", "0.05-0.2", agents=tuple(f"{a}={r}" for a, r in RATES.items()))
    cluster = Cluster(tmp_path, daemons, sim, ledger_url(server.dsn))
    wait_for(lambda: set().union(*cluster.holding().values()) == set(RATES), 30, "every agent held")
    given = {name: spread(name, PER_DAEMON, index * 10_000) for index, name in enumerate(NAMES)}
    for name, batch in given.items():
        drop(tmp_path, name, "work.jsonl", batch)

    kills: list[tuple[float, set[str]]] = []  # when, and the agents the killed daemon held
    stops: list[float] = []
    for event in range(KILLS + 2):
        time.sleep(EVENT_EVERY_S)
        if event == 2:  # one stopped past its lease, then let go on
            name = rng.choice(NAMES)
            daemon = cluster.running[name]
            daemon.proc.send_signal(signal.SIGSTOP)
            stops.append(time.time())
            time.sleep(LEASE_S * 2)
            daemon.proc.send_signal(signal.SIGCONT)
        elif event == 5:  # the database restarted under the cluster
            server.restart()
        else:
            name = rng.choice(NAMES)
            holding = held(cluster.running[name])
            cluster.running[name].kill()
            kills.append((time.time(), holding))
            cluster.restart(name)

    def all_results() -> dict[str, list[dict]]:
        return {name: read_results(tmp_path / name / "results.jsonl") for name in NAMES}

    total = PER_DAEMON * len(NAMES)
    wait_for(
        lambda: sum(len({r["id"] for r in lines}) for lines in all_results().values()) >= total,
        180,
        "every result",
    )
    for daemon in cluster.running.values():
        assert daemon.stop(timeout=30)[0] == 0, daemon.stderr[-2000:]

    arrivals = sim.arrivals()
    refused = [a for a in arrivals if a["http_status"] == 429]
    assert not refused, ("429s at the simulator", before_each(refused, arrivals), kills, stops)
    assert not over_rate(arrivals, RATES)
    placed = Counter(a["to"] for a in arrivals if a["placed"])
    assert not {to: n for to, n in placed.items() if n > 1}, "placed more than once"

    outcomes: Counter[str] = Counter()
    for name, lines in all_results().items():
        distinct = {json.dumps(line, sort_keys=True) for line in lines}  # a line written just
        by_id = Counter(json.loads(line)["id"] for line in distinct)  # before a kill: again
        assert set(by_id) == {r["id"] for r in given[name]}, name
        assert max(by_id.values()) == 1, {i: n for i, n in by_id.items() if n > 1}
        outcomes.update(json.loads(line)["outcome"] for line in distinct)
    assert set(outcomes) <= {"dialed", "in_doubt"}, outcomes

    marked_at = in_doubt_marks(server.dsn)
    moments = [at for at, _ in kills] + stops
    for request_id, sent_at in marked_at.items():
        assert any(0 <= moment - sent_at <= KILL_WINDOW_S for moment in moments), (
            f"{request_id} in_doubt, marked at {sent_at}; kills and stops at {moments}"
        )

    gaps = failover_gaps(arrivals, kills)
    for agent, gap in gaps:
        assert gap <= LEASE_S + 1.05 / RATES[agent] + SLACK_S, (agent, gap)
    return {
        "requests": total,
        "outcomes": dict(outcomes),
        "kills": len(kills),
        "arrivals": len(arrivals),
        "worst_failover_s": max((gap for _, gap in gaps), default=None),
    }


def before_each(refused: list[dict], arrivals: list[dict]) -> list[list[tuple]]:
    """For each 429, its agent's arrivals in the 1.2 s before it: (wall time, number, status)."""
    return [
        [
            (round(a["wall"], 3), a["to"], a["http_status"])
            for a in arrivals
            if a["agent_id"] == late["agent_id"] and late["at"] - 1.2 <= a["at"] <= late["at"]
        ]
        for late in refused
    ]


def in_doubt_marks(dsn: str) -> dict[str, float]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, sent_at, error FROM requests WHERE outcome = 'in_doubt'"
        ).fetchall()
    for request_id, _sent_at, error in rows:
        assert error.startswith(IN_DOUBT_PREFIX), (request_id, error)
    return {request_id: sent_at for request_id, sent_at, _ in rows}


def failover_gaps(arrivals: list[dict], kills: list[tuple[float, set[str]]]):
    """Per killed daemon's agent that had work after it (any send later than the bound), the
    time from the kill to its next send."""
    gaps = []
    for killed_at, agents in kills:
        for agent in agents:
            after = sorted(a["wall"] for a in arrivals if a["agent_id"] == agent)
            after = [wall for wall in after if wall > killed_at]
            if after and after[-1] > killed_at + LEASE_S + 1.05 / RATES[agent] + SLACK_S:
                gaps.append((agent, after[0] - killed_at))
    return gaps
