"""What the ledger's SQL says differently on SQLite and on PostgreSQL: the rest is written once,
in the SQL both read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

NOTICES = "dialerd"  # the channel of the daemons' wake-ups (see dialerd/notices.py)
QUEUED, CONTROL, LEASES = "queued:", "control", "leases"  # what a notice is of


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the ledger's SQL says differently on each engine."""

    name: str
    begin: str  # a writing transaction, holding off other writers as far as the engine needs
    json_texts: str  # the texts of a JSON array given as the one parameter, as a subquery
    snapshot: str  # a transaction that reads one state of the ledger throughout (a report)
    db_clock: str  # the database's wall clock in seconds since the epoch; SQLite: the caller's
    last_control: str  # the latest control's seq
    lock_number: str  # held by a send's mark until commit, so that the cap is read and kept
    notify: str  # tells the other daemons of a change, as the transaction commits ("": none)
    hour: str  # the whole hours since the epoch of a time in seconds ({} for its column)
    try_lock: str  # taken until the transaction ends, if no other has it ("": no need)


SQLITE = Dialect(
    name="sqlite",
    begin="BEGIN IMMEDIATE",  # one writer at a time: the whole file is locked
    json_texts="SELECT value FROM json_each(?)",
    snapshot="BEGIN",  # a read transaction of WAL: one snapshot
    db_clock="?",
    last_control="SELECT seq FROM sqlite_sequence WHERE name = 'controls'",
    lock_number="",  # the whole file is the writer's already
    notify="",  # one daemon: nobody else to tell
    hour="CAST({} / 3600 AS INTEGER)",  # CAST truncates
    try_lock="",
)
POSTGRES = Dialect(
    name="postgresql",
    begin="BEGIN",
    json_texts="SELECT json_array_elements_text(CAST(? AS json))",
    snapshot="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    db_clock="extract(epoch FROM clock_timestamp())",
    # What is committed: a sequence's last value is not (it may name a control whose transaction
    # is still open). A control that commits after a later one is noticed by its notice.
    last_control="SELECT max(seq) FROM controls",
    lock_number="SELECT pg_advisory_xact_lock(1, hashtext(?))",
    notify=f"SELECT pg_notify('{NOTICES}', ?)",
    hour="CAST(floor({} / 3600) AS bigint)",  # CAST alone rounds
    try_lock="SELECT pg_try_advisory_xact_lock(2, ?)",
)


def dialect(conn: Any) -> Dialect:
    """The dialect of a connection: a plain sqlite3 one, or postgres.PgConn."""
    return getattr(conn, "dialect", SQLITE)


# The SQLite ledger version whose tables a ledger on PostgreSQL holds, for the checks of what an
# older SQLite ledger lacks.
POSTGRES_HOLDS_VERSION = 9


def shard(conn: Any) -> str:
    """The counters' row this connection counts in: its daemon's instance in cluster mode."""
    return getattr(conn, "shard", "")


def tables_version(conn: Any) -> int:
    """The ledger's schema version, as SQLite's versions count it."""
    if dialect(conn) is POSTGRES:
        return POSTGRES_HOLDS_VERSION
    return conn.execute("PRAGMA user_version").fetchone()[0]


def tell(conn: Any, *notices: str) -> None:
    """Wake the other daemons of a cluster (each notice as QUEUED + an agent, CONTROL or
    LEASES) once the transaction commits; nothing on SQLite."""
    sql = dialect(conn).notify
    for notice in dict.fromkeys(notices) if sql else ():
        conn.execute(sql, (notice,))


# The ledger's chores that every daemon of a cluster runs (each would do the same work).
CHORES = ("prune", "expire", "settle", "forget", "orphans")


def chore_is_ours(conn: Any, chore: str) -> bool:
    """Whether this transaction may do `chore` now: on PostgreSQL, when no other daemon's is
    doing it at this moment (two would take the same rows, one waiting on the other's locks
    while the sends' marks in its group commit wait too); on SQLite, always."""
    sql = dialect(conn).try_lock
    return not sql or conn.execute(sql, (CHORES.index(chore),)).fetchone()[0]


def clock_reading(conn: Any) -> tuple[datetime, float]:
    """PostgreSQL's clock now, and the monotonic clock when it was read (halfway through the
    round trip)."""
    before = time.monotonic()
    (now,) = conn.execute("SELECT clock_timestamp()").fetchone()
    return now, (before + time.monotonic()) / 2
