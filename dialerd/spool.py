"""The spool: files renamed into incoming/ by submitters who may not trust each other, taken into
the ledger, then filed away in done/ or rejected/.

As Postfix's maildrop, submitters may write into incoming/ (mode 1730: they cannot list it, nor
replace or remove each other's files) and nowhere else. Nothing they put there is followed:
each spool directory is opened below the spool root with O_NOFOLLOW, each entry relative to its
directory's descriptor, and only a regular file that is still the one listed (its device and
inode, by fstat) is read, and no more of it than the size limit. Anything else is moved to
rejected/ (a rename moves a link or a FIFO itself, never what it points to) or, when it cannot
be moved, left where it is and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .aio import Progress, Worker, wait_event
from .config import Config
from .files import PRIVATE_MODE
from .ledger import Ledger, SpoolChunk, SpoolRecord
from .logs import log
from .sources import CHUNK_ITEMS, Batch, Intake, Rejected, spool_chunks

MAX_SPOOL_FILE = 64 * 1024 * 1024
READ_CHUNK = 1024 * 1024  # reads past a file's size when it grew since its fstat
SPOOL_RESCAN_S = 1.0  # with inotify: a rescan now and then, in case an event was lost; and how
# soon a spool directory that could not be used (linked, missing, unreadable) is tried again
SPOOL_POLL_S = 0.1  # without inotify
SPOOL_BATCH = 256  # files taken side by side
SPOOL_BATCH_BYTES = 16 * 1024 * 1024  # and no more than this read ahead of the ledger
# NAME.errors lists a file's first million bad lines (~60 MB), then how many more: each has its
# own `invalid` result, and a note of every bad line of a 64 MiB file would be held whole (~2 GB).
NOTE_MAX_LINES = 1_000_000
NAME_MAX = 255  # bytes in a file name, on every file system dialerd may run on
# Why an entry cannot be moved for good: another user's directory the daemon may not write
# into ('..'), a mount point.
UNMOVABLE = frozenset({errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV})
# Modes of a spool directory the daemon makes again (as systemd/tmpfiles.d/dialerd.conf has
# them): whatever its umask, submitters write into incoming/ and into nothing else.
DIRECTORY_MODES = {"incoming": 0o1730, "done": 0o750, "rejected": 0o750}

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in since the listing returns at once, and fstat then
# refuses it; O_NOCTTY: a terminal never becomes the daemon's.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NOTE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Control characters (C0, DEL, C1), and the lone surrogates by which Python keeps the bytes of
# a name that is not UTF-8.
BAD_NAME_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Listed:
    """An entry of incoming/ as listed: a name and its inode."""

    name: str
    inode: int


class Swapped(Exception):
    """The entry at a listed name is no longer the regular file that was listed."""


class SpoolDirs:
    """Descriptors of the spool's directories, opened for one scan; None for one that cannot
    be used now, with why in `problems`."""

    def __init__(self, root: Path, remade: bool):
        self.problems: dict[str, str] = {}
        self.made_again: list[str] = []
        self.fds: dict[str, int | None] = dict.fromkeys(DIRECTORY_MODES)
        # The root is the operator's (spool.dir): a link there is followed, as for any path in
        # the config. Submitters can write nowhere above the directories below it.
        os.makedirs(root, exist_ok=True)
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.device = os.fstat(self._root).st_dev
            for name in DIRECTORY_MODES:
                self.fds[name] = self._open(name, remade)
        except BaseException:
            self.close()
            raise

    @property
    def incoming(self) -> int | None:
        return self.fds["incoming"]

    @property
    def done(self) -> int | None:
        return self.fds["done"]

    @property
    def rejected(self) -> int | None:
        return self.fds["rejected"]

    def _open(self, name: str, remade: bool) -> int | None:
        try:
            return os.open(name, DIRECTORY_FLAGS, dir_fd=self._root)
        except FileNotFoundError:
            return self._make(name, remade)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                self.problems[name] = _not_a_directory(self._root, name)
            else:
                self.problems[name] = f"cannot open it: {error.strerror}"
            return None

    def _make(self, name: str, remade: bool) -> int | None:
        """Make a missing directory with its mode, whatever the umask; incoming/ in the spool
        root's group, the submitters', where the daemon may give it (root may; the service's
        user is not of that group: `systemd-tmpfiles --create` mends it)."""
        try:
            os.mkdir(name, 0o700, dir_fd=self._root)
            fd = os.open(name, DIRECTORY_FLAGS, dir_fd=self._root)
        except OSError as error:
            self.problems[name] = f"cannot make it: {error.strerror}"
            return None
        try:
            if name == "incoming":
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, os.fstat(self._root).st_gid)
            os.fchmod(fd, DIRECTORY_MODES[name])
        except OSError as error:
            os.close(fd)
            self.problems[name] = f"cannot give it its mode: {error.strerror}"
            return None
        if remade:
            self.made_again.append(name)
        return fd

    def close(self) -> None:
        for fd in (*self.fds.values(), self._root):
            if fd is not None:
                os.close(fd)


def _not_a_directory(root_fd: int, name: str) -> str:
    try:
        mode = os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode
    except OSError:
        return "is not a directory"
    if stat.S_ISLNK(mode):
        return "is a symbolic link: not followed; the spool waits until it is a directory"
    return f"is {_kind(mode)}, not a directory"


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def name_problem(name: str) -> str | None:
    """Why a file name cannot be taken as it is, or None."""
    bad = BAD_NAME_CHARACTER.search(name)
    if bad is None:
        return None
    if "\ud800" <= bad.group() <= "\udfff":
        return "its name is not valid UTF-8"
    return "its name holds control characters"


def escaped_name(name: str) -> str:
    """The name with each byte that is not UTF-8, or of a control character, written %XX."""
    return BAD_NAME_CHARACTER.sub(
        lambda bad: "".join(f"%{byte:02X}" for byte in os.fsencode(bad.group())), name
    )


def _fitting(name: str, room: int) -> str:
    """`name`, or a shortened one that leaves `room` bytes for suffixes within NAME_MAX; a hash
    of the whole name keeps shortened names apart."""
    encoded = os.fsencode(name)
    if len(encoded) + room <= NAME_MAX:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    kept = encoded[: NAME_MAX - room - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{kept}~{digest}"


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _free_name(dir_fd: int, name: str, note_suffix: str, inode: int) -> str:
    """`name`, or where the directory holds one of that name or its note already, name.INODE
    (the file's own inode: unique among the files there now, so one look-up, not a count
    through every earlier file of the name), then name.INODE.N; each shortened where it and
    its note would not fit in NAME_MAX."""

    def taken(candidate: str) -> bool:
        return _exists(dir_fd, candidate) or bool(
            note_suffix and _exists(dir_fd, candidate + note_suffix)
        )

    candidate = _fitting(name, len(note_suffix))
    counter = 0
    while taken(candidate):
        suffix = f".{inode}" + (f".{counter}" if counter else "")
        candidate = _fitting(name, len(note_suffix) + len(suffix)) + suffix
        counter += 1
    return candidate


def _write_note(dir_fd: int, name: str, text: str) -> None:
    """Write a note whole, or leave none: a partial one would take the name of the next try."""
    fd = os.open(name, NOTE_FLAGS, PRIVATE_MODE, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise


def list_incoming(dirs: SpoolDirs) -> tuple[list[Listed], list[tuple[Listed, str]]]:
    """The regular files waiting in incoming/, oldest first, and the entries that are not to be
    read, each with why (names starting with '.' are still being written: not listed)."""
    files, strays = [], []
    with os.scandir(dirs.incoming) as scan:
        for entry in scan:
            if entry.name.startswith("."):
                continue
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            listed = Listed(entry.name, status.st_ino)
            problem = name_problem(entry.name)
            if problem is None and not stat.S_ISREG(status.st_mode):
                problem = f"it is {_kind(status.st_mode)}: never followed nor read"
            if problem is None:
                files.append((status.st_mtime, listed))
            else:
                strays.append((listed, problem))
    files.sort(key=lambda pair: (pair[0], pair[1].name))
    return [listed for _mtime, listed in files], strays


def read_listed(dirs: SpoolDirs, listed: Listed) -> bytes:
    """The bytes of a listed file; Rejected if it cannot be read at all, Swapped if the entry
    is no longer the regular file listed, OSError to try again later."""
    try:
        fd = os.open(listed.name, READ_FLAGS, dir_fd=dirs.incoming)
    except PermissionError as error:
        raise Rejected(f"cannot be read: {error.strerror}") from None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO):  # now a link; now a socket
            raise Swapped("replaced since it was listed") from None
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or (status.st_dev, status.st_ino) != (
            dirs.device,
            listed.inode,
        ):
            raise Swapped("replaced since it was listed")
        if status.st_size > MAX_SPOOL_FILE:
            raise Rejected(f"larger than {MAX_SPOOL_FILE // (1024 * 1024)} MiB")
        data = _read_at_most(fd, status.st_size, MAX_SPOOL_FILE)
    finally:
        os.close(fd)
    if len(data) > MAX_SPOOL_FILE:
        raise Rejected(f"larger than {MAX_SPOOL_FILE // (1024 * 1024)} MiB")
    return data


def _read_at_most(fd: int, size: int, limit: int) -> bytes:
    """Up to limit + 1 bytes: one read for a file of the size fstat gave (a short read of a
    regular file is its end); more, in chunks, only for a file that grew since."""
    want = size + 1
    parts, total = [], 0
    while total <= limit:
        chunk = os.read(fd, want)
        parts.append(chunk)
        total += len(chunk)
        if len(chunk) < want:
            break
        want = min(READ_CHUNK, limit + 1 - total)
    return parts[0] if len(parts) == 1 else b"".join(parts)


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
    return Taking(listed, digest, spool_chunks(data, listed.name, config, start), start, None)


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


def move(dirs: SpoolDirs, listed: Listed, to: str, note: tuple[str, str] | None) -> str | None:
    """Move a listed entry from incoming/ to `to` (done or rejected), with its note (suffix,
    text) beside it; its new name, or None if the entry was replaced before it could be moved
    (it is then back in incoming/, to be taken as a file of its own).

    The rename moves whatever is at the name, never following it; what arrived there since the
    listing is told by its inode and put back.
    """
    target_fd = dirs.fds[to]
    suffix = note[0] if note else ""
    target = _free_name(target_fd, escaped_name(listed.name), suffix, listed.inode)
    if note is not None:
        _write_note(target_fd, target + suffix, note[1])
    try:
        os.rename(listed.name, target, src_dir_fd=dirs.incoming, dst_dir_fd=target_fd)
        if os.stat(target, dir_fd=target_fd, follow_symlinks=False).st_ino == listed.inode:
            return target
        back = _free_name(dirs.incoming, listed.name, "", listed.inode)
        os.rename(target, back, src_dir_fd=target_fd, dst_dir_fd=dirs.incoming)
    finally:
        if note is not None and not _exists(target_fd, target):
            with contextlib.suppress(OSError):  # a note beside no file would stay for ever
                os.unlink(target + suffix, dir_fd=target_fd)
    log.warning("a spool file was replaced while it was taken; taking it again", file=back)
    return None


def sync(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.fsync(fd)


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
        self._report("spool", None)
        self._opened = True
        for name in dirs.made_again:
            log.warning(
                "a spool directory was missing; made it again (its group may need mending:"
                " systemd-tmpfiles --create)",
                dir=str(self._root / name),
            )
        for name in DIRECTORY_MODES:
            self._report(name, dirs.problems.get(name))
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
            lambda: [name for name in names if not _exists(dirs.incoming, name)]
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
