"""The ledger's writer on PostgreSQL when the connection is lost as a transaction commits: the
commit's outcome is asked for, so that a call that took effect is not made twice (an intake
made again would take its own requests for duplicates)."""

from __future__ import annotations

import psycopg
from test_request import CONFIG

from dialerd.ledger import postgres
from dialerd.ledger.intake import add
from dialerd.ledger.writer import Writer
from dialerd.request import build_request


class LostCommit:
    """A connection whose next COMMIT is lost: made (or not) on the server, and the connection
    gone before its answer came."""

    def __init__(self, conn: postgres.PgConn, commits: bool):
        self._conn, self._commits, self.lost = conn, commits, False

    def execute(self, sql, params=()):
        if sql == "COMMIT" and not self.lost:
            self.lost = True
            self._conn.execute("COMMIT" if self._commits else "ROLLBACK")
            self._conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return self._conn.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def writer(conn, pg_dsn: str) -> Writer:
    return Writer(conn, postgres.engine("test", lambda: postgres.connect(pg_dsn)))


def request(request_id: str):
    return build_request({"id": request_id, "to": "+447700900123"}, CONFIG, "test:1")


async def intake_across_a_lost_commit(pg_dsn: str, commits: bool) -> tuple:
    conn = postgres.connect(pg_dsn)
    postgres.create_schema(conn)
    lost = LostCommit(conn, commits)
    ledger = writer(lost, pg_dsn)
    try:
        taken = await ledger.call(add, 1, [request("r1")], [], None, 0)
    finally:
        ledger.stop(5)
    check = postgres.connect(pg_dsn)
    outbox = check.execute("SELECT outcome FROM outbox").fetchall()
    states = check.execute("SELECT id, state FROM requests").fetchall()
    check.close()
    return lost.lost, taken.accepted, taken.rejected, outbox, states


async def test_a_commit_that_took_effect_is_not_made_again(pg_dsn):
    lost, accepted, rejected, outbox, states = await intake_across_a_lost_commit(pg_dsn, True)
    assert lost, "the commit was not the one lost"
    assert (accepted, rejected, outbox) == (1, 0, []), "taken for a duplicate of itself"
    assert states == [("r1", "queued")]


async def test_a_commit_that_did_not_take_effect_is_made_again(pg_dsn):
    lost, accepted, rejected, outbox, states = await intake_across_a_lost_commit(pg_dsn, False)
    assert lost
    assert (accepted, rejected, outbox) == (1, 0, [])
    assert states == [("r1", "queued")]
