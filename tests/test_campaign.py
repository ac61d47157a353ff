"""Campaign rules at send time: calling hours, the per-number cap, expiry while waiting, and a
ledger of an older version brought up to date (SPEC 3 campaign rules, 6 `blocked`/`expired`)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import signal
import socket
import sqlite3
import time
from collections import Counter

import pytest
from conftest import read_results, run_dialerd, sim_config, wait_for

from dialerd.config import NumberCap, build_config
from dialerd.ledger import MIGRATIONS, SCHEMA, Ledger, read_status
from dialerd.request import build_request

NUMBER = "447700900555"


# -- the cap in the ledger -------------------------------------------------------------------


@pytest.fixture
async def ledger(new_ledger):
    """Each test of the cap and of expiry runs on SQLite and on PostgreSQL."""
    ledger = new_ledger()
    await asyncio.to_thread(ledger.open)
    if ledger.cluster is not None:
        assert await ledger.join() is None  # as a daemon's run: the results are its instance's
    yield ledger
    await asyncio.to_thread(ledger.close)


CONFIG = build_config(
    {"api": {"key_env": "VGAI_KEY"}, "agents": {"agent-a": {"region": "eu", "rate": 5}}}
)


async def queue(ledger: Ledger, id_: str, to: str = NUMBER) -> int:
    await ledger.add([build_request({"id": id_, "to": to}, CONFIG, "test:1")], [], None, 0)
    due, _ = await ledger.due("agent-a", time.time() + 1, 1000)
    return next(p.seq for p in due if p.id == id_)


async def test_the_cap_counts_sends_in_flight_and_placed_but_not_refused_ones(ledger):
    cap = NumberCap(count=2, per_s=3600)
    first, second, third = [await queue(ledger, name) for name in ("first", "second", "third")]
    assert await ledger.mark_sending(first, None, 1, cap) == (True, None)
    assert await ledger.mark_sending(second, None, 1, cap) == (True, None)
    marked, allowed_at = await ledger.mark_sending(third, None, 1, cap)
    assert not marked and allowed_at == pytest.approx(time.time() + 3600, abs=5)

    await ledger.retry_later(second, time.time(), True, "HTTP 503")  # refused: no call placed
    assert await ledger.mark_sending(third, None, 1, cap) == (True, None)
    await ledger.finish(first, "dialed", attempts=1)
    await ledger.finish(third, "in_doubt", error="timed out")  # may have been placed: counts
    marked, allowed_at = await ledger.mark_sending(second, None, 1, cap)
    assert not marked, "a dialed and an in_doubt call fill a cap of 2"

    other = await queue(ledger, "other-number", to="447700900556")
    assert await ledger.mark_sending(other, None, 1, cap) == (True, None)


async def test_the_cap_opens_when_the_oldest_call_leaves_its_window(ledger):
    cap = NumberCap(count=1, per_s=1.0)
    first, second = await queue(ledger, "first"), await queue(ledger, "second")
    assert (await ledger.mark_sending(first, None, 1, cap))[0]
    sent_at = time.time()
    await ledger.finish(first, "dialed", attempts=1)
    marked, allowed_at = await ledger.mark_sending(second, None, 1, cap)
    assert not marked and sent_at <= allowed_at <= sent_at + 1.0 + 0.05
    await asyncio.sleep(max(0.0, allowed_at - time.time()) + 0.01)
    assert await ledger.mark_sending(second, None, 1, cap) == (True, None)


async def test_a_request_no_longer_queued_is_not_marked(ledger):
    seq = await queue(ledger, "expires")
    await ledger.finish(seq, "expired", error="expires_at passed before sending")
    assert await ledger.mark_sending(seq, None, 1) == (False, None)


async def test_held_requests_are_counted_with_the_time_they_wait_for(ledger):
    until = time.time() + 600
    await ledger.hold([(await queue(ledger, "night"), until)], "calling_hours")
    await ledger.hold([(await queue(ledger, "capped", to="447700900557"), until + 60)], "cap")
    agent = read_status(ledger.state_dir, ledger.cluster)["agents"]["agent-a"]
    assert (agent["held_calling_hours"], agent["held_cap"]) == (1, 1)
    assert agent["held_calling_hours_until"] == pytest.approx(until)
    assert agent["held_cap_until"] == pytest.approx(until + 60)
    assert agent["queued"] == 2 and agent["due_now"] == 0


async def test_queued_requests_expire_while_they_wait(ledger):
    soon = time.time() + 0.2
    for id_, expires_at in (("soon", soon), ("later", soon + 3600), ("never", None)):
        request = build_request({"id": id_, "to": NUMBER}, CONFIG, "test:1")
        await ledger.add([_replace_expiry(request, expires_at)], [], None, 0)
    assert await ledger.expire_due(time.time(), 432_000) == 0
    await asyncio.sleep(0.3)
    assert await ledger.expire_due(time.time(), 432_000) == 1
    lines = [json.loads(line) for _seq, line, *_ in await ledger.outbox(10)]
    assert [(r["id"], r["outcome"]) for r in lines] == [("soon", "expired")]


def _replace_expiry(request, expires_at):
    return dataclasses.replace(request, expires_at=expires_at)


def test_a_ledger_of_the_first_version_is_brought_up_to_date(tmp_path):
    """SQLite only: a file of the first schema version."""
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "ledger.sqlite3", isolation_level=None)
    conn.executescript(SCHEMA)  # as the first version made it, user_version 0
    conn.execute(
        "INSERT INTO requests (id, run, agent_id, to_number, body, source, due_at, state,"
        " created_at) VALUES ('old', 1, 'agent-a', ?, ?, 'stdin:1', 0, 'queued', 0)",
        (NUMBER, json.dumps({"agent_id": "agent-a", "to": NUMBER})),
    )
    conn.close()
    assert read_status(state)["agents"]["agent-a"]["queued"] == 1, "read before the upgrade"

    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    conn = sqlite3.connect(state / "ledger.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    assert "held" in columns
    assert conn.execute("SELECT id, state FROM requests").fetchall() == [("old", "queued")]
    conn.close()
    ledger = Ledger(state)
    ledger.open()  # a second open finds nothing left to migrate
    ledger.close()


# -- the real daemon -------------------------------------------------------------------------


def closed_window_now() -> dict:
    """calling_hours in UTC that open two hours from now."""
    now = dt.datetime.now(dt.UTC)
    start, end = now + dt.timedelta(hours=2), now + dt.timedelta(hours=3)
    return {
        "start": start.strftime("%H:%M"),
        "end": end.strftime("%H:%M"),
        "default_timezone": "UTC",
    }


def open_window_now() -> dict:
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=2)
    return {
        "start": start.strftime("%H:%M"),
        "end": end.strftime("%H:%M"),
        "default_timezone": "UTC",
    }


def iso_in(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


def status_of(config) -> dict:
    done = run_dialerd("status", "-c", str(config), "--json", timeout=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_outside_the_calling_hours_requests_wait_and_survive_a_restart(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.01-0.03")
    spool = tmp_path / "spool"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, calling_hours=closed_window_now())
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    requests = [
        {"id": "sip", "to": "sip:alice@example.com"},
        {"id": "unplaced", "to": "447700900601"},  # no zone known: the default zone
        {"id": "gives-up", "to": "447700900602", "expires_at": iso_in(3600)},
    ]
    submitted = run_dialerd(
        "submit", "-c", str(config), "-",
        input="".join(json.dumps(r) + "\n" for r in requests).encode(),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    results = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: len(read_results(results)) == 1, 15, "the one that expires first")
    agent = wait_for(
        lambda: (a := status_of(config)["agents"]["agent-a"])["held_calling_hours"] == 2 and a,
        15,
        "the two held for the calling hours",
    )
    opens_at = dt.datetime.fromisoformat(iso_in(7200)).timestamp()
    assert abs(agent["held_calling_hours_until"] - opens_at) < 61
    text = run_dialerd("status", "-c", str(config), timeout=20).stdout.decode()
    assert "2 wait for the calling hours" in text
    assert daemon.stop()[0] == 0

    (gives_up,) = read_results(results)
    assert (gives_up["id"], gives_up["outcome"]) == ("gives-up", "expired")
    assert "outside the calling hours until" in gives_up["error"]
    assert sim.arrivals() == []

    # Restarted with the window open, the held requests are dialed at once.
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, calling_hours=open_window_now())
    daemon = daemons("-c", str(config))
    wait_for(lambda: len(read_results(results)) == 3, 15, "the held requests dialed")
    assert daemon.stop()[0] == 0
    outcomes = {r["id"]: r["outcome"] for r in read_results(results)}
    assert outcomes == {"gives-up": "expired", "sip": "dialed", "unplaced": "dialed"}
    assert Counter(a["to"] for a in sim.arrivals()) == Counter(
        {"sip:alice@example.com": 1, "447700900601": 1}
    )


def test_a_number_whose_zones_never_share_the_window_ends_expired(tmp_path, simulator):
    sim = simulator("--latency", "0.01-0.03")
    hours = {"start": "09:00", "end": "10:00"}
    config = sim_config(tmp_path, sim, calling_hours=hours)
    done = run_dialerd(
        "run", "-c", str(config), input=b'{"id": "toll-free", "to": "+1 800 555 1234"}\n'
    )
    assert done.returncode == 0, done.stderr
    (result,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert result["outcome"] == "expired" and "never open" in result["error"]
    assert sim.arrivals() == []


def test_the_cap_holds_across_restarts_and_across_agents(tmp_path, simulator, daemons):
    sim = simulator("--latency", "0.01-0.03")
    spool = tmp_path / "spool"
    cap = {"count": 1, "per_s": 3600}
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, max_calls_per_number=cap)

    def submit(*requests: dict) -> None:
        data = "".join(json.dumps(r) + "\n" for r in requests).encode()
        done = run_dialerd("submit", "-c", str(config), "-", input=data)
        assert done.returncode == 0, done.stderr

    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    submit({"id": "first", "to": NUMBER})
    wait_for(lambda: len(read_results(results)) == 1, 15, "the first call")
    assert daemon.stop()[0] == 0

    daemon = daemons("-c", str(config))
    daemon.wait_running()
    submit(
        {"id": "same-agent", "to": f"+{NUMBER}"},
        {"id": "other-agent", "to": NUMBER, "agent_id": "agent-b"},
        {"id": "in-a-hurry", "to": NUMBER, "agent_id": "agent-b", "expires_at": iso_in(600)},
        {"id": "someone-else", "to": "447700900556"},
    )
    wait_for(lambda: len(read_results(results)) == 3, 15, "the free number and the hurried one")
    status = wait_for(
        lambda: (
            (s := status_of(config)["agents"])["agent-a"]["held_cap"] + s["agent-b"]["held_cap"]
            == 2
            and s
        ),
        15,
        "the two over the cap held",
    )
    first_sent = next(a["wall"] for a in sim.arrivals() if a["to"] == NUMBER)
    assert abs(status["agent-a"]["held_cap_until"] - (first_sent + 3600)) < 5
    assert daemon.stop()[0] == 0

    by_id = {r["id"]: r for r in read_results(results)}
    assert {k: r["outcome"] for k, r in by_id.items()} == {
        "first": "dialed", "someone-else": "dialed", "in-a-hurry": "blocked",
    }  # fmt: skip
    assert "max_calls_per_number" in by_id["in-a-hurry"]["error"]
    assert Counter(a["to"] for a in sim.arrivals()) == Counter({NUMBER: 1, "447700900556": 1})


def test_a_request_expires_while_it_waits_behind_others(tmp_path, simulator):
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim)
    ahead = [{"id": f"ahead-{n}", "to": f"4477009007{n:02d}"} for n in range(30)]  # 6 s at 5/s
    late = {"id": "late", "to": NUMBER, "expires_at": iso_in(2)}
    lines = "".join(json.dumps(r) + "\n" for r in (*ahead, late)).encode()
    done = run_dialerd("run", "-c", str(config), input=lines)
    assert done.returncode == 0, done.stderr
    results = [json.loads(text) for text in done.stdout.splitlines()]
    order = [r["id"] for r in results]
    assert len(order) == 31 and results[order.index("late")]["outcome"] == "expired"
    assert order.index("late") < 20, "ended at its expires_at, not when its turn came"
    assert NUMBER not in {a["to"] for a in sim.arrivals()}


def test_redials_obey_the_calling_hours_and_a_reload_judges_held_requests_again(
    tmp_path, simulator, daemons
):
    sim = simulator("--unreached", "busy=1", "--callback-delay", "0.2-0.2", "--latency", "0.05")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    top = {
        "spool": {"dir": str(tmp_path / "spool")},
        "callbacks": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "redial": {"busy": {"attempts": 3, "delay_s": 2}},
    }
    config = sim_config(tmp_path, sim, calling_hours=open_window_now(), **top)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    data = json.dumps({"id": "busy-one", "to": NUMBER}).encode()
    assert run_dialerd("submit", "-c", str(config), "-", input=data).returncode == 0
    wait_for(lambda: len(sim.arrivals()) == 1, 15, "the first call")

    def reload_with(hours: dict) -> None:
        reloads = daemon.stderr.count('"event": "reloaded"')
        sim_config(tmp_path, sim, calling_hours=hours, **top)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.stderr.count('"event": "reloaded"') > reloads, 10, "a reload")

    reload_with(closed_window_now())
    wait_for(
        lambda: status_of(config)["agents"]["agent-a"]["held_calling_hours"] == 1,
        15,
        "the redial held for the calling hours",
    )
    time.sleep(1.0)
    assert len(sim.arrivals()) == 1, "no redial outside the calling hours"

    reload_with(open_window_now())
    wait_for(lambda: len(sim.arrivals()) == 2, 15, "the redial once the hours allow it")
    assert daemon.stop()[0] == 0
