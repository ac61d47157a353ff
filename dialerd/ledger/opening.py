"""The ledger as the command line opens it, whether or not a daemon runs: the file in the
state_dir, or (cluster mode) the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import clock
from ..config import ClusterConfig
from .dialect import clock_reading
from .schema import MIGRATIONS, connect


class LedgerNotCurrent(OSError):
    """The ledger is of an older schema: its daemon has not upgraded it yet."""


def open_ledger(state_dir: Path, cluster: ClusterConfig | None, read_only: bool = False) -> Any:
    """A connection to the ledger; FileNotFoundError when there is none yet (no daemon has
    started on it, no request has been taken in)."""
    if cluster is None:
        path = state_dir / "ledger.sqlite3"
        if not path.exists():
            raise FileNotFoundError(f"no ledger at {path}: no request has been taken in yet")
        return connect(path, read_only=read_only)
    from . import postgres  # psycopg takes 0.1 s to import: only in cluster mode

    conn = postgres.connect(cluster.url, cluster.password_file, "dialerd command")
    version = postgres.schema_version(conn)
    if version == 0:
        conn.close()
        raise FileNotFoundError(
            f"no ledger in {postgres.describe(cluster.url)}: no daemon has started on it yet"
        )
    if version > postgres.VERSION:
        conn.close()
        raise postgres.LedgerTooNew(
            f"the ledger in {postgres.describe(cluster.url)} has schema version {version},"
            f" newer than this dialerd knows ({postgres.VERSION})"
        )
    follow_database_clock(conn)
    return conn


def follow_database_clock(conn: Any) -> None:
    """Cluster mode: this process's moments are the database's (see clock)."""
    now, read_at = clock_reading(conn)
    clock.follow_database(now.timestamp(), read_at)


def open_current(state_dir: Path, cluster: ClusterConfig | None) -> Any:
    """open_ledger(), for a change: LedgerNotCurrent when its daemon has not yet brought it up
    to this dialerd's schema."""
    conn = open_ledger(state_dir, cluster)
    if cluster is not None:
        return conn  # a daemon upgrades it before it takes anything in
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version != len(MIGRATIONS):
        conn.close()
        raise LedgerNotCurrent(
            f"the ledger {state_dir / 'ledger.sqlite3'} has schema version {version}, not this"
            f" dialerd's {len(MIGRATIONS)}: start this dialerd's daemon once to bring it up to date"
        )
    return conn
