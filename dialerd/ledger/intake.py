"""Requests into the ledger: queued, or final at once (invalid, duplicate), with how far a
spool file is recorded; and what submit foresees of them."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import clock
from ..config import ClusterConfig
from ..request import Request
from ..results import Outcome, result_line, utc_text
from .dialect import QUEUED, tell
from .opening import open_ledger
from .retention import id_digest, pruned_taken_at
from .schema import MIGRATIONS, create_schema
from .states import State
from .status import REFUSED_AT_INTAKE, count_outcome


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """The spool file a batch of intake is a chunk of."""

    name: str
    digest: str
    start: int  # the file's items recorded before this chunk
    errors: str | None  # this chunk's lines for NAME.errors
    last: bool


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """What the ledger holds of a spool file taken, or being taken, into it."""

    digest: str
    items: int | None  # items recorded so far; None: all of them
    errors: str | None  # the lines for NAME.errors recorded so far


@dataclass(frozen=True, slots=True)
class Intake:
    """What one intake batch did: requests queued per agent, and results it produced at once."""

    queued_agents: frozenset[str]
    accepted: int
    rejected: int


def add(
    conn: sqlite3.Connection,
    run: int,
    requests: list[Request],
    invalid: list[dict],
    spool_file: SpoolChunk | None,
    dedupe_window_s: float,
) -> Intake:
    now = clock.now()
    agents = set()
    accepted = 0
    paused = {name for (name,) in conn.execute("SELECT name FROM pauses WHERE kind = 'campaign'")}
    for request in requests:
        request_id, repeated = take(conn, run, request, now, dedupe_window_s, paused)
        if repeated is None:
            agents.add(request.agent_id)
            accepted += 1
            continue
        _reject(
            conn,
            run,
            now,
            {
                "id": request_id,
                "to": request.to,
                "agent_id": request.agent_id,
                "meta": request.meta,
                "source": request.source,
                "campaign": request.campaign,
                "outcome": Outcome.DUPLICATE,
                "error": repeated,
            },
        )
    for fields in invalid:
        _reject(conn, run, now, {"outcome": Outcome.INVALID, **fields})
    if spool_file is not None:
        _record_spool_chunk(conn, spool_file, len(requests) + len(invalid))
    tell(conn, *(QUEUED + agent for agent in agents))  # whichever daemon holds each agent
    return Intake(frozenset(agents), accepted, len(requests) - accepted + len(invalid))


def take(
    conn: sqlite3.Connection,
    run: int,
    request: Request,
    now: float,
    window: float,
    paused: Collection[str] = (),
) -> tuple[str, str | None]:
    """The id `request` is recorded under, queued, or, when it repeats an earlier request, the
    id it repeats and the duplicate's error."""
    request_id, repeated = _intake_id(conn, request, now, window)
    if repeated is not None:
        return request_id, repeated
    # _intake_id has looked among the pruned ids for an id made from the content.
    free = request.id_from_content or pruned_taken_at(conn, request_id) is None
    if free and _insert(conn, run, request, request_id, now, request.campaign in paused):
        return request_id, None
    return request_id, _taken(conn, request_id)


def _intake_id(
    conn: sqlite3.Connection, request: Request, now: float, window: float
) -> tuple[str, str | None]:
    """The id to record `request` under, and, when it repeats a request given no id within the
    window, what the duplicate's error says. Repeating one taken before the window, it gets the
    content's id with the first free suffix (.2, .3, ...): the first keeps its own. (No request
    given an id holds one of this form: request.py refuses them.)"""
    if not request.id_from_content:
        return request.id, None
    latest = None
    for candidate in _ids_made_from(request.id):
        taken = _taken_at(conn, candidate)
        if taken is None:
            break
        latest = (candidate, *taken)
    if latest is None:
        return candidate, None
    earlier_id, taken_at, source = latest
    if now - taken_at < window:
        return earlier_id, (
            f"repeats request {earlier_id} ({source or 'pruned since'}, taken"
            f" {utc_text(taken_at)}), within dedupe_window_s ({window:g} s)"
        )
    return candidate, None


def _ids_made_from(key: str) -> Iterator[str]:
    """The ids a request's content is recorded under, in the order intake gives them out."""
    yield key
    for suffix in itertools.count(2):
        yield f"{key}.{suffix}"


def _taken_at(conn: sqlite3.Connection, request_id: str) -> tuple[float, str | None] | None:
    """When a request of this id was taken, and its source (None once it is pruned)."""
    row = conn.execute(
        "SELECT created_at, source FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    if row is not None:
        return row
    taken_at = pruned_taken_at(conn, request_id)
    return None if taken_at is None else (taken_at, None)


def _insert(
    conn: sqlite3.Connection,
    run: int,
    request: Request,
    request_id: str,
    now: float,
    paused: bool,
) -> bool:
    """Whether `request` was queued (`paused`: of a paused campaign); not when its id is taken
    already."""
    cursor = conn.execute(
        "INSERT INTO requests (id, run, agent_id, to_number, body, meta, source,"
        " expires_at, due_at, state, created_at, campaign, first_due_at, priority, timezone,"
        f" paused) VALUES (?,?,?,?,?,?,?,?,?,'{State.QUEUED}',?,?,?,?,?,?)"
        " ON CONFLICT DO NOTHING",
        (
            request_id,
            run,
            request.agent_id,
            request.to,
            json.dumps(request.api_body(), separators=(",", ":")),
            None if request.meta is None else json.dumps(request.meta),
            request.source,
            request.expires_at,
            max(now, request.not_before or now),
            now,
            request.campaign,
            max(now, request.not_before or now),
            request.priority,
            request.timezone,
            1 if paused else None,
        ),
    )
    return cursor.rowcount == 1


def _taken(conn: sqlite3.Connection, request_id: str) -> str:
    taken_at, source = _taken_at(conn, request_id)
    return (
        f"id {request_id!r} was already taken by an earlier request"
        f" ({source or 'pruned since'}, taken {utc_text(taken_at)})"
    )


def _reject(conn: sqlite3.Connection, run: int, now: float, fields: dict) -> None:
    request_id = fields.get("id")  # an invalid request's `id` may be any JSON value
    conn.execute(
        "INSERT INTO rejects (id, outcome, error, source, at, campaign) VALUES (?, ?, ?, ?, ?, ?)",
        (
            request_id if isinstance(request_id, str) else None,
            fields["outcome"],
            fields["error"],
            fields["source"],
            now,
            fields.get("campaign"),
        ),
    )
    conn.execute(
        "INSERT INTO outbox (line, outcome, campaign, run) VALUES (?, ?, ?, ?)",
        (result_line(at=now, **fields), fields["outcome"], fields.get("campaign"), run),
    )
    count_outcome(conn, REFUSED_AT_INTAKE, fields["outcome"])


def spool_files(
    conn: sqlite3.Connection, names: list[str], note_lines: int
) -> dict[str, SpoolRecord]:
    recorded = {}
    for name in names:
        row = conn.execute(
            "SELECT digest, items, errors FROM spool_files WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            continue
        digest, items, errors = row
        chunks = conn.execute(
            "SELECT errors FROM spool_file_errors WHERE name = ? ORDER BY start", (name,)
        )
        texts = itertools.chain([errors] if errors else [], (chunk for (chunk,) in chunks))
        recorded[name] = SpoolRecord(digest, items, _note(texts, note_lines))
    return recorded


def _note(texts: Iterable[str], note_lines: int) -> str | None:
    """The lines of texts, the first `note_lines` of them, then one saying how many more."""
    kept, shown, more = [], 0, 0
    for text in texts:
        lines = text.count("\n")
        room = max(0, note_lines - shown)
        if lines <= room:
            kept.append(text)
            shown += lines
            continue
        if room:
            kept.append("\n".join(text.split("\n", room)[:room]) + "\n")
            shown += room
        more += lines - room
    if more:
        kept.append(f"... and {more} more invalid lines, each with its own invalid result\n")
    return "".join(kept) or None


def _record_spool_chunk(conn: sqlite3.Connection, chunk: SpoolChunk, items: int) -> None:
    """The file's row says how far it is recorded, with this chunk's `items`; its first chunk
    starts the file's errors afresh (a row of its name may be of an earlier file)."""
    if chunk.start == 0:
        conn.execute("DELETE FROM spool_file_errors WHERE name = ?", (chunk.name,))
    conn.execute(
        "INSERT INTO spool_files (name, digest, errors, items) VALUES (?, ?, NULL, ?)"
        " ON CONFLICT (name) DO UPDATE SET digest = excluded.digest, errors = NULL,"
        " items = excluded.items",
        (chunk.name, chunk.digest, None if chunk.last else chunk.start + items),
    )
    if chunk.errors:
        conn.execute(
            "INSERT INTO spool_file_errors (name, start, errors) VALUES (?, ?, ?)",
            (chunk.name, chunk.start, chunk.errors),
        )


def forget_spool_files(conn: sqlite3.Connection, names: list[str]) -> None:
    rows = [(name,) for name in names]
    conn.executemany("DELETE FROM spool_files WHERE name = ?", rows)
    conn.executemany("DELETE FROM spool_file_errors WHERE name = ?", rows)


def foresee_intake(
    state_dir: Path,
    requests: list[Request],
    dedupe_window_s: float,
    cluster: ClusterConfig | None = None,
) -> list[tuple[str, bool]]:
    """For each request, as the ledger stands, the id the daemon will record it under and
    whether it is a duplicate of one taken before it (or before it in `requests`). The ledger's
    rows that the requests may repeat are copied into a ledger in memory and the requests taken
    there, by the daemon's own code; the ledger is only read (SQLite may make its -wal and -shm
    when no daemon has them open). sqlite3.Error or OSError when it cannot be read, or is of
    another version."""
    ledger = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
    try:
        create_schema(ledger)
        keys = [request.id for request in requests]
        if cluster is not None:
            _copy_from_postgres(ledger, state_dir, cluster, keys)
        elif (state_dir / "ledger.sqlite3").exists():
            _copy_repeatable(ledger, state_dir / "ledger.sqlite3", keys)
        now = clock.now()
        ledger.execute("BEGIN")
        taken = [take(ledger, 0, request, now, dedupe_window_s) for request in requests]
        return [(request_id, repeated is not None) for request_id, repeated in taken]
    finally:
        ledger.close()


def _requests_columns(ledger: sqlite3.Connection) -> str:
    return ", ".join(row[1] for row in ledger.execute("PRAGMA main.table_info(requests)"))


def _copy_repeatable(ledger: sqlite3.Connection, path: Path, keys: list[str]) -> None:
    """Into `ledger`, the requests of the ledger at `path` whose id is a key, or made from the
    same content as it (and maybe a few more: they change nothing), and the digests of those
    pruned."""
    ledger.execute("ATTACH ? AS stored", (path.absolute().as_uri() + "?mode=ro",))  # see connect
    (version,) = ledger.execute("PRAGMA stored.user_version").fetchone()
    if version != len(MIGRATIONS):  # older: the daemon upgrades it when it starts
        raise OSError(
            f"the ledger {path} has schema version {version}, not this dialerd's {len(MIGRATIONS)}"
        )
    ledger.execute("CREATE TEMP TABLE keys (key TEXT PRIMARY KEY)")
    ledger.executemany("INSERT OR IGNORE INTO keys VALUES (?)", ((key,) for key in keys))
    columns = _requests_columns(ledger)
    # A key's ids sort from the key to the key and a suffix ('.' sorts just before '/').
    ledger.execute(
        f"INSERT OR IGNORE INTO main.requests ({columns}) SELECT {columns}"
        " FROM keys CROSS JOIN stored.requests AS r ON r.id >= key AND r.id < key || '/'"
    )
    if ledger.execute("SELECT 1 FROM stored.pruned_ids LIMIT 1").fetchone():
        for key in set(keys):
            _copy_pruned(ledger, key, ledger, "stored.pruned_ids")
    ledger.execute("DETACH stored")


def _copy_from_postgres(
    ledger: sqlite3.Connection, state_dir: Path, cluster: ClusterConfig, keys: list[str]
) -> None:
    """_copy_repeatable() from the cluster's ledger: its rows copied over the connection."""
    try:
        stored = open_ledger(state_dir, cluster, read_only=True)
    except FileNotFoundError:
        return  # no daemon has made it yet: nothing is taken
    try:
        columns = _requests_columns(ledger)
        # `id` is compared by bytes (its column's collation), as on SQLite: a locale's order
        # would not keep a key's ids together; and read by its index, a range per key.
        rows = stored.execute(
            f"SELECT {columns} FROM requests AS r JOIN unnest(CAST(? AS text[])) AS k(key)"
            " ON r.id >= k.key AND r.id < k.key || '/'",
            (sorted(set(keys)),),
        ).fetchall()
        marks = ", ".join("?" * len(columns.split(", ")))
        ledger.executemany(f"INSERT OR IGNORE INTO requests ({columns}) VALUES ({marks})", rows)
        if stored.execute("SELECT 1 FROM pruned_ids LIMIT 1").fetchone():
            for key in set(keys):
                _copy_pruned(ledger, key, stored, "pruned_ids")
    finally:
        stored.close()


def _copy_pruned(ledger: sqlite3.Connection, key: str, stored: Any, table: str) -> None:
    """The digests of pruned ids among the key and its suffixed ids, as far as intake would
    look (see _intake_id), from `table` of the `stored` ledger's connection."""
    for candidate in _ids_made_from(key):
        row = stored.execute(
            f"SELECT digest, taken_at, until FROM {table} WHERE digest = ?",
            (id_digest(candidate),),
        ).fetchone()
        if row is not None:
            ledger.execute(
                "INSERT OR IGNORE INTO main.pruned_ids VALUES (?, ?, ?)",
                (bytes(row[0]), row[1], row[2]),
            )
        elif not ledger.execute(
            "SELECT 1 FROM main.requests WHERE id = ?", (candidate,)
        ).fetchone():
            return
