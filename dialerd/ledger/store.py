"""The ledger as the daemon's tasks use it: every call runs in the writer thread, on SQLite in
the state_dir or (cluster mode) on PostgreSQL."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import clock
from ..aio import Worker
from ..config import ClusterConfig, NumberCap, RedialPolicy
from ..logs import log
from ..request import Request
from ..results import Outcome
from . import control, intake, leases, placed, retention, sends, status
from .dialect import dialect
from .intake import Intake, SpoolChunk, SpoolRecord
from .lock import keep_ledger_private, lock_state_dir
from .opening import follow_database_clock
from .schema import connect, create_schema
from .sends import Pending
from .states import State
from .writer import Engine, Writer

# Records pruned in one call: one commit's worth that holds up the sends' marks in it by a few
# milliseconds at most.
PRUNE_BATCH = 200


class Ledger:
    def __init__(self, state_dir: Path, cluster: ClusterConfig | None = None):
        self.state_dir = state_dir
        self.cluster = cluster
        self.path = state_dir / "ledger.sqlite3"
        self._lock_fd: int | None = None
        self._conn: Any = None
        self._writer: Writer | None = None
        self._status_conn: Any = None  # cluster mode: the reports' own connection
        self._instance_runs: list[int] = []  # cluster mode: this one and its instance's before
        self._reports: Worker | None = None  # the thread the reports are read in, in turn
        self.run = 0

    @property
    def where(self) -> str:
        """The ledger as the log and errors name it."""
        if self.cluster is None:
            return str(self.path)
        from .postgres import describe

        return describe(self.cluster.url)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the database and start this run (on SQLite, with the state_dir locked);
        blocking, called once."""
        if self.cluster is not None:
            self._open_postgres(self.cluster)
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state_dir(self.state_dir)
        try:
            keep_ledger_private(self.path)
            self._conn = connect(self.path)
            create_schema(self._conn)
            cursor = self._conn.execute(
                "INSERT INTO runs (pid, started_at) VALUES (?, ?)", (os.getpid(), clock.now())
            )
        except sqlite3.Error as error:  # not writable (read-only file or directory), not SQLite
            self.close()
            raise OSError(f"cannot open the ledger {self.path}: {error}") from None
        except OSError:
            self.close()
            raise
        self.run = cursor.lastrowid
        self._writer = Writer(self._conn, Engine(str(self.path)))

    def _open_postgres(self, cluster: ClusterConfig) -> None:
        from . import postgres  # psycopg takes 0.1 s to import: only in cluster mode

        try:
            self._conn = self._connect_postgres()
            postgres.create_schema(self._conn)
            follow_database_clock(self._conn)
            (self.run,) = self._conn.execute(
                "INSERT INTO runs (pid, started_at) VALUES (?, ?) RETURNING run",
                (os.getpid(), clock.now()),
            ).fetchone()
        except postgres.psycopg.Error as error:
            self.close()
            raise OSError(f"cannot open the ledger {self.where}: {error}") from None
        except OSError:
            self.close()
            raise
        self._writer = Writer(self._conn, postgres.engine(self.where, self._connect_postgres))

    def _connect_postgres(self) -> Any:
        from . import postgres

        cluster = self.cluster
        return postgres.connect(
            cluster.url, cluster.password_file, f"dialerd {cluster.instance}", cluster.instance
        )

    def close(self, timeout: float | None = None) -> None:
        """Finish queued calls, stop the thread, close the database and release the lock; a
        thread that does not end within `timeout` keeps the database (the process exits)."""
        if self._writer is not None:
            ended = self._writer.stop(timeout)
            self._writer = None
            if not ended:
                log.warning("the ledger's last commit did not end in time; leaving it")
                self._conn = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._close_status_conn()
        if self._reports is not None:
            self._reports.close()
            self._reports = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(conn, *args) in the writer thread, in the next group commit (see Writer.call)."""
        assert self._writer is not None, "the ledger is not open"
        return await self._writer.call(fn, *args)

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
        if spool_file is not None:
            spool_file = dataclasses.replace(spool_file, name=self._spool_key(spool_file.name))
        return await self.call(intake.add, self.run, requests, invalid, spool_file, dedupe_window_s)

    # A spool file is recorded by its name, which in cluster mode another daemon's spool may
    # give too: there, each daemon's are under its instance ("dialer-1/batch.jsonl"; no name
    # in a spool holds a "/").

    def _spool_key(self, name: str) -> str:
        return name if self.cluster is None else f"{self.cluster.instance}/{name}"

    def _spool_name(self, key: str) -> str | None:
        if self.cluster is None:
            return key
        instance, _, name = key.partition("/")
        return name if instance == self.cluster.instance else None

    async def spool_files(self, names: list[str], note_lines: int) -> dict[str, SpoolRecord]:
        """What is recorded of the named spool files, recorded (or partly) but not yet moved;
        of the lines for each one's NAME.errors, the first `note_lines` and how many more."""
        keys = [self._spool_key(name) for name in names]
        recorded = await self.call(intake.spool_files, keys, note_lines)
        return {self._spool_name(key): record for key, record in recorded.items()}

    async def spool_file_names(self) -> list[str]:
        keys = await self.call(
            lambda conn: [r[0] for r in conn.execute("SELECT name FROM spool_files")]
        )
        return [name for key in keys if (name := self._spool_name(key)) is not None]

    async def forget_spool_files(self, names: list[str]) -> None:
        await self.call(intake.forget_spool_files, [self._spool_key(name) for name in names])

    # -- dispatch ----------------------------------------------------------------------------

    async def due(
        self, agent_id: str, now: float, limit: int
    ) -> tuple[list[Pending], float | None]:
        """Up to `limit` due requests of an agent in due order, and when the next one is due."""
        return await self.call(sends.due, agent_id, now, limit)

    async def mark_sending(
        self,
        seq: int,
        token: str | None = None,
        attempt: int = 0,
        cap: NumberCap | None = None,
        epoch: int | None = None,
    ) -> tuple[bool, float | None]:
        """A send is about to go out; `token` is its status_url's, when callbacks are on.

        Returns (marked, allowed_at). Not marked: the number is over `cap` until `allowed_at`,
        or (allowed_at None) the request is no longer queued, e.g. expired while it waited.
        The cap is checked in the same transaction as the mark, so two sends to one number from
        two lanes cannot both pass it.

        Cluster mode: `epoch` is that of the agent's lease, which the mark checks is still this
        run's (sends.LeaseLost when it is not); the send is stamped by the database's clock.
        """
        fence = None if epoch is None else (self.run, epoch)
        return await self.call(sends.mark_sending, seq, token, attempt, clock.now(), cap, fence)

    async def unmark(self, seq: int) -> None:
        """A marked send that never left (a stop began first): queued again as it was."""
        await self.call(sends.unmark, seq)

    async def hold(self, holds: list[tuple[int, float]], reason: str) -> None:
        """Requests (seq, until) back to the queue until then, for `reason` (calling_hours,
        cap): not a retry."""
        await self.call(sends.hold, holds, reason)

    async def release_held(self, now: float) -> int:
        """Held requests are due again now, to be judged by the rules in force (a restart or a
        reload may have changed them); those still held back are held again."""
        return await self.call(
            lambda conn: (
                conn.execute(
                    "UPDATE requests SET due_at = CASE WHEN due_at < ? THEN due_at ELSE ? END,"
                    f" held = NULL WHERE state = '{State.QUEUED}' AND held IS NOT NULL",
                    (now, now),
                ).rowcount
            )
        )

    async def follow_clock_step(self, step: float, stepped_at: float) -> int:
        """The wall clock was stepped: waits keep their length, fixed moments stay (see
        sends.follow_clock_step); how many requests moved."""
        return await self.call(sends.follow_clock_step, step, stepped_at)

    async def expire_due(self, now: float, max_queue_s: float) -> int:
        """Queued requests past expires_at or max_queue_s end `expired`; how many did."""
        return await self.call(sends.expire_due, now, max_queue_s)

    async def forget_number_calls(self, before: float) -> None:
        """Drop the record of placed calls older than `before`: no cap looks back that far."""
        await self.call(sends.forget_number_calls, before)

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
        return await self.call(placed.placed, seq, token, wait_until, redial, fields)

    async def apply_callback(
        self, token: str, body: dict, redial: Mapping[str, RedialPolicy]
    ) -> tuple[str, str | None] | None:
        """Record a callback and apply it; (effect, agent_id), or None for an unknown token.

        Effects: `redial` (queued again), `unanswered` (final), `cancelled` (final: a redial
        was due, but an operator cancelled the request while the call was out), `early` (before
        the placed answer was recorded: applied then), `stale` (an earlier attempt's, or the
        request has moved on), `repeat` (this token's callback was already received),
        `mismatch` (its `to`, `agent_id` or `conversation_uuid` is another call's: recorded, and
        changes nothing).
        """
        return await self.call(placed.apply_callback, token, body, redial, clock.now())

    async def settle_placed(self, now: float) -> tuple[int, float | None]:
        """Placed calls whose wait for a callback is over end `dialed`; (count, next wait end)."""
        return await self.call(placed.settle_placed, now)

    async def since_last_send(self, agent_id: str) -> float | None:
        """How long ago the agent's latest send left, in this run or one before, or (cluster
        mode) from another daemon: by the clock that stamped it (the database's, there)."""
        return await self.call(sends.since_last_send, agent_id, clock.now())

    async def retry_later(
        self, seq: int, due_at: float | None, counts_retry: bool, error: str
    ) -> None:
        """Back to the queue: the API refused the send before placing a call; due at `due_at`,
        or (None) where it was in the queue."""
        await self.call(sends.retry_later, seq, due_at, counts_retry, error)

    async def finish(self, seq: int, outcome: Outcome, **fields: Any) -> None:
        """Record the final outcome and queue its result line, in one transaction."""
        await self.call(sends.finish, seq, outcome, fields)

    async def recover_in_flight(self) -> int:
        """Sends marked but never answered (the daemon stopped): `in_doubt`, never resent."""
        return await self.call(sends.recover_in_flight)

    async def open_requests(self) -> int:
        """Requests without a final outcome yet; in cluster mode, of those this daemon's
        instance took in (the others' are theirs to wait for)."""
        instance = None if self.cluster is None else self.cluster.instance
        return await self.call(status.open_requests, instance)

    # -- retention ---------------------------------------------------------------------------

    async def prune(self, now: float, retention_s: float) -> bool:
        """A batch of what is older than retention_s pruned; whether there may be more."""
        return await self.call(retention.prune, now, retention_s, PRUNE_BATCH) == PRUNE_BATCH

    async def vacuum(self) -> bool:
        """Some free pages given back to the file system; whether there are more to give."""
        return await self.call(retention.vacuum) > 0

    # -- results -----------------------------------------------------------------------------

    async def outbox(self, limit: int) -> list[tuple[int, str, str, str | None]]:
        """Result lines not yet written: (seq, line, outcome, campaign), oldest first; in
        cluster mode, those of the requests this daemon's instance took in."""
        if self.cluster is None:
            sql, params = "SELECT seq, line, outcome, campaign FROM outbox", ()
        else:  # by the list of runs, read by its index: never past others' lines owed
            sql = "SELECT seq, line, outcome, campaign FROM outbox WHERE run = ANY(?)"
            params = (self._instance_runs,)
        return await self.call(
            lambda conn: conn.execute(f"{sql} ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        )

    async def outbox_written(self, seqs: list[int]) -> None:
        """Those lines are written. By their seqs, not up to the last: on PostgreSQL a line of
        a lower seq may commit after one of a higher (seqs are given out before commits)."""
        await self.call(
            lambda conn: conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
        )

    # -- leases (cluster mode) ---------------------------------------------------------------

    async def shared_secret(self, name: str, new: bytes) -> bytes:
        """The secret of this name every daemon of the cluster shares; `new` if it is the
        first to ask."""
        return await self.call(leases.shared_secret, name, new)

    async def join(self) -> float | None:
        """This run joins the cluster under its instance name; when a live run has that name,
        the seconds its heartbeat has left instead (see leases.join)."""
        cluster = self.cluster
        left = await self.call(leases.join, self.run, cluster.instance, cluster.lease_s)
        if left is None:
            self._instance_runs = await self.call(leases.runs_of, cluster.instance)
        return left

    async def lease_round(self, agents: list[str]) -> leases.Round:
        """This run's heartbeat and its leases renewed; what there is to take (leases.Round).
        The process follows the database's clock as the round read it."""
        round_ = await self.call(leases.renew, self.run, agents, self.cluster.lease_s)
        clock.follow_database(*round_.clock)
        return round_

    async def take_leases(self, agents: list[str]) -> tuple[dict[str, int], int]:
        """The free leases of `agents` taken: their epochs, and how many sends of the holders
        before became in_doubt (see leases.take)."""
        cluster = self.cluster
        return await self.call(leases.take, self.run, cluster.instance, agents, cluster.lease_s)

    async def release_leases(self, agents: list[str]) -> None:
        await self.call(leases.release, self.run, agents)

    async def park_orphans(self) -> int:
        """Sends in flight for an agent no daemon has held for a while: in_doubt."""
        return await self.call(leases.park_orphans)

    async def leave(self) -> None:
        await self.call(leases.leave, self.run)

    # -- status ------------------------------------------------------------------------------

    async def pause_targets(self) -> tuple[list[str], list[str]]:
        """Campaigns to leave out of the index of due requests, and campaigns to put back."""
        return await self.call(control.pause_targets)

    async def set_paused(self, campaign: str, paused: bool) -> bool:
        """A batch of the campaign's queued requests left out (or put back); whether there may
        be more."""
        return await self.call(control.set_paused, campaign, paused) == control.PAUSE_SYNC_BATCH

    async def last_control(self) -> int:
        """The latest operator's change: a requeue, cancel, pause or resume (0: none), so that
        a running daemon notices new ones."""
        return await self.call(control.last_control)

    async def status(self) -> dict:
        """The status report, read on a connection of its own in another thread: a report
        never waits for the writer, nor holds up a send's mark (WAL lets both go on at once).
        The thread is a Worker's: a report stuck on a database that went away mid-read never
        holds up the process's exit."""
        if self._reports is None:
            self._reports = Worker("ledger-reports")
        return await self._reports.run(self._read_status)

    def _read_status(self) -> dict:
        if self.cluster is None:
            conn = connect(self.path, read_only=True)
            try:
                return _report(conn)
            finally:
                conn.close()
        from .postgres import psycopg

        # One connection for the reports, kept (a new one per report would cost the server a
        # process each time /status or /metrics is read), made again once it is lost.
        try:
            if self._status_conn is None or self._status_conn.broken:
                self._status_conn = self._connect_postgres()
            report = _report(self._status_conn)
            self._status_conn.execute("COMMIT")
            return report
        except psycopg.Error as error:  # the database went away during the report
            self._close_status_conn()
            raise OSError(f"cannot read the ledger {self.where}: {error}") from None

    def _close_status_conn(self) -> None:
        if self._status_conn is not None:
            self._status_conn.close()
            self._status_conn = None


def _report(conn: Any) -> dict:
    conn.execute(dialect(conn).snapshot)  # one snapshot for all of the report's queries
    return status.status_report(conn, clock.now())
