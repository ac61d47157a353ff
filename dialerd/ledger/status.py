"""What `dialerd status`, `/status` and the service's STATUS= line say of the ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .. import clock
from ..config import ClusterConfig
from .dialect import POSTGRES, dialect, tables_version
from .dialect import shard as dialect_shard
from .opening import open_ledger
from .states import NOT_PAUSED, State

HELD_REASONS = ("calling_hours", "cap")  # why a queued request may wait past its own due time
RATE_OVER_S = 60.0  # the achieved rate is taken over this long
REFUSED_AT_INTAKE = ""  # the agent of outcomes counted for requests that reached no agent
COUNTED_SINCE = 4  # the schema version that counts outcomes as they are reached
CAMPAIGNS_SINCE = 7  # the schema version of pauses and counts per campaign
SHARDED_SINCE = 9  # the schema version that counts outcomes in a row per shard
PLACED = ("dialed", "unanswered")  # the outcomes of a call the API placed


def count_outcome(
    conn: sqlite3.Connection,
    agent_id: str,
    outcome: str,
    by: int = 1,
    campaign: str | None = None,
    sharded: bool = True,
) -> None:
    """One more (or `by` more; fewer when negative) of the agent's requests, and of its
    campaign's, has this outcome.

    Counted in the row of this connection's shard (a daemon's instance, in cluster mode; ''
    otherwise): daemons that counted in one row would wait on each other's group commits for
    it, and deadlock on two of them taken in opposite orders. Read as the sum over the shards.
    `sharded` False: a ledger older than SHARDED_SINCE (requeue, before its daemon upgrades it).
    """
    shard = (", shard", ", ?", (dialect_shard(conn),)) if sharded else ("", "", ())
    conn.execute(
        f"INSERT INTO outcome_counts (agent_id, outcome, count{shard[0]})"
        f" VALUES (?, ?, ?{shard[1]}) ON CONFLICT (agent_id, outcome{shard[0]})"
        " DO UPDATE SET count = outcome_counts.count + excluded.count",
        (agent_id, outcome, by, *shard[2]),
    )
    if campaign is not None:
        conn.execute(
            f"INSERT INTO campaign_counts (campaign, outcome, count, last_at{shard[0]})"
            f" VALUES (?, ?, ?, ?{shard[1]}) ON CONFLICT (campaign, outcome{shard[0]})"
            " DO UPDATE SET count = campaign_counts.count + excluded.count,"
            " last_at = excluded.last_at",
            (campaign, outcome, by, clock.now(), *shard[2]),
        )


def empty_agent_status() -> dict:
    return {
        "queued": 0,
        "due_now": 0,
        "in_flight": 0,
        "awaiting_callback": 0,
        "next_due": None,
        "achieved_rate": 0.0,  # calls placed (or awaiting an answer) per second, last minute
        **{f"held_{reason}": 0 for reason in HELD_REASONS},
        **{f"held_{reason}_until": None for reason in HELD_REASONS},
        "paused": 0,  # of the queued: not sent while its agent or campaign is paused
    }


def empty_campaign_status() -> dict:
    return {
        "queued": 0,
        "paused": 0,
        "in_flight": 0,
        "awaiting_callback": 0,
        "placed": 0,  # calls the API placed: final, or awaiting a callback
        "outcomes": {},
        "achieved_rate": 0.0,
        "eta_s": None,  # seconds until its queue is empty at the achieved rate
    }


def status_report(conn: sqlite3.Connection, now: float) -> dict:
    """Queue per agent, in flight, due times and counts per outcome, as `dialerd status` shows."""
    agents: dict[str, dict] = {}
    for agent_id, state, count, next_due in conn.execute(
        "SELECT agent_id, state, count(*), min(due_at) FROM requests"
        " WHERE state != 'final' GROUP BY agent_id, state"
    ):
        entry = agents.setdefault(agent_id, empty_agent_status())
        if state == State.QUEUED:
            entry["queued"] = count
            entry["next_due"] = next_due
        elif state == State.SENDING:
            entry["in_flight"] = count
        else:
            entry["awaiting_callback"] = count
    # `!= final`, here and below: read by the index of open requests, never among the history.
    for agent_id, due_now in conn.execute(
        "SELECT agent_id, count(*) FROM requests WHERE state != 'final' AND state = 'queued'"
        " AND due_at <= ? GROUP BY agent_id",
        (now,),
    ):
        agents[agent_id]["due_now"] = due_now
    if tables_version(conn) >= 1:  # number_calls: since version 1
        for agent_id, calls in conn.execute(
            "SELECT r.agent_id, count(*) FROM number_calls AS n JOIN requests AS r ON r.seq = n.seq"
            " WHERE n.at > ? GROUP BY r.agent_id",
            (now - RATE_OVER_S,),
        ):
            if agent_id in agents:  # the agents with open work, as the rest of the report
                agents[agent_id]["achieved_rate"] = calls / RATE_OVER_S
    if tables_version(conn) >= 1:  # else a daemon not yet upgraded
        for agent_id, reason, count, until in conn.execute(
            "SELECT agent_id, held, count(*), min(due_at) FROM requests"
            " WHERE state = 'queued' AND held IS NOT NULL GROUP BY agent_id, held"
        ):
            agents[agent_id][f"held_{reason}"] = count
            agents[agent_id][f"held_{reason}_until"] = until
    report = {
        "agents": agents,
        "outcomes": _outcomes(conn),
        "results_unwritten": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
    }
    if tables_version(conn) >= CAMPAIGNS_SINCE:
        for agent_id, count in conn.execute(
            "SELECT agent_id, count(*) FROM requests WHERE state != 'final' AND state = 'queued'"
            f" AND NOT {NOT_PAUSED} GROUP BY agent_id"
        ):
            agents[agent_id]["paused"] = count
        report["paused"] = paused(conn)
        report["campaigns"] = _campaigns(conn, now)
    if dialect(conn) is POSTGRES:
        report["daemons"] = daemons(conn)
    return report


def daemons(conn) -> dict[str, dict]:
    """Cluster mode: each daemon alive by its heartbeat, with the agents whose leases it holds
    and its last renewal (epoch seconds, by the database's clock); and each instance owed
    result lines, alive or not (they wait for it in the ledger)."""
    report = {
        instance: {
            "alive": True,
            "run": run,
            "pid": pid,
            "renewed_at": float(renewed_at),
            "agents": list(agents),
            "results_owed": 0,
        }
        for instance, run, pid, renewed_at, agents in conn.execute(
            "SELECT r.instance, r.run, r.pid, extract(epoch FROM r.renewed_at),"
            " coalesce((SELECT array_agg(l.agent_id ORDER BY l.agent_id) FROM leases AS l"
            "  WHERE l.run = r.run AND l.expires_at > clock_timestamp()), '{}')"
            " FROM runs AS r WHERE r.stopped_at IS NULL AND r.instance IS NOT NULL"
            " AND r.renewed_at + make_interval(secs => r.lease_s) > clock_timestamp()"
            " ORDER BY r.run"
        )
    }
    for instance, owed in conn.execute(
        "SELECT r.instance, count(*) FROM outbox AS o JOIN runs AS r ON r.run = o.run"
        " GROUP BY r.instance"
    ):
        entry = report.setdefault(instance, {"alive": False, "agents": []})
        entry["results_owed"] = owed
    return report


def paused(conn: sqlite3.Connection) -> list[dict]:
    """The pauses in force: kind, name, since (epoch seconds), oldest first."""
    return [
        {"kind": kind, "name": name, "since": since}
        for kind, name, since in conn.execute("SELECT kind, name, since FROM pauses ORDER BY since")
    ]


def _campaigns(conn: sqlite3.Connection, now: float) -> dict[str, dict]:
    """Per campaign with open work or outcomes: its queue, calls and outcomes, from the open
    requests and the counters."""
    campaigns: dict[str, dict] = {}
    for campaign, state, count in conn.execute(
        "SELECT campaign, state, count(*) FROM requests"
        " WHERE state != 'final' AND campaign IS NOT NULL GROUP BY campaign, state"
    ):
        entry = campaigns.setdefault(campaign, empty_campaign_status())
        key = {State.QUEUED: "queued", State.SENDING: "in_flight"}.get(state, "awaiting_callback")
        entry[key] = count
    for campaign, count in conn.execute(
        "SELECT campaign, count(*) FROM requests WHERE state = 'queued'"
        f" AND campaign IS NOT NULL AND NOT {NOT_PAUSED} GROUP BY campaign"
    ):
        campaigns[campaign]["paused"] = count
    for campaign, outcome, count in conn.execute(
        "SELECT campaign, outcome, sum(count) FROM campaign_counts GROUP BY campaign, outcome"
        " HAVING sum(count) != 0"
    ):
        campaigns.setdefault(campaign, empty_campaign_status())["outcomes"][outcome] = count
    for campaign, calls in conn.execute(
        "SELECT r.campaign, count(*) FROM number_calls AS n JOIN requests AS r ON r.seq = n.seq"
        " WHERE n.at > ? AND r.campaign IS NOT NULL GROUP BY r.campaign",
        (now - RATE_OVER_S,),
    ):
        campaigns.setdefault(campaign, empty_campaign_status())["achieved_rate"] = (
            calls / RATE_OVER_S
        )
    for entry in campaigns.values():
        entry["placed"] = entry["awaiting_callback"] + sum(
            entry["outcomes"].get(outcome, 0) for outcome in PLACED
        )
        waiting = entry["queued"] - entry["paused"]
        if waiting and entry["achieved_rate"]:
            entry["eta_s"] = waiting / entry["achieved_rate"]
    return campaigns


def _outcomes(conn: sqlite3.Connection) -> dict[str, int]:
    if tables_version(conn) < COUNTED_SINCE:
        # A ledger its daemon has not upgraded yet: counted the slow way, this once.
        sql = (
            "SELECT outcome, count(*) FROM requests WHERE outcome IS NOT NULL GROUP BY outcome"
            " UNION ALL SELECT outcome, count(*) FROM rejects GROUP BY outcome"
        )
    else:
        sql = "SELECT outcome, sum(count) FROM outcome_counts GROUP BY outcome"
    outcomes: dict[str, int] = {}
    for outcome, count in conn.execute(sql):
        if count:
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    return outcomes


def read_status(state_dir: Path, cluster: ClusterConfig | None = None) -> dict | None:
    """The status from the ledger, whether or not a daemon runs; None if there is none."""
    try:
        conn = open_ledger(state_dir, cluster, read_only=True)
    except FileNotFoundError:
        return None
    try:
        conn.execute(dialect(conn).snapshot)  # one state of the ledger throughout the report
        return status_report(conn, clock.now())
    finally:
        conn.close()


def open_requests(conn: sqlite3.Connection, instance: str | None = None) -> int:
    """Requests without a final outcome yet; of those `instance` took in (cluster mode)."""
    if instance is None:
        return conn.execute("SELECT count(*) FROM requests WHERE state != 'final'").fetchone()[0]
    return conn.execute(
        "SELECT count(*) FROM requests WHERE state != 'final'"
        " AND run IN (SELECT run FROM runs WHERE instance = ?)",
        (instance,),
    ).fetchone()[0]
