"""The spool source: files renamed into incoming/ by submitters who may not trust each other,
taken into the ledger a chunk at a time, then filed away in done/ or rejected/. How the spool's
directories and entries are opened, read and moved without following anything: spooldir.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .aio import Progress, Worker, wait_event
from .config import Config
from .ledger import Ledger, SpoolChunk, SpoolRecord
from .logs import log
from .sources import CHUNK_ITEMS, Batch, Intake, Rejected, spool_chunks
from .spooldir import (
    UNMOVABLE,
    Listed,
    SpoolDirs,
    Swapped,
    entry_exists,
    escaped_name,
    list_incoming,
    move,
    prune_filed,
    read_listed,
    sync,
)

SPOOL_RESCAN_S = 1.0  # with inotify: a rescan now and then, in case an event was lost; and how
# soon a spool directory that could not be used (linked, missing, unreadable) is tried again
SPOOL_POLL_S = 0.1  # without inotify
PRUNE_FILED_EVERY_S = 60.0  # how often done/ and rejected/ are looked through for retention_s
# (or every retention_s, when that is shorter)
SPOOL_BATCH = 256  # files taken side by side
SPOOL_BATCH_BYTES = 16 * 1024 * 1024  # and no more than this read ahead of the ledger
# NAME.errors lists a file's first million bad lines (~60 MB), then how many more: each has its
# own `invalid` result, and a note of every bad line of a 64 MiB file would be held whole (~2 GB).
NOTE_MAX_LINES = 1_000_000


Chunk = tuple[Batch, bool]  # a batch of a file's items, and whether it is the file's last


@dataclass(slots=True)
class Taking:
    """A file read, and what is left of it to record."""

    listed: Listed
    digest: str
    chunks: Iterator[Chunk] | None  # None: recorded whole before (a crash came before its move)
    start: int  # its items recorded before
    first: Chunk | None  # its next chunk, when parsed with the read


Reading = tuple[Listed, Taking | Rejected | Swapped | OSError]


def read_batch(
    dirs: SpoolDirs, files: list[Listed], config: Config, recorded: dict[str, SpoolRecord]
) -> tuple[list[Reading], list[Listed]]:
    """In a thread: read the first of `files`, up to SPOOL_BATCH files or until
    SPOOL_BATCH_BYTES are read (so a batch of large files stays small in memory), and parse
    the first chunk of each while those parsed hold fewer than CHUNK_ITEMS items in all (a
    batch of small files then costs one call here; the other chunks are parsed as they are
    recorded). `recorded`: what the ledger holds of files of these names.

    Returns each file with what is left of it to record, or why it was not read, and the
    files left.
    """
    reads: list[Reading] = []
    size = parsed = 0
    for count, listed in enumerate(files[:SPOOL_BATCH], 1):
        try:
            data = read_listed(dirs, listed)
            size += len(data)
            taking = _taking(listed, data, config, recorded.get(listed.name))
            if taking.chunks is not None and parsed < CHUNK_ITEMS:
                taking.first = next(taking.chunks)
                parsed += len(taking.first[0])
            reads.append((listed, taking))
        except (Rejected, Swapped, OSError) as error:
            reads.append((listed, error))
        if size >= SPOOL_BATCH_BYTES:
            return reads, files[count:]
    return reads, files[SPOOL_BATCH:]


def _taking(listed: Listed, data: bytes, config: Config, record: SpoolRecord | None) -> Taking:
    """What is left to record of a file: the items after those recorded of it before (the
    ledger's record of its name is of this file when it has its digest); Rejected if it
    cannot be taken at all."""
    digest = hashlib.sha256(data).hexdigest()
    start = 0
    if record is not None and record.digest == digest:
        if record.items is None:
            return Taking(listed, digest, None, 0, None)
        start = record.items
    chunks = spool_chunks(data, f"spool:{listed.name}", config, start)
    return Taking(listed, digest, chunks, start, None)


class ItemBudget:
    """How many items the files of a batch have in ledger calls at once: small files are
    recorded side by side (their commits share fsyncs), and no chunk waits behind, nor makes,
    a group commit of more than `limit` items (a send's mark waits for the commit it is in)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._used = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def held(self, items: int) -> AsyncIterator[None]:
        async with self._freed:
            await self._freed.wait_for(lambda: self._used + items <= self._limit)
            self._used += items
        try:
            yield
        finally:
            async with self._freed:
                self._used -= items
                self._freed.notify_all()


class SpoolSource:
    """Takes files from incoming/ into the ledger, then moves them to done/ or rejected/."""

    def __init__(self, root: Path, intake: Intake, ledger: Ledger):
        self._root = root
        self._intake = intake
        self._ledger = ledger
        self._worker = Worker("spool")  # the file system's calls: a hung one never blocks a stop
        self.progress = Progress(asyncio.get_running_loop().time)
        self._changed = asyncio.Event()
        self._stopping = False
        self._faults: dict[str, str] = {}  # what keeps a part of the spool from use, logged once
        self._left: set[Listed] = set()  # entries left in incoming/, logged once each
        self._opened = False  # opened once: a directory missing from now on was removed
        self._forgotten = False
        self._pruned_at = -PRUNE_FILED_EVERY_S  # monotonic

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    async def prepare(self) -> None:
        """Before intake starts: forget the files that a run which stopped between their move
        to done/ and forgetting them left recorded (or a later file of the same name and bytes
        would be taken for one of them). If the spool cannot be used yet, the first scan that
        can use it does this."""
        async with self._scan_dirs() as dirs:
            if dirs is not None:
                await self._forget_moved_files(dirs)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(self._watch())
                try:
                    await self._take_files()
                finally:
                    watcher.cancel()
        finally:
            self._worker.close()

    async def _take_files(self) -> None:
        while not self._stopping:
            self._changed.clear()
            try:
                async with self._scan_dirs() as dirs:
                    if dirs is not None:
                        await self._take_all(dirs)
                        await self._prune_filed(dirs)
                self._report("scan", None)
            except Exception as error:  # a fault of this code: the daemon and the next scan go on
                if "scan" not in self._faults:
                    log.exception("a scan of the spool failed")
                self._report("scan", f"{type(error).__name__}: {error}")
            with self.progress.waiting():
                await wait_event(self._changed, SPOOL_RESCAN_S)

    @contextlib.asynccontextmanager
    async def _scan_dirs(self) -> AsyncIterator[SpoolDirs | None]:
        """The spool's directories for one scan, None if nothing can be taken now; closed in
        the worker, after any call still using them (a descriptor closed under a call would be
        reused by the next open, in another directory)."""
        dirs = await self._open()
        try:
            yield dirs
        finally:
            if dirs is not None:
                self._worker.post(dirs.close)

    async def _open(self) -> SpoolDirs | None:
        try:
            dirs = await self._worker.run(SpoolDirs, self._root, self._opened)
        except OSError as error:
            self._report("spool", f"cannot open {self._root}: {error.strerror}")
            return None
        self._opened = True
        for name in dirs.made_again:
            log.warning(
                "a spool directory was missing; made it again (its group may need mending:"
                " systemd-tmpfiles --create)",
                dir=str(self._root / name),
            )
        # One report for the spool's directories, whichever of them fail: the spool replaced
        # under the daemon fails them all at once, and that is one fault, not three.
        problems = [f"{name}/ {why}" for name, why in dirs.problems.items()]
        self._report("spool", "; ".join(problems) or None)
        if dirs.incoming is None or dirs.done is None:  # nothing can be taken
            self._worker.post(dirs.close)
            return None
        return dirs

    def _report(self, part: str, problem: str | None) -> None:
        """Log a change in what keeps a part of the spool from use: once, not at every scan."""
        before = self._faults.get(part)
        if problem == before:
            return
        if problem is None:
            del self._faults[part]
            self._left.clear()  # what could not be moved may be now
            log.info("the spool can be used again", part=part, dir=str(self._root))
        else:
            self._faults[part] = problem
            log.error(
                "cannot use the spool; trying again", part=part, dir=str(self._root), error=problem
            )

    async def _prune_filed(self, dirs: SpoolDirs) -> None:
        """Now and then, the files filed in done/ and rejected/ longer ago than retention_s go:
        they hold what the ledger prunes."""
        retention_s = self._intake.config().retention_s
        now = time.monotonic()
        if now - self._pruned_at < min(PRUNE_FILED_EVERY_S, retention_s):
            return
        self._pruned_at = now
        before = time.time() - retention_s
        try:
            removed = await self._worker.run(prune_filed, dirs, before)
        except OSError as error:
            self._report("retention", f"cannot remove files past retention_s: {error}")
            return
        self._report("retention", None)
        if removed:
            log.info("spool files past retention_s removed", files=removed)

    async def _take_all(self, dirs: SpoolDirs) -> None:
        if not self._forgotten:
            await self._forget_moved_files(dirs)
        files, strays = await self._worker.run(list_incoming, dirs)
        self._left &= {*files, *(listed for listed, _problem in strays)}
        files = [listed for listed in files if listed not in self._left]
        if strays:
            await self._worker.run(self._reject, dirs, strays)
        while files and not self._stopping:
            files = await self._take_some(dirs, files)
            self.progress.advanced()

    async def _forget_moved_files(self, dirs: SpoolDirs) -> None:
        names = await self._ledger.spool_file_names()
        gone = await self._worker.run(
            lambda: [name for name in names if not entry_exists(dirs.incoming, name)]
        )
        if gone:
            await self._ledger.forget_spool_files(gone)
        self._forgotten = True

    async def _take_some(self, dirs: SpoolDirs, files: list[Listed]) -> list[Listed]:
        """Take the first of `files` (up to SPOOL_BATCH of them, or SPOOL_BATCH_BYTES); returns
        the files left for the next call.

        Reading, moving and syncing run as one worker call each for the whole batch (a thread
        call per file cost more than the file system work it did); the ledger records the
        files side by side, so their commits share fsyncs, a chunk at a time and no more than
        CHUNK_ITEMS items of them at once, so that no commit holds up the sends' marks for
        long whatever the files hold. The moves are made durable with one
        sync per directory before the ledger forgets them: a file must never be forgotten while
        a crash could still bring it back to incoming/.
        """
        names = [listed.name for listed in files[:SPOOL_BATCH]]
        recorded = await self._ledger.spool_files(names, NOTE_MAX_LINES)
        reads, rest = await self._worker.run(
            read_batch, dirs, files, self._intake.config(), recorded
        )
        takings = [outcome for _listed, outcome in reads if isinstance(outcome, Taking)]
        rejects, faults = [], []
        for listed, outcome in reads:
            if isinstance(outcome, Rejected):
                rejects.append((listed, str(outcome)))
            elif isinstance(outcome, Swapped):  # the next scan sees what is there now
                log.debug("spool entry replaced since it was listed", file=listed.name)
            elif isinstance(outcome, OSError) and not isinstance(outcome, FileNotFoundError):
                faults.append(f"{listed.name}: {outcome.strerror or outcome}")
        self._report("files", f"cannot read {len(faults)}, e.g. {faults[0]}" if faults else None)
        budget = ItemBudget(CHUNK_ITEMS)
        taken = await asyncio.gather(*(self._record(taking, budget) for taking in takings))
        to_done = await self._notes([listed for listed in taken if listed is not None])
        forget, problem = await self._worker.run(self._file_away, dirs, to_done, rejects)
        self._report("moves", problem)
        if forget:
            await self._ledger.forget_spool_files(forget)
        return rest

    async def _record(self, taking: Taking, budget: ItemBudget) -> Listed | None:
        """Record what is left of one file, a chunk at a time (the sends' marks go between
        them); the file once it is recorded whole, None if a stop came first (it stays in
        incoming/, and the next start goes on after the chunks recorded)."""
        if taking.chunks is None:
            return taking.listed
        start, chunk = taking.start, taking.first
        while not self._stopping:
            # A chunk not parsed yet may hold up to CHUNK_ITEMS: it waits for that much.
            async with budget.held(CHUNK_ITEMS if chunk is None else len(chunk[0])):
                if chunk is None:
                    chunk = await self._worker.run(next, taking.chunks)
                batch, last = chunk
                errors = "".join(line + "\n" for line in batch.errors) or None
                note = SpoolChunk(taking.listed.name, taking.digest, start, errors, last)
                await self._intake.record(batch, spool_file=note)
            self.progress.advanced()
            if last:
                return taking.listed
            start, chunk = start + len(batch), None
        return None

    async def _notes(self, taken: list[Listed]) -> list[tuple[Listed, str | None]]:
        """Files recorded whole, each with its NAME.errors text as the ledger holds it (of
        every chunk, recorded in this run or one before)."""
        if not taken:
            return []
        recorded = await self._ledger.spool_files([listed.name for listed in taken], NOTE_MAX_LINES)
        return [(listed, recorded[listed.name].errors) for listed in taken]

    def _file_away(
        self,
        dirs: SpoolDirs,
        to_done: list[tuple[Listed, str | None]],
        rejects: list[tuple[Listed, str]],
    ) -> tuple[list[str], str | None]:
        """In the worker: move recorded files to done/ and unreadable ones to rejected/; the
        names the ledger is to forget (those moved to done/, once their moves are durable, and
        those no longer there to move: a later file of one of their names is a new file), and
        what kept files from moving, if anything did.

        A file that cannot be moved (a full disk) stays in incoming/ for the next scan, where
        what the ledger holds of it is recognised by its digest.
        """
        self._reject(dirs, rejects)
        taken, gone, problem = [], [], None
        for listed, errors in to_done:
            try:
                if move(dirs, listed, "done", errors and (".errors", errors)) is not None:
                    taken.append(listed.name)
                else:
                    gone.append(listed.name)  # replaced: what is there now is another file
            except FileNotFoundError:
                gone.append(listed.name)  # taken away by its writer: its requests stay recorded
            except OSError as error:
                problem = f"cannot move {listed.name} to done/: {error.strerror}"
        if not taken:
            return gone, problem
        try:
            sync(dirs.done, dirs.incoming)
        except OSError as error:
            # They stay recorded, and the next start forgets those no longer in incoming/.
            return gone, f"cannot sync the spool after a move: {error.strerror}"
        log.info("spool files taken", files=len(taken), first=taken[0], last=taken[-1])
        return taken + gone, problem

    def _reject(self, dirs: SpoolDirs, rejects: list[tuple[Listed, str]]) -> None:
        moved, problem = False, None
        for listed, reason in rejects:
            if listed in self._left:
                continue  # tried, and logged: again once the spool's state changes
            if dirs.rejected is None:
                self._leave(listed, reason)
                continue
            shown = escaped_name(listed.name)
            try:
                name = move(dirs, listed, "rejected", (".error", f"{shown}: {reason}\n"))
            except FileNotFoundError:
                continue
            except OSError as error:
                if error.errno in UNMOVABLE:  # this entry never moves: not tried again
                    self._leave(listed, f"{reason}; cannot move it: {error.strerror}")
                else:  # a fault of the disk (full, I/O): tried again at the next scan
                    problem = f"cannot move {shown} to rejected/: {error.strerror}"
                continue
            if name is not None:
                moved = True
                log.warning("spool file rejected", file=shown, moved_to=name, error=reason)
        if rejects:
            self._report("rejects", problem)
        if moved:
            with contextlib.suppress(OSError):
                sync(dirs.rejected, dirs.incoming)

    def _leave(self, listed: Listed, reason: str) -> None:
        """An entry left in incoming/: logged once, not at every scan."""
        if listed not in self._left:
            self._left.add(listed)
            log.warning("spool entry left in incoming/", file=escaped_name(listed.name), why=reason)

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
        # DONT_FOLLOW, ONLYDIR: a linked incoming/ is not watched either.
        mask = Mask.MOVED_TO | Mask.CLOSE_WRITE | Mask.DONT_FOLLOW | Mask.ONLYDIR
        with inotify:
            while True:
                try:
                    inotify.add_watch(self._root / "incoming", mask)
                except OSError:
                    await asyncio.sleep(SPOOL_RESCAN_S)  # missing or linked: the scan says why
                    continue
                async for event in inotify:
                    if event.mask & Mask.IGNORED:
                        self._changed.set()
                        break  # incoming/ was removed: watch it again once it is back
                    # A file being written under a name starting with "." is not for a scan
                    # yet: its rename is (and a submitter touching one cannot spin the scans).
                    if event.name is None or not event.name.name.startswith("."):
                        self._changed.set()
