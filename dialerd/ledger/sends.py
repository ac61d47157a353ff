"""A request on its way out: taken from its lane's queue, marked before its POST, retried,
held by the rules, or finished with its result line."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .. import clock
from ..config import NumberCap
from ..results import Outcome, result_line
from .dialect import chore_is_ours, dialect
from .states import PAUSED_AGENT, PAUSED_CAMPAIGN, Add, Move, State, move, move_returning
from .status import count_outcome

RESPONSE_KEPT = 4096  # characters of each API answer kept in the ledger


EXPIRED_ERROR = "expires_at passed before sending"


CANCELLED_ERROR = "cancelled by an operator before it was sent"
CANCELLED_IN_FLIGHT = "cancelled by an operator while a send was out; not sent again"


IN_DOUBT_ERROR = "the daemon stopped while this send was in flight; requeue it to send again"


FINISH_COLUMNS = ("attempts", "http_status", "conversation_uuid", "status", "error", "response")
FINISHED_ROW = (  # what a result line says of a request
    "id, to_number, agent_id, attempts, http_status, conversation_uuid, status, error, meta,"
    " source, campaign, run"
)


@dataclass(frozen=True, slots=True)
class Pending:
    """A queued request as the dispatcher needs it."""

    seq: int
    id: str
    agent_id: str
    body: dict[str, Any]
    attempts: int
    retries: int
    expires_at: float | None
    timezone: str | None = None  # the callee's zone, as the request gave it


PRIORITIES = range(9, -1, -1)  # a request's priority, the highest first


def due(conn: sqlite3.Connection, agent_id: str, now: float, limit: int):
    """Up to `limit` of the agent's due requests, highest priority first, then by due time and
    arrival; none of a paused agent or campaign. When none is due: when the next one is."""
    paused = set(conn.execute("SELECT kind, name FROM pauses"))
    if (PAUSED_AGENT, agent_id) in paused:
        return [], None
    campaigns = [name for kind, name in paused if kind == PAUSED_CAMPAIGN]
    not_paused = f" AND coalesce(campaign, '') NOT IN ({', '.join('?' * len(campaigns))})"
    # `paused IS NULL`: the index of due requests, which leaves paused campaigns out; the
    # campaigns' names still, for a request queued again since (a retry) and not yet left out.
    index_range = f"state = '{State.QUEUED}' AND paused IS NULL AND agent_id = ? AND priority = ?"
    where = index_range + (not_paused if campaigns else "")
    pending: list[Pending] = []
    for priority in PRIORITIES:  # a range of the index each, however many wait to be due
        rows = conn.execute(
            "SELECT seq, id, body, attempts, retries, expires_at, timezone FROM requests"
            f" WHERE {where} AND due_at <= ? ORDER BY due_at, seq LIMIT ?",
            (agent_id, priority, *campaigns, now, limit - len(pending)),
        ).fetchall()
        pending += [
            Pending(seq, id_, agent_id, json.loads(body), attempts, retries, expires, zone)
            for seq, id_, body, attempts, retries, expires, zone in rows
        ]
        if len(pending) == limit:
            break
    if pending:
        return pending, None
    later = [
        conn.execute(
            f"SELECT min(due_at) FROM requests WHERE {where} AND due_at > ?",
            (agent_id, priority, *campaigns, now),
        ).fetchone()[0]
        for priority in PRIORITIES
    ]
    return pending, min((moment for moment in later if moment is not None), default=None)


class LeaseLost(Exception):
    """Cluster mode: a send's mark found that this run holds the agent's lease no more (or
    under another epoch): another daemon sends for it now."""


def mark_sending(
    conn: sqlite3.Connection,
    seq: int,
    token: str | None,
    attempt: int,
    now: float,
    cap: NumberCap | None,
    fence: tuple[int, int] | None = None,
) -> tuple[bool, float | None]:
    """See Ledger.mark_sending. `fence`: (run, epoch) of the agent's lease, in cluster mode;
    the send is then stamped by the database's clock."""
    row = conn.execute(
        "SELECT to_number, agent_id, state FROM requests WHERE seq = ?", (seq,)
    ).fetchone()
    if row is None:
        return False, None
    to, agent_id, state = row
    # The lease first: a holder that lost it learns so at its next mark, whatever became of
    # the request (the new holder may have sent it already), and its lane stops there.
    if fence is not None:
        now = _fenced_clock(conn, agent_id, *fence)
        if now is None:
            raise LeaseLost(agent_id)
    if state != State.QUEUED:
        return False, None
    if cap is not None and dialect(conn).lock_number:  # two daemons' marks: one at a time
        conn.execute(dialect(conn).lock_number, (to,))
    allowed_at = None if cap is None else _cap_allows_at(conn, to, now, cap)
    if allowed_at is not None:
        return False, allowed_at
    if not move(conn, seq, Move.SEND, sent_at=now, token=token, held=None):
        return False, None
    conn.execute(
        "INSERT INTO number_calls (seq, to_number, at, placed) VALUES (?, ?, ?, 0)", (seq, to, now)
    )
    conn.execute(
        "INSERT INTO agent_sends (agent_id, last_sent_at) VALUES (?, ?)"
        " ON CONFLICT (agent_id) DO UPDATE SET last_sent_at = excluded.last_sent_at",
        (agent_id, now),
    )
    if token is not None:
        conn.execute(
            "INSERT INTO calls (token, seq, attempt, sent_at) VALUES (?, ?, ?, ?)",
            (token, seq, attempt, now),
        )
    return True, None


def forget_number_calls(conn: Any, before: float) -> None:
    if chore_is_ours(conn, "forget"):
        conn.execute("DELETE FROM number_calls WHERE placed = 1 AND at < ?", (before,))


def since_last_send(conn: Any, agent_id: str, now: float) -> float | None:
    clock = dialect(conn).db_clock
    params = (now, agent_id) if clock == "?" else (agent_id,)
    row = conn.execute(
        f"SELECT {clock} - last_sent_at FROM agent_sends WHERE agent_id = ?", params
    ).fetchone()
    return None if row is None else float(row[0])


def _fenced_clock(conn: Any, agent_id: str, run: int, epoch: int) -> float | None:
    """The database's clock now, if this run still holds the agent's lease under `epoch`; the
    row is locked against a takeover until the transaction ends (a send's mark)."""
    row = conn.execute(
        "SELECT extract(epoch FROM clock_timestamp()) FROM leases WHERE agent_id = ?"
        " AND run = ? AND epoch = ? AND expires_at > clock_timestamp() FOR SHARE",
        (agent_id, run, epoch),
    ).fetchone()
    return None if row is None else float(row[0])


def _cap_allows_at(conn: sqlite3.Connection, to: str, now: float, cap: NumberCap) -> float | None:
    """None if `to` may be called now under the cap, else the moment it may: when enough of the
    calls in the window (placed, or sent and not yet answered) have left it."""
    times = [
        r[0]
        for r in conn.execute(
            "SELECT at FROM number_calls WHERE to_number = ? AND at > ? ORDER BY at",
            (to, now - cap.per_s),
        )
    ]
    if len(times) < cap.count:
        return None
    return times[len(times) - cap.count] + cap.per_s


def settle_number_call(conn: sqlite3.Connection, seq: int, placed: bool) -> None:
    """The request's unanswered send to its number was placed (it counts), or was not."""
    if placed:
        conn.execute("UPDATE number_calls SET placed = 1 WHERE seq = ? AND placed = 0", (seq,))
    else:
        conn.execute("DELETE FROM number_calls WHERE seq = ? AND placed = 0", (seq,))


def retry_later(
    conn: sqlite3.Connection, seq: int, due_at: float | None, counts_retry: bool, error: str
) -> None:
    """Queued again, due at `due_at` (None: as it was, keeping its place in the queue)."""
    columns = {"retries": Add(int(counts_retry)), "error": error, "held": None}
    if due_at is not None:
        columns["due_at"] = due_at
    if move(conn, seq, Move.RETRY, **columns):
        settle_number_call(conn, seq, placed=False)
    elif cancelled_while_out(conn, seq):
        finish(conn, seq, Outcome.CANCELLED, {"error": CANCELLED_IN_FLIGHT})


def unmark(conn: sqlite3.Connection, seq: int) -> None:
    """A marked send that never left (the daemon began to stop first): queued again as it was,
    and not counted against its number."""
    if move(conn, seq, Move.RETRY, held=None):
        settle_number_call(conn, seq, placed=False)
    elif cancelled_while_out(conn, seq):  # as it was marked: never sent, so cancelled
        finish(conn, seq, Outcome.CANCELLED, {"error": CANCELLED_ERROR})


def cancelled_while_out(conn: sqlite3.Connection, seq: int) -> bool:
    """Whether an operator cancelled the request while a send of it was out (and it is)."""
    return (
        conn.execute(
            "SELECT 1 FROM requests WHERE seq = ? AND cancelled_at IS NOT NULL"
            f" AND state IN ('{State.SENDING}', '{State.PLACED}')",
            (seq,),
        ).fetchone()
        is not None
    )


def hold(conn: sqlite3.Connection, holds: list[tuple[int, float]], reason: str) -> None:
    for seq, until in holds:
        move(conn, seq, Move.HOLD, due_at=until, held=reason)


def follow_clock_step(conn: sqlite3.Connection, step: float, stepped_at: float) -> int:
    """The wall clock was stepped by `step` seconds at `stepped_at` (as it read before): every
    wait the ledger measures from the moment it began keeps its length, and what was due stays
    due, in its order; a moment the submitter or the calling hours fixed stays where it is.
    How many requests moved."""
    moved = conn.execute(
        "UPDATE requests SET due_at = due_at + :step, first_due_at = first_due_at + :step"
        f" WHERE state != '{State.FINAL}' AND state IN ('{State.QUEUED}', '{State.PLACED}')"
        " AND (due_at <= :stepped_at"
        # Fixed moments: a not_before (never sent, not held) and the calling hours' opening.
        " OR NOT (coalesce(held, '') = 'calling_hours' OR (sent_at IS NULL AND held IS NULL)))",
        {"step": step, "stepped_at": stepped_at},
    ).rowcount
    conn.execute("UPDATE agent_sends SET last_sent_at = last_sent_at + ?", (step,))
    return moved


def expire_due(conn: sqlite3.Connection, now: float, max_queue_s: float) -> int:
    """Queued requests past their expires_at, or due longer than max_queue_s ago (held by an
    API that refuses them, or waiting for a lane that is gone), end `expired`; how many did."""
    if not chore_is_ours(conn, "expire"):
        return 0
    queued_too_long = f"not sent within max_queue_s ({max_queue_s:g} s) of its due time"
    expired = {
        r[0]: queued_too_long
        for r in conn.execute(
            f"SELECT seq FROM requests WHERE state = '{State.QUEUED}' AND first_due_at <= ?",
            (now - max_queue_s,),
        )
    }
    expired |= {  # its own expiry, when both have passed
        r[0]: EXPIRED_ERROR
        for r in conn.execute(
            f"SELECT seq FROM requests WHERE state = '{State.QUEUED}' AND expires_at IS NOT NULL"
            " AND expires_at <= ?",
            (now,),
        )
    }
    for seq, error in expired.items():
        finish(conn, seq, Outcome.EXPIRED, {"error": error})
    return len(expired)


def finish(
    conn: sqlite3.Connection, seq: int, outcome: Outcome, fields: dict, how: Move = Move.FINISH
) -> bool:
    """The request's outcome, and its result line into the outbox, in one transaction; once.
    Whether it ended now (not when final already, or, for a cancel, out)."""
    now = clock.now()
    columns = {c: fields[c] for c in FINISH_COLUMNS if c in fields}
    if columns.get("response"):
        columns["response"] = columns["response"][:RESPONSE_KEPT]
    row = move_returning(conn, seq, how, FINISHED_ROW, outcome=outcome, finished_at=now, **columns)
    if row is None:
        return False  # already final: a finish is applied once
    # A call the API placed, or may have placed, counts against the number's cap.
    settle_number_call(conn, seq, placed=outcome in (Outcome.DIALED, Outcome.IN_DOUBT))
    (
        id_, to, agent_id, attempts, http_status, conversation_uuid, status, error, meta, source,
        campaign, run,
    ) = row  # fmt: skip
    count_outcome(conn, agent_id, outcome, campaign=campaign)
    line = result_line(
        id=id_,
        to=to,
        agent_id=agent_id,
        outcome=outcome,
        attempts=attempts,
        http_status=http_status,
        conversation_uuid=conversation_uuid,
        status=status,
        error=error,
        meta=None if meta is None else json.loads(meta),
        source=source,
        campaign=campaign,
        at=now,
    )
    # Of the run that took the request in: its daemon writes the line (cluster mode).
    conn.execute(
        "INSERT INTO outbox (line, outcome, campaign, run) VALUES (?, ?, ?, ?)",
        (line, outcome, campaign, run),
    )
    return True


def recover_in_flight(conn: sqlite3.Connection) -> int:
    seqs = [  # `!= final`: read by the index of the open requests, not among the history
        r[0]
        for r in conn.execute(
            f"SELECT seq FROM requests WHERE state != '{State.FINAL}' AND state = '{State.SENDING}'"
        )
    ]
    for seq in seqs:
        finish(conn, seq, Outcome.IN_DOUBT, {"error": IN_DOUBT_ERROR})
    return len(seqs)
