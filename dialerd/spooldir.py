"""The spool's directories and entries, as a maildrop's: nothing a submitter puts there is
followed, opened unless it is a regular file, or read past the size limit.

Submitters may write into incoming/ (mode 1730: they cannot list it, nor replace or remove each
other's files) and nowhere else. Each spool directory is opened below the spool root with
O_NOFOLLOW, each entry relative to its directory's descriptor, and only a regular file that is
still the one listed (its device and inode, by fstat) is read, and no more of it than the size
limit. Anything else is moved to rejected/ (a rename moves a link or a FIFO itself, never what it
points to), and an entry replaced since it was read is told by its inode and put back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .files import PRIVATE_MODE
from .logs import log
from .sources import Rejected

MAX_SPOOL_FILE = 64 * 1024 * 1024
READ_CHUNK = 1024 * 1024  # reads past a file's size when it grew since its fstat
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


def entry_exists(dir_fd: int, name: str) -> bool:
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
        return entry_exists(dir_fd, candidate) or bool(
            note_suffix and entry_exists(dir_fd, candidate + note_suffix)
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
        if note is not None and not entry_exists(target_fd, target):
            with contextlib.suppress(OSError):  # a note beside no file would stay for ever
                os.unlink(target + suffix, dir_fd=target_fd)
    log.warning("a spool file was replaced while it was taken; taking it again", file=back)
    return None


def prune_filed(dirs: SpoolDirs, before: float) -> int:
    """Remove the files (and notes) filed in done/ and rejected/ before `before`, as their
    ctime tells: the rename into them sets it, and no submitter can set it back. How many went."""
    removed = 0
    for fd in (dirs.done, dirs.rejected):
        if fd is None:
            continue
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    filed = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(filed.st_mode) or filed.st_ctime >= before:
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                removed += 1
    return removed


def sync(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.fsync(fd)
