"""JSON lines on stdin, through the real `dialerd run` process and a `dialerd simulate` server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import yaml
from conftest import (
    NUMBER_OF_A,
    REPO,
    check_result_shape,
    dialerd,
    dialerd_env,
    result_lines,
    run_dialerd,
    sim_config,
)

# -- the tests ----------------------------------------------------------------------------------


def line(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_piped_requests_are_each_placed_once_and_the_run_ends(tmp_path, simulator):
    sim = simulator()
    config = sim_config(tmp_path, sim)
    requests = [
        {"id": f"req-{n}", "to": f"+44 7700 900{n:03d}", "meta": {"row": n},
         "agent_id": "agent-a" if n % 2 else "agent-b"}
        for n in range(1, 9)
    ]  # fmt: skip
    requests[0]["session_parameters"] = {"CALLER_NAME": "Diane Miller"}
    requests[0]["hangup_on_answer_machine"] = True
    stdin = b"".join(line(**request) + b"\n" for request in requests)

    started = time.monotonic()
    run = run_dialerd("run", "-c", str(config), input=stdin, timeout=30)
    elapsed = time.monotonic() - started

    assert run.returncode == 0, run.stderr.decode()
    assert b"Traceback" not in run.stderr
    results = result_lines(run.stdout)
    assert len(results) == len(requests)
    by_id = {result["id"]: result for result in results}
    arrivals = {arrival["to"]: arrival for arrival in sim.arrivals()}
    for number, request in enumerate(requests, 1):
        result = by_id[request["id"]]
        check_result_shape(result)
        to = f"447700900{number:03d}"
        assert result | {"conversation_uuid": None, "at": None} == {
            "id": request["id"], "to": to, "agent_id": request["agent_id"], "outcome": "dialed",
            "attempts": 1, "http_status": 200, "conversation_uuid": None, "status": None,
            "error": None, "meta": {"row": number}, "source": f"stdin:{number}", "campaign": None,
            "at": None,
        }  # fmt: skip
        assert result["conversation_uuid"] == arrivals[to]["conversation_uuid"]
        assert arrivals[to]["region"] == ("eu" if request["agent_id"] == "agent-a" else "us")
    assert sim.placed() == Counter(f"447700900{n:03d}" for n in range(1, 9))
    assert len(sim.arrivals()) == len(requests)
    assert arrivals["447700900001"]["body"] == {
        "to": "447700900001", "agent_id": "agent-a", "hangup_on_answer_machine": True,
        "session_parameters": [{"name": "CALLER_NAME", "value": "Diane Miller"}],
    }  # fmt: skip
    assert elapsed < 15  # 4 per agent at 5/s: the run ends as soon as all are final


# (line, expectation): "good", None (blank: no result), or (outcome, text the error names)
GOOD_64K_PREFIX = b'{"id": "good-5", "to": "447700900105", "meta": {"pad": "'
GOOD_64K = GOOD_64K_PREFIX + b"x" * (64 * 1024 - len(GOOD_64K_PREFIX) - 3) + b'"}}'
MIXED_LINES: list[tuple[bytes, Any]] = [
    (line(id="good-1", to="+44 7700 900101", meta={"row": 1}), "good"),
    (b'{"to": ', ("invalid", "")),  # not JSON
    (b'[{"to": "447700900160"}]', ("invalid", "")),  # not an object
    (b"42", ("invalid", "")),  # not an object
    (line(to="447700900161", colour="blue", meta={"row": 5}), ("invalid", "colour")),
    (line(id="no-to", meta={"row": 6}), ("invalid", "to")),
    (line(to="+44 12"), ("invalid", "to")),  # not a possible number
    (line(to="sip:nobody"), ("invalid", "to")),
    (line(id="has space", to="447700900162"), ("invalid", "id")),
    (line(id="x" * 129, to="447700900163"), ("invalid", "id")),
    (line(id="good-1", to="447700900164"), ("duplicate", "good-1")),
    (line(agent_id="nobody", to="447700900165"), ("invalid", "agent_id")),
    (line(to="447700900166", **{"from": "447700900999"}), ("invalid", "from")),
    (line(to="447700900167", session_parameters=[{"name": "A"}]), ("invalid", "session_param")),
    (line(to="447700900168", session_parameters="A=1"), ("invalid", "session_param")),
    (line(to="447700900169", not_before="tomorrow"), ("invalid", "not_before")),
    (line(to="447700900170", expires_at="2030-01-01T00:00:00"), ("invalid", "expires_at")),
    (line(to="447700900171", meta=[1, 2]), ("invalid", "meta")),
    (line(to="447700900172", hangup_on_answer_machine="yes"), ("invalid", "hangup")),
    (b"", None),
    (b"   \t", None),
    (b'{"to": "447700900173", "meta": {"pad": "' + b"x" * 70_000 + b'"}}', ("invalid", "")),
    (b'{"to": "447700900177", "meta": {"pad": "' + b"y" * 300_000 + b'"}}', ("invalid", "")),
    (b'{"to": "447700900174", "meta": {"name": "Jos\xe9"}}', ("invalid", "")),  # Latin-1
    (b'{"to": "447700900175"}\x00', ("invalid", "")),
    (b'{"to": "447700900176", "meta": {"n": "a\x00b"}}', ("invalid", "")),
    (line(to="447700900178", agent_id="agent-a", **{"from": NUMBER_OF_A}), ("invalid", "from")),
    (line(to="447700900179", not_before="2030-01-02T00:00:00Z",
          expires_at="2030-01-01T00:00:00Z"), ("invalid", "expires_at")),
    (line(id="good-2", to="447700900102", **{"from": "+44 7700 900000"}), "good"),
    (line(id="good-3", agent_id="agent-b", to="sip:alice@example.com"), "good"),
    (line(to="(+44) 7700-900.104", hangup_on_answer_machine=False,
          session_parameters=[{"name": "CALLER_NAME", "value": "Diane"}],
          not_before="2020-01-01T00:00:00Z", expires_at="2099-01-01T00:00:00+01:00"), "good"),
    (GOOD_64K, "good"),  # exactly 64 KiB: not longer than the limit
    (line(id="good-6", to="447700900106"), "good"),  # the last line, with no newline after it
]  # fmt: skip
GOOD_TO = {"447700900101", "447700900102", "sip:alice@example.com", "447700900104",
           "447700900105", "447700900106"}  # fmt: skip


def test_bad_lines_each_get_a_result_and_never_stop_the_good_ones(tmp_path, simulator):
    assert len(GOOD_64K) == 64 * 1024
    sim = simulator("--default-rate", "5")  # a `from` request is counted for the number itself
    config = sim_config(tmp_path, sim)
    stdin = b"\n".join(text for text, _ in MIXED_LINES)  # no newline after the last line

    run = run_dialerd("run", "-c", str(config), input=stdin, timeout=30)

    assert run.returncode == 0, run.stderr.decode()
    assert b"Traceback" not in run.stderr
    results = result_lines(run.stdout)
    for result in results:
        check_result_shape(result)
    by_source = {result["source"]: result for result in results}
    assert len(by_source) == len(results), "one result per line"
    expected_sources = {f"stdin:{n}" for n, (_, want) in enumerate(MIXED_LINES, 1) if want}
    assert set(by_source) == expected_sources  # blank lines give none
    for number, (text, want) in enumerate(MIXED_LINES, 1):
        if want is None:
            continue
        result = by_source[f"stdin:{number}"]
        if want == "good":
            assert result["outcome"] == "dialed", (number, result)
            assert result["attempts"] == 1 and result["http_status"] == 200, result
            continue
        outcome, named = want
        assert result["outcome"] == outcome, (number, text[:80], result)
        assert result["attempts"] == 0 and result["http_status"] is None, result
        assert result["error"], (number, result)
        assert named in result["error"], (number, result)
    duplicate = by_source["stdin:11"]
    assert duplicate["id"] == "good-1" and duplicate["to"] == "447700900164"
    assert by_source["stdin:5"]["meta"] == {"row": 5}  # meta kept even in an invalid result
    assert by_source["stdin:6"]["id"] == "no-to"
    assert by_source["stdin:1"]["meta"] == {"row": 1}
    # Every good one placed once; nothing else was even sent.
    assert sim.placed() == Counter(GOOD_TO)
    assert {arrival["to"] for arrival in sim.arrivals()} == GOOD_TO
    assert len(sim.arrivals()) == len(GOOD_TO)
    bodies = {arrival["to"]: arrival["body"] for arrival in sim.arrivals()}
    assert bodies["447700900102"] == {"to": "447700900102", "from": NUMBER_OF_A}
    assert bodies["447700900104"] == {
        "to": "447700900104", "agent_id": "agent-a", "hangup_on_answer_machine": False,
        "session_parameters": [{"name": "CALLER_NAME", "value": "Diane"}],
    }  # fmt: skip
    sip = next(a for a in sim.arrivals() if a["to"] == "sip:alice@example.com")
    assert sip["region"] == "us" and sip["body"]["agent_id"] == "agent-b"


def test_a_bom_opening_stdin_is_read_even_split_across_reads(tmp_path, simulator):
    """Editors and PowerShell's pipes start a stream with a UTF-8 BOM; only there is it one."""
    sim = simulator()
    config = sim_config(tmp_path, sim)
    first, second = line(id="bom-1", to="447700900401"), line(id="bom-2", to="447700900402")
    run = dialerd("run", "-c", str(config), stdin=subprocess.PIPE)
    for piece in (b"\xef", b"\xbb", b"\xbf" + first + b"\n", b"\xef\xbb\xbf" + second + b"\n"):
        run.stdin.write(piece)
        run.stdin.flush()
        time.sleep(0.3)  # each piece its own read
    stdout, stderr = run.communicate(timeout=30)

    assert run.returncode == 0, stderr.decode()
    by_source = {result["source"]: result for result in result_lines(stdout)}
    assert (by_source["stdin:1"]["id"], by_source["stdin:1"]["outcome"]) == ("bom-1", "dialed")
    assert by_source["stdin:2"]["outcome"] == "invalid"  # a BOM inside the stream is not one
    assert sim.placed() == Counter({"447700900401": 1})


def test_results_to_a_configured_file_are_appended_not_printed(tmp_path, simulator):
    sim = simulator()
    results_file = tmp_path / "out" / "results.jsonl"
    results_file.parent.mkdir()
    earlier = '{"id": "from-an-earlier-run"}\n'
    results_file.write_text(earlier)
    config = sim_config(tmp_path, sim, results=str(results_file))
    stdin = line(id="r1", to="447700900201") + b"\n" + b"not json\n"

    run = run_dialerd("run", "-c", str(config), input=stdin, timeout=30)

    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b""
    text = results_file.read_text()
    assert text.startswith(earlier)
    results = result_lines(text[len(earlier) :])
    assert sorted((r["source"], r["outcome"]) for r in results) == [
        ("stdin:1", "dialed"), ("stdin:2", "invalid"),
    ]  # fmt: skip
    assert sim.placed() == Counter({"447700900201": 1})


def test_a_second_daemon_on_the_same_state_dir_says_so_and_exits(tmp_path, simulator, daemons):
    sim = simulator()
    config = sim_config(tmp_path, sim)
    first = daemons("-c", str(config), stdin=subprocess.PIPE)  # stdin open: it keeps running
    first.wait_running()

    second = run_dialerd(
        "run", "-c", str(config), input=line(id="s1", to="447700900301"), timeout=20
    )

    assert second.returncode != 0
    assert first.proc.poll() is None, "the first daemon keeps running"
    message = second.stderr.decode()
    assert "another dialerd" in message and str(first.proc.pid) in message, message
    assert str(tmp_path / "state") in message
    assert second.stdout == b""
    # The first one is undisturbed: it still takes and sends requests.
    first.proc.stdin.write(line(id="f1", to="447700900302") + b"\n")
    first.proc.stdin.close()
    assert first.proc.wait(timeout=20) == 0, first.stderr
    assert [(r["id"], r["outcome"]) for r in result_lines(first.stdout)] == [("f1", "dialed")]
    assert sim.placed() == Counter({"447700900302": 1})


def test_the_demo_runs_on_the_built_in_simulator(tmp_path):
    demo = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    demo["state_dir"] = str(tmp_path / "demo-state")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(demo))
    requests = tmp_path / "requests.jsonl"
    shutil.copy(REPO / "examples" / "requests.jsonl", requests)
    env = {k: v for k, v in dialerd_env().items() if k != "VGAI_KEY"}  # no account needed

    with open(requests, "rb") as stdin:
        run = subprocess.run(
            [sys.executable, "-m", "dialerd", "run", "--simulate", "--latency", "0.01-0.05",
             "-c", str(config)],
            stdin=stdin, capture_output=True, timeout=30, env=env, cwd=tmp_path,
        )  # fmt: skip

    assert run.returncode == 0, run.stderr.decode()
    results = result_lines(run.stdout)
    for result in results:
        check_result_shape(result)
    by_source = {result["source"]: result for result in results}
    assert len(results) == 19 == len(by_source)
    for row in range(1, 16):
        result = by_source[f"stdin:{row}"]
        agent = "demo-us" if row % 3 == 0 else "demo-eu"
        assert (result["id"], result["to"], result["agent_id"], result["outcome"]) == (
            f"demo-{row}", f"4477009000{row:02d}", agent, "dialed",
        )  # fmt: skip
        assert result["attempts"] == 1 and result["meta"] == {"row": row}
        assert result["conversation_uuid"]
    assert [by_source[f"stdin:{n}"]["outcome"] for n in (16, 17, 18, 19)] == [
        "invalid", "invalid", "invalid", "duplicate",
    ]  # fmt: skip
    assert "colour" in by_source["stdin:17"]["error"]
    assert by_source["stdin:16"]["meta"] == {"row": 16}
    assert by_source["stdin:19"]["id"] == "demo-1"
    assert not (tmp_path / ".demo-state").exists()
