"""`dialerd report`: final outcomes by agent, by callback status and by hour, from the ledger or
from result lines; both read the same run as the same numbers."""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .config import ClusterConfig
from .ledger.dialect import dialect, tables_version
from .ledger.opening import open_ledger
from .ledger.status import CAMPAIGNS_SINCE
from .request import parse_moment
from .results import Outcome

OUTCOMES = (
    Outcome.DIALED, Outcome.UNANSWERED, Outcome.FAILED, Outcome.INVALID, Outcome.DUPLICATE,
    Outcome.EXPIRED, Outcome.BLOCKED, Outcome.IN_DOUBT, Outcome.CANCELLED,
)  # fmt: skip
# Rejected at intake: they never reached an agent's queue, and the ledger keeps no agent for them.
NOT_QUEUED = (Outcome.INVALID, Outcome.DUPLICATE)
NOT_QUEUED_ROW = "(not queued)"
HOUR_S = 3600

# The ledger's final outcomes, counted per (outcome, agent, status, UTC hour); :start is the first
# whole second counted, as a result line's `at` has no fraction.
# (The campaign is CAST: PostgreSQL cannot tell a parameter's type from `IS NULL` alone.)
LEDGER_FINALS = """
SELECT outcome, agent_id, status, {finished_hour}, count(*) FROM requests
 WHERE outcome IS NOT NULL AND finished_at >= :start
   AND (CAST(:campaign AS TEXT) IS NULL OR campaign = :campaign) GROUP BY 1, 2, 3, 4
UNION ALL
SELECT outcome, NULL, NULL, {rejected_hour}, count(*) FROM rejects
 WHERE at >= :start AND {rejects_of_campaign} GROUP BY 1, 4
"""
REJECTS_OF_CAMPAIGN = "(CAST(:campaign AS TEXT) IS NULL OR campaign = :campaign)"
# An older ledger's refusals have no campaign.
REJECTS_BEFORE_CAMPAIGNS = "CAST(:campaign AS TEXT) IS NULL"


class Final(NamedTuple):
    """What the report counts of a final outcome."""

    outcome: str
    agent_id: str | None  # None: not queued
    status: str | None  # the callback status of an `unanswered` outcome, else None
    hour: int  # hours since the epoch, UTC


def final(outcome: str, agent_id: str | None, status: str | None, hour: int) -> Final:
    """The one rule for both sources: what of an outcome's agent and status is counted."""
    return Final(
        outcome,
        None if outcome in NOT_QUEUED else agent_id,
        status if outcome == Outcome.UNANSWERED else None,
        hour,
    )


@dataclass
class Tally:
    finals: Counter[Final] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: why it was not counted"


# -- the ledger ---------------------------------------------------------------------------------


def read_ledger(
    state_dir: Path,
    since: float | None,
    campaign: str | None = None,
    cluster: ClusterConfig | None = None,
) -> Tally | None:
    """The final outcomes in the ledger (of `campaign` only, when given), read-only, whether or
    not a daemon runs; None when there is no ledger. sqlite3.Error when it cannot be read."""
    try:
        conn = open_ledger(state_dir, cluster, read_only=True)
    except FileNotFoundError:
        return None
    try:
        parameters = {"start": _first_second(since), "campaign": campaign}
        upgraded = tables_version(conn) >= CAMPAIGNS_SINCE
        hour = dialect(conn).hour
        sql = LEDGER_FINALS.format(
            finished_hour=hour.format("finished_at"),
            rejected_hour=hour.format("at"),
            rejects_of_campaign=REJECTS_OF_CAMPAIGN if upgraded else REJECTS_BEFORE_CAMPAIGNS,
        )
        rows = conn.execute(sql, parameters).fetchall()
    finally:
        conn.close()
    tally = Tally()
    for outcome, agent_id, status, hour, count in rows:
        tally.finals[final(outcome, agent_id, status, hour)] += count
    return tally


def _first_second(since: float | None) -> int:
    """The first whole second counted: a line's `at` is at or after `since` from then on."""
    return 0 if since is None else math.ceil(since)


# -- result lines -------------------------------------------------------------------------------


def read_results(names: list[str], since: float | None, campaign: str | None = None) -> Tally:
    """The final outcomes in files of result lines ('-': stdin), of `campaign` only when given.
    A request's last line counts:
    a requeued request has two, and a crash may write a line again. A bad line is counted in
    `problems`, not fatal. OSError when a file cannot be read."""
    latest: dict[str | bytes, tuple[Final, int]] = {}  # by request id, or a rejected one's line
    tally = Tally()
    for name in names:
        for number, line in _lines(name):
            try:
                key, counted, at, of = _result(line)
            except ValueError as error:
                tally.problems.append(f"{name}:{number}: {error}")
                continue
            if campaign is None or of == campaign:
                latest[key] = (counted, at)
    start = _first_second(since)
    tally.finals.update(counted for counted, at in latest.values() if at >= start)
    return tally


def _lines(name: str) -> Iterator[tuple[int, bytes]]:
    with open(sys.stdin.fileno() if name == "-" else name, "rb", closefd=name != "-") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                yield number, line


def _result(line: bytes) -> tuple[str | bytes, Final, int, Any]:
    """A result line as (whose it is, what it counts, its whole second, its campaign);
    ValueError if bad."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ValueError("not a JSON line") from None
    if not isinstance(record, dict):
        raise ValueError("not a result: not a JSON object")
    outcome = record.get("outcome")
    if not isinstance(outcome, str) or not outcome:
        raise ValueError("not a result: no outcome")
    at = _whole_second(record.get("at"))
    if outcome in NOT_QUEUED:
        # Each is its own, whatever id it shows (any JSON an invalid request gave, or the id a
        # duplicate repeats); one written again after a crash is the same line.
        return line.strip(), final(outcome, None, None, at // HOUR_S), at, record.get("campaign")
    request_id, agent_id, status = (record.get(name) for name in ("id", "agent_id", "status"))
    if not isinstance(request_id, str) or not isinstance(agent_id, str):
        raise ValueError(f"not a result: {outcome} without an id and an agent_id")
    if not isinstance(status, str | None):
        raise ValueError("status: neither a string nor null")
    return request_id, final(outcome, agent_id, status, at // HOUR_S), at, record.get("campaign")


def _whole_second(at: Any) -> int:
    if not isinstance(at, str):
        raise ValueError("at: missing")
    try:
        return int(parse_moment(at))
    except ValueError as error:
        raise ValueError(f"at: {error}") from None


# -- the report ---------------------------------------------------------------------------------


def summarise(tally: Tally, source: str, since: float | None, campaign: str | None = None) -> dict:
    """The report as one JSON-ready object: counts per outcome, per agent (of queued requests),
    per callback status of `unanswered`, and per UTC hour."""
    outcomes: Counter[str] = Counter()
    by_agent: defaultdict[str, Counter[str]] = defaultdict(Counter)
    unanswered: Counter[str] = Counter()
    by_hour: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for (outcome, agent_id, status, hour), count in tally.finals.items():
        outcomes[outcome] += count
        if agent_id is not None:
            by_agent[agent_id][outcome] += count
        if status is not None:
            unanswered[status] += count
        by_hour[_hour_text(hour)][outcome] += count
    return {
        "source": source,
        "campaign": campaign,
        "since": None if since is None else _moment_text(since),
        "total": outcomes.total(),
        "outcomes": _in_order(outcomes),
        "by_agent": {agent: _in_order(by_agent[agent]) for agent in sorted(by_agent)},
        "unanswered_by_status": dict(sorted(unanswered.items())),
        "by_hour": {hour: _in_order(by_hour[hour]) for hour in sorted(by_hour)},
        "bad_lines": len(tally.problems),
    }


def _in_order(counts: Mapping[str, int]) -> dict[str, int]:
    """Outcomes in the contract's order, any other (from a newer version) after them."""
    known = [outcome for outcome in OUTCOMES if outcome in counts]
    return {outcome: counts[outcome] for outcome in known + sorted(set(counts) - set(known))}


def _hour_text(hour: int) -> str:
    return _moment_text(hour * HOUR_S)


def _moment_text(moment: float) -> str:
    text = dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


def report_text(report: dict) -> str:
    """The report as tables for a terminal."""
    since = f" since {report['since']}" if report["since"] else ""
    of = f" of campaign {report['campaign']}" if report.get("campaign") else ""
    heading = f"{report['total']} final outcome(s){of} in the {report['source']}{since}"
    if report["bad_lines"]:
        heading += f"; {report['bad_lines']} bad line(s) not counted"
    if not report["total"]:
        return heading
    columns = list(report["outcomes"])
    not_queued = {o: n for o, n in report["outcomes"].items() if o in NOT_QUEUED}
    agents = report["by_agent"] | ({NOT_QUEUED_ROW: not_queued} if not_queued else {})
    hours = {_hour_label(hour): counts for hour, counts in report["by_hour"].items()}
    statuses = ", ".join(f"{s} {n}" for s, n in report["unanswered_by_status"].items())
    sections = [
        heading,
        _table("agent", agents | {"all": report["outcomes"]}, columns),
        _table("hour (UTC)", hours, columns),
    ]
    if statuses:
        sections.insert(2, f"unanswered by callback status: {statuses}")
    return "\n\n".join(sections)


def _table(title: str, rows: Mapping[str, Mapping[str, int]], columns: list[str]) -> str:
    """Counts per row and outcome, with a total per row; '-' for none."""
    cells = [[title, *columns, "total"]]
    for label, counts in rows.items():
        numbers = [str(counts.get(column, "-")) for column in columns]
        cells.append([label, *numbers, str(sum(counts.values()))])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(_aligned(row, widths) for row in cells)


def _aligned(row: list[str], widths: list[int]) -> str:
    """The label to the left, the numbers to the right of their columns."""
    numbers = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
    return "  ".join([row[0].ljust(widths[0]), *numbers])


def _hour_label(hour: str) -> str:
    return hour.replace("T", " ").removesuffix(":00Z")  # 2026-11-24T12:00:00Z: 2026-11-24 12:00
