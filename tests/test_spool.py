"""The spool directory, through the real `dialerd run` process (stdin /dev/null: it runs until
SIGTERM) and a `dialerd simulate` server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import (
    check_result_shape,
    dialerd_env,
    read_results,
    run_dialerd,
    sim_config,
    wait_for,
)

PICKUP_S = 3.0  # a file renamed into incoming/ is taken within this


def spool_config(tmp_path: Path, sim, **top) -> Path:
    return sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")}, **top)


def drop(tmp_path: Path, name: str, data: bytes | str) -> Path:
    """Write aside on the same filesystem, then rename into incoming/ as a writer must."""
    if isinstance(data, str):
        data = data.encode()
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    aside = tmp_path / f"writing-{name}"
    aside.write_bytes(data)
    os.rename(aside, incoming / name)
    return incoming / name


def wait_taken(tmp_path: Path, name: str, where: str = "done") -> float:
    """Seconds until incoming/NAME has moved to done/ (or rejected/), failing after PICKUP_S."""
    started = time.monotonic()
    spool = tmp_path / "spool"
    wait_for(
        lambda: (spool / where / name).exists() and not (spool / "incoming" / name).exists(),
        PICKUP_S,
        f"{name} to move to {where}/",
    )
    return time.monotonic() - started


def wait_results(results: Path, count: int, timeout: float = 15) -> list[dict]:
    return wait_for(
        lambda: len(r := read_results(results)) >= count and r,
        timeout,
        f"{count} results in {results}",
    )


def status_json(config: Path) -> dict:
    status = run_dialerd("status", "-c", str(config), "--json", timeout=20)
    assert status.returncode == 0, status.stderr.decode()
    return json.loads(status.stdout)


def request(id_: str, number: int, **fields) -> dict:
    return {"id": id_, "to": f"447700900{number:03d}", **fields}


def test_each_file_form_is_taken_and_its_requests_placed(tmp_path, simulator, daemons):
    sim = simulator()
    config = spool_config(tmp_path, sim)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    batch = "".join(json.dumps(request(f"b{n}", 410 + n)) + "\n" for n in range(1, 4))
    files = {
        "one.json": json.dumps(request("o1", 401, meta={"k": "v"})),  # no newline at the end
        "pretty.json": json.dumps(request("p1", 402, agent_id="agent-b"), indent=2),
        "array.json": json.dumps([request("a1", 403), request("a2", 404)], indent=2),
        "batch.jsonl": batch,
    }

    for name, text in files.items():
        drop(tmp_path, name, text)
        wait_taken(tmp_path, name)  # within PICKUP_S of its rename
    results = wait_results(tmp_path / "state" / "results.jsonl", 7)

    item_lines = [n for n, line in enumerate(files["array.json"].splitlines(), 1) if line == "  {"]
    assert sorted((r["source"], r["id"], r["outcome"]) for r in results) == [
        (f"spool:array.json:{item_lines[0]}", "a1", "dialed"),
        (f"spool:array.json:{item_lines[1]}", "a2", "dialed"),
        ("spool:batch.jsonl:1", "b1", "dialed"), ("spool:batch.jsonl:2", "b2", "dialed"),
        ("spool:batch.jsonl:3", "b3", "dialed"), ("spool:one.json:1", "o1", "dialed"),
        ("spool:pretty.json:1", "p1", "dialed"),
    ]  # fmt: skip
    for result in results:
        check_result_shape(result)
        assert result["attempts"] == 1 and result["http_status"] == 200
    assert next(r for r in results if r["id"] == "o1")["meta"] == {"k": "v"}
    assert next(r for r in results if r["id"] == "p1")["agent_id"] == "agent-b"
    assert sorted(os.listdir(tmp_path / "spool" / "done")) == sorted(files)  # no .errors
    assert os.listdir(tmp_path / "spool" / "incoming") == []
    assert os.listdir(tmp_path / "spool" / "rejected") == []
    assert sim.placed() == Counter(f"447700900{n}" for n in (401, 402, 403, 404, 411, 412, 413))
    code, _ = daemon.stop()
    assert code == 0, daemon.stderr
    assert daemon.stdout == ""  # results went to STATE_DIR/results.jsonl, not stdout
    assert "Traceback" not in daemon.stderr


def test_bad_files_are_rejected_and_bad_lines_reported(tmp_path, simulator, daemons):
    sim = simulator()
    config = spool_config(tmp_path, sim)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    mixed = [
        json.dumps(request("m1", 501, meta={"row": 1})),
        "nope, not JSON",
        json.dumps({"id": "m3", "to": "12"}),
        "",
        json.dumps(request("m5", 505, colour="blue")),
        json.dumps(request("m6", 506)),
    ]
    dot = drop(tmp_path, ".hidden.jsonl", json.dumps(request("h1", 599)) + "\n")
    rejected = {
        "notjson.txt": b"this is not JSON\nnor is this\n",
        "latin1.jsonl": b'{"id": "l1", "to": "447700900520", "meta": {"n": "Jos\xe9"}}\n',
        "nul.jsonl": json.dumps(request("n1", 521)).encode() + b"\n\x00\n",
    }

    for name, data in rejected.items():
        drop(tmp_path, name, data)
        wait_taken(tmp_path, name, "rejected")
    drop(tmp_path, "mixed.jsonl", "\n".join(mixed) + "\n")
    wait_taken(tmp_path, "mixed.jsonl")
    results = wait_results(tmp_path / "state" / "results.jsonl", 5)
    wait_for(lambda: sum(sim.placed().values()) >= 2, 10, "the good lines to be placed")
    time.sleep(0.3)  # room for anything that should not be sent

    spool = tmp_path / "spool"
    for name in rejected:
        assert (spool / "rejected" / name).read_bytes() == rejected[name]  # moved untouched
        reason = (spool / "rejected" / f"{name}.error").read_text()
        assert reason.strip(), name
    assert sorted(os.listdir(spool / "done")) == ["mixed.jsonl", "mixed.jsonl.errors"]
    errors = (spool / "done" / "mixed.jsonl.errors").read_text().splitlines()
    assert len(errors) == 3, errors
    for number, error in zip((2, 3, 5), errors, strict=True):
        assert f"mixed.jsonl:{number}" in error, errors
    assert "colour" in errors[2]
    assert sorted((r["source"], r["outcome"]) for r in results) == [
        ("spool:mixed.jsonl:1", "dialed"), ("spool:mixed.jsonl:2", "invalid"),
        ("spool:mixed.jsonl:3", "invalid"), ("spool:mixed.jsonl:5", "invalid"),
        ("spool:mixed.jsonl:6", "dialed"),
    ]  # fmt: skip
    for result in results:
        check_result_shape(result)
        if result["outcome"] == "invalid":
            assert result["error"] and result["attempts"] == 0
    assert next(r for r in results if r["source"].endswith(":3"))["id"] == "m3"
    # Rejected files and the dot-file gave no results and nothing was sent for them.
    assert sim.placed() == Counter({"447700900501": 1, "447700900506": 1})
    assert len(sim.arrivals()) == 2
    assert dot.exists(), "a file whose name starts with '.' is left alone"
    code, _ = daemon.stop()
    assert code == 0, daemon.stderr
    assert len(read_results(tmp_path / "state" / "results.jsonl")) == 5


def test_submit_drops_into_the_spool_of_a_running_daemon(tmp_path, simulator, daemons):
    sim = simulator()
    config = spool_config(tmp_path, sim)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(request("u1", 601)) + "\n" + json.dumps(request("u2", 602)) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(request("u3", 603)) + "\n" + '{"to": "12"}\n')
    csv = tmp_path / "people.csv"
    csv.write_text("id,to,CALLER_NAME\nc1,+44 7700 900604,Diane Miller\n")

    refused = run_dialerd("submit", "-c", str(config), str(bad), timeout=20)
    submitted = run_dialerd("submit", "-c", str(config), str(good), timeout=20)
    from_stdin = subprocess.run(
        [sys.executable, "-m", "dialerd", "submit", "-c", str(config), "-"],
        input=csv.read_bytes(), capture_output=True, timeout=20, env=dialerd_env(),
    )  # fmt: skip

    assert refused.returncode == 65, refused.stderr.decode()
    assert ":2" in refused.stderr.decode()  # the bad line, by number
    assert submitted.returncode == 0, submitted.stderr.decode()
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    results = wait_results(tmp_path / "state" / "results.jsonl", 3)
    assert sorted((r["id"], r["outcome"]) for r in results) == [
        ("c1", "dialed"), ("u1", "dialed"), ("u2", "dialed"),
    ]  # fmt: skip
    assert sim.placed() == Counter({"447700900601": 1, "447700900602": 1, "447700900604": 1})
    body = next(a["body"] for a in sim.arrivals() if a["to"] == "447700900604")
    assert body["session_parameters"] == [{"name": "CALLER_NAME", "value": "Diane Miller"}]
    assert len(os.listdir(tmp_path / "spool" / "done")) == 2  # the refused file never arrived
    code, _ = daemon.stop()
    assert code == 0, daemon.stderr


def test_sigterm_finishes_sends_in_flight_and_a_restart_sends_the_queue(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.3-0.6")  # slow answers: sends are in flight at the signal
    config = spool_config(tmp_path, sim)
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    total = 12
    drop(
        tmp_path,
        "queue.jsonl",
        "".join(json.dumps(request(f"q{n}", 700 + n)) + "\n" for n in range(total)),
    )
    wait_for(lambda: len(sim.arrivals()) >= 3, 10, "three sends")

    code, elapsed = daemon.stop()

    assert code == 0, daemon.stderr
    assert elapsed < 3.0, f"took {elapsed:.1f} s to stop"
    first = read_results(results_file)
    assert {r["outcome"] for r in first} == {"dialed"}, first  # in flight: finished, not in_doubt
    placed = sim.placed()
    assert {r["to"] for r in first} == set(placed) and set(placed.values()) == {1}
    status = status_json(config)
    assert status["agents"]["agent-a"]["queued"] == total - len(first) > 0, status
    assert status["agents"]["agent-a"]["in_flight"] == 0, status
    assert status["outcomes"] == {"dialed": len(first)}

    again = daemons("-c", str(config))
    wait_results(results_file, total)
    code, _ = again.stop()

    assert code == 0, again.stderr
    results = read_results(results_file)
    assert sorted(r["id"] for r in results) == sorted(f"q{n}" for n in range(total))
    assert {r["outcome"] for r in results} == {"dialed"}
    assert sim.placed() == Counter(f"447700900{700 + n}" for n in range(total))
    assert len(sim.arrivals()) == total  # each sent once in all, across the restart
    assert status_json(config)["agents"] == {}


def test_shutdown_timeout_bounds_a_send_that_never_answers(tmp_path, simulator, daemons):
    sim = simulator("--hang-rate", "1")  # every call is placed, and never answered
    config = spool_config(tmp_path, sim, timeout_s=10, shutdown_timeout_s=1.5)
    results_file = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(tmp_path, "hang.json", json.dumps(request("h1", 801)))
    wait_for(sim.arrivals, 10, "the send")

    code, elapsed = daemon.stop(timeout=20)

    assert code == 0, daemon.stderr
    assert elapsed < 4.0, f"took {elapsed:.1f} s to stop with shutdown_timeout_s 1.5"
    # Parked, and never sent again: in_doubt (at the latest at the next start).
    again = daemons("-c", str(config))
    results = wait_results(results_file, 1)
    code, _ = again.stop()
    assert code == 0, again.stderr
    assert [(r["id"], r["outcome"]) for r in results] == [("h1", "in_doubt")]
    assert results[0]["error"]
    assert len(sim.arrivals()) == 1
