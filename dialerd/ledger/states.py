"""A request's states, and the one table of the moves between them.

Every change of a request's state is one guarded statement, made by `move()`: it changes the row
only from a state the table allows, so that a move made twice, or raced by another process that
shares the ledger, applies once, and the caller learns whether it did.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..results import Outcome


class State(enum.StrEnum):
    QUEUED = "queued"  # in its agent's lane, waiting for its due time and its rules
    SENDING = "sending"  # marked before its POST went out; the answer is awaited
    PLACED = "placed"  # the API placed the call; a callback, or the end of wait_s, is awaited
    FINAL = "final"  # it has its outcome, and its result line is in the outbox


class Move(enum.Enum):
    SEND = "send"
    PLACE = "place"
    RETRY = "retry"
    HOLD = "hold"
    REDIAL = "redial"
    FINISH = "finish"
    CANCEL = "cancel"
    REQUEUE = "requeue"


@dataclass(frozen=True, slots=True)
class Transition:
    sources: tuple[State, ...]
    target: State
    guard: str = ""  # a further condition on the row, in SQL


PAUSED_AGENT, PAUSED_CAMPAIGN = "agent", "campaign"  # the kinds of `dialerd pause`
NOT_PAUSED = (  # the request is of no agent or campaign an operator has paused
    "NOT EXISTS (SELECT 1 FROM pauses WHERE"
    f" (kind = '{PAUSED_AGENT}' AND name = requests.agent_id)"
    f" OR (kind = '{PAUSED_CAMPAIGN}' AND name = requests.campaign))"
)
NOT_CANCELLED = "cancelled_at IS NULL"  # no operator cancelled it while a send of it was out

TRANSITIONS = {
    # Checked as the send is marked: a pause or a cancel comes between no lane and its send.
    Move.SEND: Transition((State.QUEUED,), State.SENDING, NOT_PAUSED),
    Move.PLACE: Transition((State.SENDING,), State.PLACED),
    # The API refused the send before placing a call: it goes out again later, unless an
    # operator cancelled it while the send was out.
    Move.RETRY: Transition((State.SENDING,), State.QUEUED, NOT_CANCELLED),
    # The calling hours or the cap say later: back to the queue, not a retry.
    Move.HOLD: Transition((State.QUEUED,), State.QUEUED),
    # A callback said the callee was not reached, and a redial is left.
    Move.REDIAL: Transition((State.PLACED,), State.QUEUED, NOT_CANCELLED),
    Move.FINISH: Transition((State.QUEUED, State.SENDING, State.PLACED), State.FINAL),
    # An operator's cancel: only of what is not out (a send out is never ended under it).
    Move.CANCEL: Transition((State.QUEUED,), State.FINAL),
    # The operator's deliberate resend of a send whose answer was lost.
    Move.REQUEUE: Transition((State.FINAL,), State.QUEUED, f"outcome = '{Outcome.IN_DOUBT}'"),
}


@dataclass(frozen=True, slots=True)
class Add:
    """A column's new value as its value plus this, for move()'s columns."""

    amount: int


def move(conn: sqlite3.Connection, seq: int, how: Move, **columns: Any) -> bool:
    """Move request `seq` as `how` says, setting `columns` too; whether it moved (not when it
    was in no state the move is allowed from)."""
    sql, params = _statement(seq, how, columns)
    return conn.execute(sql, params).rowcount == 1


def move_returning(
    conn: sqlite3.Connection, seq: int, how: Move, returning: str, **columns: Any
) -> tuple | None:
    """move(), and the `returning` columns of the row it moved; None when it did not move."""
    sql, params = _statement(seq, how, columns)
    return conn.execute(f"{sql} RETURNING {returning}", params).fetchone()


def _statement(seq: int, how: Move, columns: dict[str, Any]) -> tuple[str, tuple]:
    transition = TRANSITIONS[how]
    assignments = ["state = ?"]
    params: list[Any] = [transition.target]
    for column, value in columns.items():
        if isinstance(value, Add):
            assignments.append(f"{column} = {column} + ?")
            params.append(value.amount)
        else:
            assignments.append(f"{column} = ?")
            params.append(value)
    sources = ", ".join("?" * len(transition.sources))
    guard = f" AND {transition.guard}" if transition.guard else ""
    sql = (
        f"UPDATE requests SET {', '.join(assignments)}"
        f" WHERE seq = ? AND state IN ({sources}){guard}"
    )
    return sql, (*params, seq, *transition.sources)
