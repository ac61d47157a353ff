"""The daemon's own files (results, ledger, lock): kept to its user and group, whatever the umask.

They hold numbers, names and the daemon's state; nobody outside the daemon's group reads them,
and only the daemon writes them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .logs import log

PRIVATE_MODE = 0o640
NOT_PRIVATE = 0o027  # group write, and anything for others


def create_private(path: Path | str, flags: int) -> int:
    """Open `path` (made 0640, less what the umask takes away, if new) and keep it private."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
    keep_private(fd, path)
    return fd


def keep_private(file: Path | str | int, name: Path | str | None = None) -> None:
    """Take group write and all access by others away from an existing regular file (a path,
    or an open descriptor with its `name` for the log).

    An existing file is tightened rather than left alone: one that an earlier dialerd made 0644
    (or an operator made world-readable) would otherwise keep the callees' numbers open to every
    local user. Group read, and any mode already narrower, are the operator's choice and kept.
    A file the daemon may not chmod (owned by another user, immutable) is used as it is, with a
    warning: its mode is the operator's to fix, not a reason to stop.
    """
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode) or not mode & NOT_PRIVATE:
        return
    was, now = stat.S_IMODE(mode), stat.S_IMODE(mode) & ~NOT_PRIVATE
    name = str(file if name is None else name)
    try:
        os.chmod(file, now)
    except OSError as error:
        log.warning(
            "cannot tighten the mode of a file", file=name, mode=f"{was:04o}", error=f"{error}"
        )
        return
    log.warning("file mode tightened", file=name, was=f"{was:04o}", now=f"{now:04o}")
