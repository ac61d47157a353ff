"""Results: one JSON line per request at its final outcome, written from the ledger's outbox.

A final outcome and its line are committed together; the writer copies lines from the outbox to
stdout or the results file and deletes them only once they are flushed, so a crash can repeat the
last lines written but never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .aio import wait_event

if TYPE_CHECKING:
    from .ledger import Ledger
    from .metrics import Metrics

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
)


def result_line(at: float, **fields: Any) -> str:
    """The result as one JSON line, fields in the documented order, absent ones null."""
    record = {name: fields.get(name) for name in RESULT_FIELDS}
    record["attempts"] = record["attempts"] or 0
    record["at"] = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")
    record["at"] = record["at"].replace("+00:00", "Z")
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


class ResultsWriter:
    """Copies the outbox to the results target as lines become final."""

    BATCH = 1000

    def __init__(self, ledger: Ledger, target: str, metrics: Metrics):
        self._ledger = ledger
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        # Opened at start-up, so an unwritable results file stops the daemon before any send.
        self._stream = sys.stdout.buffer if target == "-" else open(target, "ab")  # noqa: SIM115

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Write lines whenever woken (and every second, as a safety net), until cancelled."""
        while True:
            await self.flush()
            await wait_event(self._wake, 1.0)
            self._wake.clear()

    async def flush(self) -> None:
        """Write every line that is final so far."""
        async with self._lock:
            while lines := await self._ledger.outbox(self.BATCH):
                data = "".join(line + "\n" for _seq, line, _outcome in lines).encode()
                await asyncio.to_thread(_write_durably, self._stream, data)
                await self._ledger.outbox_written(lines[-1][0])
                for _seq, _line, outcome in lines:
                    self._metrics.outcome(outcome)

    def close(self) -> None:
        if self._stream is not sys.stdout.buffer:
            self._stream.close()


def _write_durably(stream, data: bytes) -> None:
    stream.write(data)
    stream.flush()
    # A pipe or a terminal cannot be synced; the flush is what counts there.
    with contextlib.suppress(OSError):
        os.fsync(stream.fileno())
