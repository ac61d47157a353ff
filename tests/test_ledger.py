"""The ledger's lifecycle: the one table of moves between a request's states, each move one
guarded statement, so a move made twice, or raced by another process on the same file, applies
once; and the storage calls built on it never move a request the wrong way."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import another_connection, ledger_of_version
from test_request import CONFIG

from dialerd.config import RedialPolicy
from dialerd.ledger import Ledger, connect, create_schema, status_report
from dialerd.ledger.dialect import dialect
from dialerd.ledger.intake import add
from dialerd.ledger.placed import apply_callback, placed
from dialerd.ledger.requeue import requeue
from dialerd.ledger.sends import due, expire_due, finish, mark_sending, retry_later
from dialerd.ledger.states import TRANSITIONS, Add, Move, State, move
from dialerd.request import build_request
from dialerd.results import Outcome


@pytest.fixture
def conn(ledger_conn):
    """Each test of the ledger's guarantees runs on SQLite and on PostgreSQL."""
    return ledger_conn


def queued(conn: sqlite3.Connection, request_id: str = "r1") -> int:
    request = build_request({"id": request_id, "to": "+447700900123"}, CONFIG, "test:1")
    add(conn, 1, [request], [], None, 0)
    return conn.execute("SELECT seq FROM requests WHERE id = ?", (request_id,)).fetchone()[0]


def state_of(conn: sqlite3.Connection, seq: int) -> tuple[str, str | None]:
    return conn.execute("SELECT state, outcome FROM requests WHERE seq = ?", (seq,)).fetchone()


def result_lines(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


@pytest.mark.parametrize("how", list(Move))
@pytest.mark.parametrize("start", list(State))
def test_a_move_applies_only_from_the_states_the_table_allows(conn, how, start):
    seq = queued(conn)
    outcome = Outcome.IN_DOUBT if start == State.FINAL else None
    conn.execute("UPDATE requests SET state = ?, outcome = ? WHERE seq = ?", (start, outcome, seq))
    transition = TRANSITIONS[how]
    moved = move(conn, seq, how)
    assert moved == (start in transition.sources)
    assert state_of(conn, seq)[0] == (transition.target if moved else start)


def test_every_state_is_reached_and_left_by_some_move():
    targets = {t.target for t in TRANSITIONS.values()}
    sources = {s for t in TRANSITIONS.values() for s in t.sources}
    assert targets == sources == set(State)


def test_a_requeue_takes_only_a_request_in_doubt(conn):
    seq = queued(conn)
    finish(conn, seq, Outcome.FAILED, {"error": "refused"})
    assert not move(conn, seq, Move.REQUEUE)
    conn.execute("UPDATE requests SET outcome = ? WHERE seq = ?", (Outcome.IN_DOUBT, seq))
    assert move(conn, seq, Move.REQUEUE, outcome=None)
    assert state_of(conn, seq) == (State.QUEUED, None)


def test_a_column_may_be_added_to(conn):
    seq = queued(conn)
    move(conn, seq, Move.SEND)
    move(conn, seq, Move.RETRY, retries=Add(1))
    move(conn, seq, Move.SEND)
    move(conn, seq, Move.RETRY, retries=Add(0))
    assert conn.execute("SELECT retries FROM requests WHERE seq = ?", (seq,)).fetchone() == (1,)


def test_two_processes_marking_one_send_mark_it_once(tmp_path, conn):
    """Two daemons on one ledger: each marks the send in its own transaction; the second finds
    the request no longer queued, and must not send it."""
    seq = queued(conn)
    other = another_connection(conn, tmp_path)
    marked = []
    for each in (conn, other):
        each.execute(dialect(each).begin)
        marked.append(mark_sending(each, seq, None, 1, 100.0, None))
        each.execute("COMMIT")
    assert marked == [(True, None), (False, None)]
    assert conn.execute("SELECT count(*) FROM number_calls").fetchone() == (1,)


def test_a_finish_is_applied_once(conn):
    seq = queued(conn)
    finish(conn, seq, Outcome.EXPIRED, {"error": "first"})
    finish(conn, seq, Outcome.FAILED, {"error": "second"})
    assert state_of(conn, seq) == (State.FINAL, Outcome.EXPIRED)
    assert result_lines(conn) == 1


def test_a_send_queued_again_without_a_due_time_keeps_its_place(conn):
    first, second = queued(conn, "r1"), queued(conn, "r2")
    conn.execute("UPDATE requests SET due_at = seq")
    assert mark_sending(conn, first, None, 1, 10.0, None) == (True, None)
    retry_later(conn, first, None, False, "HTTP 401")
    assert [p.id for p in due(conn, "agent-eu", 100.0, 10)[0]] == ["r1", "r2"]
    assert conn.execute(
        "SELECT due_at, retries FROM requests WHERE seq = ?", (first,)
    ).fetchone() == (first, 0)
    del second


def test_a_late_answer_does_not_bring_a_final_request_back(conn):
    """A send finished meanwhile (an operator's cancel, a stop's in_doubt): its answer, or a
    retry, records what it must (the call counts for the cap) and moves nothing."""
    seq = queued(conn)
    mark_sending(conn, seq, "tok", 1, 100.0, None)
    finish(conn, seq, Outcome.IN_DOUBT, {"error": "stopped"})
    retry_later(conn, seq, 200.0, True, "503")
    assert placed(conn, seq, "tok", 300.0, {}, {"attempts": 1}) == (None, [])
    assert state_of(conn, seq) == (State.FINAL, Outcome.IN_DOUBT)
    assert conn.execute("SELECT placed FROM number_calls WHERE seq = ?", (seq,)).fetchone() == (1,)


def test_a_redial_is_decided_by_the_policy_and_recorded_as_a_move(conn):
    seq = queued(conn)
    redial = {"busy": RedialPolicy(attempts=2, delay_s=60)}
    body = {"to": "447700900123", "agent_id": "agent-eu", "status": "busy"}
    for attempt, effect in ((1, "redial"), (2, "unanswered")):
        token = f"tok{attempt}"
        mark_sending(conn, seq, token, attempt, 100.0, None)
        placed(conn, seq, token, 1000.0, redial, {"attempts": attempt})
        assert apply_callback(conn, token, body, redial, 500.0) == (effect, "agent-eu")
    assert state_of(conn, seq) == (State.FINAL, Outcome.UNANSWERED)
    assert result_lines(conn) == 1


def test_requeue_moves_only_requests_in_doubt(ledger_where, conn):
    doubt, failed = queued(conn, "doubt"), queued(conn, "failed")
    finish(conn, doubt, Outcome.IN_DOUBT, {"error": "stopped"})
    finish(conn, failed, Outcome.FAILED, {"error": "refused"})
    state_dir, cluster = ledger_where
    requeued, refused = requeue(state_dir, ["doubt", "failed", "nobody"], cluster)
    assert requeued == ["doubt"]
    assert refused == {"failed": "is failed, not in_doubt", "nobody": "no such request"}
    assert state_of(conn, doubt) == (State.QUEUED, None)
    assert state_of(conn, failed) == (State.FINAL, Outcome.FAILED)


# --- status without cost -------------------------------------------------------------------------


def counted_the_slow_way(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT outcome, count(*) FROM requests WHERE outcome IS NOT NULL GROUP BY outcome"
        " UNION ALL SELECT outcome, count(*) FROM rejects GROUP BY outcome"
    )
    counts: dict[str, int] = {}
    for outcome, count in rows:
        counts[outcome] = counts.get(outcome, 0) + count
    return counts


def test_outcomes_are_counted_as_they_are_reached(ledger_where, conn):
    seqs = [queued(conn, f"r{n}") for n in range(6)]
    for seq, outcome in zip(seqs, [Outcome.DIALED, Outcome.DIALED, Outcome.IN_DOUBT,
                                   Outcome.EXPIRED, Outcome.FAILED], strict=False):  # fmt: skip
        finish(conn, seq, outcome, {})
    finish(conn, seqs[0], Outcome.FAILED, {})  # final already: not counted again
    request = build_request({"id": "r1", "to": "+447700900124"}, CONFIG, "test:2")
    add(conn, 1, [request], [{"source": "test:3", "error": "bad"}], None, 0)  # duplicate, invalid
    requeue(*ledger_where[:1], ["r2"], ledger_where[1])  # in_doubt no more
    expected = {"dialed": 2, "expired": 1, "failed": 1, "duplicate": 1, "invalid": 1}
    assert status_report(conn, 0)["outcomes"] == counted_the_slow_way(conn) == expected


def ledger_of_version_3(path: Path, request_id: str, agent_id: str, outcome: Outcome):
    """A ledger as dialerd wrote it before outcomes were counted, holding one final request."""
    old = ledger_of_version(path, 3)
    old.execute(
        "INSERT INTO requests (id, run, agent_id, to_number, body, source, due_at, state,"
        " outcome, created_at) VALUES (?, 1, ?, '447700900123', '{}', 's', 0, 'final', ?, 0)",
        (request_id, agent_id, outcome),
    )
    return old


def test_an_older_ledger_has_its_outcomes_counted_once_when_upgraded(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    old = ledger_of_version_3(path, "a", "agent-eu", Outcome.DIALED)
    old.execute("INSERT INTO rejects (outcome, source, at) VALUES ('invalid', 's', 0)")
    assert status_report(old, 0)["outcomes"] == {"dialed": 1, "invalid": 1}  # the slow way
    old.close()
    conn = connect(path)
    create_schema(conn)
    counted = "SELECT agent_id, outcome, count FROM outcome_counts ORDER BY outcome"
    assert conn.execute(counted).fetchall() == [
        ("agent-eu", "dialed", 1), ("", "invalid", 1)
    ]  # fmt: skip
    assert status_report(conn, 0)["outcomes"] == {"dialed": 1, "invalid": 1}


OPEN_WORK = ("requests_open", "requests_by_campaign")  # partial indexes: WHERE state != 'final'
# Partial indexes of some open requests only, and the rows of the last minute's calls.
OPEN_INDEXES = (*OPEN_WORK, "requests_due", "requests_waiting", "requests_held", "requests_placed")


def test_no_query_of_a_status_report_reads_the_history(sqlite_conn):
    """Every statement the report runs, planned: a table's rows are read by a partial index of
    open requests, a key, or the last minute's calls, never scanned (SPEC 8.9)."""
    conn = sqlite_conn
    statements = []
    conn.set_trace_callback(statements.append)
    status_report(conn, 0)
    conn.set_trace_callback(None)
    for sql in (s for s in statements if s.lstrip().upper().startswith("SELECT")):
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for step in plan:
            scans_requests = step.startswith(("SCAN requests", "SCAN r "))
            assert not scans_requests or any(index in step for index in OPEN_INDEXES), (sql, plan)


def test_the_open_work_is_read_by_its_own_index_not_the_history(sqlite_conn):
    conn = sqlite_conn
    for query in (
        "SELECT agent_id, state, count(*), min(due_at) FROM requests"
        " WHERE state != 'final' GROUP BY agent_id, state",
        "SELECT count(*) FROM requests WHERE state != 'final'",
    ):
        (plan,) = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}")]
        # Either index of the open requests only (by agent, by campaign): never the history.
        assert plan in {f"SCAN requests USING COVERING INDEX {index}" for index in OPEN_WORK}


async def test_a_status_report_never_waits_for_the_writer(tmp_path):
    """The writer may be busy (a large intake batch, a storage fault being retried): a status
    poll (STATUS=, /status, /metrics) is read beside it, and a mark never queues behind one."""
    ledger = Ledger(tmp_path / "state")
    await asyncio.to_thread(ledger.open)
    busy, release = threading.Event(), threading.Event()

    def hold_the_writer(_conn) -> None:
        busy.set()
        release.wait(10)

    try:
        held = asyncio.ensure_future(ledger.call(hold_the_writer))
        await asyncio.to_thread(busy.wait, 10)
        report = await asyncio.wait_for(ledger.status(), 10)
        assert report["agents"] == {} and not held.done()
    finally:
        release.set()
        await held
        await asyncio.to_thread(ledger.close)


async def test_a_status_report_reads_a_ledger_whose_path_looks_like_uri_syntax(tmp_path):
    """The report's read-only connection names the file as a URI: '#', '?' and '%' in the path
    are escaped, or SQLite would open (and make) another file."""
    state = tmp_path / "st#1?x=%41" / "state"
    ledger = Ledger(state)
    await asyncio.to_thread(ledger.open)
    try:
        assert (await ledger.status())["agents"] == {}
    finally:
        await asyncio.to_thread(ledger.close)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st#1?x=%41"]


def test_a_requeue_on_a_ledger_its_daemon_has_not_upgraded_yet(tmp_path):
    ledger_of_version_3(tmp_path / "ledger.sqlite3", "r1", "a", Outcome.IN_DOUBT).close()
    assert requeue(tmp_path, ["r1"]) == (["r1"], {})


def test_a_request_queued_longer_than_max_queue_s_after_its_due_time_expires(conn):
    """Held all that while (an API refusing its key, a lane gone with its agent), it ends
    `expired`, counted from when it was first due, not from its latest retry or hold."""
    old, new = queued(conn, "old"), queued(conn, "new")
    first_due = conn.execute("SELECT first_due_at FROM requests WHERE seq = ?", (old,)).fetchone()
    move(conn, old, Move.HOLD, due_at=first_due[0] + 500)  # held since: its due_at moved
    now = first_due[0] + 100
    assert expire_due(conn, now, 200) == 0
    assert expire_due(conn, now + 150, 200) == 2
    assert {state_of(conn, seq) for seq in (old, new)} == {(State.FINAL, Outcome.EXPIRED)}
    error = conn.execute("SELECT error FROM requests WHERE seq = ?", (old,)).fetchone()[0]
    assert error == "not sent within max_queue_s (200 s) of its due time"
