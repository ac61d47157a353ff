"""`dialerd report`: final outcomes by agent, by callback status and by hour, from the ledger and
from result lines (SPEC §2, §6); the two read the same run as the same numbers."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import AGENTS, NUMBER_OF_A, read_results, run_dialerd, wait_for, write_config

from dialerd.cli import main

QUEUED = ("dialed", "unanswered", "failed", "expired", "blocked", "in_doubt")
DNC_NUMBER = "447700900199"
PAST = "2020-01-01T00:00:00+01:00"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moment(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def expected_report(results: list[dict], since: str | None = None) -> dict:
    """The report's numbers, counted straight from result lines (one per request)."""
    chosen = [r for r in results if since is None or moment(r["at"]) >= moment(since)]
    by_agent: defaultdict[str, Counter] = defaultdict(Counter)
    by_hour: defaultdict[str, Counter] = defaultdict(Counter)
    for result in chosen:
        if result["outcome"] in QUEUED:
            by_agent[result["agent_id"]][result["outcome"]] += 1
        by_hour[result["at"][:13] + ":00:00Z"][result["outcome"]] += 1
    unanswered = Counter(r["status"] for r in chosen if r["outcome"] == "unanswered")
    return {
        "total": len(chosen),
        "outcomes": dict(Counter(r["outcome"] for r in chosen)),
        "by_agent": {agent: dict(counts) for agent, counts in by_agent.items()},
        "unanswered_by_status": dict(unanswered),
        "by_hour": {hour: dict(counts) for hour, counts in by_hour.items()},
        "bad_lines": 0,
    }


def report(*args: str) -> dict:
    """`dialerd report --json ARGS` as the real process prints it, less where it read from."""
    done = run_dialerd("report", "--json", *args, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    numbers = json.loads(done.stdout)
    assert numbers.pop("source") in ("ledger", "results")
    numbers.pop("since")
    numbers.pop("campaign")
    return numbers


# -- the real daemon, its ledger and its results ---------------------------------------------------


def request_lines() -> list[bytes]:
    """Requests for every outcome a run on the simulator can give, and bad lines."""
    good = [
        {"id": f"ok-{n}", "to": f"4477009001{n:02d}", "agent_id": ("agent-a", "agent-b")[n % 2]}
        for n in range(20)
    ]
    good.append({"id": "by-number", "to": "447700900150", "from": NUMBER_OF_A})
    others = [
        {"id": "ok-1", "to": "447700900160"},  # duplicate
        {"id": "ok-2", "to": "447700900161", "agent_id": "agent-b"},  # duplicate
        {"id": "late-1", "to": "447700900162", "expires_at": PAST},
        {"id": "late-2", "to": "447700900163", "agent_id": "agent-b", "expires_at": PAST},
        {"id": "listed", "to": "+44 7700 900199"},  # blocked
        {"id": "bad-to", "to": "not a number"},
        {"to": "447700900164", "colour": "blue"},
        {"to": "447700900165", "agent_id": "nobody"},
    ]
    return [json.dumps(r).encode() for r in good + others] + [b'{"to": ', b"42"]


def run_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config for `run --simulate` with callbacks and a do-not-call list; and its results."""
    port = free_port()
    (tmp_path / "dnc.txt").write_text(f"+{DNC_NUMBER}\n")
    results = tmp_path / "results.jsonl"
    config = write_config(
        tmp_path,
        AGENTS,
        api={"key_env": "VGAI_KEY", "timeout_s": 1},  # a hung send is in_doubt after 1 s
        default_agent="agent-a",
        callbacks={"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}",
                   "wait_s": 1},
        dnc_file=str(tmp_path / "dnc.txt"),
        results=str(results),
    )  # fmt: skip
    return config, results


def test_the_report_counts_what_the_results_say(tmp_path, daemons):
    config, results_file = run_config(tmp_path)
    lines = request_lines()
    daemon = daemons(
        "--simulate", "-c", str(config), "--latency", "0.01-0.05", "--hang-rate", "0.1",
        "--unreached", "busy=0.3", "--unreached", "timeout=0.2", "--callback-delay", "0.05-0.2",
        stdin=subprocess.PIPE,
    )  # fmt: skip
    daemon.proc.stdin.write(b"".join(line + b"\n" for line in lines))
    daemon.proc.stdin.flush()
    wait_for(lambda: len(read_results(results_file)) == len(lines), 40, "every result")
    results = read_results(results_file)
    outcomes = Counter(r["outcome"] for r in results)
    assert {"dialed", "unanswered", "invalid", "duplicate", "expired", "blocked"} <= set(outcomes)
    assert (outcomes["invalid"], outcomes["duplicate"], outcomes["expired"]) == (5, 2, 2)
    expected = expected_report(results)
    assert sum(expected["unanswered_by_status"].values()) == outcomes["unanswered"]

    # While the daemon runs (stdin still open), and after it has ended.
    assert report("-c", str(config)) == expected
    assert report("--results", str(results_file)) == expected
    daemon.proc.stdin.close()
    assert daemon.proc.wait(timeout=30) == 0, daemon.stderr
    assert report("-c", str(config)) == expected

    # --since: both count whole seconds, as a result line's `at` has them.
    middle = sorted(r["at"] for r in results)[len(results) // 2]
    for since in (middle, middle.replace("Z", ".5+00:00"), "2999-01-01T00:00:00+02:00"):
        expected = expected_report(results, since)
        assert report("-c", str(config), "--since", since) == expected
        assert report("--results", str(results_file), "--since", since) == expected
    assert expected["total"] == 0


def test_the_text_report_of_a_run(tmp_path):
    config, results_file = run_config(tmp_path)
    lines = b"".join(line + b"\n" for line in request_lines())
    done = run_dialerd("run", "--simulate", "-c", str(config), input=lines, timeout=60)
    assert done.returncode == 0, done.stderr
    results = read_results(results_file)

    shown = run_dialerd("report", "-c", str(config), timeout=30)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert text.startswith(f"{len(results)} final outcome(s) in the ledger\n")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line}
    assert rows["all"][-1] == str(len(results))
    for agent in ("agent-a", "agent-b"):
        queued = [r for r in results if r["agent_id"] == agent and r["outcome"] in QUEUED]
        assert rows[agent][-1] == str(len(queued))
    assert "(not queued)" in text


# -- result lines -------------------------------------------------------------------------------


def result(outcome: str, at: str, **fields) -> str:
    line = {"id": None, "to": "447700900123", "agent_id": None, "outcome": outcome, "attempts": 0,
            "http_status": None, "conversation_uuid": None, "status": None, "error": None,
            "meta": None, "source": "stdin:1", "at": at} | fields  # fmt: skip
    return json.dumps(line)


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


LINES = [
    result("dialed", "2026-11-24T12:59:59Z", id="a", agent_id="agent-a", attempts=1),
    result("unanswered", "2026-11-24T13:00:00Z", id="b", agent_id="agent-a", status="busy"),
    result("unanswered", "2026-11-24T13:10:00Z", id="c", agent_id="agent-b", status="timeout"),
    result("in_doubt", "2026-11-24T13:20:00Z", id="d", agent_id="agent-b"),
    result("invalid", "2026-11-24T13:30:00Z", error="to: required", source="stdin:7"),
    result("invalid", "2026-11-24T13:30:00Z", error="to: required", source="stdin:8"),
    result("duplicate", "2026-11-24T13:30:00Z", id="a", agent_id="agent-a", source="stdin:9"),
    result("invalid", "2026-11-24T13:40:00Z", id=42, agent_id=[5], error="id: 42 is not…"),
    result("dialed", "2026-11-24T14:05:00Z", id="d", agent_id="agent-b", attempts=1),  # requeued
]


def test_a_request_counts_once_by_its_last_line(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    repeated = LINES[:7] + LINES[5:7] + LINES[7:]  # a crash wrote the lines of 6 and 7 again
    path.write_text("\n".join(repeated) + "\n")
    code, out, err = in_process(capsys, "--json", "--results", str(path))
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "source": "results",
        "campaign": None,
        "since": None,
        "total": 8,
        "outcomes": {"dialed": 2, "unanswered": 2, "invalid": 3, "duplicate": 1},
        "by_agent": {"agent-a": {"dialed": 1, "unanswered": 1},
                     "agent-b": {"dialed": 1, "unanswered": 1}},
        "unanswered_by_status": {"busy": 1, "timeout": 1},
        "by_hour": {
            "2026-11-24T12:00:00Z": {"dialed": 1},
            "2026-11-24T13:00:00Z": {"unanswered": 2, "invalid": 3, "duplicate": 1},
            "2026-11-24T14:00:00Z": {"dialed": 1},
        },
        "bad_lines": 0,
    }  # fmt: skip


def test_the_text_report(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    code, out, err = in_process(capsys, "--results", str(path))
    assert (code, err) == (0, "")
    assert out == (
        "8 final outcome(s) in the results\n"
        "\n"
        "agent         dialed  unanswered  invalid  duplicate  total\n"
        "agent-a            1           1        -          -      2\n"
        "agent-b            1           1        -          -      2\n"
        "(not queued)       -           -        3          1      4\n"
        "all                2           2        3          1      8\n"
        "\n"
        "unanswered by callback status: busy 1, timeout 1\n"
        "\n"
        "hour (UTC)        dialed  unanswered  invalid  duplicate  total\n"
        "2026-11-24 12:00       1           -        -          -      1\n"
        "2026-11-24 13:00       -           2        3          1      6\n"
        "2026-11-24 14:00       1           -        -          -      1\n"
    )


def test_since_counts_whole_seconds(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    for since, total in [
        ("2026-11-24T12:59:59Z", 8),
        ("2026-11-24T12:59:59.5Z", 7),  # 12:59:59 is before it
        ("2026-11-24T15:00:00+02:00", 7),
        ("2026-11-24T14:05:01Z", 0),
    ]:
        code, out, _err = in_process(capsys, "--json", "--since", since, "--results", str(path))
        assert code == 0
        assert json.loads(out)["total"] == total, since
        assert json.loads(out)["since"] == moment(since).astimezone(dt.UTC).isoformat(
            timespec="seconds"
        ).replace("+00:00", "Z")


def test_bad_lines_are_counted_and_named_not_fatal(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    noon = "2026-11-24T12:00:00Z"
    bad = [
        "{not json",
        "[1, 2]",
        json.dumps({"id": "x", "at": noon}),
        result("dialed", "yesterday", id="y"),
        result("dialed", noon.removesuffix("Z")),
        result("dialed", noon),
        "\xff",
        "[" * 100_000,
        result("unanswered", noon, id="z", agent_id="a", status=1),
    ]
    path.write_bytes(("\n".join([LINES[0], "", *bad, LINES[1]]) + "\n").encode("latin-1"))
    code, out, err = in_process(capsys, "--json", "--results", str(path))
    assert code == 0
    numbers = json.loads(out)
    assert (numbers["total"], numbers["bad_lines"]) == (2, 9)
    problems = err.splitlines()
    assert [line.split(": ", 1)[0] for line in problems] == [f"{path}:{n}" for n in range(3, 12)]
    assert "not a JSON line" in problems[0] and "no outcome" in problems[2]
    assert "at: 'yesterday' is not an ISO 8601 time" in problems[3]
    assert "no UTC offset" in problems[4] and "without an id" in problems[5]
    assert "not a JSON line" in problems[7] and "status: " in problems[8]

    code, out, _err = in_process(capsys, "--results", str(path))
    assert out.startswith("2 final outcome(s) in the results; 9 bad line(s) not counted\n")


def test_several_files_and_stdin(tmp_path, capsys, monkeypatch):
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    first.write_text("\n".join(LINES[:4]) + "\n")
    second.write_text("\n".join(LINES[4:]) + "\n")
    code, out, _err = in_process(capsys, "--json", "--results", str(first), str(second))
    assert code == 0
    assert json.loads(out)["outcomes"] == {"dialed": 2, "unanswered": 2, "invalid": 3,
                                           "duplicate": 1}  # fmt: skip
    done = run_dialerd("report", "--json", "--results", "-", input=first.read_bytes())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == 4


# -- what cannot be reported -----------------------------------------------------------------------


def test_no_ledger_yet(tmp_path, capsys):
    config = write_config(tmp_path)
    code, out, err = in_process(capsys, "-c", str(config), "--json")
    assert code == 0
    assert err == f"dialerd: no ledger in {tmp_path / 'state'}: nothing recorded yet\n"
    assert json.loads(out)["total"] == 0 and json.loads(out)["source"] == "ledger"


def test_a_ledger_that_is_not_one(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.sqlite3").write_bytes(b"not a database, just bytes" * 100)
    code, _out, err = in_process(capsys, "-c", str(config))
    assert code == 65
    assert err.startswith("dialerd: cannot read the ledger ") and err.count("\n") == 1


def test_a_ledger_that_cannot_be_opened(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "state" / "ledger.sqlite3").mkdir(parents=True)
    code, _out, err = in_process(capsys, "-c", str(config))
    assert code == 66
    assert err.startswith("dialerd: cannot read the ledger ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "code", "complaint"),
    [
        (["--since", "yesterday"], 64, "report: --since: 'yesterday' is not an ISO 8601 time"),
        (["--since", "2026-11-24T12:00:00"], 64, "has no UTC offset"),
        (["--results"], 64, "--results"),
        (["--results", "/nonexistent/results.jsonl"], 66, "cannot read /nonexistent/results"),
    ],
)
def test_usage_and_input_errors(capsys, args, code, complaint):
    got, out, err = in_process(capsys, *args)
    assert got == code
    assert out == ""
    assert complaint in err


def test_bad_config(tmp_path, capsys):
    path = write_config(tmp_path, {"a": {"region": "mars", "rate": 1}})
    code, _out, err = in_process(capsys, "-c", str(path))
    assert code == 78
    assert "agents.a.region" in err


def test_the_ledger_is_counted_by_hour_alike_on_either_engine(ledger_conn, ledger_where):
    """A request ended in the last second of an hour is of that hour (CAST on PostgreSQL
    rounds; the report floors), and the campaign picks alike on both engines."""
    from test_request import CONFIG

    from dialerd.ledger.intake import add
    from dialerd.ledger.sends import finish
    from dialerd.report import Final, read_ledger
    from dialerd.request import build_request

    fields = [({"id": "a", "campaign": "spring"}, 7 * 3600 + 3599.6), ({"id": "b"}, 8 * 3600)]
    for given, ended_at in fields:
        request = build_request({"to": "+447700900123", **given}, CONFIG, "test:1")
        add(ledger_conn, 1, [request], [], None, 0)
        (seq,) = ledger_conn.execute(
            "SELECT seq FROM requests WHERE id = ?", (given["id"],)
        ).fetchone()
        finish(ledger_conn, seq, "dialed", {})
        ledger_conn.execute("UPDATE requests SET finished_at = ? WHERE seq = ?", (ended_at, seq))
    state_dir, cluster = ledger_where
    every = read_ledger(state_dir, None, None, cluster).finals
    assert every == {
        Final("dialed", "agent-eu", None, 7): 1,
        Final("dialed", "agent-eu", None, 8): 1,
    }
    spring = read_ledger(state_dir, None, "spring", cluster).finals
    assert spring == {Final("dialed", "agent-eu", None, 7): 1}
