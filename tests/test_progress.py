"""Following a long run (SPEC §8): a progress line per minute while there is work, and a summary
when a stdin run ends."""

from __future__ import annotations

import json

from conftest import run_dialerd, sim_config

from dialerd.progress import progress_fields, summary_fields


def test_the_progress_line_names_each_agent_with_work_and_its_achieved_rate():
    report = {
        "agents": {
            "busy": {"queued": 40, "in_flight": 1},
            "draining": {"queued": 0, "in_flight": 2},
            "idle": {"queued": 0, "in_flight": 0},
        }
    }
    counts = {"busy": (300, 290), "draining": (12, 12), "idle": (5, 5), "new": (0, 0)}
    before = {"busy": (0, 0), "draining": (0, 0), "idle": (5, 5)}
    assert progress_fields(report, counts, before, 60.0) == {
        "busy": {"sent": 300, "placed": 290, "queued": 40, "rate": 5.0},
        "draining": {"sent": 12, "placed": 12, "queued": 0, "rate": 0.2},
    }
    idle = {"agents": {"idle": {"queued": 0, "in_flight": 0}}}
    assert progress_fields(idle, counts, before, 60.0) == {}  # no work, no line


def test_a_summary_sums_a_run():
    fields = summary_fields({"dialed": 8, "invalid": 1, "blocked": 1}, {"a": (9, 8)}, 12.34)
    assert fields == {
        "results": 10,
        "outcomes": {"blocked": 1, "dialed": 8, "invalid": 1},
        "sent": 9,
        "placed": 8,
        "seconds": 12.3,
    }


def test_a_stdin_run_ends_with_one_summary_line(tmp_path, simulator):
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim)
    lines = (
        b"".join(json.dumps({"to": f"4477009006{n:02d}"}).encode() + b"\n" for n in range(4))
        + b"not json\n"
    )
    done = run_dialerd("run", "-c", str(config), input=lines)
    assert done.returncode == 0, done.stderr.decode()
    logged = [json.loads(line) for line in done.stderr.decode().splitlines() if line[:1] == "{"]
    (summary,) = [line for line in logged if line["event"] == "summary"]
    assert summary["level"] == "info"
    assert (summary["results"], summary["outcomes"]) == (5, {"dialed": 4, "invalid": 1})
    assert (summary["sent"], summary["placed"]) == (4, 4)
    assert [line["event"] for line in logged][-2:] == ["summary", "stopped"]
