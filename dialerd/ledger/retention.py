"""Retention: final requests, and all that belongs to them, pruned `retention_s` after their
outcome, a batch at a time; their ids remembered as digests as long again; the pages freed
given back to the file system."""

from __future__ import annotations

import hashlib
import sqlite3

from .dialect import SQLITE, chore_is_ours, dialect
from .states import State

VACUUM_PAGES = 250  # pages (1 MiB) given back in one call: a few ms of the writer's time


def id_digest(request_id: str) -> bytes:
    """What is kept of a pruned request's id: enough to know it again, nothing to read."""
    return hashlib.blake2b(request_id.encode(), digest_size=16).digest()


def pruned_taken_at(conn: sqlite3.Connection, request_id: str) -> float | None:
    """When a pruned request of this id was taken; None when no pruned one had it."""
    row = conn.execute(
        "SELECT taken_at FROM pruned_ids WHERE digest = ?", (id_digest(request_id),)
    ).fetchone()
    return None if row is None else row[0]


def prune(conn: sqlite3.Connection, now: float, retention_s: float, batch: int) -> int:
    """Up to `batch` of each kind of record older than retention_s; how many went (when it is
    `batch`, there may be more).

    A final request goes with its sends' tokens, callbacks and calls to its number; its id is
    remembered until retention_s from now. Result lines not yet written are in the outbox, which
    this never touches.
    """
    if not chore_is_ours(conn, "prune"):
        return 0
    cutoff = now - retention_s
    ended = conn.execute(
        f"SELECT seq, id, created_at FROM requests WHERE state = '{State.FINAL}'"
        " AND finished_at < ? ORDER BY finished_at LIMIT ?",
        (cutoff, batch),
    ).fetchall()
    conn.executemany(
        "INSERT INTO pruned_ids (digest, taken_at, until) VALUES (?, ?, ?) ON CONFLICT (digest)"
        " DO UPDATE SET taken_at = excluded.taken_at, until = excluded.until",
        ((id_digest(request_id), taken_at, now + retention_s) for _, request_id, taken_at in ended),
    )
    seqs = [(seq,) for seq, _, _ in ended]
    conn.executemany(
        "DELETE FROM callbacks WHERE token IN (SELECT token FROM calls WHERE seq = ?)", seqs
    )
    conn.executemany("DELETE FROM calls WHERE seq = ?", seqs)
    conn.executemany("DELETE FROM requests WHERE seq = ?", seqs)
    pruned = len(ended)
    # By age: the cap never looks back further than retention_s (config.py sees to it).
    for table, key, column, before in (
        ("number_calls", "rowid", "at", cutoff),
        ("rejects", "seq", "at", cutoff),
        ("requeues", "seq", "at", cutoff),
        ("controls", "seq", "at", cutoff),
        ("pruned_ids", "digest", "until", now),
    ):
        deleted = conn.execute(
            f"DELETE FROM {table} WHERE {key} IN"
            f" (SELECT {key} FROM {table} WHERE {column} < ? ORDER BY {column} LIMIT ?)",
            (before, batch),
        ).rowcount
        pruned = max(pruned, deleted)
    # A campaign's counts, once it has no open request and no outcome within retention_s.
    conn.execute(
        "DELETE FROM campaign_counts WHERE campaign IN (SELECT campaign FROM campaign_counts"
        " GROUP BY campaign HAVING max(last_at) < ?) AND campaign NOT IN (SELECT campaign"
        f" FROM requests WHERE state != '{State.FINAL}' AND campaign IS NOT NULL)",
        (cutoff,),
    )
    return pruned


def vacuum(conn: sqlite3.Connection) -> int:
    """Give back up to VACUUM_PAGES free pages (a ledger made before retention keeps them for
    reuse); how many pages are still free. PostgreSQL's autovacuum does this itself."""
    if dialect(conn) is not SQLITE:
        return 0
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    if mode != 2:  # not INCREMENTAL
        return 0
    # Python's sqlite3 steps a statement without result columns once, and this pragma frees
    # one page per step: one execution per page.
    for _ in range(min(free, VACUUM_PAGES)):
        conn.execute("PRAGMA incremental_vacuum(1)").close()
    return max(0, free - VACUUM_PAGES)
