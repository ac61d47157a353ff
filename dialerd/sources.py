"""Sources: requests from stdin (JSON lines) and from the spool directory, into the ledger.

Both hand each batch to `Intake`, which validates it and records it in the ledger in one
transaction; only then can a request be sent, and only then does a spool file leave incoming/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aio import wait_event
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

MAX_SPOOL_FILE = 64 * 1024 * 1024
STDIN_BATCHES_AHEAD = 4  # batches read and parsed ahead of the ledger: bounds memory
STOP_CHECK_S = 0.25
READ_CHUNK = 256 * 1024
SPOOL_RESCAN_S = 1.0  # with inotify: a rescan now and then, in case an event was lost
SPOOL_POLL_S = 0.1  # without inotify
SPOOL_BATCH = 256  # files taken side by side
SPOOL_BATCH_BYTES = 16 * 1024 * 1024  # and no more than this read ahead of the ledger


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
            # Wake at least every STOP_CHECK_S to see a stop, however quiet stdin is.
            try:
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


class SpoolSource:
    """Takes files from incoming/ into the ledger, then moves them to done/ or rejected/."""

    def __init__(self, root: Path, intake: Intake, ledger: Ledger):
        self._intake = intake
        self._ledger = ledger
        self.incoming, self.done, self.rejected = (
            root / "incoming",
            root / "done",
            root / "rejected",
        )
        self._changed = asyncio.Event()
        self._stopping = False
        self._fault: str | None = None  # what keeps the spool from being read, while it lasts
        self._listed = False  # listed once: a directory missing from now on was removed

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    async def run(self) -> None:
        await self._forget_moved_files()
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(self._watch())
            try:
                await self._take_files()
            finally:
                watcher.cancel()

    async def _forget_moved_files(self) -> None:
        """A crash between a file's move to done/ and forgetting it leaves it recorded; forget
        it now, or a later file of the same name and bytes would be taken for it."""
        names = await self._ledger.spool_file_names()
        gone = [name for name in names if not (self.incoming / name).exists()]
        if gone:
            await self._ledger.forget_spool_files(gone)

    async def _take_files(self) -> None:
        while not self._stopping:
            self._changed.clear()
            names = await self._scan()
            while names and not self._stopping:
                names = await self._take_some(names)
            await wait_event(self._changed, SPOOL_RESCAN_S)

    async def _scan(self) -> list[str]:
        """The files waiting in incoming/; its directories are made again if they went missing."""
        try:
            names = await asyncio.to_thread(self._make_and_list)
        except OSError as error:
            if str(error) != self._fault:
                self._fault = str(error)
                log.error("cannot read the spool; trying again", error=self._fault)
            return []
        if self._fault is not None:
            self._fault = None
            log.info("the spool can be read again", dir=str(self.incoming))
        return names

    def _make_and_list(self) -> list[str]:
        for directory in (self.incoming, self.done, self.rejected):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                if self._listed:
                    log.warning("a spool directory was missing; made it again", dir=str(directory))
        self._listed = True
        return self._waiting_files()

    async def _watch(self) -> None:
        """Wake the spool on every file renamed or written into incoming/."""
        try:
            from asyncinotify import Inotify, Mask

            inotify = Inotify()
        except (ImportError, OSError) as error:
            log.warning("no inotify; polling the spool", error=str(error))
            while True:
                await asyncio.sleep(SPOOL_POLL_S)
                self._changed.set()
        with inotify:
            while True:
                try:
                    inotify.add_watch(self.incoming, Mask.MOVED_TO | Mask.CLOSE_WRITE)
                except OSError:
                    await asyncio.sleep(SPOOL_RESCAN_S)  # incoming/ is missing: the scan remakes it
                    continue
                async for event in inotify:
                    self._changed.set()
                    if event.mask & Mask.IGNORED:
                        break  # incoming/ was removed: watch it again once it is back

    def _waiting_files(self) -> list[str]:
        """Files in incoming/, oldest first; names starting with '.' are still being written."""
        entries = []
        with os.scandir(self.incoming) as scan:
            for entry in scan:
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                    entries.append((entry.stat().st_mtime, entry.name))
        return [name for _mtime, name in sorted(entries)]

    async def _take_some(self, names: list[str]) -> list[str]:
        """Take the first files of `names` (up to SPOOL_BATCH of them, or SPOOL_BATCH_BYTES);
        returns the names left for the next call.

        Reading, moving and syncing run as one thread call each for the whole batch (a thread
        call per file cost more than the file system work it did); the ledger records the
        files side by side, so their commits share fsyncs. The moves are made durable with one
        sync per directory before the ledger forgets them: a file must never be forgotten while
        a crash could still bring it back to incoming/.
        """
        reads, rest = await asyncio.to_thread(
            _read_spool_files, str(self.incoming), names, self._intake.config()
        )
        recorded = await self._ledger.spool_files([name for name, _outcome in reads])
        readable, rejects = [], []
        for name, outcome in reads:
            if isinstance(outcome, Rejected):
                rejects.append((name, str(outcome)))
            elif isinstance(outcome, FileNotFoundError):
                pass  # taken away by its writer meanwhile
            elif isinstance(outcome, OSError):
                log.error("cannot take a spool file; trying again", file=name, error=str(outcome))
            else:
                readable.append((name, *outcome))
        to_done = await asyncio.gather(
            *(
                self._record(name, digest, batch, recorded.get(name))
                for name, digest, batch in readable
            )
        )
        taken = await asyncio.to_thread(self._file_away, to_done, rejects)
        if taken:
            await self._ledger.forget_spool_files(taken)
        return rest

    async def _record(
        self, name: str, digest: str, batch: Batch, recorded: tuple[str, str | None] | None
    ) -> tuple[str, str | None]:
        """Record one file's requests; (name, its errors note) for its move to done/.

        `recorded`: the (digest, errors) the ledger holds of a file of this name, if any.
        """
        if recorded is not None and recorded[0] == digest:
            return name, recorded[1]  # recorded before a crash that came before the move
        errors = _errors_text(batch)
        await self._intake.record(batch, spool_file=(name, digest, errors))
        return name, errors

    def _file_away(
        self, to_done: list[tuple[str, str | None]], rejects: list[tuple[str, str]]
    ) -> list[str]:
        """In a thread: move recorded files to done/ and unreadable ones to rejected/; the names
        moved to done/, once their moves are durable (none if they cannot be made so)."""
        for name, reason in rejects:
            self._reject(name, reason)
        taken = [name for name, errors in to_done if self._move_to_done(name, errors)]
        if not taken:
            return []
        try:
            _sync_dirs(self.done, self.incoming)
        except OSError as error:
            # The spool went away under the moves: they stay recorded, and the next start
            # forgets those no longer in incoming/.
            log.error("cannot sync the spool after a move", error=str(error))
            return []
        log.info("spool files taken", files=len(taken), first=taken[0], last=taken[-1])
        return taken

    def _move_to_done(self, name: str, errors: str | None) -> bool:
        try:
            _move(os.path.join(self.incoming, name), str(self.done), name, errors)
        except FileNotFoundError:
            return False  # taken away by its writer meanwhile: its requests stay recorded
        except OSError as error:
            # A full disk or a directory gone: the file stays in incoming/ for the next scan;
            # what the ledger holds of it is recognised by its digest then.
            log.error("cannot take a spool file; trying again", file=name, error=str(error))
            return False
        return True

    def _reject(self, name: str, reason: str) -> None:
        log.warning("spool file rejected", file=name, error=reason)
        try:
            _reject(os.path.join(self.incoming, name), self.rejected, name, reason)
        except FileNotFoundError:
            pass
        except OSError as fault:  # it stays in incoming/ for the next scan
            log.error("cannot reject a spool file; trying again", file=name, error=str(fault))


def _read_spool_files(
    incoming: str, names: list[str], config: Config
) -> tuple[list[tuple[str, tuple[str, Batch] | Rejected | OSError]], list[str]]:
    """In a thread: read and parse the first of `names`, up to SPOOL_BATCH files or until
    SPOOL_BATCH_BYTES are read (so a batch of large files stays small in memory).

    Returns each file read with its (digest, requests) or why it could not be read (Rejected,
    or the OSError that keeps it for the next scan), and the names left.
    """
    reads: list[tuple[str, tuple[str, Batch] | Rejected | OSError]] = []
    size = 0
    for count, name in enumerate(names[:SPOOL_BATCH], 1):
        try:
            data = _read_limited(os.path.join(incoming, name))
            size += len(data)
            digest = hashlib.sha256(data).hexdigest()
            reads.append((name, (digest, parse_spool_file(data, name, config))))
        except (Rejected, OSError) as error:
            reads.append((name, error))
        if size >= SPOOL_BATCH_BYTES:
            return reads, names[count:]
    return reads, names[SPOOL_BATCH:]


def _read_limited(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            # Sized first: read(MAX + 1) would allocate the whole limit for every small file.
            if os.fstat(file.fileno()).st_size > MAX_SPOOL_FILE:
                raise Rejected(f"larger than {MAX_SPOOL_FILE // (1024 * 1024)} MiB")
            return file.read()
    except PermissionError as error:
        raise Rejected(f"cannot be read: {error.strerror}") from None


def _errors_text(batch: Batch) -> str | None:
    return "".join(line + "\n" for line in batch.errors) or None


def _free_name(directory: str, name: str, note_suffix: str) -> str:
    """`name`, or name.N where the directory already holds one of that name or its note."""
    candidate, counter = name, 0
    # Plain strings and lexists: this runs for every file taken, and pathlib's objects cost
    # more than the look-ups themselves; a dangling link still counts as taken.
    while os.path.lexists(f"{directory}/{candidate}") or os.path.lexists(
        f"{directory}/{candidate}{note_suffix}"
    ):
        counter += 1
        candidate = f"{name}.{counter}"
    return candidate


def _move(path: str, directory: str, name: str, errors: str | None) -> None:
    target = _free_name(directory, name, ".errors")
    if errors is not None:
        _write_file(f"{directory}/{target}.errors", errors)
    os.rename(path, f"{directory}/{target}")


def _reject(path: str, directory: Path, name: str, reason: str) -> None:
    target = _free_name(str(directory), name, ".error")
    _write_file(directory / f"{target}.error", reason + "\n")
    os.rename(path, directory / target)
    _sync_dir(directory)


def _write_file(path: str | Path, text: str) -> None:
    """Write a note whole, or leave none: a partial one would take the name of the next try."""
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _sync_dirs(*directories: Path) -> None:
    for directory in directories:
        _sync_dir(directory)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
