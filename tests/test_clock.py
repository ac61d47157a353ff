"""Time that cannot jump (SPEC §8.8): the wall clock may be stepped, back or forward, between two
runs or during one; spacing is measured on the monotonic clock, and a stored moment the wall
clock has not reached yet is not waited for."""

from __future__ import annotations

import json
import sqlite3

from conftest import result_lines, run_dialerd, sim_config

NUMBERS = [f"4477009004{n:02d}" for n in range(3)]


def test_a_last_send_stored_in_the_future_does_not_stall_the_agent(tmp_path, simulator):
    """The clock was stepped back an hour since the last run: its last send now seems an hour
    ahead. The agent sends at once, at its rate, and says why it spaced from now."""
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim)
    first = run_dialerd("run", "-c", str(config), input=b'{"to": "447700900499"}\n')
    assert first.returncode == 0, first.stderr.decode()
    ledger = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3", isolation_level=None)
    ledger.execute("UPDATE agent_sends SET last_sent_at = last_sent_at + 3600")
    ledger.close()

    lines = "".join(json.dumps({"to": number}) + "\n" for number in NUMBERS).encode()
    again = run_dialerd("run", "-c", str(config), input=lines, timeout=30)
    assert again.returncode == 0, again.stderr.decode()
    assert [r["outcome"] for r in result_lines(again.stdout)] == ["dialed"] * len(NUMBERS)
    arrivals = [a for a in sim.arrivals() if a["to"] in NUMBERS]
    gaps = [b["at"] - a["at"] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(arrivals) == len(NUMBERS) and all(gap >= 0.19 for gap in gaps), gaps
    warnings = [
        json.loads(line)
        for line in again.stderr.decode().splitlines()
        if "last send recorded is ahead of the clock" in line
    ]
    assert [w["agent"] for w in warnings] == ["agent-a"]
    assert 3590 < warnings[0]["ahead_s"] <= 3600
