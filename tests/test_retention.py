"""Retention: final requests and all that belongs to them pruned retention_s after their outcome,
a batch at a time; their ids still taken; the answers kept short; the file given back its pages;
and, through the real daemon, done/ files pruned with them and a ledger that stops growing."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3

import aiohttp
import pytest
from aiohttp import web
from conftest import read_results, sim_config, wait_for, write_config
from test_campaign import closed_window_now
from test_faults import complete_results, drop, ledger_rows
from test_request import CONFIG

from dialerd import studio
from dialerd.config import ConfigError, load_config
from dialerd.ledger import RESPONSE_KEPT, connect, create_schema, foresee_intake
from dialerd.ledger.intake import add, take
from dialerd.ledger.placed import apply_callback
from dialerd.ledger.retention import prune, vacuum
from dialerd.ledger.sends import finish, mark_sending
from dialerd.request import build_request
from dialerd.results import Outcome
from dialerd.studio import StudioClient


@pytest.fixture
def conn(ledger_conn):
    """Each test of retention's guarantees runs on SQLite and on PostgreSQL."""
    return ledger_conn


def request(request_id: str, number: str = "+447700900123"):
    return build_request({"id": request_id, "to": number}, CONFIG, "test:1")


def sent_and_finished(conn, request_id: str, finished_at: float, callback: bool = True) -> int:
    """A request taken at 0, sent with a status_url token, called back, and final at
    `finished_at`."""
    add(conn, 1, [request(request_id)], [], None, 0)
    (seq,) = conn.execute("SELECT seq FROM requests WHERE id = ?", (request_id,)).fetchone()
    assert mark_sending(conn, seq, f"token-{request_id}", 1, 0.0, None) == (True, None)
    if callback:
        apply_callback(
            conn,
            f"token-{request_id}",
            {"status": "busy", "to": "447700900123", "agent_id": "agent-eu"},
            {},
            0.0,
        )
    finish(conn, seq, Outcome.DIALED, {"response": "{}"})
    conn.execute(
        "UPDATE requests SET created_at = 0, finished_at = ? WHERE seq = ?", (finished_at, seq)
    )
    conn.execute("UPDATE number_calls SET at = ? WHERE seq = ?", (finished_at, seq))
    return seq


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_final_request_goes_with_its_calls_callbacks_and_number_calls_and_nothing_else(conn):
    sent_and_finished(conn, "old", finished_at=100)
    sent_and_finished(conn, "recent", finished_at=195)
    add(conn, 1, [request("open")], [], None, 0)  # queued: never pruned, however old
    conn.execute("UPDATE requests SET created_at = 0, due_at = 0 WHERE id = 'open'")
    before = {table: count(conn, table) for table in ("calls", "callbacks", "number_calls")}

    assert prune(conn, now=200, retention_s=50, batch=100) == 1

    ids = {row[0] for row in conn.execute("SELECT id FROM requests")}
    assert ids == {"recent", "open"}
    assert {table: count(conn, table) for table in before} == {
        table: n - 1 for table, n in before.items()
    }
    assert conn.execute("SELECT token FROM calls").fetchall() == [("token-recent",)]
    assert count(conn, "outbox") == 2  # result lines not yet written are never pruned
    assert count(conn, "pruned_ids") == 1


def test_pruning_goes_a_batch_at_a_time_oldest_first(conn):
    for n in range(7):
        sent_and_finished(conn, f"r{n}", finished_at=10 + n, callback=False)

    assert prune(conn, now=1000, retention_s=10, batch=3) == 3
    assert {row[0] for row in conn.execute("SELECT id FROM requests")} == {"r3", "r4", "r5", "r6"}
    assert prune(conn, now=1000, retention_s=10, batch=3) == 3
    assert prune(conn, now=1000, retention_s=10, batch=3) == 1
    assert prune(conn, now=1000, retention_s=10, batch=3) == 0


def test_a_pruned_id_is_still_taken_until_it_is_remembered_no_longer(conn):
    sent_and_finished(conn, "r1", finished_at=100)
    prune(conn, now=200, retention_s=50, batch=100)
    assert conn.execute("SELECT 1 FROM requests WHERE id = 'r1'").fetchone() is None
    # Kept as a digest: the id itself (which may name a person) is not in the file.
    [(digest, taken_at, until)] = conn.execute("SELECT * FROM pruned_ids").fetchall()
    assert b"r1" not in digest and len(digest) == 16 and (taken_at, until) == (0, 250)

    request_id, error = take(conn, 1, request("r1"), 240, 0)
    assert request_id == "r1"
    taken = "id 'r1' was already taken by an earlier request (pruned since, taken 1970-01-01T"
    assert error.startswith(taken)

    prune(conn, now=251, retention_s=50, batch=100)  # remembered as long as retention_s again
    assert count(conn, "pruned_ids") == 0
    assert take(conn, 1, request("r1"), 252, 0) == ("r1", None)


def test_submit_foresees_a_pruned_id_as_taken(tmp_path, sqlite_conn):
    """SQLite only: submit foresees its intake from the ledger file."""
    conn = sqlite_conn
    sent_and_finished(conn, "r1", finished_at=100)
    prune(conn, now=200, retention_s=50, batch=100)
    conn.close()
    assert foresee_intake(tmp_path, [request("r1"), request("r2")], 0) == [
        ("r1", True),
        ("r2", False),
    ]


def test_refusals_requeues_and_controls_are_pruned_by_their_age(conn):
    add(conn, 1, [], [{"source": "test:1", "error": "bad", "id": "x"}], None, 0)
    conn.execute("UPDATE rejects SET at = 10")
    conn.execute("INSERT INTO requeues (id, previous_error, at) VALUES ('r', 'e', 10)")
    conn.execute("INSERT INTO requeues (id, previous_error, at) VALUES ('s', 'e', 90)")
    conn.execute("INSERT INTO controls (action, target, at) VALUES ('pause', 'campaign A', 10)")

    assert prune(conn, now=100, retention_s=50, batch=100) == 1
    assert count(conn, "rejects") == 0
    assert conn.execute("SELECT id FROM requeues").fetchall() == [("s",)]
    assert count(conn, "controls") == 0


def test_the_pages_pruning_frees_are_given_back_on_a_new_ledger(sqlite_conn):
    """SQLite only: the file's pages (PostgreSQL's autovacuum does this itself)."""
    conn = sqlite_conn
    for n in range(400):
        sent_and_finished(conn, f"r{n:03d}-" + "x" * 100, finished_at=10, callback=False)
    conn.execute("UPDATE requests SET body = ?", ("b" * 2000,))
    (full,) = conn.execute("PRAGMA page_count").fetchone()
    while prune(conn, now=1000, retention_s=10, batch=100):
        pass
    while vacuum(conn):
        pass
    (after,) = conn.execute("PRAGMA page_count").fetchone()
    assert after < full / 4
    assert conn.execute("PRAGMA freelist_count").fetchone() == (0,)


def test_a_ledger_made_before_retention_keeps_its_free_pages_for_reuse(tmp_path):
    """SQLite only: a file made by an older SQLite ledger."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("CREATE TABLE t (x)")  # a table first: SQLite's auto_vacuum stays off
    conn = connect(path)
    create_schema(conn)
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    sent_and_finished(conn, "r1", finished_at=10)
    prune(conn, now=1000, retention_s=10, batch=100)
    assert vacuum(conn) == 0


def test_an_answer_is_kept_at_response_kept_characters(conn):
    add(conn, 1, [request("r1")], [], None, 0)
    finish(conn, 1, Outcome.FAILED, {"response": "é" * (10 * RESPONSE_KEPT)})
    (kept,) = conn.execute("SELECT response FROM requests").fetchone()
    assert kept == "é" * RESPONSE_KEPT


async def test_an_answer_is_read_only_as_far_as_answer_read_max():
    written = []

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500, headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(5 * 1024):  # 5 MiB, if the client took it all
                await response.write(b"x" * 1024)
                written.append(1024)
        return response

    app = web.Application()
    app.router.add_post("/make-call", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http:
            client = StudioClient(http, "k" * 20, {"eu": f"http://{host}:{port}/make-call"})
            departed = asyncio.get_running_loop().create_future()
            result = await client.make_call("eu", {"agent_id": "a"}, departed)
    finally:
        await runner.cleanup()
    assert result.http_status == 500
    assert len(result.response) == studio.ANSWER_READ_MAX
    assert sum(written) < 5 * 1024 * 1024  # the rest was never taken in


@pytest.mark.parametrize(
    ("top", "problem"),
    [
        ({"retention_s": 0}, "retention_s: must be above 0"),
        ({"retention_s": "month"}, "retention_s: must be a number"),
        (
            {"retention_s": 3600, "max_calls_per_number": {"count": 1, "per_s": 7200}},
            "max_calls_per_number.per_s: must not exceed retention_s (3600)",
        ),
    ],
)
def test_retention_s_is_checked_by_key(tmp_path, top, problem):
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, **top))
    assert any(line.startswith(problem) for line in refused.value.problems), refused.value


# -- through the real daemon ---------------------------------------------------------------------


def requests_file(ids: list[str], **fields) -> str:
    return "".join(
        json.dumps({"id": request_id, "to": f"+4477009{n:05d}", **fields}) + "\n"
        for n, request_id in enumerate(ids)
    )


def test_final_requests_and_their_done_files_go_and_their_ids_stay_taken(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.01-0.02")
    spool = tmp_path / "spool"
    # Long enough to drop the file again while the pruned ids are still remembered.
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, retention_s=4)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    ids = [f"r{n}" for n in range(10)]

    drop(spool, "first.jsonl", requests_file(ids))
    wait_for(lambda: len(complete_results(results)) == 10, 20, "ten results")
    wait_for(
        lambda: (
            ledger_rows(ledger, "SELECT count(*) FROM requests") == [(0,)]
            and not list((spool / "done").iterdir())
        ),
        15,
        "the requests and their done/ file pruned",
    )
    assert ledger_rows(ledger, "SELECT count(*) FROM calls, number_calls") == [(0,)]

    drop(spool, "again.jsonl", requests_file(ids))
    again = wait_for(lambda: len(r := complete_results(results)) == 20 and r[10:], 20, "ten more")
    assert {result["outcome"] for result in again} == {"duplicate"}, again
    assert all("(pruned since, taken " in result["error"] for result in again)
    assert len(sim.placed()) == 10 and set(sim.placed().values()) == {1}  # each called once
    assert daemon.stop()[0] == 0


def test_the_ledger_stops_growing_when_what_it_takes_in_is_pruned(tmp_path, daemons):
    """Rounds of requests that expire while they wait (the calling hours are closed), each
    pruned before the next: the file holds what one round needs, and no more."""
    spool = tmp_path / "spool"
    config = write_config(  # nothing is sent: no API is needed
        tmp_path,
        spool={"dir": str(spool)},
        retention_s=1,
        calling_hours=closed_window_now(),
    )
    ledger = tmp_path / "state" / "ledger.sqlite3"
    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    pages = []
    for round_ in range(6):
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
        ids = [f"round{round_}-{n}" for n in range(2000)]
        drop(spool, f"round{round_}.jsonl", requests_file(ids, expires_at=expires))
        expired = 2000 * (round_ + 1)
        wait_for(lambda n=expired: len(complete_results(results)) == n, 30, "expired")
        wait_for(
            lambda: (
                ledger_rows(ledger, "SELECT count(*) FROM requests") == [(0,)]
                and ledger_rows(ledger, "PRAGMA freelist_count") == [(0,)]
            ),
            15,
            "pruned, and the pages given back",
        )
        pages.append(ledger_rows(ledger, "PRAGMA page_count")[0][0])
    assert {r["outcome"] for r in read_results(results)} == {"expired"}
    # Kept, each round's requests would add as much again as the first round took.
    assert max(pages[1:]) <= 2 * pages[0], pages
    assert daemon.stop()[0] == 0
