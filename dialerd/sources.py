"""Sources: requests from stdin (JSON lines), and how a spool file's bytes become requests.

stdin and the spool (spool.py) hand each batch to `Intake`, which records it in the ledger in
one transaction; only then can a request be sent, and only then does a spool file leave
incoming/. A spool file is taken a chunk (CHUNK_ITEMS items) at a time.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .aio import Progress
from .config import Config
from .ledger import Ledger, SpoolChunk
from .logs import log
from .request import (
    MAX_LINE_BYTES,
    STRICT_JSON,
    SURROGATE_ESCAPE,
    InvalidRequest,
    Request,
    build_request,
    check_surrogates,
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
        except Exception as error:  # a fault of ours: the request is refused, the source goes on
            log.exception("a request could not be validated", source=source)
            self.reject(source, f"could not be validated ({type(error).__name__}: {error})", {})

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

    async def record(self, batch: Batch, spool_file: SpoolChunk | None = None) -> None:
        intake = await self._ledger.add(
            batch.requests, batch.invalid, spool_file, self.config().dedupe_window_s
        )
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
        try:
            await self._take(batches)
        finally:
            self.progress.ended()  # the daemon may run on, with the spool: no stall of stdin's
        log.info("stdin intake stopped" if self._stopping else "stdin ended", lines=self.lines_read)

    async def _take(self, batches: asyncio.Queue[Batch | None]) -> None:
        while not self._stopping:
            # Wake at least every STOP_CHECK_S to see a stop, however quiet stdin is; a read
            # that blocks is in the reading thread, never in this task.
            try:
                with self.progress.waiting():
                    async with asyncio.timeout(STOP_CHECK_S):  # not wait_for: see wait_event
                        batch = await batches.get()
            except TimeoutError:
                continue
            if batch is None:
                return
            if len(batch):
                await self._intake.record(batch)

    def _read(self, batches: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """The reading thread: blocking reads work for pipes and regular files alike."""

        def hand_over(batch: Batch | None) -> None:
            put = batches.put(batch)
            try:
                asyncio.run_coroutine_threadsafe(put, loop).result()
            except RuntimeError:  # the loop closed: the put never ran
                put.close()
                raise

        fd = sys.stdin.fileno()
        lines = LineSplitter()
        try:
            try:
                while chunk := os.read(fd, READ_CHUNK):
                    hand_over(self._parse(lines.feed(chunk)))
                hand_over(self._parse(lines.end()))
            except OSError as error:
                log.error("cannot read stdin", error=str(error))
            hand_over(None)
        except RuntimeError:
            pass  # the loop closed while reading or at the end: the daemon is gone

    def _parse(self, lines: list[bytes | None]) -> Batch:
        batch = Batch()
        config = self._intake.config()
        for line in lines:
            self.lines_read += 1
            source = f"stdin:{self.lines_read}"
            if self.lines_read == 1 and line:
                # A BOM, as editors write it, at the stream's very first bytes only; lines come
                # whole, so one split across reads is whole here.
                line = line.removeprefix(codecs.BOM_UTF8)
            if line is None:
                batch.reject(source, f"line longer than {MAX_LINE_BYTES // 1024} KiB", {})
            elif line.strip():
                batch.add_line(line, config, source)
        return batch


class Rejected(Exception):
    """A spool file that cannot be read at all."""


CHUNK_ITEMS = 500  # a spool file's items in one ledger call, at most (requests and invalid): the
# call holds the ledger about 5 ms, and a send's mark may wait for it
SOURCE_MAX = 512  # characters of a source an item names for itself
SUBMITTED = "submit:"  # what the source an item names for itself starts with
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def spool_chunks(
    data: bytes, origin: str, config: Config, skip: int = 0, own_sources: bool = True
) -> Iterator[tuple[Batch, bool]]:
    """A whole JSON object, a JSON array of objects, or JSON lines, as batches of at most
    CHUNK_ITEMS items in file order, each with whether it is the last; at least one (an empty
    file's is empty). The first `skip` items (recorded before) are passed over.

    Each item's source is `origin` ("spool:NAME") and the line it starts on, unless the item
    names its own (`dialerd submit` writes where each request came from, SPEC §6) and
    `own_sources` lets it: for `submit`'s inputs, `source` is no field.

    Rejected, raised here before any batch is made, if the file is none of these. The items
    are made as the batches are taken, so a file of many bad lines costs its bytes in memory
    and one batch, not a result per line at once.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as editors write it
    try:
        text = utf8_text(data)
    except ValueError as error:
        raise Rejected(str(error)) from None
    items: Iterator[tuple[str, Any]]
    if _is_array(text):
        items = _array_items(text, origin)
    elif isinstance(document := _document(text), dict):
        line = text.count("\n", 0, _skip_space(text, 0)) + 1
        items = iter([(f"{origin}:{line}", document)])
    else:
        del text  # JSON lines are decoded one by one from the bytes
        _first_json_line(data)
        items = _line_items(data, origin)
    return _chunked(itertools.islice(items, skip, None), config, own_sources)


def parse_spool_file(data: bytes, origin: str, config: Config) -> Batch:
    """The whole of an input of `dialerd submit` in one batch, each request's source `origin`
    and its line; Rejected as spool_chunks."""
    whole = Batch()
    for batch, _last in spool_chunks(data, origin, config, own_sources=False):
        whole.requests += batch.requests
        whole.invalid += batch.invalid
        whole.errors += batch.errors
    return whole


def _chunked(
    items: Iterator[tuple[str, Any]], config: Config, own_sources: bool
) -> Iterator[tuple[Batch, bool]]:
    """`items` (source, document or InvalidRequest) as batches; one item read ahead tells the
    last batch."""
    ahead = next(items, None)
    while True:
        batch = Batch()
        while ahead is not None and len(batch) < CHUNK_ITEMS:
            source, document = ahead
            if own_sources and isinstance(document, dict) and "source" in document:
                source, document = _given_source(source, document)
            if isinstance(document, InvalidRequest):
                batch.reject(source, str(document), {})
            else:
                batch.add(document, config, source)
            ahead = next(items, None)
        yield batch, ahead is None
        if ahead is None:
            return


def _given_source(where: str, document: dict) -> tuple[str, Any]:
    """The source an item names for itself, and the item without it; the item as invalid (at
    `where`) when the name is not `submit:` and a line of printable text: no spool file can
    pass its requests off as stdin's or another spool file's."""
    given = document.pop("source")
    if (
        isinstance(given, str)
        and given.startswith(SUBMITTED)
        and len(SUBMITTED) < len(given) <= SOURCE_MAX
        and given.isprintable()
    ):
        return given, document
    return where, InvalidRequest(
        f"source: must be {SUBMITTED} and more, in all at most {SOURCE_MAX} printable characters"
    )


def _document(text: str) -> Any:
    """The file as one JSON document, or None when it is not one."""
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return None


def _is_array(text: str) -> bool:
    """Whether the file is one JSON array: every element is parsed once to tell, and dropped."""
    if not text.startswith("[", _skip_space(text, 0)):
        return False
    try:
        for _item in _array_items(text, ""):
            pass
    except (ValueError, RecursionError):
        return False
    return True


def _array_items(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array one at a time (loads would hold them all at once), each
    named by the line it starts on; a ValueError where the text is not one strict JSON array."""
    surrogates = SURROGATE_ESCAPE.search(text) is not None
    at = _skip_space(text, text.index("[") + 1)
    line, counted_to = 1, 0
    if text.startswith("]", at):
        at = _skip_space(text, at + 1)
    else:
        while True:
            line += text.count("\n", counted_to, at)
            counted_to = at
            value, at = STRICT_JSON.raw_decode(text, at)
            if surrogates:
                check_surrogates(value)
            yield f"{name}:{line}", value
            at = _skip_space(text, at)
            if text.startswith(",", at):
                at = _skip_space(text, at + 1)
            elif text.startswith("]", at):
                at = _skip_space(text, at + 1)
                break
            else:
                raise ValueError("not a JSON array")
    if at != len(text):
        raise ValueError("more after the JSON array")


def _skip_space(text: str, at: int) -> int:
    return JSON_WHITESPACE.match(text, at).end()


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of `data` with their numbers, without a list of them all."""
    start = 0
    number = 0
    while start <= len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        number += 1
        line = data[start:end]
        if line.strip():
            yield number, line
        start = end + 1


def _first_json_line(data: bytes) -> None:
    """Rejected unless some line parses as JSON: the lines up to the first that does are read."""
    for _number, line in _lines(data):
        try:
            decode_line(line)
        except InvalidRequest:
            continue
        return
    raise Rejected("no part of it parses as JSON")


def _line_items(data: bytes, origin: str) -> Iterator[tuple[str, Any]]:
    for number, line in _lines(data):
        try:
            document: Any = decode_line(line)
        except InvalidRequest as error:
            document = error
        yield f"{origin}:{number}", document
