"""A placed call: waiting for a callback or the end of wait_s, and what its callbacks do."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

from .. import clock
from ..config import RedialPolicy
from ..request import callback_matches
from ..results import Outcome
from .dialect import QUEUED, chore_is_ours, tell
from .sends import (
    CANCELLED_IN_FLIGHT,
    FINISH_COLUMNS,
    cancelled_while_out,
    finish,
    settle_number_call,
)
from .states import Move, State, move


def placed(
    conn: sqlite3.Connection,
    seq: int,
    token: str,
    wait_until: float,
    redial: Mapping,
    fields: dict,
) -> tuple[str | None, list[str]]:
    settle_number_call(conn, seq, placed=True)  # placed, whatever became of the request
    columns = {c: fields[c] for c in FINISH_COLUMNS if c in fields}
    if not move(conn, seq, Move.PLACE, due_at=wait_until, **columns):
        return None, []
    # Callbacks that came before this answer were judged without its conversation_uuid: judged
    # again with it now. The first that is about this call applies; the others change nothing.
    to, agent_id = conn.execute(
        "SELECT to_number, agent_id FROM requests WHERE seq = ?", (seq,)
    ).fetchone()
    applied, mismatched = None, []
    early = conn.execute(
        "SELECT seq, status, body FROM callbacks WHERE token = ? AND effect = 'early' ORDER BY seq",
        (token,),
    ).fetchall()
    for callback_seq, status, body in early:
        if not callback_matches(json.loads(body), to, agent_id, fields.get("conversation_uuid")):
            effect = "mismatch"
            mismatched.append(status)
        elif applied is None:
            effect = applied = _unreached(conn, seq, status, redial.get(status), clock.now())
        else:
            effect = "repeat"
        conn.execute("UPDATE callbacks SET effect = ? WHERE seq = ?", (effect, callback_seq))
    return applied, mismatched


def apply_callback(
    conn: sqlite3.Connection, token: str, body: dict, redial: Mapping, now: float
) -> tuple[str, str | None] | None:
    call = conn.execute("SELECT seq, attempt FROM calls WHERE token = ?", (token,)).fetchone()
    if call is None:
        return None
    seq = call[0]
    state, current_token, agent_id, to, conversation_uuid = conn.execute(
        "SELECT state, token, agent_id, to_number, conversation_uuid FROM requests WHERE seq = ?",
        (seq,),
    ).fetchone()
    # A mismatch uses nothing up: the genuine callback for the call may still come.
    applied_before = conn.execute(
        "SELECT 1 FROM callbacks WHERE token = ? AND effect NOT IN ('mismatch', 'early')",
        (token,),
    ).fetchone()
    # Only the latest send's token counts: an earlier attempt's, or a refused send's, is stale.
    if applied_before:
        effect = "repeat"
    elif token != current_token or state not in (State.PLACED, State.SENDING):
        effect = "stale"
    elif state == State.SENDING:  # the answer, and its conversation_uuid, are not recorded yet
        matches = callback_matches(body, to, agent_id, None)
        effect = "early" if matches else "mismatch"  # early: judged again once they are
    elif callback_matches(body, to, agent_id, conversation_uuid):
        effect = _unreached(conn, seq, body["status"], redial.get(body["status"]), now)
    else:
        effect = "mismatch"
    if effect != "repeat":
        conn.execute(
            "INSERT INTO callbacks (token, status, body, effect, received_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (token, body["status"], json.dumps(body), effect, now),
        )
    return effect, agent_id


def _unreached(
    conn: sqlite3.Connection, seq: int, status: str, policy: RedialPolicy | None, now: float
) -> str:
    """The callee of the current attempt was not reached: redialed when the policy says so,
    else ended."""
    attempts = conn.execute("SELECT attempts FROM requests WHERE seq = ?", (seq,)).fetchone()[0]
    redial_at = None if policy is None else policy.redial_at(attempts, now)
    if redial_at is None:
        finish(conn, seq, Outcome.UNANSWERED, {"status": status})
        return "unanswered"
    if move(conn, seq, Move.REDIAL, due_at=redial_at, status=status):
        (agent_id,) = conn.execute("SELECT agent_id FROM requests WHERE seq = ?", (seq,)).fetchone()
        tell(conn, QUEUED + agent_id)  # the daemon that holds the agent, maybe not this one
        return "redial"
    if cancelled_while_out(conn, seq):  # an operator cancelled it: no redial follows
        finish(conn, seq, Outcome.CANCELLED, {"status": status, "error": CANCELLED_IN_FLIGHT})
        return "cancelled"
    return "stale"  # it has moved on meanwhile


def settle_placed(conn: sqlite3.Connection, now: float) -> tuple[int, float | None]:
    if not chore_is_ours(conn, "settle"):
        return 0, None  # another daemon's settling now
    seqs = [
        r[0]
        for r in conn.execute(
            f"SELECT seq FROM requests WHERE state = '{State.PLACED}' AND due_at <= ?", (now,)
        )
    ]
    for seq in seqs:
        finish(conn, seq, Outcome.DIALED, {"status": None})
    next_end = conn.execute(
        f"SELECT min(due_at) FROM requests WHERE state = '{State.PLACED}'"
    ).fetchone()
    return len(seqs), next_end[0]
