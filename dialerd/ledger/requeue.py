"""`dialerd requeue`: an operator's deliberate resend of sends whose answers were lost."""

from __future__ import annotations

from pathlib import Path

from .. import clock
from ..config import ClusterConfig
from ..results import Outcome
from .control import Selection, record
from .dialect import dialect, tables_version
from .opening import open_ledger
from .states import Move, move
from .status import CAMPAIGNS_SINCE, COUNTED_SINCE, SHARDED_SINCE, count_outcome

FIRST_DUE_SINCE = 5  # the schema version that keeps a request's first due time


def requeue(
    state_dir: Path, ids: list[str] | None, cluster: ClusterConfig | None = None
) -> tuple[list[str], dict[str, str]]:
    """Queue `in_doubt` requests again (all of them when `ids` is None): the operator's
    deliberate resend, recorded in the ledger. Works whether or not a daemon runs.

    Returns the ids requeued, and why each other id was not.
    """
    conn = open_ledger(state_dir, cluster)
    try:
        conn.execute(dialect(conn).begin)
        # A ledger its daemon has not upgraded yet counts no outcomes and keeps no first due
        # time: the upgrade makes them from what is there.
        version = tables_version(conn)
        counted = version >= COUNTED_SINCE
        campaigns = version >= CAMPAIGNS_SINCE
        now = clock.now()
        due_again = {"first_due_at": now} if version >= FIRST_DUE_SINCE else {}
        if campaigns:  # a cancel while its send was out is over: this is a new send
            due_again["cancelled_at"] = None
        if ids is None:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM requests WHERE outcome = ?", (Outcome.IN_DOUBT,)
                )
            ]
        requeued, refused = [], {}
        for request_id in ids:
            campaign = "campaign" if campaigns else "NULL"
            row = conn.execute(
                f"SELECT seq, outcome, error, agent_id, {campaign} FROM requests WHERE id = ?",
                (request_id,),
            ).fetchone()
            if row is None or row[1] != Outcome.IN_DOUBT:
                refused[request_id] = "no such request" if row is None else _not_in_doubt(row[1])
                continue
            seq, _outcome, error, agent_id, of = row
            moved = move(
                conn, seq, Move.REQUEUE,
                outcome=None, finished_at=None, error=None, retries=0, due_at=now, **due_again,
            )  # fmt: skip
            if moved and counted:
                sharded = version >= SHARDED_SINCE
                count_outcome(conn, agent_id, Outcome.IN_DOUBT, -1, of, sharded)
            conn.execute(
                "INSERT INTO requeues (id, previous_error, at) VALUES (?, ?, ?)",
                (request_id, error, clock.now()),
            )
            requeued.append(request_id)
        if campaigns and requeued:
            record(conn, "requeue", Selection(ids=tuple(requeued)))
        conn.execute("COMMIT")
        return requeued, refused
    finally:
        conn.close()


def _not_in_doubt(outcome: str | None) -> str:
    return f"is {outcome}, not in_doubt" if outcome else "is not final yet"
