"""Time that cannot jump (SPEC §8.8): the wall clock may be stepped, back or forward, between two
runs or during one; spacing is measured on the monotonic clock, and a stored moment the wall
clock has not reached yet is not waited for."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import cluster_of, read_results, result_lines, run_dialerd, sim_config
from test_cluster import ledger_url
from test_faults import drop

from dialerd import clock
from dialerd.config import build_config
from dialerd.daemon import Daemon
from dialerd.ledger import Ledger, connect, create_schema, postgres
from dialerd.ledger.opening import open_ledger
from dialerd.ledger.sends import follow_clock_step
from dialerd.simulator import Faults

NUMBERS = [f"4477009004{n:02d}" for n in range(3)]


def test_a_last_send_stored_in_the_future_does_not_stall_the_agent(tmp_path, simulator):
    """The clock was stepped back an hour since the last run: its last send now seems an hour
    ahead. The agent sends at once, at its rate, and says why it spaced from now."""
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim)
    first = run_dialerd("run", "-c", str(config), input=b'{"to": "447700900499"}\n')
    assert first.returncode == 0, first.stderr.decode()
    ledger = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3", isolation_level=None)
    ledger.execute("UPDATE agent_sends SET last_sent_at = last_sent_at + 3600")
    ledger.close()

    lines = "".join(json.dumps({"to": number}) + "\n" for number in NUMBERS).encode()
    again = run_dialerd("run", "-c", str(config), input=lines, timeout=30)
    assert again.returncode == 0, again.stderr.decode()
    assert [r["outcome"] for r in result_lines(again.stdout)] == ["dialed"] * len(NUMBERS)
    arrivals = [a for a in sim.arrivals() if a["to"] in NUMBERS]
    gaps = [b["at"] - a["at"] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == len(NUMBERS) and all(gap >= 0.19 for gap in gaps), gaps
    warnings = [
        json.loads(line)
        for line in again.stderr.decode().splitlines()
        if "last send recorded is ahead of the clock" in line
    ]
    assert [w["agent"] for w in warnings] == ["agent-a"]
    assert 3590 < warnings[0]["ahead_s"] <= 3600


# -- a step during a run ------------------------------------------------------------------------


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = connect(tmp_path / "ledger.sqlite3")
    create_schema(conn)
    return conn


def test_a_step_moves_the_waits_and_what_was_due_and_keeps_the_fixed_moments(conn):
    """At 1000 the clock is stepped back an hour. Each row: (state, due_at, sent_at, held)."""
    rows = {
        "due": ("queued", 990, None, None),  # taken, due, not sent yet
        "retry": ("queued", 1030, 995, None),  # refused at 995, due again 30 s later
        "cap": ("queued", 1500, None, "cap"),  # the number's cap lets it go at 1500
        "placed": ("placed", 1060, 999, None),  # waiting wait_s for a callback
        "not-before": ("queued", 5000, None, None),  # the submitter's not_before
        "hours": ("queued", 8000, 900, "calling_hours"),  # the calling hours open then
        "done": ("final", 990, 980, None),
    }
    for request_id, (state, due_at, sent_at, held) in rows.items():
        conn.execute(
            "INSERT INTO requests (id, run, agent_id, to_number, body, source, due_at,"
            " first_due_at, state, sent_at, held, created_at)"
            " VALUES (?, 1, 'a', '447700900123', '{}', 's', ?, ?, ?, ?, ?, 0)",
            (request_id, due_at, due_at, state, sent_at, held),
        )
    conn.execute("INSERT INTO agent_sends VALUES ('a', 999)")

    assert follow_clock_step(conn, -3600, 1000) == 4
    due = dict(conn.execute("SELECT id, due_at FROM requests").fetchall())
    assert due == {
        "due": 990 - 3600, "retry": 1030 - 3600, "cap": 1500 - 3600, "placed": 1060 - 3600,
        "not-before": 5000, "hours": 8000, "done": 990,
    }  # fmt: skip
    assert conn.execute("SELECT last_sent_at FROM agent_sends").fetchone() == (999 - 3600,)


async def test_only_a_step_is_reported_not_drift(monkeypatch):
    wall = {"offset": 0.0}
    monkeypatch.setattr(clock, "LOOK_EVERY_S", 0.01)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + wall["offset"])
    steps = []

    async def on_step(step: float, stepped_at: float) -> None:
        steps.append((step, stepped_at))

    follower = asyncio.create_task(clock.follow_steps(on_step))
    try:
        for _ in range(20):  # drift, 0.1 s a look: never a step, however long it goes on
            wall["offset"] += 0.1
            await asyncio.sleep(0.02)
        wall["offset"] -= 3600
        async with asyncio.timeout(5):
            while not steps:
                await asyncio.sleep(0.01)
    finally:
        follower.cancel()
    [(step, stepped_at)] = steps
    assert -3600.2 < step < -3599.9
    assert abs(stepped_at - (real_time() + wall["offset"] + 3600)) < 1


async def test_a_clock_stepped_back_during_a_run_leaves_what_was_due_due(tmp_path, monkeypatch):
    """At rate 1, a second file taken while the lane sends the first (it has read those five
    ahead): its requests are due when the clock is stepped back an hour, and are sent all the
    same."""
    wall = {"offset": 0.0}
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + wall["offset"])
    monkeypatch.setattr(clock, "LOOK_EVERY_S", 0.1)
    spool = tmp_path / "spool"
    config = spool_config(tmp_path, rate=1)
    results = tmp_path / "state" / "results.jsonl"
    async with running(config):
        drop(spool, "first.jsonl", lines(0, 5))
        while len(read_results(results)) < 1:
            await asyncio.sleep(0.05)
        drop(spool, "second.jsonl", lines(5, 8))  # taken long before the lane reads it
        while not (spool / "done" / "second.jsonl").exists():
            await asyncio.sleep(0.05)
        wall["offset"] = -3600.0
        while len(read_results(results)) < 8:
            await asyncio.sleep(0.05)
    assert {r["outcome"] for r in read_results(results)} == {"dialed"}


def spool_config(tmp_path: Path, rate: int, **more):
    """agent-a at `rate`, its requests from tmp_path/spool, sent to the simulator in the
    daemon; `more` keys."""
    return build_config(
        {
            "api": {"key_env": "VGAI_KEY", "timeout_s": 2},
            "agents": {"agent-a": {"region": "eu", "rate": rate}},
            "state_dir": str(tmp_path / "state"),
            "spool": {"dir": str(tmp_path / "spool")},
            "stdin": False,
            **more,
        }
    )


@contextlib.asynccontextmanager
async def running(config):
    """The daemon of `config` in this loop, its spool ready; stopped as by SIGTERM after."""
    daemon = Daemon(config, simulate=Faults())
    run = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(30):
            while not (config.spool_dir / "incoming").exists():
                await asyncio.sleep(0.05)
            yield daemon
        daemon.request_stop("test")
        await asyncio.wait_for(run, 15)
    finally:
        if not run.done():
            run.cancel()


def lines(start: int, end: int) -> str:
    return "".join(json.dumps({"to": f"4477009004{n:02d}"}) + "\n" for n in range(start, end))


# -- cluster mode: the database's clock -----------------------------------------------------------


@pytest.fixture
def an_hour_ahead(monkeypatch):
    """This host's wall clock an hour ahead of the database's (stepped, or skewed); the real
    time."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    return real_time


def test_the_database_clock_is_followed_between_two_readings(an_hour_ahead):
    clock.follow_database(1_000.0, time.monotonic() - 2.5)
    assert 1_002.5 <= clock.now() < 1_003.5


def test_a_command_on_a_host_with_a_skewed_clock_reads_the_database_clock(
    tmp_path, pg_dsn, an_hour_ahead, monkeypatch
):
    cluster = cluster_of(pg_dsn)
    ledger = Ledger(tmp_path, cluster)
    ledger.open()  # the schema, as a daemon makes it (and its clock followed, forgotten here)
    ledger.close()
    monkeypatch.setattr(clock, "_database", None)
    conn = open_ledger(tmp_path, cluster)
    conn.close()
    assert abs(clock.now() - an_hour_ahead()) < 1


async def test_each_lease_round_reads_the_databases_clock_again(tmp_path, pg_dsn):
    ledger = Ledger(tmp_path, cluster_of(pg_dsn))
    ledger.open()
    try:
        assert await ledger.join() is None
        clock.follow_database(time.time() + 3600, time.monotonic())  # a reading an hour off
        await ledger.lease_round(["agent-a"])
        assert abs(clock.now() - time.time()) < 1
    finally:
        ledger.close()


async def test_a_daemon_in_a_cluster_keeps_to_the_databases_clock_not_its_hosts(
    tmp_path, pg_dsn, an_hour_ahead
):
    """Its host's clock is an hour ahead: a request not before a minute from now waits, and
    those due now go at once, each with its result."""
    spool = tmp_path / "spool"
    cluster = {"ledger": ledger_url(pg_dsn), "instance": "skewed", "lease_s": 2}
    config = spool_config(tmp_path, rate=5, results=str(tmp_path / "results.jsonl"), **cluster)
    later = dt.datetime.fromtimestamp(an_hour_ahead() + 60, dt.UTC).isoformat()
    waiting = json.dumps({"id": "later", "to": "447700900490", "not_before": later}) + "\n"
    async with running(config):
        drop(spool, "batch.jsonl", waiting + lines(0, 3))
        while len(read_results(tmp_path / "results.jsonl")) < 3:
            await asyncio.sleep(0.05)
    assert [r["outcome"] for r in read_results(tmp_path / "results.jsonl")] == ["dialed"] * 3
    conn = postgres.connect(ledger_url(pg_dsn))
    (state,) = conn.execute("SELECT state FROM requests WHERE id = 'later'").fetchone()
    conn.close()
    assert state == "queued"
