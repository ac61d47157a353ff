"""Following a long run (SPEC §8): a line every minute while there is work, per agent, and a
summary when a stdin run ends."""

from __future__ import annotations

from collections.abc import Mapping

PROGRESS_EVERY_S = 60.0

Counts = Mapping[str, tuple[int, int]]  # per agent: sends that left, calls the API placed


def progress_fields(report: dict, counts: Counts, before: Counts, seconds: float) -> dict:
    """Per agent with work queued or in flight: sent and placed so far, queued, and the rate
    achieved since the last line; {} when there is no work."""
    fields = {}
    for agent_id, (sent, placed) in counts.items():
        entry = report["agents"].get(agent_id, {})
        queued, in_flight = entry.get("queued", 0), entry.get("in_flight", 0)
        if not queued and not in_flight:
            continue
        sent_before = before.get(agent_id, (0, 0))[0]
        fields[agent_id] = {
            "sent": sent,
            "placed": placed,
            "queued": queued,
            "rate": round((sent - sent_before) / seconds, 2) if seconds > 0 else 0.0,
        }
    return fields


def summary_fields(outcomes: Mapping[str, int], counts: Counts, seconds: float) -> dict:
    """What a stdin run did: its results by outcome, its sends, and how long it took."""
    return {
        "results": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "sent": sum(sent for sent, _placed in counts.values()),
        "placed": sum(placed for _sent, placed in counts.values()),
        "seconds": round(seconds, 1),
    }
