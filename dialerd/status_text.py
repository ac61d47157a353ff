"""`dialerd status` as text: a table of agents, what waits and why, and the campaigns."""

from __future__ import annotations

import time

from .config import Config


def status_text(report: dict, config: Config) -> str:
    """The report of `dialerd status`, as a table per agent, then holds, pauses, campaigns."""
    lines = [
        f"{'agent':<24} {'rate':>4} {'achieved':>8} {'queued':>8} {'due now':>8} "
        f"{'in flight':>9} {'awaiting callback':>17} {'drains in':>9}  next due (UTC)"
    ]
    for agent_id in sorted(set(config.agents) | set(report["agents"])):
        entry = report["agents"].get(agent_id, {})
        rate = config.agents[agent_id].rate if agent_id in config.agents else None
        queued = entry.get("queued", 0)
        lines.append(
            f"{agent_id:<24} {rate or '-':>4} {entry.get('achieved_rate', 0.0):>8.2f} {queued:>8} "
            f"{entry.get('due_now', 0):>8} {entry.get('in_flight', 0):>9} "
            f"{entry.get('awaiting_callback', 0):>17} {_drains_in(queued, rate):>9}  "
            f"{_utc_time(entry.get('next_due'))}"
        )
    lines += _held_lines(report)
    lines += _paused_lines(report)
    lines += _campaign_lines(report)
    lines += _daemon_lines(report)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items())) or "none yet"
    lines.append(f"outcomes: {outcomes}")
    if report["results_unwritten"]:
        lines.append(f"results not yet written: {report['results_unwritten']}")
    return "\n".join(lines)


HELD_TEXT = {"calling_hours": "wait for the calling hours", "cap": "are over the per-number cap"}


def _held_lines(report: dict) -> list[str]:
    """Per agent, the requests waiting past their due time, and until when the first waits."""
    lines = []
    for agent_id, entry in sorted(report["agents"].items()):
        held = [
            f"{entry[f'held_{reason}']} {text} (until {_utc_time(entry[f'held_{reason}_until'])})"
            for reason, text in HELD_TEXT.items()
            if entry.get(f"held_{reason}")
        ]
        if held:
            lines.append(f"{agent_id}: " + "; ".join(held))
    return lines


def _utc_time(moment: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)) if moment else "-"


def _drains_in(queued: int, rate: int | None) -> str:
    """How long the queue takes at the agent's rate, were it all due now: an estimate."""
    if not queued or not rate:
        return "-"
    return _duration(queued / rate)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _paused_lines(report: dict) -> list[str]:
    return [
        f"paused: {pause['kind']} {pause['name']} since {_utc_time(pause['since'])}"
        for pause in report.get("paused", [])
    ]


def _daemon_lines(report: dict) -> list[str]:
    """Cluster mode: the daemons, the agents each holds, and the results each is owed."""
    lines = []
    for instance, entry in sorted(report.get("daemons", {}).items()):
        if entry["alive"]:
            said = (
                f"daemon {instance} (pid {entry['pid']}): renewed"
                f" {_utc_time(entry['renewed_at'])}; agents: {', '.join(entry['agents']) or '-'}"
            )
        else:
            said = f"daemon {instance}: not running"
        if entry["results_owed"]:
            said += f"; {entry['results_owed']} result line(s) wait for it"
        lines.append(said)
    return lines


def _campaign_lines(report: dict) -> list[str]:
    campaigns = report.get("campaigns", {})
    if not campaigns:
        return []
    lines = [
        f"{'campaign':<24} {'queued':>8} {'paused':>8} {'in flight':>9} {'placed':>8} "
        f"{'achieved':>8} {'done in':>9}  outcomes"
    ]
    for name, entry in sorted(campaigns.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(entry["outcomes"].items())) or "-"
        in_flight = entry["in_flight"] + entry["awaiting_callback"]
        lines.append(
            f"{name:<24} {entry['queued']:>8} {entry['paused']:>8} {in_flight:>9} "
            f"{entry['placed']:>8} {entry['achieved_rate']:>8.2f} {_duration(entry['eta_s']):>9}"
            f"  {outcomes}"
        )
    return lines
