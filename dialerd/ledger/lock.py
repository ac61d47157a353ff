"""The state_dir's lock (one daemon per ledger) and the ledger file's mode."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..files import create_private, keep_private


class LedgerLocked(Exception):
    """Another daemon holds this state_dir."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state_dir for the life of the process."""
    fd = create_private(state_dir / "dialerd.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LedgerLocked(f"another dialerd (pid {holder}) is running with {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def keep_ledger_private(path: Path) -> None:
    """The ledger made 0640 before SQLite opens it, which would make it 0644 less the umask;
    SQLite gives its -wal and -shm the ledger's own mode when it makes them. Ones left by a crash
    are tightened as they are."""
    os.close(create_private(path, os.O_RDWR))
    for companion in ("-wal", "-shm"):
        keep_private(f"{path}{companion}")
