"""Agents' leases (cluster mode): which daemon's run sends for each agent, until when by the
database's clock, under which fencing epoch. What is recorded here; who takes or gives up
which agent is decided in dialerd/leases.py.

Every statement compares with `clock_timestamp()`, the database's own clock at that moment,
so that no daemon's clock decides when a lease has run out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Outcome
from .dialect import LEASES, chore_is_ours, clock_reading, tell
from .lock import LedgerLocked
from .sends import IN_DOUBT_ERROR, finish
from .states import State

_LEASE_LASTS = "clock_timestamp() + make_interval(secs => ?)"
_FREE = "run = NULL, instance = NULL, expires_at = clock_timestamp()"
ORPHAN_AFTER_S = 300.0  # lease_s at its longest


@dataclass(frozen=True, slots=True)
class Round:
    """One renewal: the leases this run holds (agent: epoch), the agents free to take, the
    runs alive (this one among them) in the order they started, and in how many seconds the
    first lease of another run runs out (None: none)."""

    held: dict[str, int]
    free: list[str]
    live: list[int]
    next_expiry_s: float | None
    clock: tuple[float, float]  # the database's clock at the round, and the monotonic clock then


class InstanceRunning(LedgerLocked):
    """Another live daemon has this instance name (as LedgerLocked: `run` exits 75)."""


def join(conn, run: int, instance: str, lease_s: float) -> float | None:
    """This run, of `instance`, joins the cluster. When a run of the same name is alive by its
    heartbeat, nothing is recorded and the seconds it has left are returned (a crash just
    before a restart: it runs out; a second daemon started by mistake: it renews). Two runs of
    one name that join at once do so one after the other (the lock on the name)."""
    conn.execute("SELECT pg_advisory_xact_lock(3, hashtext(?))", (instance,))
    left = conn.execute(
        "SELECT extract(epoch FROM max(renewed_at + make_interval(secs => lease_s))"
        " - clock_timestamp()) FROM runs WHERE instance = ? AND stopped_at IS NULL"
        " AND run != ? AND renewed_at + make_interval(secs => lease_s) > clock_timestamp()",
        (instance, run),
    ).fetchone()[0]
    if left is not None:
        return float(left)
    conn.execute(
        "UPDATE runs SET instance = ?, lease_s = ?, renewed_at = clock_timestamp() WHERE run = ?",
        (instance, lease_s, run),
    )
    return None


def runs_of(conn, instance: str) -> list[int]:
    """Every run of the instance, this one too: the result lines owed to it are theirs."""
    return [r[0] for r in conn.execute("SELECT run FROM runs WHERE instance = ?", (instance,))]


def renew(conn, run: int, agents: list[str], lease_s: float) -> Round:
    conn.execute("UPDATE runs SET renewed_at = clock_timestamp() WHERE run = ?", (run,))
    conn.execute(
        "INSERT INTO leases (agent_id, epoch, expires_at)"
        " SELECT agent, 0, '-infinity' FROM unnest(CAST(? AS text[])) AS agent"
        " ON CONFLICT DO NOTHING",
        (agents,),
    )
    held = dict(
        conn.execute(
            f"UPDATE leases SET expires_at = {_LEASE_LASTS} WHERE run = ? AND agent_id = ANY(?)"
            " RETURNING agent_id, epoch",
            (lease_s, run, agents),
        ).fetchall()
    )
    # The round's moment, one for all it reads: read at two moments, a lease could run out
    # between them and be neither free nor still to run out, and wait a whole round.
    now, read_at = clock_reading(conn)
    live = [
        r[0]
        for r in conn.execute(
            "SELECT run FROM runs WHERE stopped_at IS NULL"
            " AND renewed_at + make_interval(secs => lease_s) > ? ORDER BY run",
            (now,),
        )
    ]
    free = [
        r[0]
        for r in conn.execute(
            "SELECT agent_id FROM leases WHERE agent_id = ANY(?) AND expires_at <= ?"
            " ORDER BY agent_id",
            (agents, now),
        )
    ]
    (next_expiry,) = conn.execute(
        "SELECT extract(epoch FROM min(expires_at) - ?) FROM leases"
        " WHERE agent_id = ANY(?) AND run IS DISTINCT FROM ? AND expires_at > ?",
        (now, agents, run, now),
    ).fetchone()
    next_expiry_s = None if next_expiry is None else float(next_expiry)
    return Round(held, free, live, next_expiry_s, (now.timestamp(), read_at))


def take(
    conn, run: int, instance: str, agents: list[str], lease_s: float
) -> tuple[dict[str, int], int]:
    """The leases of `agents` that are still free taken by this run, each under a new epoch,
    which fences off the holder before; its sends marked and never answered are in_doubt now
    (its lease is gone: no answer of them will be recorded). The epochs of those taken (by
    agent), and how many sends became in_doubt."""
    taken, parked = {}, 0
    # In one order whoever takes (two daemons locking two rows in opposite orders deadlock, and
    # wait deadlock_timeout to learn it); one another daemon is taking now is skipped, not
    # waited for: the caller rounds again for what is still free.
    for agent_id in sorted(agents):
        row = conn.execute(
            "SELECT run FROM leases WHERE agent_id = ? AND expires_at <= clock_timestamp()"
            " FOR UPDATE SKIP LOCKED",
            (agent_id,),
        ).fetchone()
        if row is None:
            continue  # taken by another daemon since the round read it, or being taken
        (epoch,) = conn.execute(
            "UPDATE leases SET run = ?, instance = ?, epoch = epoch + 1,"
            f" expires_at = {_LEASE_LASTS}, taken_at = clock_timestamp() WHERE agent_id = ?"
            " RETURNING epoch",
            (run, instance, lease_s, agent_id),
        ).fetchone()
        taken[agent_id] = epoch
        if row[0] != run:  # this run's own sends are still awaited by its lanes
            parked += _in_doubt(conn, agent_id)
    return taken, parked


def _in_doubt(conn, agent_id: str) -> int:
    return _park(
        conn,
        f"SELECT seq FROM requests WHERE state != '{State.FINAL}'"
        f" AND state = '{State.SENDING}' AND agent_id = ?",
        (agent_id,),
    )


def park_orphans(conn) -> int:
    """Sends marked under a lease that ran out ORPHAN_AFTER_S ago and that no daemon took since
    (its agent is in no daemon's config now): in_doubt, as a takeover would make them."""
    if not chore_is_ours(conn, "orphans"):
        return 0
    return _park(
        conn,
        f"SELECT r.seq FROM requests AS r WHERE r.state != '{State.FINAL}'"
        f" AND r.state = '{State.SENDING}' AND NOT EXISTS (SELECT 1 FROM leases AS l"
        "  WHERE l.agent_id = r.agent_id"
        "  AND l.expires_at > clock_timestamp() - make_interval(secs => ?))",
        (ORPHAN_AFTER_S,),
    )


def _park(conn, select: str, params: tuple) -> int:
    seqs = [r[0] for r in conn.execute(select, params)]
    for seq in seqs:
        finish(conn, seq, Outcome.IN_DOUBT, {"error": IN_DOUBT_ERROR})
    return len(seqs)


def release(conn, run: int, agents: list[str]) -> None:
    """This run gives up the leases (its lanes have stopped, their sends answered): free to
    take at once, and no more this run's (a renewal would take them back)."""
    conn.execute(f"UPDATE leases SET {_FREE} WHERE run = ? AND agent_id = ANY(?)", (run, agents))
    tell(conn, LEASES)


def leave(conn, run: int) -> None:
    """This run stops: every lease it holds is free at once, and it counts as alive no more."""
    conn.execute(f"UPDATE leases SET {_FREE} WHERE run = ?", (run,))
    conn.execute("UPDATE runs SET stopped_at = clock_timestamp() WHERE run = ?", (run,))
    tell(conn, LEASES)


def shared_secret(conn, name: str, new: bytes) -> bytes:
    conn.execute(
        "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, new)
    )
    return bytes(conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])
