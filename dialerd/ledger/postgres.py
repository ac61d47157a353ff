"""The ledger on PostgreSQL (cluster mode): the connection the ledger's SQL runs on, the
tables, and their versions.

The ledger's functions are written once, in the SQL both engines read: `PgConn` gives them
SQLite's `?` and `:name` parameters on psycopg, which runs them as prepared statements once a
statement repeats. What differs between the engines is in `dialect`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from .dialect import POSTGRES
from .schema import LedgerTooNew
from .writer import Engine

CONNECT_TIMEOUT_S = 5
# Calls in one group commit: each is a subtransaction, and past 64 of them in one transaction
# every other session's snapshot checks get slower (the subtransaction cache).
BATCH_CALLS = 60
# A transaction left open this long between two statements is ended by the server: its process
# was stopped (SIGSTOP, a paused VM) or cut off, and the locks it holds (a lease's, a number's,
# rows) would hold every other daemon up. No call of the ledger pauses that long mid-transaction;
# one ended by mistake is tried again whole.
IDLE_IN_TRANSACTION_MS = 1000
LOCK_TIMEOUT_MS = 2000  # a wait on another's lock longer than this gives up, and tries again
# The errors of one transaction against another (psycopg makes them OperationalErrors too),
# gone when it is tried again.
CONFLICTS = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.LockNotAvailable)
# And those of the database or the connection, gone once the database answers again: a lost
# connection, a server shutting down, a primary not yet promoted, this process stalled past
# IDLE_IN_TRANSACTION_MS.
TRANSIENT = (
    psycopg.OperationalError,
    pg_errors.ReadOnlySqlTransaction,
    pg_errors.IdleInTransactionSessionTimeout,
)


class PgConn:
    """A psycopg connection that runs the ledger's SQL as sqlite3 would."""

    dialect = POSTGRES

    def __init__(self, raw: psycopg.Connection, shard: str = ""):
        self.raw = raw
        self.shard = shard  # the counters' row it counts in (status.count_outcome)
        raw.adapters.register_loader("numeric", _NumberLoader)  # sum() of integers is numeric

    def execute(self, sql: str, params: tuple | Mapping = ()) -> psycopg.Cursor:
        return self.raw.execute(_translated(sql, isinstance(params, Mapping)), params)

    def executemany(self, sql: str, rows: Iterable[tuple]) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(_translated(sql, False), list(rows))
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()


class _NumberLoader(Loader):
    def load(self, data: bytes) -> int | float:
        text = bytes(data).decode()
        return float(text) if "." in text or "e" in text.lower() else int(text)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def _translated(sql: str, named: bool) -> str:
    """SQLite's parameters as psycopg's: `?` as `%s`, `:name` as `%(name)s` (a literal `%` is
    doubled). The ledger's SQL holds no `?` or `:` in a string literal."""
    sql = sql.replace("%", "%%")
    return _NAMED.sub(r"%(\1)s", sql) if named else sql.replace("?", "%s")


def is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT)


def is_outage(error: BaseException) -> bool:
    """The database's or the connection's fault, worth an error in the log: not a conflict
    between two daemons' transactions, which the next try gets past."""
    return is_transient(error) and not isinstance(error, CONFLICTS)


def commit_token(conn: PgConn) -> int | None:
    """The transaction's id, if it has written anything."""
    return conn.execute("SELECT txid_current_if_assigned()").fetchone()[0]


def committed(conn: PgConn, token: int) -> bool | None:
    """Whether the transaction `token` committed; None while it is still in progress (the
    server has not yet seen its connection go)."""
    (status,) = conn.execute("SELECT txid_status(?)", (token,)).fetchone()
    return {"committed": True, "aborted": False}.get(status)


def engine(where: str, reconnect: Callable[[], Any] | None) -> Engine:
    """What the ledger's writer needs of PostgreSQL (see writer.Engine)."""
    return Engine(
        where,
        POSTGRES,
        batch_calls=BATCH_CALLS,
        reconnect=reconnect,
        fault=is_transient,
        lasting=is_outage,
        commit_token=commit_token,
        committed=committed,
    )


def connect(
    url: str, password_file: Path | None = None, application: str = "dialerd", shard: str = ""
) -> PgConn:
    """A connection to the ledger's database, in autocommit (the ledger says BEGIN itself).

    The password comes from `password_file` or from libpq's own sources (PGPASSWORD,
    ~/.pgpass, PGPASSFILE), never from the url in the config."""
    try:
        raw = psycopg.connect(_conninfo(url, password_file, application), autocommit=True)
        return PgConn(raw, shard)
    except psycopg.OperationalError as error:  # as a file that cannot be opened: an OSError
        reason = " ".join(str(error).split()) or "no answer"
        raise LedgerUnreachable(f"cannot reach the ledger {describe(url)}: {reason}") from None


async def connect_async(cluster: Any) -> psycopg.AsyncConnection:
    """An asyncio connection to the ledger's database (for LISTEN), as connect() makes one."""
    conninfo = _conninfo(cluster.url, cluster.password_file, f"dialerd {cluster.instance} notices")
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


def _conninfo(url: str, password_file: Path | None, application: str) -> str:
    given = conninfo_to_dict(url)
    params: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": application,
        # A connection that hangs (a cut network) is found dead within seconds, not hours.
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    params = {key: value for key, value in params.items() if key not in given}
    # Each statement planned for its own parameters: a generic plan made while a table was empty
    # (a new ledger) would go on scanning it once it has grown (the cap's look at a number's
    # calls, say).
    # No JIT: the ledger's statements are short, and a misestimated one was compiled for 0.1 s.
    server = (
        "-c plan_cache_mode=force_custom_plan -c jit=off"
        f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
        f" -c lock_timeout={LOCK_TIMEOUT_MS}"
    )
    params["options"] = f"{given.get('options', '')} {server}".strip()
    if password_file is not None:
        params["password"] = password_file.read_text().removesuffix("\n")
    return make_conninfo(url, **params)


def describe(url: str) -> str:
    """The url as the log and errors may show it: never a password."""
    fields = conninfo_to_dict(url)
    fields.pop("password", None)
    host = fields.get("host", "localhost")
    port = fields.get("port", "5432")
    return f"postgresql://{fields.get('user', '')}@{host}:{port}/{fields.get('dbname', '')}"


# -- the tables ---------------------------------------------------------------------------
# The ledger as SQLite's migrations leave it (its version 9), in PostgreSQL's types, and what a
# cluster adds: daemons' runs with their heartbeat, agents' leases (leases.py), the secrets
# every daemon shares (the callbacks' key).
SCHEMA = """
CREATE TABLE requests (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id text COLLATE "C" NOT NULL UNIQUE,  -- by bytes, as on SQLite (submit's ranges of ids)
    run bigint NOT NULL,
    agent_id text NOT NULL,
    to_number text NOT NULL,
    body text NOT NULL,
    meta text,
    source text NOT NULL,
    expires_at double precision,
    due_at double precision NOT NULL,
    state text NOT NULL,
    token text,
    attempts integer NOT NULL DEFAULT 0,
    retries integer NOT NULL DEFAULT 0,
    http_status integer,
    conversation_uuid text,
    status text,
    error text,
    response text,
    outcome text,
    created_at double precision NOT NULL,
    sent_at double precision,
    finished_at double precision,
    held text,
    campaign text,
    first_due_at double precision,
    priority integer NOT NULL DEFAULT 0,
    timezone text,
    cancelled_at double precision,
    paused integer
);
CREATE INDEX requests_due ON requests(agent_id, priority, due_at, seq)
    WHERE state = 'queued' AND paused IS NULL;
CREATE INDEX requests_open ON requests(agent_id, state, due_at) WHERE state != 'final';
CREATE INDEX requests_placed ON requests(due_at) WHERE state = 'placed';
CREATE INDEX requests_expiring ON requests(expires_at)
    WHERE state = 'queued' AND expires_at IS NOT NULL;
CREATE INDEX requests_held ON requests(agent_id, held) WHERE state = 'queued' AND held IS NOT NULL;
CREATE INDEX requests_waiting ON requests(first_due_at) WHERE state = 'queued';
CREATE INDEX requests_ended ON requests(finished_at) WHERE state = 'final';
CREATE INDEX requests_by_campaign ON requests(campaign, state, paused) WHERE state != 'final';
CREATE INDEX requests_in_doubt ON requests(outcome) WHERE outcome = 'in_doubt';
CREATE TABLE rejects (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id text, outcome text NOT NULL, error text, source text, at double precision, campaign text
);
CREATE INDEX rejects_by_age ON rejects(at);
CREATE TABLE outbox (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    line text NOT NULL, outcome text NOT NULL, campaign text, run bigint
);
CREATE INDEX outbox_by_run ON outbox(run, seq);
CREATE TABLE spool_files (name text PRIMARY KEY, digest text NOT NULL, errors text, items bigint);
CREATE TABLE spool_file_errors (
    name text NOT NULL, start bigint NOT NULL, errors text NOT NULL, PRIMARY KEY (name, start)
);
CREATE TABLE agent_sends (agent_id text PRIMARY KEY, last_sent_at double precision NOT NULL);
CREATE TABLE runs (
    run bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    pid integer, started_at double precision,
    instance text, lease_s double precision, renewed_at timestamptz, stopped_at timestamptz
);
CREATE INDEX runs_alive ON runs(instance) WHERE stopped_at IS NULL;
CREATE TABLE leases (
    agent_id text PRIMARY KEY, run bigint, instance text, epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL, taken_at timestamptz
);
CREATE TABLE secrets (name text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE calls (
    token text PRIMARY KEY, seq bigint NOT NULL, attempt integer NOT NULL,
    sent_at double precision NOT NULL
);
CREATE INDEX calls_by_seq ON calls(seq);
CREATE TABLE callbacks (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    token text NOT NULL, status text NOT NULL, body text NOT NULL, effect text NOT NULL,
    received_at double precision NOT NULL
);
CREATE INDEX callbacks_token ON callbacks(token);
CREATE TABLE requeues (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id text NOT NULL, previous_error text, at double precision NOT NULL
);
CREATE INDEX requeues_by_age ON requeues(at);
CREATE TABLE number_calls (
    rowid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    seq bigint NOT NULL, to_number text NOT NULL, at double precision NOT NULL,
    placed integer NOT NULL
);
CREATE INDEX number_calls_by_number ON number_calls(to_number, at);
CREATE INDEX number_calls_by_seq ON number_calls(seq) WHERE placed = 0;
CREATE INDEX number_calls_by_age ON number_calls(at);
CREATE TABLE outcome_counts (
    agent_id text NOT NULL, outcome text NOT NULL, shard text NOT NULL, count bigint NOT NULL,
    PRIMARY KEY (agent_id, outcome, shard)
);
CREATE TABLE pruned_ids (
    digest bytea PRIMARY KEY, taken_at double precision NOT NULL, until double precision NOT NULL
);
CREATE INDEX pruned_ids_by_age ON pruned_ids(until);
CREATE TABLE pauses (
    kind text NOT NULL, name text NOT NULL, since double precision NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE controls (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    action text NOT NULL, target text NOT NULL, at double precision NOT NULL
);
CREATE TABLE campaign_counts (
    campaign text NOT NULL, outcome text NOT NULL, shard text NOT NULL, count bigint NOT NULL,
    last_at double precision NOT NULL, PRIMARY KEY (campaign, outcome, shard)
);
"""
# Changes to SCHEMA, applied in turn; `ledger_schema` holds how many are (a new ledger gets them).
MIGRATIONS: tuple[str, ...] = ()
VERSION = len(MIGRATIONS) + 1  # SCHEMA is version 1
# One schema change at a time, whichever daemons start at once.
_SCHEMA_LOCK = 0x6469616C  # "dial"


class LedgerUnreachable(OSError, psycopg.OperationalError):
    """No connection to the ledger's database: an OSError for the command line (as a file that
    cannot be opened), and an OperationalError for the writer, which tries again."""


def schema_version(conn: PgConn) -> int:
    """The version of the ledger's tables; 0 when they are not made yet."""
    exists = conn.execute("SELECT to_regclass('ledger_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT version FROM ledger_schema").fetchone()[0]


def create_schema(conn: PgConn) -> None:
    """The tables of this version, made or brought up to date, in one transaction."""
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
        version = schema_version(conn)
        if version > VERSION:
            raise LedgerTooNew(
                f"the ledger has schema version {version}, newer than this dialerd knows"
                f" ({VERSION}): run the dialerd that wrote it, or a newer one"
            )
        if version == 0:
            conn.raw.execute(SCHEMA)
            conn.execute("CREATE TABLE ledger_schema (version integer NOT NULL)")
            conn.execute("INSERT INTO ledger_schema VALUES (1)")
            version = 1
        for migration in MIGRATIONS[version - 1 :]:
            conn.raw.execute(migration)
        conn.execute("UPDATE ledger_schema SET version = ?", (VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken:
            conn.execute("ROLLBACK")
        raise
