"""The ledger's one writing thread, which runs the calls of every task in group commits.

The calls that queue up while one transaction commits are run together in the next, each
under a savepoint, so a burst of sends or an intake batch costs one commit, and one failing
call never undoes the others. The same thread serves SQLite and PostgreSQL: `Engine` says what
differs (how a transaction begins, which errors pass, how a lost connection comes back).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..aio import settle
from ..logs import log
from .dialect import SQLITE, Dialect

STORAGE_FAULTS = ("disk is full", "disk I/O error", "readonly", "unable to open", "locked")
FAULT_RETRY_FIRST_S = 0.1
FAULT_RETRY_MAX_S = 5.0
FAULT_LOG_EVERY_S = 10.0


def storage_fault(error: BaseException) -> bool:
    """SQLite's faults of the storage, not of the call: the call is tried again once they
    clear."""
    return isinstance(error, sqlite3.OperationalError) and any(
        fault in str(error) for fault in STORAGE_FAULTS
    )


@dataclass(frozen=True)
class Engine:
    """What the writer needs to know of the database it writes."""

    where: str  # for the log: a path, or a url without its password
    dialect: Dialect = SQLITE
    batch_calls: int = 2000  # calls in one group commit at most
    reconnect: Callable[[], Any] | None = None  # a new connection, when one can be lost
    # Whether an error is the storage's or the connection's, not the call's (it is tried
    # again once it clears); and whether such a fault is worth an error in the log.
    fault: Callable[[BaseException], bool] = storage_fault
    lasting: Callable[[BaseException], bool] = storage_fault
    # A connection lost as it committed leaves the commit's outcome unknown, and most calls
    # cannot be made twice (an intake would find its own requests, and take them for
    # duplicates). With these, the writer asks: `commit_token(conn)`, before COMMIT, names the
    # transaction (None: it wrote nothing); `committed(conn, token)` on a new connection says
    # whether it took effect (None: the server cannot tell yet).
    commit_token: Callable[[Any], Any] | None = None
    committed: Callable[[Any, Any], bool | None] | None = None


class Writer:
    def __init__(self, conn: Any, engine: Engine):
        self._conn = conn
        self._engine = engine
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._fault_logged_at = -FAULT_LOG_EVERY_S
        self._stopping = False  # no more waiting for a lost commit's outcome
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the calls queued, then end the thread; whether it ended within `timeout` (a
        commit can hang on a failing disk: the thread is a daemon's, left behind)."""
        self._stopping = True
        self._calls.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
            except Exception as error:
                if not self._engine.fault(error):
                    raise
                if self._engine.lasting(error):
                    self._report_fault(error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, FAULT_RETRY_MAX_S)

    def _report_fault(self, error: Exception) -> None:
        """Log a storage fault at most once per FAULT_LOG_EVERY_S, however many calls it hits."""
        now = time.monotonic()
        if now - self._fault_logged_at >= FAULT_LOG_EVERY_S:
            self._fault_logged_at = now
            log.error(
                "the ledger cannot write; retrying until it can",
                error=str(error),
                ledger=self._engine.where,
            )

    def _serve(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._engine.batch_calls:
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
        outcomes = []
        try:
            conn = self._connected()
            conn.execute(self._engine.dialect.begin)
            for fn, args, _future in batch:
                conn.execute("SAVEPOINT call")
                try:
                    outcomes.append((True, fn(conn, *args)))
                    conn.execute("RELEASE call")
                except Exception as error:  # handed to the caller, who decides
                    try:
                        conn.execute("ROLLBACK TO call")
                        conn.execute("RELEASE call")
                    except Exception:
                        # The transaction went with the call's error (SQLite rolls back on a
                        # full disk or an I/O error; a connection lost): the batch fails as the
                        # call did, so that its fault is known for what it is, and tried again.
                        raise error from None
                    outcomes.append((False, error))
            self._commit_known(conn)
        except Exception as error:  # handed to every caller: the thread serves on
            # The commit itself failed (disk full, I/O error, the connection lost): nothing of
            # the batch holds.
            self._abandon()
            outcomes = [(False, error)] * len(batch)
        # One wake-up of each waiting loop per batch, not one per call.
        settled: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for (_fn, _args, future), outcome in zip(batch, outcomes, strict=True):
            settled[future.get_loop()].append((future, outcome))
        for loop, futures in settled.items():
            loop.call_soon_threadsafe(_settle, futures)

    def _commit_known(self, conn: Any) -> None:
        """COMMIT; raises unless it took effect, even when the connection was lost with it."""
        token = self._engine.commit_token(conn) if self._engine.commit_token else None
        try:
            conn.execute("COMMIT")
        except Exception:
            # An error the server gave is its answer: rolled back. Only a lost connection
            # leaves it open.
            if token is None or not getattr(conn, "broken", False):
                raise
            if not self._committed_after_all(token):
                raise

    def _committed_after_all(self, token: Any) -> bool:
        """A commit whose answer was lost: whether it took effect, asked on a new connection
        until the database can tell (a transaction cut off stays in progress until the server
        notices, then is rolled back), or until the writer stops."""
        self._abandon()
        delay = FAULT_RETRY_FIRST_S
        while not self._stopping:
            try:
                outcome = self._engine.committed(self._connected(), token)
            except Exception:  # the database is not back yet
                self._abandon()
                outcome = None
            if outcome is not None:
                return outcome
            time.sleep(delay)
            delay = min(delay * 2, FAULT_RETRY_MAX_S)
        return False

    def _connected(self) -> Any:
        """The connection, made again first if the last one was lost."""
        if self._conn is None:
            self._conn = self._engine.reconnect()
        return self._conn

    def _abandon(self) -> None:
        """After a failed commit: roll back what is left, or, when the connection is gone,
        drop it for a new one at the next batch."""
        conn = self._conn
        if conn is None:
            return
        try:
            if conn.in_transaction and not getattr(conn, "broken", False):
                conn.execute("ROLLBACK")
        except Exception:
            pass  # lost while rolling back: it is dropped below, and the server rolls back
        if getattr(conn, "broken", False):
            self._conn = None
            conn.close()


def _settle(futures: list[tuple[asyncio.Future, tuple[bool, Any]]]) -> None:
    for future, outcome in futures:
        settle(future, outcome)
