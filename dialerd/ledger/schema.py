"""The ledger's tables, the migrations from older versions, and opening the file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from ..numbers import NotANumber, normalise

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    run INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    to_number TEXT NOT NULL,
    body TEXT NOT NULL,
    meta TEXT,
    source TEXT NOT NULL,
    expires_at REAL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,
    token TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    conversation_uuid TEXT,
    status TEXT,
    error TEXT,
    response TEXT,
    outcome TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS requests_due ON requests(agent_id, due_at, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS requests_open ON requests(run, state) WHERE state != 'final';
CREATE INDEX IF NOT EXISTS requests_outcome ON requests(agent_id, outcome);
CREATE TABLE IF NOT EXISTS rejects (
    seq INTEGER PRIMARY KEY, id TEXT, outcome TEXT NOT NULL, error TEXT, source TEXT, at REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, line TEXT NOT NULL, outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spool_files (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, errors TEXT
);
CREATE TABLE IF NOT EXISTS agent_sends (agent_id TEXT PRIMARY KEY, last_sent_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY, pid INTEGER, started_at REAL);
CREATE TABLE IF NOT EXISTS calls (
    token TEXT PRIMARY KEY, seq INTEGER NOT NULL, attempt INTEGER NOT NULL, sent_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS callbacks (
    seq INTEGER PRIMARY KEY,
    token TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    effect TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS callbacks_token ON callbacks(token);
CREATE TABLE IF NOT EXISTS requeues (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, previous_error TEXT, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_placed ON requests(due_at) WHERE state = 'placed';
"""
# Changes to the schema since the first version, applied in turn to a ledger of an older version
# (its PRAGMA user_version counts those already applied); a new ledger gets them all.
MIGRATIONS = (
    # 1: calling hours and the per-number cap. `held` says why a queued request waits past its
    # own due time; `number_calls` holds every send of a number (placed = 0 while unanswered).
    """
    ALTER TABLE requests ADD COLUMN held TEXT;
    CREATE TABLE number_calls (
        seq INTEGER NOT NULL, to_number TEXT NOT NULL, at REAL NOT NULL, placed INTEGER NOT NULL
    );
    CREATE INDEX number_calls_by_number ON number_calls(to_number, at);
    CREATE INDEX number_calls_by_seq ON number_calls(seq) WHERE placed = 0;
    CREATE INDEX number_calls_by_age ON number_calls(at);
    CREATE INDEX requests_expiring ON requests(expires_at)
        WHERE state = 'queued' AND expires_at IS NOT NULL;
    CREATE INDEX requests_held ON requests(agent_id, held)
        WHERE state = 'queued' AND held IS NOT NULL;
    """,
    # 2: spool files taken a chunk at a time. `items` counts the file's items recorded so far
    # (NULL: all of them, as every row an older version wrote); each chunk's lines for
    # NAME.errors are a row of their own (appending them to one value would write the whole
    # note again at every chunk).
    """
    ALTER TABLE spool_files ADD COLUMN items INTEGER;
    CREATE TABLE spool_file_errors (
        name TEXT NOT NULL, start INTEGER NOT NULL, errors TEXT NOT NULL, PRIMARY KEY (name, start)
    );
    """,
    # 3: campaigns, and numbers as the numbers module writes them.
    lambda conn: _migrate_to_campaigns(conn),
    # 4: status without a scan of history. Final outcomes are counted as they are reached (per
    # agent; '' for requests refused at intake); the open requests are indexed by agent.
    """
    CREATE TABLE outcome_counts (
        agent_id TEXT NOT NULL, outcome TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (agent_id, outcome)
    ) WITHOUT ROWID;
    INSERT INTO outcome_counts SELECT agent_id, outcome, count(*) FROM requests
        WHERE outcome IS NOT NULL GROUP BY agent_id, outcome;
    INSERT INTO outcome_counts SELECT '', outcome, count(*) FROM rejects GROUP BY outcome;
    DROP INDEX requests_open;
    CREATE INDEX requests_open ON requests(agent_id, state, due_at) WHERE state != 'final';
    """,
    # 5: max_queue_s. `first_due_at`: when the request was first due (its due_at moves with
    # retries, holds and redials).
    """
    ALTER TABLE requests ADD COLUMN first_due_at REAL;
    UPDATE requests SET first_due_at = due_at WHERE state != 'final';
    CREATE INDEX requests_waiting ON requests(first_due_at) WHERE state = 'queued';
    """,
    # 6: retention. Final requests are pruned in the order they ended; the id of each is kept
    # as a digest (not the id: it may name a person) with when it was taken, until `until`.
    """
    CREATE INDEX requests_ended ON requests(finished_at) WHERE state = 'final';
    CREATE INDEX calls_by_seq ON calls(seq);
    CREATE INDEX rejects_by_age ON rejects(at);
    CREATE INDEX requeues_by_age ON requeues(at);
    CREATE TABLE pruned_ids (
        digest BLOB PRIMARY KEY, taken_at REAL NOT NULL, until REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX pruned_ids_by_age ON pruned_ids(until);
    """,
    # 7: campaign control. `priority` orders an agent's due requests (the index by it, a range
    # per priority); a campaign's open requests are found by an index of their own;
    # `timezone`: the callee's zone as the request gave it; `cancelled_at`: an operator
    # cancelled the request while a send of it was out, so nothing follows that send; `paused`
    # (1): of a paused campaign, kept out of the index of due requests (by intake, and by the
    # daemon as pauses come and go), so that a large paused campaign costs no read of what is
    # due; the pause itself is checked at the mark.
    # `pauses`: the standing rules of `dialerd pause`; `controls`: every requeue, cancel, pause
    # and resume, which a running daemon notices by the latest seq (never given out twice);
    # `campaign_counts`: outcomes per campaign, counted as they are reached, with the last one's
    # time, so that a campaign long over is pruned.
    """
    ALTER TABLE requests ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN timezone TEXT;
    ALTER TABLE requests ADD COLUMN cancelled_at REAL;
    ALTER TABLE requests ADD COLUMN paused INTEGER;
    ALTER TABLE rejects ADD COLUMN campaign TEXT;
    ALTER TABLE outbox ADD COLUMN campaign TEXT;
    DROP INDEX requests_due;
    CREATE INDEX requests_due ON requests(agent_id, priority, due_at, seq)
        WHERE state = 'queued' AND paused IS NULL;
    CREATE INDEX requests_by_campaign ON requests(campaign, state, paused)
        WHERE state != 'final';
    CREATE TABLE pauses (
        kind TEXT NOT NULL, name TEXT NOT NULL, since REAL NOT NULL, PRIMARY KEY (kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE controls (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL, target TEXT NOT NULL, at REAL NOT NULL
    );
    CREATE TABLE campaign_counts (
        campaign TEXT NOT NULL, outcome TEXT NOT NULL, count INTEGER NOT NULL,
        last_at REAL NOT NULL, PRIMARY KEY (campaign, outcome)
    ) WITHOUT ROWID;
    INSERT INTO campaign_counts
        SELECT campaign, outcome, count(*), coalesce(max(finished_at), max(created_at))
        FROM requests WHERE outcome IS NOT NULL AND campaign IS NOT NULL
        GROUP BY campaign, outcome;
    """,
    # 8: the run that took each result line's request in: in cluster mode its daemon, and only
    # its, writes the line (the same schema on PostgreSQL, postgres.py).
    """
    ALTER TABLE outbox ADD COLUMN run INTEGER;
    """,
    # 9: outcomes counted in a row per shard (see status.count_outcome): always '' on SQLite,
    # where one daemon writes; the same tables as on PostgreSQL.
    """
    ALTER TABLE outcome_counts ADD COLUMN shard TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX outcome_counts_by_shard ON outcome_counts(agent_id, outcome, shard);
    ALTER TABLE campaign_counts ADD COLUMN shard TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX campaign_counts_by_shard ON campaign_counts(campaign, outcome, shard);
    """,
)


class LedgerTooNew(OSError):
    """The ledger was made by a newer dialerd, whose schema this one does not know. An OSError,
    as for any ledger that cannot be opened: `run` and `requeue` exit 73 for it."""


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the ledger at `path`; LedgerTooNew, before anything is written to it,
    if a newer dialerd made it."""
    if read_only:
        # As a URI, escaped: a '#', '?' or '%' in the path would be read as its syntax.
        uri = Path(path).absolute().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    try:
        _refuse_newer(conn, path)
    except BaseException:
        conn.close()
        raise
    if not read_only:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the send it marks goes out, power loss included.
        conn.execute("PRAGMA synchronous=FULL")
    return conn


def _refuse_newer(conn: sqlite3.Connection, path: Path) -> None:
    """A ledger of a schema this code does not know would be misread, and written wrongly."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise LedgerTooNew(
            f"the ledger {path} has schema version {version}, newer than this dialerd knows "
            f"({len(MIGRATIONS)}): run the dialerd that wrote it, or a newer one"
        )


def create_schema(conn: sqlite3.Connection) -> None:
    """The tables of this version, made or brought up to date, each migration in one commit."""
    if not conn.execute("SELECT 1 FROM sqlite_schema").fetchone():
        # New: the pages that pruning frees can be given back (retention.vacuum). SQLite can
        # only choose this before the first table; an older ledger reuses its free pages.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")  # connect() has put it in WAL mode, which fixes the choice
    conn.executescript(SCHEMA)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, migration in enumerate(MIGRATIONS[version:], version + 1):
        if isinstance(migration, str):
            conn.executescript(
                f"BEGIN IMMEDIATE; {migration}; PRAGMA user_version = {number}; COMMIT;"
            )
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration(conn)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _migrate_to_campaigns(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE requests ADD COLUMN campaign TEXT")
    _renormalise_numbers(conn)


def _renormalise_numbers(conn: sqlite3.Connection) -> None:
    """An older dialerd kept a trunk 0 written after the country code (+49 030 123456 stored as
    49030123456): such numbers are rewritten as they are read now, so that the per-number cap
    counts both forms as one number and the do-not-call list matches them; so are the numbers
    in the bodies of requests still to be sent."""
    for table, key in (("requests", "seq"), ("number_calls", "rowid")):
        rows = conn.execute(f"SELECT {key}, to_number FROM {table}").fetchall()
        changed = [(new, row) for row, old in rows if (new := _renormalised(old)) != old]
        conn.executemany(f"UPDATE {table} SET to_number = ? WHERE {key} = ?", changed)
    open_bodies = conn.execute("SELECT seq, body FROM requests WHERE state != 'final'").fetchall()
    for seq, text in open_bodies:
        body = json.loads(text)
        fields = {name: _renormalised(body[name]) for name in ("to", "from") if name in body}
        if any(body[name] != number for name, number in fields.items()):
            body.update(fields)
            conn.execute(
                "UPDATE requests SET body = ? WHERE seq = ?",
                (json.dumps(body, separators=(",", ":")), seq),
            )


def _renormalised(stored: str) -> str:
    try:
        return normalise(stored)
    except NotANumber:  # not a number the rules read now: kept, as it was taken then
        return stored
