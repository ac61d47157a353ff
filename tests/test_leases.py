"""Agents' leases on a real PostgreSQL server: who may send for an agent, the epoch that fences
a holder off once another has taken its lease, and how the agents are shared (SPEC §9)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections import Counter

import aiohttp
import psycopg
import pytest
from conftest import cluster_of
from hypothesis import given
from hypothesis import strategies as st
from test_dispatcher import KEY, make_config, requests_for
from test_request import CONFIG
from test_studio import SlowToResolve

from dialerd import studio
from dialerd.dispatcher import Dispatcher
from dialerd.lane import Fence, Wiring
from dialerd.leases import Leases, plan, share
from dialerd.ledger import Ledger, postgres
from dialerd.ledger.intake import add
from dialerd.ledger.leases import join, leave, release, renew, take
from dialerd.ledger.sends import LeaseLost, mark_sending
from dialerd.metrics import Metrics
from dialerd.request import build_request

AGENT = "agent-eu"
LEASE_S = 30.0


def new_run(conn, instance: str) -> int:
    (run,) = conn.execute(
        "INSERT INTO runs (pid, started_at) VALUES (1, 0) RETURNING run"
    ).fetchone()
    assert join(conn, run, instance, LEASE_S) is None
    return run


def queued(conn, request_id: str) -> int:
    request = build_request({"id": request_id, "to": "+447700900123"}, CONFIG, "test:1")
    add(conn, 1, [request], [], None, 0)
    return conn.execute("SELECT seq FROM requests WHERE id = ?", (request_id,)).fetchone()[0]


def run_out(conn, agent: str = AGENT) -> None:
    """The agent's lease runs out now, as if its holder had stopped renewing lease_s ago."""
    conn.execute(
        "UPDATE leases SET expires_at = clock_timestamp() - interval '1 ms' WHERE agent_id = ?",
        (agent,),
    )


def test_a_lease_is_taken_once_and_its_epoch_fences_the_holder_before(pg):
    first, second = new_run(pg, "d1"), new_run(pg, "d2")
    renew(pg, first, [AGENT], LEASE_S)
    assert take(pg, first, "d1", [AGENT], LEASE_S) == ({AGENT: 1}, 0)
    assert take(pg, second, "d2", [AGENT], LEASE_S) == ({}, 0), "held: not free to take"
    seq = queued(pg, "r1")
    assert mark_sending(pg, seq, None, 1, 0.0, None, fence=(first, 1)) == (True, None)
    queued(pg, "r2")
    run_out(pg)
    # Run out, not yet taken: the holder's own mark is refused by the database's clock.
    with pytest.raises(LeaseLost):
        mark_sending(pg, seq + 1, None, 1, 0.0, None, fence=(first, 1))
    assert take(pg, second, "d2", [AGENT], LEASE_S) == ({AGENT: 2}, 1)
    with pytest.raises(LeaseLost):
        mark_sending(pg, seq + 1, None, 1, 0.0, None, fence=(first, 1))
    # The send the first run marked and never answered is in_doubt: its lease is gone.
    assert pg.execute("SELECT outcome FROM requests WHERE seq = ?", (seq,)).fetchone() == (
        "in_doubt",
    )
    assert renew(pg, first, [AGENT], LEASE_S).held == {}, "lost: a renewal does not bring it back"
    assert mark_sending(pg, seq + 1, None, 1, 0.0, None, fence=(second, 2)) == (True, None)


def test_the_holder_before_is_fenced_off_even_from_a_request_its_successor_sent(pg):
    """The old holder's lane was about to send the request at the head of the agent's queue;
    the new holder sent it first. The old holder is told that it lost the lease (its lane
    stops), not merely that the request is no longer queued (it would read the next one)."""
    first, second = new_run(pg, "d1"), new_run(pg, "d2")
    renew(pg, first, [AGENT], LEASE_S)
    take(pg, first, "d1", [AGENT], LEASE_S)
    seq = queued(pg, "r1")
    run_out(pg)
    assert take(pg, second, "d2", [AGENT], LEASE_S) == ({AGENT: 2}, 0)
    assert mark_sending(pg, seq, None, 1, 0.0, None, fence=(second, 2)) == (True, None)
    with pytest.raises(LeaseLost):
        mark_sending(pg, seq, None, 1, 0.0, None, fence=(first, 1))
    # The holder itself, marking a request no longer queued, is told just that.
    assert mark_sending(pg, seq, None, 1, 0.0, None, fence=(second, 2)) == (False, None)


class OneLane:
    """A daemon's lane for AGENT on a ledger on PostgreSQL, under a lease it took whose fence
    holds for `valid_for_s`, with `count` requests queued; at the simulator, through
    `connector` (None: the session's own)."""

    def __init__(self, tmp_path, pg_dsn, simulator, count: int, valid_for_s: float, connector=None):
        endpoints = {region: simulator.endpoint(region) for region in ("eu", "us")}
        if connector is not None:  # by a name, which the connector's resolver is asked for
            endpoints = {r: url.replace("127.0.0.1", "api.test") for r, url in endpoints.items()}
        self.config = make_config(tmp_path, endpoints, {AGENT: ("eu", 5)})
        self.ledger = Ledger(tmp_path / "state", cluster_of(pg_dsn, "d1", LEASE_S))
        self.metrics = Metrics()
        self._count, self._valid_for_s, self._connector = count, valid_for_s, connector
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Dispatcher:
        self.ledger.open()
        self._stack.callback(self.ledger.close)
        assert await self.ledger.join() is None
        await self.ledger.lease_round([AGENT])
        epochs, _ = await self.ledger.take_leases([AGENT])
        fields = requests_for(AGENT, self._count)
        requests = [build_request(f, self.config, f"t:{i}") for i, f in enumerate(fields)]
        await self.ledger.add(requests, [], None, 0)
        http = await self._stack.enter_async_context(studio.session(5, self._connector))
        client = studio.StudioClient(http, KEY, self.config.api.endpoints)
        self.dispatcher = Dispatcher(Wiring(self.ledger, client, lambda: None, self.metrics))
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self.dispatcher.start([], group)
        loop = asyncio.get_running_loop()
        self.fence = Fence(epochs[AGENT], loop.time() + self._valid_for_s)
        self.dispatcher.open_lanes([self.config.agents[AGENT]], {AGENT: self.fence})
        return self.dispatcher

    async def __aexit__(self, *exc_info) -> None:
        self.dispatcher.stop()
        await self._stack.__aexit__(*exc_info)  # the lane ends, then the session and ledger

    async def states(self) -> Counter:
        rows = await self.ledger.call(lambda c: c.execute("SELECT state FROM requests").fetchall())
        return Counter(state for (state,) in rows)


async def test_a_lane_whose_lease_is_taken_behind_its_back_sends_no_more(
    tmp_path, pg_dsn, simulator_factory
):
    """The lease taken by another daemon while the lane's own view of it still holds (as after
    a pause): its next mark is refused by the epoch, counted, and the lane stops; what it had
    marked went out, the rest stays queued for the new holder."""
    simulator = await simulator_factory({AGENT: 5})
    lane = OneLane(tmp_path, pg_dsn, simulator, 20, valid_for_s=3600)
    async with asyncio.timeout(30), lane as dispatcher:
        while len(simulator.placed()) < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(taken_by_another, pg_dsn)
        await dispatcher.lanes[AGENT].task  # it stops by itself
        assert await dispatcher.drain(1.0) == 0
        states = await lane.states()
    fenced = lane.metrics.registry.get_sample_value("dialerd_fenced_marks_total", {"agent": AGENT})
    assert fenced == 1
    placed = len(simulator.placed())
    assert placed >= 3 and states == {"final": placed, "queued": 20 - placed}


async def test_a_send_whose_lease_runs_out_while_it_connects_is_queued_again_not_sent(
    tmp_path, pg_dsn, simulator_factory
):
    """Marked and let go under its lease, on a connection slow to make, while which the lease
    runs out (its renewals fail): as its bytes are to leave, the lease has less than an
    interval left, so it stays home and is queued again (the next holder sends it)."""
    simulator = await simulator_factory({AGENT: 5})
    loop = asyncio.get_running_loop()
    resolver = SlowToResolve(0.3, on_ask=lambda: setattr(lane.fence, "valid_until", loop.time()))
    connector = aiohttp.TCPConnector(resolver=resolver, force_close=True)
    lane = OneLane(tmp_path, pg_dsn, simulator, 1, valid_for_s=3600, connector=connector)
    async with asyncio.timeout(30), lane:
        while not resolver.asked or (await lane.states()) != {"queued": 1}:
            await asyncio.sleep(0.05)
    assert simulator.arrivals == []


async def test_a_lease_given_up_is_released_an_interval_after_its_last_send_left(
    tmp_path, pg_dsn, simulator_factory, monkeypatch
):
    """A second daemon joins: the first gives one of its two agents up. Nothing more leaves
    under that lease, and it is released no sooner than an interval after the lane's last
    send left, which the next holder's first send cannot then follow too closely (it spaces
    from the send's mark, which may be long before)."""
    agents = {AGENT: ("eu", 5), "agent-us": ("us", 5)}
    simulator = await simulator_factory(dict.fromkeys(agents, 5))
    endpoints = {region: simulator.endpoint(region) for region in ("eu", "us")}
    config = dataclasses.replace(
        make_config(tmp_path, endpoints, agents), cluster=cluster_of(pg_dsn, "d1", LEASE_S)
    )
    ledger = Ledger(tmp_path / "state", config.cluster)
    ledger.open()
    released: list[tuple[list[str], float]] = []
    release = ledger.release_leases

    async def noted(given_up: list[str]) -> None:
        released.append((given_up, asyncio.get_running_loop().time()))
        await release(given_up)

    monkeypatch.setattr(ledger, "release_leases", noted)
    try:
        assert await ledger.join() is None
        fields = [r for agent in agents for r in requests_for(agent, 40, block=len(agent))]
        requests = [build_request(f, config, f"t:{i}") for i, f in enumerate(fields)]
        await ledger.add(requests, [], None, 0)
        async with studio.session(5) as http, asyncio.timeout(30):
            client = studio.StudioClient(http, KEY, config.api.endpoints)
            dispatcher = Dispatcher(Wiring(ledger, client, lambda: None, Metrics()))
            async with asyncio.TaskGroup() as group:
                dispatcher.start([], group)
                leases = Leases(ledger, dispatcher, lambda: config, Metrics())
                rounds = group.create_task(leases.run())
                while len({a.agent_id for a in simulator.placed()}) < 2:
                    await asyncio.sleep(0.01)
                lanes = dict(dispatcher.lanes)
                await asyncio.to_thread(another_daemon_joins, pg_dsn)
                leases.wake()
                while not released:
                    await asyncio.sleep(0.01)
                rounds.cancel()
                dispatcher.stop()
            await dispatcher.drain(1.0)
    finally:
        ledger.close()
    [([given_up], released_at)] = released
    lane = lanes[given_up]
    assert lane.fence.valid_until == -math.inf
    assert released_at >= lane.left_at + lane.interval


def another_daemon_joins(dsn: str) -> None:
    other = postgres.connect(dsn)
    new_run(other, "d2")
    other.close()


def taken_by_another(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute(
            "UPDATE leases SET run = NULL, instance = 'd2', epoch = epoch + 1 WHERE agent_id = %s",
            (AGENT,),
        )


def test_a_mark_holds_off_a_takeover_until_it_commits(pg, pg_dsn):
    """The mark checks the lease FOR SHARE: a takeover, which updates the row, waits until the
    mark's transaction has committed, so no send is marked under a lease already taken."""
    holder = new_run(pg, "d1")
    renew(pg, holder, [AGENT], LEASE_S)
    take(pg, holder, "d1", [AGENT], LEASE_S)
    seq = queued(pg, "r1")
    pg.execute("BEGIN")
    assert mark_sending(pg, seq, None, 1, 0.0, None, fence=(holder, 1)) == (True, None)
    other = psycopg.connect(pg_dsn, autocommit=True)
    other.execute("SET lock_timeout = '200ms'")
    with pytest.raises(psycopg.errors.LockNotAvailable):
        other.execute("UPDATE leases SET epoch = epoch + 1 WHERE agent_id = %s", (AGENT,))
    pg.execute("COMMIT")
    other.execute("UPDATE leases SET epoch = epoch + 1 WHERE agent_id = %s", (AGENT,))
    other.close()


def test_a_lease_given_up_is_free_at_once_and_not_renewed_again(pg):
    first, second = new_run(pg, "d1"), new_run(pg, "d2")
    renew(pg, first, [AGENT], LEASE_S)
    take(pg, first, "d1", [AGENT], LEASE_S)
    release(pg, first, [AGENT])
    assert renew(pg, first, [AGENT], LEASE_S).held == {}
    round_ = renew(pg, second, [AGENT], LEASE_S)
    assert round_.free == [AGENT] and round_.live == [first, second]
    assert take(pg, second, "d2", [AGENT], LEASE_S) == ({AGENT: 2}, 0)


def test_a_daemon_that_leaves_frees_its_leases_and_counts_as_alive_no_more(pg):
    first, second = new_run(pg, "d1"), new_run(pg, "d2")
    agents = [AGENT, "agent-us"]
    renew(pg, first, agents, LEASE_S)
    take(pg, first, "d1", agents, LEASE_S)
    leave(pg, first)
    round_ = renew(pg, second, agents, LEASE_S)
    assert round_.live == [second] and round_.free == sorted(agents)


def test_a_second_live_daemon_of_one_instance_is_told_how_long_the_first_has_left(pg):
    new_run(pg, "d1")
    (run,) = pg.execute("INSERT INTO runs (pid, started_at) VALUES (2, 0) RETURNING run").fetchone()
    left = join(pg, run, "d1", LEASE_S)
    assert left is not None and 0 < left <= LEASE_S


@given(agents=st.integers(0, 300), runs=st.integers(1, 12))
def test_the_shares_add_up_to_every_agent_and_differ_by_one_at_most(agents, runs):
    live = list(range(100, 100 + runs))
    shares = [share(agents, live, run) for run in live]
    assert sum(shares) == agents and max(shares) - min(shares) <= 1


def test_an_agent_moves_only_from_a_holder_with_more_than_its_share():
    assert plan({"a", "b"}, ["c", "d"], 3, run=1) in ((["c"], []), (["d"], []))
    assert plan({"a", "b", "c"}, ["d"], 3, run=1) == ([], [])
    assert plan({"a", "b", "c", "d"}, [], 3, run=1) == ([], ["d"])


def test_daemons_taking_at_once_mostly_ask_for_different_agents():
    free = [f"agent-{n}" for n in range(12)]
    firsts = {plan(set(), free, 1, run)[0][0] for run in range(1, 21)}
    assert len(firsts) > 5, firsts


def test_a_chore_every_daemon_runs_is_done_by_one_at_a_time(pg, pg_dsn):
    """Pruning, expiry and settling would take the same rows on each daemon: while one
    daemon's transaction does a chore, another's skips it (and comes back at its next round)."""
    from dialerd.ledger.placed import settle_placed
    from dialerd.ledger.retention import prune
    from dialerd.ledger.sends import expire_due, finish

    seq = queued(pg, "old")
    finish(pg, seq, "dialed", {})
    pg.execute("UPDATE requests SET finished_at = 0 WHERE seq = ?", (seq,))
    other = postgres.connect(pg_dsn)
    other.execute("BEGIN")
    assert prune(other, 10.0, 1.0, 200) == 1
    assert (expire_due(other, 0.0, 1.0), settle_placed(other, 0.0)) == (0, (0, None))
    pg.execute("BEGIN")
    assert prune(pg, 10.0, 1.0, 200) == 0, "another daemon is pruning"
    assert settle_placed(pg, 0.0) == (0, None)
    pg.execute("ROLLBACK")
    other.execute("COMMIT")
    other.close()
    assert pg.execute("SELECT count(*) FROM requests").fetchone() == (0,)


def test_two_daemons_count_outcomes_without_waiting_on_each_other(pg, pg_dsn):
    """Each daemon counts in its own row (its shard), so that finishing requests of one agent or
    campaign never waits on another daemon's open group commit; status reads the sum."""
    from dialerd.ledger.sends import finish
    from dialerd.ledger.status import status_report

    first, second = (postgres.connect(pg_dsn, shard=name) for name in ("d1", "d2"))
    for request_id in ("r1", "r2"):
        request = build_request(
            {"id": request_id, "to": "+447700900123", "campaign": "spring"}, CONFIG, "test:1"
        )
        add(pg, 1, [request], [], None, 0)
    seqs = dict(pg.execute("SELECT id, seq FROM requests").fetchall())
    first.execute("BEGIN")
    finish(first, seqs["r1"], "dialed", {})
    second.execute("SET lock_timeout = '200ms'")
    finish(second, seqs["r2"], "dialed", {})  # not held up by the first's open transaction
    first.execute("COMMIT")
    report = status_report(pg, 0)
    assert report["outcomes"] == {"dialed": 2}
    assert report["campaigns"]["spring"]["outcomes"] == {"dialed": 2}
    first.close()
    second.close()


def test_two_daemons_of_one_name_starting_at_once_are_not_both_let_in(pg, pg_dsn):
    """The first to join holds the name: the second, in a transaction begun beside the first's,
    is told to wait, not let in."""
    other = postgres.connect(pg_dsn)
    runs = [
        conn.execute("INSERT INTO runs (pid, started_at) VALUES (1, 0) RETURNING run").fetchone()[0]
        for conn in (pg, other)
    ]
    pg.execute("BEGIN")
    assert join(pg, runs[0], "dialer-1", LEASE_S) is None
    other.execute("SET lock_timeout = '200ms'")
    other.execute("BEGIN")
    with pytest.raises(psycopg.errors.LockNotAvailable):  # waits for the first's commit
        join(other, runs[1], "dialer-1", LEASE_S)
    other.execute("ROLLBACK")
    pg.execute("COMMIT")
    assert join(other, runs[1], "dialer-1", LEASE_S) is not None
    other.close()


def test_a_send_left_by_a_holder_no_daemon_followed_ends_in_doubt(pg):
    """An agent taken out of every daemon's config: its lease is never taken again, and what
    its last holder had in flight ends in_doubt once the lease has been out for long enough."""
    from dialerd.ledger.leases import ORPHAN_AFTER_S, park_orphans

    holder = new_run(pg, "d1")
    renew(pg, holder, [AGENT, "agent-us"], LEASE_S)
    take(pg, holder, "d1", [AGENT, "agent-us"], LEASE_S)
    orphan, held = queued(pg, "r1"), queued(pg, "r2")
    pg.execute("UPDATE requests SET agent_id = 'agent-us' WHERE seq = ?", (held,))
    for seq in (orphan, held):
        assert mark_sending(pg, seq, None, 1, 0.0, None, fence=(holder, 1)) == (True, None)
    pg.execute(
        "UPDATE leases SET expires_at = clock_timestamp() - make_interval(secs => ?)"
        " WHERE agent_id = ?",
        (ORPHAN_AFTER_S / 2, AGENT),
    )
    assert park_orphans(pg) == 0, "not out for long enough"
    pg.execute(
        "UPDATE leases SET expires_at = clock_timestamp() - make_interval(secs => ?)"
        " WHERE agent_id = ?",
        (ORPHAN_AFTER_S + 1, AGENT),
    )
    assert park_orphans(pg) == 1
    states = dict(pg.execute("SELECT id, coalesce(outcome, state) FROM requests").fetchall())
    assert states == {"r1": "in_doubt", "r2": "sending"}
