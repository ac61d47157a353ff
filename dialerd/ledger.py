"""The ledger: every request and its fate in SQLite, written from one thread in group commits.

Each call runs in the ledger's own thread; the calls that queue up while one transaction commits
are run together in the next, each under a savepoint, so a burst of sends or an intake batch costs
one commit, and one failing call never undoes the others.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aio import settle
from .config import NumberCap, RedialPolicy
from .files import create_private, keep_private
from .logs import log
from .numbers import NotANumber, normalise
from .request import Request, callback_matches
from .results import result_line, utc_text

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
)
RESPONSE_KEPT = 4096  # bytes of each API answer kept in the ledger
STORAGE_FAULTS = ("disk is full", "disk I/O error", "readonly", "unable to open", "locked")
FAULT_RETRY_FIRST_S = 0.1
FAULT_RETRY_MAX_S = 5.0
FAULT_LOG_EVERY_S = 10.0


class LedgerLocked(Exception):
    """Another daemon holds this state_dir."""


class LedgerTooNew(OSError):
    """The ledger was made by a newer dialerd, whose schema this one does not know. An OSError,
    as for any ledger that cannot be opened: `run` and `requeue` exit 73 for it."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A queued request as the dispatcher needs it."""

    seq: int
    id: str
    agent_id: str
    body: dict[str, Any]
    attempts: int
    retries: int
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """The spool file a batch of intake is a chunk of."""

    name: str
    digest: str
    start: int  # the file's items recorded before this chunk
    errors: str | None  # this chunk's lines for NAME.errors
    last: bool


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """What the ledger holds of a spool file taken, or being taken, into it."""

    digest: str
    items: int | None  # items recorded so far; None: all of them
    errors: str | None  # the lines for NAME.errors recorded so far


@dataclass(frozen=True, slots=True)
class Intake:
    """What one intake batch did: requests queued per agent, and results it produced at once."""

    queued_agents: frozenset[str]
    accepted: int
    rejected: int


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the ledger at `path`; LedgerTooNew, before anything is written to it,
    if a newer dialerd made it."""
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
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


def _lock(state_dir: Path) -> int:
    """Hold an exclusive lock on the state_dir for the life of the process."""
    fd = create_private(state_dir / "dialerd.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LedgerLocked(f"another dialerd (pid {holder}) is running with {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _keep_ledger_private(path: Path) -> None:
    """The ledger made 0640 before SQLite opens it, which would make it 0644 less the umask;
    SQLite gives its -wal and -shm the ledger's own mode when it makes them. Ones left by a crash
    are tightened as they are."""
    os.close(create_private(path, os.O_RDWR))
    for companion in ("-wal", "-shm"):
        keep_private(f"{path}{companion}")


class Ledger:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.path = state_dir / "ledger.sqlite3"
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.run = 0
        self._fault_logged_at = -FAULT_LOG_EVERY_S

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the state_dir, open the database and start this run; blocking, called once."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.state_dir)
        try:
            _keep_ledger_private(self.path)
            self._conn = connect(self.path)
            create_schema(self._conn)
            cursor = self._conn.execute(
                "INSERT INTO runs (pid, started_at) VALUES (?, ?)", (os.getpid(), time.time())
            )
        except sqlite3.Error as error:  # not writable (read-only file or directory), not SQLite
            self.close()
            raise OSError(f"cannot open the ledger {self.path}: {error}") from None
        except OSError:
            self.close()
            raise
        self.run = cursor.lastrowid
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finish queued calls, stop the thread, close the database and release the lock."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the ledger thread -------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(conn, *args) in the ledger thread, inside the next group commit.

        A storage fault (disk full, I/O error, a read-only or vanished file) rolls the call back
        whole; it is tried again until the fault clears, so no stage ever goes on as if it had
        been recorded, and none dies of it.
        """
        delay = FAULT_RETRY_FIRST_S
        while True:
            future = asyncio.get_running_loop().create_future()
            self._calls.put((fn, args, future))
            try:
                return await future
            except sqlite3.OperationalError as error:
                if not any(fault in str(error) for fault in STORAGE_FAULTS):
                    raise
                self._report_fault(error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, FAULT_RETRY_MAX_S)

    def _report_fault(self, error: sqlite3.Error) -> None:
        """Log a storage fault at most once per FAULT_LOG_EVERY_S, however many calls it hits."""
        now = time.monotonic()
        if now - self._fault_logged_at >= FAULT_LOG_EVERY_S:
            self._fault_logged_at = now
            log.error(
                "the ledger cannot write; retrying until it can",
                error=str(error),
                path=str(self.path),
            )

    def _serve(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 2000:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._calls.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        conn = self._conn
        outcomes = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, _future in batch:
                conn.execute("SAVEPOINT call")
                try:
                    outcomes.append((True, fn(conn, *args)))
                    conn.execute("RELEASE call")
                except Exception as error:  # handed to the caller, who decides
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    outcomes.append((False, error))
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            # The commit itself failed (disk full, I/O error): nothing of the batch holds.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(False, error)] * len(batch)
        # One wake-up of each waiting loop per batch, not one per call.
        settled: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for (_fn, _args, future), outcome in zip(batch, outcomes, strict=True):
            settled[future.get_loop()].append((future, outcome))
        for loop, futures in settled.items():
            loop.call_soon_threadsafe(_settle, futures)

    # -- intake ------------------------------------------------------------------------------

    async def add(
        self,
        requests: list[Request],
        invalid: list[dict],
        spool_file: SpoolChunk | None,
        dedupe_window_s: float,
    ) -> Intake:
        """Queue valid requests, record invalid ones and duplicates as final results; with
        `spool_file`, how far that file is recorded, in the same transaction."""
        return await self.call(_add, self.run, requests, invalid, spool_file, dedupe_window_s)

    async def spool_files(self, names: list[str], note_lines: int) -> dict[str, SpoolRecord]:
        """What is recorded of the named spool files, recorded (or partly) but not yet moved;
        of the lines for each one's NAME.errors, the first `note_lines` and how many more."""
        return await self.call(_spool_files, names, note_lines)

    async def spool_file_names(self) -> list[str]:
        return await self.call(
            lambda conn: [r[0] for r in conn.execute("SELECT name FROM spool_files")]
        )

    async def forget_spool_files(self, names: list[str]) -> None:
        await self.call(_forget_spool_files, names)

    # -- dispatch ----------------------------------------------------------------------------

    async def due(
        self, agent_id: str, now: float, limit: int
    ) -> tuple[list[Pending], float | None]:
        """Up to `limit` due requests of an agent in due order, and when the next one is due."""
        return await self.call(_due, agent_id, now, limit)

    async def mark_sending(
        self, seq: int, token: str | None = None, attempt: int = 0, cap: NumberCap | None = None
    ) -> tuple[bool, float | None]:
        """A send is about to go out; `token` is its status_url's, when callbacks are on.

        Returns (marked, allowed_at). Not marked: the number is over `cap` until `allowed_at`,
        or (allowed_at None) the request is no longer queued, e.g. expired while it waited.
        The cap is checked in the same transaction as the mark, so two sends to one number from
        two lanes cannot both pass it.
        """
        return await self.call(_mark_sending, seq, token, attempt, time.time(), cap)

    async def hold(self, holds: list[tuple[int, float]], reason: str) -> None:
        """Requests (seq, until) back to the queue until then, for `reason` (calling_hours,
        cap): not a retry."""
        await self.call(_hold, holds, reason)

    async def release_held(self, now: float) -> int:
        """Held requests are due again now, to be judged by the rules in force (a restart or a
        reload may have changed them); those still held back are held again."""
        return await self.call(
            lambda conn: (
                conn.execute(
                    "UPDATE requests SET due_at = min(due_at, ?), held = NULL"
                    " WHERE state = 'queued' AND held IS NOT NULL",
                    (now,),
                ).rowcount
            )
        )

    async def expire_due(self, now: float) -> int:
        """Queued requests whose expires_at has passed end `expired`; how many did."""
        return await self.call(_expire_due, now)

    async def forget_number_calls(self, before: float) -> None:
        """Drop the record of placed calls older than `before`: no cap looks back that far."""
        await self.call(_execute, "DELETE FROM number_calls WHERE placed = 1 AND at < ?", (before,))

    async def placed(
        self,
        seq: int,
        token: str,
        wait_until: float,
        redial: Mapping[str, RedialPolicy],
        **fields: Any,
    ) -> tuple[str | None, list[str]]:
        """The API placed the call: wait for a callback until `wait_until`.

        Callbacks may have come before this answer was recorded; the first about this call is
        applied now. Returns its effect (None when there was none), and the statuses of those
        found not to be about this call (`mismatch`: they change nothing).
        """
        return await self.call(_placed, seq, token, wait_until, redial, fields)

    async def apply_callback(
        self, token: str, body: dict, redial: Mapping[str, RedialPolicy]
    ) -> tuple[str, str | None] | None:
        """Record a callback and apply it; (effect, agent_id), or None for an unknown token.

        Effects: `redial` (queued again), `unanswered` (final), `early` (before the placed
        answer was recorded: applied then), `stale` (an earlier attempt's, or the request has
        moved on), `repeat` (this token's callback was already received), `mismatch` (its `to`,
        `agent_id` or `conversation_uuid` is another call's: recorded, and changes nothing).
        """
        return await self.call(_apply_callback, token, body, redial, time.time())

    async def settle_placed(self, now: float) -> tuple[int, float | None]:
        """Placed calls whose wait for a callback is over end `dialed`; (count, next wait end)."""
        return await self.call(_settle_placed, now)

    async def last_sent_at(self, agent_id: str) -> float | None:
        """When the agent's latest send left, in this run or one before (wall clock)."""
        row = await self.call(
            lambda conn: conn.execute(
                "SELECT last_sent_at FROM agent_sends WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        )
        return row[0] if row else None

    async def retry_later(self, seq: int, due_at: float, counts_retry: bool, error: str) -> None:
        """Back to the queue: the API refused the send before placing a call."""
        await self.call(_retry_later, seq, due_at, counts_retry, error)

    async def finish(self, seq: int, outcome: str, **fields: Any) -> None:
        """Record the final outcome and queue its result line, in one transaction."""
        await self.call(_finish, seq, outcome, fields)

    async def recover_in_flight(self) -> int:
        """Sends marked but never answered (the daemon stopped): `in_doubt`, never resent."""
        return await self.call(_recover_in_flight)

    async def open_requests(self) -> int:
        """Requests without a final outcome yet."""
        return await self.call(_open_requests)

    # -- results -----------------------------------------------------------------------------

    async def outbox(self, limit: int) -> list[tuple[int, str, str]]:
        """Result lines not yet written: (seq, line, outcome), oldest first."""
        return await self.call(
            lambda conn: conn.execute(
                "SELECT seq, line, outcome FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        )

    async def outbox_written(self, last_seq: int) -> None:
        await self.call(_execute, "DELETE FROM outbox WHERE seq <= ?", (last_seq,))

    # -- status ------------------------------------------------------------------------------

    async def last_requeue(self) -> int:
        """The latest operator's requeue (0: none), so a running daemon notices new ones."""
        return await self.call(
            lambda conn: conn.execute("SELECT coalesce(max(seq), 0) FROM requeues").fetchone()[0]
        )

    async def status(self) -> dict:
        return await self.call(status_report, time.time())


def _settle(futures: list[tuple[asyncio.Future, tuple[bool, Any]]]) -> None:
    for future, outcome in futures:
        settle(future, outcome)


def _spool_files(
    conn: sqlite3.Connection, names: list[str], note_lines: int
) -> dict[str, SpoolRecord]:
    recorded = {}
    for name in names:
        row = conn.execute(
            "SELECT digest, items, errors FROM spool_files WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            continue
        digest, items, errors = row
        chunks = conn.execute(
            "SELECT errors FROM spool_file_errors WHERE name = ? ORDER BY start", (name,)
        )
        texts = itertools.chain([errors] if errors else [], (chunk for (chunk,) in chunks))
        recorded[name] = SpoolRecord(digest, items, _note(texts, note_lines))
    return recorded


def _note(texts: Iterable[str], note_lines: int) -> str | None:
    """The lines of texts, the first `note_lines` of them, then one saying how many more."""
    kept, shown, more = [], 0, 0
    for text in texts:
        lines = text.count("\n")
        room = max(0, note_lines - shown)
        if lines <= room:
            kept.append(text)
            shown += lines
            continue
        if room:
            kept.append("\n".join(text.split("\n", room)[:room]) + "\n")
            shown += room
        more += lines - room
    if more:
        kept.append(f"... and {more} more invalid lines, each with its own invalid result\n")
    return "".join(kept) or None


def _record_spool_chunk(conn: sqlite3.Connection, chunk: SpoolChunk, items: int) -> None:
    """The file's row says how far it is recorded, with this chunk's `items`; its first chunk
    starts the file's errors afresh (a row of its name may be of an earlier file)."""
    if chunk.start == 0:
        conn.execute("DELETE FROM spool_file_errors WHERE name = ?", (chunk.name,))
    conn.execute(
        "INSERT OR REPLACE INTO spool_files (name, digest, errors, items) VALUES (?, ?, NULL, ?)",
        (chunk.name, chunk.digest, None if chunk.last else chunk.start + items),
    )
    if chunk.errors:
        conn.execute(
            "INSERT INTO spool_file_errors (name, start, errors) VALUES (?, ?, ?)",
            (chunk.name, chunk.start, chunk.errors),
        )


def _forget_spool_files(conn: sqlite3.Connection, names: list[str]) -> None:
    rows = [(name,) for name in names]
    conn.executemany("DELETE FROM spool_files WHERE name = ?", rows)
    conn.executemany("DELETE FROM spool_file_errors WHERE name = ?", rows)


def _execute(conn: sqlite3.Connection, sql: str, params: tuple) -> None:
    conn.execute(sql, params)


def _mark_sending(
    conn: sqlite3.Connection,
    seq: int,
    token: str | None,
    attempt: int,
    now: float,
    cap: NumberCap | None,
) -> tuple[bool, float | None]:
    row = conn.execute(
        "SELECT to_number FROM requests WHERE seq = ? AND state = 'queued'", (seq,)
    ).fetchone()
    if row is None:
        return False, None
    to = row[0]
    allowed_at = None if cap is None else _cap_allows_at(conn, to, now, cap)
    if allowed_at is not None:
        return False, allowed_at
    conn.execute(
        "UPDATE requests SET state = 'sending', sent_at = ?, token = ?, held = NULL WHERE seq = ?",
        (now, token, seq),
    )
    conn.execute(
        "INSERT INTO number_calls (seq, to_number, at, placed) VALUES (?, ?, ?, 0)", (seq, to, now)
    )
    conn.execute(
        "INSERT INTO agent_sends (agent_id, last_sent_at) SELECT agent_id, ? FROM requests"
        " WHERE seq = ? ON CONFLICT (agent_id) DO UPDATE SET last_sent_at = excluded.last_sent_at",
        (now, seq),
    )
    if token is not None:
        conn.execute(
            "INSERT INTO calls (token, seq, attempt, sent_at) VALUES (?, ?, ?, ?)",
            (token, seq, attempt, now),
        )
    return True, None


def _cap_allows_at(conn: sqlite3.Connection, to: str, now: float, cap: NumberCap) -> float | None:
    """None if `to` may be called now under the cap, else the moment it may: when enough of the
    calls in the window (placed, or sent and not yet answered) have left it."""
    times = [
        r[0]
        for r in conn.execute(
            "SELECT at FROM number_calls WHERE to_number = ? AND at > ? ORDER BY at",
            (to, now - cap.per_s),
        )
    ]
    if len(times) < cap.count:
        return None
    return times[len(times) - cap.count] + cap.per_s


def _settle_number_call(conn: sqlite3.Connection, seq: int, placed: bool) -> None:
    """The request's unanswered send to its number was placed (it counts), or was not."""
    if placed:
        conn.execute("UPDATE number_calls SET placed = 1 WHERE seq = ? AND placed = 0", (seq,))
    else:
        conn.execute("DELETE FROM number_calls WHERE seq = ? AND placed = 0", (seq,))


def _retry_later(
    conn: sqlite3.Connection, seq: int, due_at: float, counts_retry: bool, error: str
) -> None:
    conn.execute(
        "UPDATE requests SET state = 'queued', due_at = ?, retries = retries + ?, error = ?,"
        " held = NULL WHERE seq = ?",
        (due_at, int(counts_retry), error, seq),
    )
    _settle_number_call(conn, seq, placed=False)


def _hold(conn: sqlite3.Connection, holds: list[tuple[int, float]], reason: str) -> None:
    for seq, until in holds:
        conn.execute(
            "UPDATE requests SET state = 'queued', due_at = ?, held = ?"
            " WHERE seq = ? AND state != 'final'",
            (until, reason, seq),
        )
        _settle_number_call(conn, seq, placed=False)


EXPIRED_ERROR = "expires_at passed before sending"


def _expire_due(conn: sqlite3.Connection, now: float) -> int:
    seqs = [
        r[0]
        for r in conn.execute(
            "SELECT seq FROM requests WHERE state = 'queued' AND expires_at IS NOT NULL"
            " AND expires_at <= ?",
            (now,),
        )
    ]
    for seq in seqs:
        _finish(conn, seq, "expired", {"error": EXPIRED_ERROR})
    return len(seqs)


def _placed(
    conn: sqlite3.Connection,
    seq: int,
    token: str,
    wait_until: float,
    redial: Mapping,
    fields: dict,
) -> tuple[str | None, list[str]]:
    columns = [c for c in FINISH_COLUMNS if c in fields]
    assignments = "".join(f", {c} = ?" for c in columns)
    conn.execute(
        f"UPDATE requests SET state = 'placed', due_at = ?{assignments} WHERE seq = ?",
        (wait_until, *(fields[c] for c in columns), seq),
    )
    _settle_number_call(conn, seq, placed=True)
    # Callbacks that came before this answer were judged without its conversation_uuid: judged
    # again with it now. The first that is about this call applies; the others change nothing.
    to, agent_id = conn.execute(
        "SELECT to_number, agent_id FROM requests WHERE seq = ?", (seq,)
    ).fetchone()
    applied, mismatched = None, []
    early = conn.execute(
        "SELECT seq, status, body FROM callbacks WHERE token = ? AND effect = 'early' ORDER BY seq",
        (token,),
    ).fetchall()
    for callback_seq, status, body in early:
        if not callback_matches(json.loads(body), to, agent_id, fields.get("conversation_uuid")):
            effect = "mismatch"
            mismatched.append(status)
        elif applied is None:
            effect = applied = _unreached(conn, seq, status, redial.get(status), time.time())
        else:
            effect = "repeat"
        conn.execute("UPDATE callbacks SET effect = ? WHERE seq = ?", (effect, callback_seq))
    return applied, mismatched


def _apply_callback(
    conn: sqlite3.Connection, token: str, body: dict, redial: Mapping, now: float
) -> tuple[str, str | None] | None:
    call = conn.execute("SELECT seq, attempt FROM calls WHERE token = ?", (token,)).fetchone()
    if call is None:
        return None
    seq = call[0]
    state, current_token, agent_id, to, conversation_uuid = conn.execute(
        "SELECT state, token, agent_id, to_number, conversation_uuid FROM requests WHERE seq = ?",
        (seq,),
    ).fetchone()
    # A mismatch uses nothing up: the genuine callback for the call may still come.
    applied_before = conn.execute(
        "SELECT 1 FROM callbacks WHERE token = ? AND effect NOT IN ('mismatch', 'early')",
        (token,),
    ).fetchone()
    # Only the latest send's token counts: an earlier attempt's, or a refused send's, is stale.
    if applied_before:
        effect = "repeat"
    elif token != current_token or state not in ("placed", "sending"):
        effect = "stale"
    elif state == "sending":  # the answer, and its conversation_uuid, are not recorded yet
        matches = callback_matches(body, to, agent_id, None)
        effect = "early" if matches else "mismatch"  # early: judged again once they are
    elif callback_matches(body, to, agent_id, conversation_uuid):
        effect = _unreached(conn, seq, body["status"], redial.get(body["status"]), now)
    else:
        effect = "mismatch"
    if effect != "repeat":
        conn.execute(
            "INSERT INTO callbacks (token, status, body, effect, received_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (token, body["status"], json.dumps(body), effect, now),
        )
    return effect, agent_id


def _unreached(
    conn: sqlite3.Connection, seq: int, status: str, policy: RedialPolicy | None, now: float
) -> str:
    """The callee of the current attempt was not reached: redial by the policy, or end."""
    attempts = conn.execute("SELECT attempts FROM requests WHERE seq = ?", (seq,)).fetchone()[0]
    if policy is not None and attempts < policy.attempts:
        conn.execute(
            "UPDATE requests SET state = 'queued', due_at = ?, status = ? WHERE seq = ?",
            (now + policy.delay_s, status, seq),
        )
        return "redial"
    _finish(conn, seq, "unanswered", {"status": status})
    return "unanswered"


def _settle_placed(conn: sqlite3.Connection, now: float) -> tuple[int, float | None]:
    seqs = [
        r[0]
        for r in conn.execute(
            "SELECT seq FROM requests WHERE state = 'placed' AND due_at <= ?", (now,)
        )
    ]
    for seq in seqs:
        _finish(conn, seq, "dialed", {"status": None})
    next_end = conn.execute("SELECT min(due_at) FROM requests WHERE state = 'placed'").fetchone()
    return len(seqs), next_end[0]


def _add(
    conn: sqlite3.Connection,
    run: int,
    requests: list[Request],
    invalid: list[dict],
    spool_file: SpoolChunk | None,
    dedupe_window_s: float,
) -> Intake:
    now = time.time()
    agents = set()
    accepted = 0
    for request in requests:
        request_id, repeated = _take(conn, run, request, now, dedupe_window_s)
        if repeated is None:
            agents.add(request.agent_id)
            accepted += 1
            continue
        _reject(
            conn,
            now,
            {
                "id": request_id,
                "to": request.to,
                "agent_id": request.agent_id,
                "meta": request.meta,
                "source": request.source,
                "outcome": "duplicate",
                "error": repeated,
            },
        )
    for fields in invalid:
        _reject(conn, now, {"outcome": "invalid", **fields})
    if spool_file is not None:
        _record_spool_chunk(conn, spool_file, len(requests) + len(invalid))
    return Intake(frozenset(agents), accepted, len(requests) - accepted + len(invalid))


def _take(
    conn: sqlite3.Connection, run: int, request: Request, now: float, window: float
) -> tuple[str, str | None]:
    """The id `request` is recorded under, queued, or, when it repeats an earlier request, the
    id it repeats and the duplicate's error."""
    request_id, repeated = _intake_id(conn, request, now, window)
    if repeated is None and _insert(conn, run, request, request_id, now):
        return request_id, None
    return request_id, repeated or _taken(conn, request_id)


def _intake_id(
    conn: sqlite3.Connection, request: Request, now: float, window: float
) -> tuple[str, str | None]:
    """The id to record `request` under, and, when it repeats a request given no id within the
    window, what the duplicate's error says. Repeating one taken before the window, it gets the
    content's id with the first free suffix: the first keeps its own. (No request given an id
    holds one of this form: request.py refuses them.)"""
    if not request.id_from_content:
        return request.id, None
    key = request.id
    earlier = conn.execute(
        "SELECT id, created_at, source FROM requests WHERE id >= ? AND id < ?"
        " ORDER BY seq DESC LIMIT 1",
        _made_from(key),
    ).fetchone()
    if earlier is None:
        return key, None
    earlier_id, taken_at, source = earlier
    if now - taken_at < window:
        return earlier_id, (
            f"repeats request {earlier_id} ({source}, taken {utc_text(taken_at)}),"
            f" within dedupe_window_s ({window:g} s)"
        )
    (times,) = conn.execute(
        "SELECT count(*) FROM requests WHERE id >= ? AND id < ?", _made_from(key)
    ).fetchone()
    suffix = times + 1  # free unless earlier repeats were forgotten
    while conn.execute("SELECT 1 FROM requests WHERE id = ?", (f"{key}.{suffix}",)).fetchone():
        suffix += 1
    return f"{key}.{suffix}", None


def _made_from(key: str) -> tuple[str, str]:
    """The range of the ids made from one request's content, as the id index reads it fast: the
    key, then the key with a suffix ('.' sorts just before '/'). request.py refuses any given
    id that starts as one made from content does, so none but these is in it."""
    return key, key + "/"


def _insert(conn: sqlite3.Connection, run: int, request: Request, request_id: str, now: float):
    """Whether `request` was queued: not when its id is taken already."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO requests (id, run, agent_id, to_number, body, meta, source,"
        " expires_at, due_at, state, created_at, campaign)"
        " VALUES (?,?,?,?,?,?,?,?,?,'queued',?,?)",
        (
            request_id,
            run,
            request.agent_id,
            request.to,
            json.dumps(request.api_body(), separators=(",", ":")),
            None if request.meta is None else json.dumps(request.meta),
            request.source,
            request.expires_at,
            max(now, request.not_before or now),
            now,
            request.campaign,
        ),
    )
    return cursor.rowcount == 1


def _taken(conn: sqlite3.Connection, request_id: str) -> str:
    earlier = conn.execute(
        "SELECT source, created_at FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    if earlier is None:  # pruned: its id is remembered, not where it came from
        return f"id {request_id!r} was already taken by an earlier request"
    source, taken_at = earlier
    return (
        f"id {request_id!r} was already taken by an earlier request ({source},"
        f" taken {utc_text(taken_at)})"
    )


def _reject(conn: sqlite3.Connection, now: float, fields: dict) -> None:
    request_id = fields.get("id")  # an invalid request's `id` may be any JSON value
    conn.execute(
        "INSERT INTO rejects (id, outcome, error, source, at) VALUES (?, ?, ?, ?, ?)",
        (
            request_id if isinstance(request_id, str) else None,
            fields["outcome"],
            fields["error"],
            fields["source"],
            now,
        ),
    )
    conn.execute(
        "INSERT INTO outbox (line, outcome) VALUES (?, ?)",
        (result_line(at=now, **fields), fields["outcome"]),
    )


def _due(conn: sqlite3.Connection, agent_id: str, now: float, limit: int):
    rows = conn.execute(
        "SELECT seq, id, body, attempts, retries, expires_at FROM requests"
        " WHERE state = 'queued' AND agent_id = ? AND due_at <= ? ORDER BY due_at, seq LIMIT ?",
        (agent_id, now, limit),
    ).fetchall()
    pending = [
        Pending(seq, id_, agent_id, json.loads(body), attempts, retries, expires)
        for seq, id_, body, attempts, retries, expires in rows
    ]
    next_due = conn.execute(
        "SELECT min(due_at) FROM requests WHERE state = 'queued' AND agent_id = ? AND due_at > ?",
        (agent_id, now),
    ).fetchone()[0]
    return pending, next_due


FINISH_COLUMNS = ("attempts", "http_status", "conversation_uuid", "status", "error", "response")


def _finish(conn: sqlite3.Connection, seq: int, outcome: str, fields: dict) -> None:
    now = time.time()
    columns = [c for c in FINISH_COLUMNS if c in fields]
    assignments = "".join(f", {c} = ?" for c in columns)
    row = conn.execute(
        f"UPDATE requests SET state = 'final', outcome = ?, finished_at = ?{assignments}"
        " WHERE seq = ? AND state != 'final'"
        " RETURNING id, to_number, agent_id, attempts, http_status, conversation_uuid, status,"
        " error, meta, source",
        (outcome, now, *(fields[c] for c in columns), seq),
    ).fetchone()
    if row is None:
        return  # already final: a finish is applied once
    # A call the API placed, or may have placed, counts against the number's cap.
    _settle_number_call(conn, seq, placed=outcome in ("dialed", "in_doubt"))
    id_, to, agent_id, attempts, http_status, conversation_uuid, status, error, meta, source = row
    line = result_line(
        id=id_,
        to=to,
        agent_id=agent_id,
        outcome=outcome,
        attempts=attempts,
        http_status=http_status,
        conversation_uuid=conversation_uuid,
        status=status,
        error=error,
        meta=None if meta is None else json.loads(meta),
        source=source,
        at=now,
    )
    conn.execute("INSERT INTO outbox (line, outcome) VALUES (?, ?)", (line, outcome))


IN_DOUBT_ERROR = "the daemon stopped while this send was in flight; requeue it to send again"


def _recover_in_flight(conn: sqlite3.Connection) -> int:
    seqs = [r[0] for r in conn.execute("SELECT seq FROM requests WHERE state = 'sending'")]
    for seq in seqs:
        _finish(conn, seq, "in_doubt", {"error": IN_DOUBT_ERROR})
    return len(seqs)


def _open_requests(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM requests WHERE state != 'final'").fetchone()[0]


HELD_REASONS = ("calling_hours", "cap")  # why a queued request may wait past its own due time


def empty_agent_status() -> dict:
    return {
        "queued": 0,
        "due_now": 0,
        "in_flight": 0,
        "awaiting_callback": 0,
        "next_due": None,
        **{f"held_{reason}": 0 for reason in HELD_REASONS},
        **{f"held_{reason}_until": None for reason in HELD_REASONS},
    }


def status_report(conn: sqlite3.Connection, now: float) -> dict:
    """Queue per agent, in flight, due times and counts per outcome, as `dialerd status` shows."""
    agents: dict[str, dict] = {}
    for agent_id, state, count, next_due in conn.execute(
        "SELECT agent_id, state, count(*), min(due_at) FROM requests"
        " WHERE state != 'final' GROUP BY agent_id, state"
    ):
        entry = agents.setdefault(agent_id, empty_agent_status())
        if state == "queued":
            entry["queued"] = count
            entry["next_due"] = next_due
        elif state == "sending":
            entry["in_flight"] = count
        else:
            entry["awaiting_callback"] = count
    for agent_id, due_now in conn.execute(
        "SELECT agent_id, count(*) FROM requests WHERE state = 'queued' AND due_at <= ?"
        " GROUP BY agent_id",
        (now,),
    ):
        agents[agent_id]["due_now"] = due_now
    if conn.execute("PRAGMA user_version").fetchone()[0] >= 1:  # else a daemon not yet upgraded
        for agent_id, reason, count, until in conn.execute(
            "SELECT agent_id, held, count(*), min(due_at) FROM requests"
            " WHERE state = 'queued' AND held IS NOT NULL GROUP BY agent_id, held"
        ):
            agents[agent_id][f"held_{reason}"] = count
            agents[agent_id][f"held_{reason}_until"] = until
    outcomes: dict[str, int] = {}
    for outcome, count in conn.execute(
        "SELECT outcome, count(*) FROM requests WHERE outcome IS NOT NULL GROUP BY outcome"
        " UNION ALL SELECT outcome, count(*) FROM rejects GROUP BY outcome"
    ):
        outcomes[outcome] = outcomes.get(outcome, 0) + count
    return {
        "agents": agents,
        "outcomes": outcomes,
        "results_unwritten": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
    }


def requeue(state_dir: Path, ids: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Queue `in_doubt` requests again (all of them when `ids` is None): the operator's
    deliberate resend, recorded in the ledger. Works whether or not a daemon runs.

    Returns the ids requeued, and why each other id was not.
    """
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        raise FileNotFoundError(f"no ledger in {state_dir}")
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        if ids is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM requests WHERE outcome = 'in_doubt'")]
        requeued, refused = [], {}
        for request_id in ids:
            row = conn.execute(
                "SELECT seq, outcome, error FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            if row is None or row[1] != "in_doubt":
                refused[request_id] = "no such request" if row is None else _not_in_doubt(row[1])
                continue
            seq, _outcome, error = row
            conn.execute(
                "UPDATE requests SET state = 'queued', outcome = NULL, finished_at = NULL,"
                " error = NULL, retries = 0, due_at = ? WHERE seq = ?",
                (time.time(), seq),
            )
            conn.execute(
                "INSERT INTO requeues (id, previous_error, at) VALUES (?, ?, ?)",
                (request_id, error, time.time()),
            )
            requeued.append(request_id)
        conn.execute("COMMIT")
        return requeued, refused
    finally:
        conn.close()


def _not_in_doubt(outcome: str | None) -> str:
    return f"is {outcome}, not in_doubt" if outcome else "is not final yet"


def foresee_intake(
    state_dir: Path, requests: list[Request], dedupe_window_s: float
) -> list[tuple[str, bool]]:
    """For each request, as the ledger stands, the id the daemon will record it under and
    whether it is a duplicate of one taken before it (or before it in `requests`). The ledger's
    rows that the requests may repeat are copied into a ledger in memory and the requests taken
    there, by the daemon's own code; the ledger is only read (SQLite may make its -wal and -shm
    when no daemon has them open). sqlite3.Error or OSError when it cannot be read, or is of
    another version."""
    path = state_dir / "ledger.sqlite3"
    ledger = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
    try:
        create_schema(ledger)
        if path.exists():
            _copy_repeatable(ledger, path, [request.id for request in requests])
        now = time.time()
        ledger.execute("BEGIN")
        taken = [_take(ledger, 0, request, now, dedupe_window_s) for request in requests]
        return [(request_id, repeated is not None) for request_id, repeated in taken]
    finally:
        ledger.close()


def _copy_repeatable(ledger: sqlite3.Connection, path: Path, keys: list[str]) -> None:
    """Into `ledger`, the requests of the ledger at `path` whose id is a key, or made from the
    same content as it (and maybe a few more: they change nothing)."""
    ledger.execute("ATTACH ? AS stored", (path.absolute().as_uri() + "?mode=ro",))
    (version,) = ledger.execute("PRAGMA stored.user_version").fetchone()
    if version != len(MIGRATIONS):  # older: the daemon upgrades it when it starts
        raise OSError(
            f"the ledger {path} has schema version {version}, not this dialerd's {len(MIGRATIONS)}"
        )
    ledger.execute("CREATE TEMP TABLE keys (key TEXT PRIMARY KEY)")
    ledger.executemany("INSERT OR IGNORE INTO keys VALUES (?)", ((key,) for key in keys))
    columns = ", ".join(row[1] for row in ledger.execute("PRAGMA main.table_info(requests)"))
    ledger.execute(
        f"INSERT OR IGNORE INTO main.requests ({columns}) SELECT {columns}"
        " FROM keys CROSS JOIN stored.requests AS r ON r.id >= key AND r.id < key || '/'"
    )
    ledger.execute("DETACH stored")


def read_status(state_dir: Path) -> dict | None:
    """The status from the ledger file, whether or not a daemon runs; None if there is none."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return None
    conn = connect(path, read_only=True)
    try:
        return status_report(conn, time.time())
    finally:
        conn.close()
