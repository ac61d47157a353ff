"""An operator's control of what is queued: cancel, pause and resume, made on the ledger file
by the command line whether or not a daemon runs; a running one notices the latest control
within a second, and checks pauses and cancels again as it marks each send."""

from __future__ import annotations

import collections
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import clock
from ..config import ClusterConfig
from ..results import Outcome
from .dialect import CONTROL, dialect, tell
from .opening import open_current
from .sends import CANCELLED_ERROR, finish
from .states import NOT_PAUSED, PAUSED_AGENT, PAUSED_CAMPAIGN, Move, State

# A cancel shares the file with a running daemon: it ends requests a batch per transaction, of a
# few milliseconds, and pauses between batches for longer than SQLite's busy handler sleeps
# (after 1, 2, 5, 10 ms...), so that the daemon's writer gets in between two; a mark, made 50 ms
# ahead of its send, then waits less than that.
CANCEL_BATCH = 200
CANCEL_PAUSE_S = 0.03
IN_FLIGHT = "in flight"  # how a request that is out waits, as far as a cancel is concerned
OUT = (State.SENDING, State.PLACED)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a cancel, pause or resume is about: ids, or a campaign, or an agent."""

    ids: tuple[str, ...] = ()
    campaign: str | None = None
    agent: str | None = None

    def __str__(self) -> str:
        if self.campaign is not None:
            return f"campaign {self.campaign}"
        if self.agent is not None:
            return f"agent {self.agent}"
        return f"{len(self.ids)} id(s)"

    def where(self, conn: Any) -> tuple[str, tuple]:
        """Its condition on requests, in SQL, and the condition's parameters."""
        if self.campaign is not None:
            return "campaign = ?", (self.campaign,)
        if self.agent is not None:
            return "agent_id = ?", (self.agent,)
        return f"id IN ({dialect(conn).json_texts})", (json.dumps(self.ids),)


@dataclass
class Cancelled:
    """What a cancel did (or, dry, would do): counts by the state each request was in."""

    by_state: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0  # sent and not final yet: not recalled, but nothing follows them
    final_already: int = 0  # of the ids given
    unknown: list[str] = field(default_factory=list)  # ids the ledger has no request of

    @property
    def count(self) -> int:
        return sum(self.by_state.values())


def cancel(
    state_dir: Path,
    selection: Selection,
    dry_run: bool = False,
    cluster: ClusterConfig | None = None,
) -> Cancelled:
    """Cancel what matches `selection` and is in the ledger now. With ids given, none is
    cancelled when one is unknown (`unknown` says which)."""
    conn = open_current(state_dir, cluster)
    try:
        done, open_seqs = _look(conn, selection)
        if done.unknown or dry_run:
            return done
        seqs = list(open_seqs)
        for start in range(0, len(seqs), CANCEL_BATCH):
            if start:
                time.sleep(CANCEL_PAUSE_S)
            for seq, state in _cancel_batch(conn, seqs[start : start + CANCEL_BATCH]).items():
                _recount(done, open_seqs[seq], state)
        record(conn, "cancel", selection)
        return done
    finally:
        conn.close()


def _look(conn: sqlite3.Connection, selection: Selection) -> tuple[Cancelled, dict[int, str]]:
    """What a cancel finds, and how each open request it is about waits (IN_FLIGHT: out)."""
    where, params = selection.where(conn)
    done, seqs = Cancelled(), {}
    rows = conn.execute(
        f"SELECT seq, state, held, attempts, {NOT_PAUSED} FROM requests"
        f" WHERE {where} AND state != '{State.FINAL}'",
        params,
    )
    for seq, state, held, attempts, not_paused in rows:
        if state in (State.SENDING, State.PLACED):
            seqs[seq] = IN_FLIGHT
            done.in_flight += 1
        else:
            seqs[seq] = _waiting_as(held, attempts, not_paused)
            done.by_state[seqs[seq]] += 1
    if selection.ids:
        found = dict(
            conn.execute(f"SELECT id, state FROM requests WHERE {where}", params).fetchall()
        )
        done.unknown = [request_id for request_id in selection.ids if request_id not in found]
        done.final_already = sum(state == State.FINAL for state in found.values())
    return done, seqs


def _waiting_as(held: str | None, attempts: int, not_paused: int) -> str:
    """How a queued request waits, as `cancel` reports it."""
    if not not_paused:
        return "paused"
    if held is not None:
        return f"held for {held.replace('_', ' ')}"
    return "waiting for a redial" if attempts else "queued"


def _cancel_batch(conn: sqlite3.Connection, seqs: list[int]) -> dict[int, str]:
    """One transaction: those of `seqs` still queued end `cancelled`; those out (a lane may
    have sent one since the cancel looked) get no retry or redial. The state of each: `queued`
    for those cancelled now."""
    conn.execute(dialect(conn).begin)
    try:
        states = {}
        for seq in seqs:
            if finish(conn, seq, Outcome.CANCELLED, {"error": CANCELLED_ERROR}, Move.CANCEL):
                states[seq] = State.QUEUED  # as it was when cancelled
            else:
                (states[seq],) = conn.execute(
                    "SELECT state FROM requests WHERE seq = ?", (seq,)
                ).fetchone()
        conn.executemany(
            f"UPDATE requests SET cancelled_at = ? WHERE seq = ?"
            f" AND state IN ('{State.SENDING}', '{State.PLACED}') AND cancelled_at IS NULL",
            ((clock.now(), seq) for seq, state in states.items() if state in OUT),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return states


def _recount(done: Cancelled, waited_as: str, state: str) -> None:
    """The count of a request as the cancel found it (`waited_as`), put right by what it was
    in when its batch came (`state`): a lane may have sent it since, it may have ended by other
    means (expired), or, found out, it may have been queued again (a retry) and cancelled."""
    found_out = waited_as == IN_FLIGHT
    if state == State.QUEUED:  # cancelled
        if found_out:
            done.in_flight -= 1
            done.by_state["queued"] += 1
        return
    if not found_out:
        done.by_state[waited_as] -= 1
        done.by_state += collections.Counter()  # drop a count that fell to 0
        done.in_flight += state in OUT
    elif state not in OUT:
        done.in_flight -= 1


def pause(
    state_dir: Path, selection: Selection, cluster: ClusterConfig | None = None
) -> tuple[bool, int]:
    """A standing rule: the agent's or campaign's requests are not sent until resumed. Whether
    it was not paused before, and how many of its requests are queued now."""
    return _set_pause(state_dir, selection, True, cluster)


def resume(
    state_dir: Path, selection: Selection, cluster: ClusterConfig | None = None
) -> tuple[bool, int]:
    """The pause lifted: whether there was one, and how many of its requests are queued now."""
    return _set_pause(state_dir, selection, False, cluster)


def _set_pause(
    state_dir: Path, selection: Selection, paused: bool, cluster: ClusterConfig | None
) -> tuple[bool, int]:
    kind, name = _pause_key(selection)
    conn = open_current(state_dir, cluster)
    try:
        conn.execute(dialect(conn).begin)
        if paused:
            changed = conn.execute(
                "INSERT INTO pauses (kind, name, since) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (kind, name, clock.now()),
            ).rowcount
        else:
            changed = conn.execute(
                "DELETE FROM pauses WHERE kind = ? AND name = ?", (kind, name)
            ).rowcount
        if changed:
            record(conn, "pause" if paused else "resume", selection)
        conn.execute("COMMIT")
        where, params = selection.where(conn)
        (queued,) = conn.execute(
            f"SELECT count(*) FROM requests WHERE {where} AND state != '{State.FINAL}'"
            f" AND state = '{State.QUEUED}'",
            params,
        ).fetchone()
        return bool(changed), queued
    finally:
        conn.close()


def _pause_key(selection: Selection) -> tuple[str, str]:
    if selection.campaign is not None:
        return PAUSED_CAMPAIGN, selection.campaign
    if selection.agent is not None:
        return PAUSED_AGENT, selection.agent
    raise ValueError("a pause is of a campaign or an agent")


PAUSE_SYNC_BATCH = 1000  # requests left out of (or put back into) the due index per call


def pause_targets(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    """The campaigns whose queued requests are to be left out of the index of due requests
    (paused), and those whose requests are to be put back (resumed, or paused no more)."""
    paused = [name for (name,) in conn.execute(_PAUSED_CAMPAIGNS)]
    flagged = conn.execute(  # `!= final`: the index of open requests, by campaign
        "SELECT DISTINCT campaign FROM requests"
        f" WHERE state != '{State.FINAL}' AND state = '{State.QUEUED}' AND paused = 1"
    ).fetchall()
    return paused, [campaign for (campaign,) in flagged if campaign not in paused]


_PAUSED_CAMPAIGNS = f"SELECT name FROM pauses WHERE kind = '{PAUSED_CAMPAIGN}'"


def set_paused(conn: sqlite3.Connection, campaign: str, paused: bool) -> int:
    """Up to PAUSE_SYNC_BATCH of the campaign's queued requests left out of the index of due
    requests (or put back); how many. The campaign's index reads each batch as a range."""
    now_is = "paused IS NULL" if paused else "paused = 1"
    return conn.execute(
        "UPDATE requests SET paused = ? WHERE seq IN (SELECT seq FROM requests WHERE campaign = ?"
        f" AND state != '{State.FINAL}' AND state = '{State.QUEUED}' AND {now_is} LIMIT ?)",
        (1 if paused else None, campaign, PAUSE_SYNC_BATCH),
    ).rowcount


def last_control(conn: sqlite3.Connection) -> int:
    """The latest operator's change (a requeue, cancel, pause or resume), 0 for none: a running
    daemon reads it to notice new ones. The counter of AUTOINCREMENT: it never goes back, even
    once retention has pruned the controls."""
    row = conn.execute(dialect(conn).last_control).fetchone()
    return (row and row[0]) or 0


def record(conn: sqlite3.Connection, action: str, selection: Selection) -> None:
    """An operator's change, for a running daemon to notice."""
    conn.execute(
        "INSERT INTO controls (action, target, at) VALUES (?, ?, ?)",
        (action, str(selection), clock.now()),
    )
    tell(conn, CONTROL)
