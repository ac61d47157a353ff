"""Sources: requests from stdin (JSON lines), and how a spool file's bytes become requests.

stdin and the spool (spool.py) hand each batch to `Intake`, which records it in the ledger in
one transaction; only then can a request be sent, and only then does a spool file leave
incoming/.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .aio import Progress
from .config import Config
from .ledger import Ledger
from .logs import log
from .request import (
    MAX_LINE_BYTES,
    InvalidRequest,
    Request,
    build_request,
    decode_line,
    loads,
    utf8_text,
)

STDIN_BATCHES_AHEAD = 4  # batches read and parsed ahead of the ledger: bounds memory
STOP_CHECK_S = 0.25
READ_CHUNK = 256 * 1024


def stdin_is_data() -> bool:
    """Whether stdin is a pipe, a socket or a file (not a terminal, nor /dev/null)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


@dataclass
class Batch:
    """Requests read from one source, on their way into the ledger."""

    requests: list[Request] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)  # fields of each `invalid` result
    errors: list[str] = field(default_factory=list)  # one line per invalid request

    def __len__(self) -> int:
        return len(self.requests) + len(self.invalid)

    def add(self, document: Any, config: Config, source: str) -> None:
        try:
            self.requests.append(build_request(document, config, source))
        except InvalidRequest as error:
            self.reject(source, str(error), error.partial)

    def add_line(self, line: bytes, config: Config, source: str) -> None:
        try:
            document = decode_line(line)
        except InvalidRequest as error:
            self.reject(source, str(error), {})
            return
        self.add(document, config, source)

    def reject(self, source: str, error: str, partial: dict) -> None:
        self.invalid.append({**partial, "source": source, "error": error})
        self.errors.append(f"{source}: {error}")


class Intake:
    """Records batches in the ledger and tells the dispatcher and results writer."""

    def __init__(
        self,
        ledger: Ledger,
        config: Callable[[], Config],
        on_queued: Callable[[frozenset[str]], None],
        on_final: Callable[[], None],
    ):
        self.config = config  # the config in force (a reload may change it between batches)
        self._ledger = ledger
        self._on_queued = on_queued
        self._on_final = on_final

    async def record(
        self, batch: Batch, spool_file: tuple[str, str, str | None] | None = None
    ) -> None:
        intake = await self._ledger.add(batch.requests, batch.invalid, spool_file)
        if intake.queued_agents:
            self._on_queued(intake.queued_agents)
        if intake.rejected:
            self._on_final()


class LineSplitter:
    """Lines of a byte stream fed in chunks, without their newline; None for a line over the
    limit. Never holds more than one line's limit of an overlong line in memory."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._overlong = False

    def feed(self, chunk: bytes) -> list[bytes | None]:
        pending = self._pending
        pending += chunk
        lines: list[bytes | None] = []
        start = 0
        while (newline := pending.find(b"\n", start)) >= 0:
            lines.append(None if self._overlong else bytes(pending[start:newline]))
            self._overlong = False
            start = newline + 1
        del pending[:start]
        if len(pending) > MAX_LINE_BYTES:
            self._overlong = True
            pending.clear()
        return lines

    def end(self) -> list[bytes | None]:
        """The last line, when the stream did not end with a newline."""
        if self._overlong:
            return [None]
        return [bytes(self._pending)] if self._pending else []


class StdinSource:
    """JSON lines from stdin, read and validated in a thread, committed a chunk at a time.

    The thread hands over what it has each time a read returns: a stream arriving fast comes in
    large batches, a slow one line by line, so a request read is in the ledger promptly either
    way; and the event loop, which keeps the lanes' timing, never parses a line.
    """

    def __init__(self, intake: Intake):
        self._intake = intake
        self._stopping = False
        self.lines_read = 0
        self.progress = Progress(asyncio.get_running_loop().time)

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=STDIN_BATCHES_AHEAD)
        loop = asyncio.get_running_loop()
        reader = threading.Thread(
            target=self._read, args=(batches, loop), name="stdin", daemon=True
        )
        reader.start()
        while not self._stopping:
            # Wake at least every STOP_CHECK_S to see a stop, however quiet stdin is; a read
            # that blocks is in the reading thread, never in this task.
            try:
                with self.progress.waiting():
                    batch = await asyncio.wait_for(batches.get(), STOP_CHECK_S)
            except TimeoutError:
                continue
            if batch is None:
                break
            if len(batch):
                await self._intake.record(batch)
        log.info("stdin intake stopped" if self._stopping else "stdin ended", lines=self.lines_read)

    def _read(self, batches: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """The reading thread: blocking reads work for pipes and regular files alike."""

        def hand_over(batch: Batch | None) -> None:
            asyncio.run_coroutine_threadsafe(batches.put(batch), loop).result()

        fd = sys.stdin.fileno()
        lines = LineSplitter()
        try:
            while chunk := os.read(fd, READ_CHUNK):
                hand_over(self._parse(lines.feed(chunk)))
            hand_over(self._parse(lines.end()))
        except OSError as error:
            log.error("cannot read stdin", error=str(error))
        except RuntimeError:
            return  # the loop closed while reading: the daemon is gone
        hand_over(None)

    def _parse(self, lines: list[bytes | None]) -> Batch:
        batch = Batch()
        config = self._intake.config()
        for line in lines:
            self.lines_read += 1
            source = f"stdin:{self.lines_read}"
            if line is None:
                batch.reject(source, f"line longer than {MAX_LINE_BYTES // 1024} KiB", {})
            elif line.strip():
                batch.add_line(line, config, source)
        return batch


class Rejected(Exception):
    """A spool file that cannot be read at all."""


def parse_spool_file(data: bytes, name: str, config: Config) -> Batch:
    """A whole JSON object, a JSON array of objects, or JSON lines; Rejected if none of these."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as editors write it
    try:
        text = utf8_text(data)
    except ValueError as error:
        raise Rejected(str(error)) from None
    batch = Batch()
    try:
        document = loads(text)
    except (ValueError, RecursionError):  # not one JSON document: read it line by line
        document = None
    if isinstance(document, dict):
        batch.add(document, config, f"spool:{name}")
    elif isinstance(document, list):
        for index, item in enumerate(document, 1):
            batch.add(item, config, f"spool:{name}#{index}")
    else:
        _parse_json_lines(data, name, config, batch)
    return batch


def _parse_json_lines(data: bytes, name: str, config: Config, batch: Batch) -> None:
    parsed_any = False
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        source = f"spool:{name}:{number}"
        try:
            document = decode_line(line)
        except InvalidRequest as error:
            batch.reject(source, str(error), {})
            continue
        parsed_any = True
        batch.add(document, config, source)
    if not parsed_any:
        raise Rejected("no part of it parses as JSON")
