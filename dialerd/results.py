"""Results: one JSON line per request at its final outcome, written from the ledger's outbox.

A final outcome and its line are committed together; the writer copies lines from the outbox to
stdout or the results file and deletes them only once they are flushed, so a crash can repeat the
last lines written but never lose one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import os
import stat
import time
from typing import TYPE_CHECKING, Any

from .aio import wait_event
from .files import create_private
from .logs import log

if TYPE_CHECKING:
    from .ledger import Ledger
    from .metrics import Metrics


class Outcome(enum.StrEnum):
    """A request's final outcome, as its result line says it (SPEC §6)."""

    DIALED = "dialed"
    UNANSWERED = "unanswered"
    FAILED = "failed"
    INVALID = "invalid"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"
    BLOCKED = "blocked"
    IN_DOUBT = "in_doubt"
    CANCELLED = "cancelled"


STDOUT = 1
APPEND = os.O_WRONLY | os.O_APPEND

RESULT_FIELDS = (
    "id",
    "to",
    "agent_id",
    "outcome",
    "attempts",
    "http_status",
    "conversation_uuid",
    "status",
    "error",
    "meta",
    "source",
    "campaign",
)


# Built once: json.dumps with any option set builds a new encoder for every line.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "))


def result_line(at: float, **fields: Any) -> str:
    """The result as one JSON line, fields in the documented order, absent ones null."""
    record = {name: fields.get(name) for name in RESULT_FIELDS}
    record["attempts"] = record["attempts"] or 0
    record["at"] = utc_text(at)
    return _ENCODER.encode(record)


def utc_text(epoch: float) -> str:
    """Epoch seconds as a result writes a moment (2026-11-24T12:00:00Z)."""
    # strftime on gmtime: the same text as datetime's isoformat, in half the time.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class ResultsWriter:
    """Copies the outbox to the results target as lines become final."""

    BATCH = 1000

    def __init__(self, ledger: Ledger, target: str, metrics: Metrics):
        self._ledger = ledger
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        # Opened at start-up, so an unwritable results file stops the daemon before any send.
        # Written unbuffered, so a failed write leaves nothing behind to come out later.
        self._fd = STDOUT if target == "-" else create_private(target, APPEND)
        self.written: collections.Counter[str] = collections.Counter()  # by outcome, this run

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Write lines whenever woken (and every second, as a safety net), until cancelled."""
        while True:
            await self.flush()
            await wait_event(self._wake, 1.0)
            self._wake.clear()

    async def flush(self) -> None:
        """Write every line that is final so far; on a write error they wait in the outbox."""
        async with self._lock:
            try:
                await self._write_outbox()
            except OSError as error:
                log.error("cannot write results; they wait in the ledger", error=str(error))

    async def _write_outbox(self) -> None:
        while lines := await self._ledger.outbox(self.BATCH):
            data = "".join(line + "\n" for _seq, line, _outcome, _campaign in lines).encode()
            await asyncio.to_thread(_write_durably, self._fd, data)
            await self._ledger.outbox_written([line[0] for line in lines])
            for _seq, _line, outcome, campaign in lines:
                self._metrics.outcome(outcome, campaign)
                self.written[outcome] += 1

    def close(self) -> None:
        if self._fd != STDOUT:
            os.close(self._fd)


def _write_durably(fd: int, data: bytes) -> None:
    """Write all of `data` and sync it; on a file, a failed write is cut back off whole."""
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    start = os.lseek(fd, 0, os.SEEK_END) if regular else 0
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if regular:
            os.fsync(fd)
    except OSError:
        if regular:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
        raise
