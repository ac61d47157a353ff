"""Idempotent by default (SPEC §4 `id`, §3 dedupe_window_s): a request without `id` gets one made
from its content, so the same list fed again calls no one twice; its duplicate names the
request it repeats; outside the window a deliberate repeat is dialed."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

from conftest import read_results, result_lines, run_dialerd, sim_config, wait_for
from test_request import CONFIG

from dialerd.ledger.intake import take
from dialerd.ledger.retention import prune
from dialerd.request import build_request

NUMBERS = [f"4477009003{n:02d}" for n in range(10)]
LIST = b"".join(
    json.dumps({"to": number, "session_parameters": {"ROW": str(row)}}).encode() + b"\n"
    for row, number in enumerate(NUMBERS, 1)
)


def test_an_interrupted_stdin_run_fed_again_places_every_call_once(tmp_path, simulator, daemons):
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim, results=str(tmp_path / "results.jsonl"))
    first = daemons("-c", str(config), stdin=subprocess.PIPE)
    first.proc.stdin.write(LIST)
    first.proc.stdin.flush()
    wait_for(lambda: len(sim.arrivals()) >= 2, 20, "a few calls of the first run")
    assert first.stop()[0] == 0  # interrupted with most of the list still queued
    assert sum(sim.placed().values()) < len(NUMBERS)

    again = run_dialerd("run", "-c", str(config), input=LIST, timeout=60)
    assert again.returncode == 0, again.stderr.decode()
    assert sim.placed() == Counter(NUMBERS), "each number once"

    results = read_results(tmp_path / "results.jsonl")
    duplicates = [r for r in results if r["outcome"] == "duplicate"]
    dialed = {r["id"]: r for r in results if r["outcome"] == "dialed"}
    assert len(duplicates) == len(NUMBERS) and len(dialed) == len(NUMBERS)
    for duplicate in duplicates:
        original = dialed[duplicate["id"]]  # the duplicate's id is its original's
        assert original["to"] == duplicate["to"]
        assert f"repeats request {original['id']} ({original['source']}" in duplicate["error"]
        assert duplicate["source"] == f"stdin:{NUMBERS.index(duplicate['to']) + 1}"


def test_a_repeat_within_one_input_is_a_duplicate_and_one_outside_the_window_is_dialed(
    tmp_path, simulator
):
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim, dedupe_window_s=1)
    request = json.dumps({"to": NUMBERS[0], "meta": {"n": 1}}).encode() + b"\n"
    done = run_dialerd("run", "-c", str(config), input=request * 2)
    assert done.returncode == 0, done.stderr.decode()
    original, repeat = sorted(result_lines(done.stdout), key=lambda r: r["source"])
    assert (original["outcome"], repeat["outcome"]) == ("dialed", "duplicate")
    assert repeat["id"] == original["id"] and original["id"].startswith("c-")

    taken = time.time()
    wait_for(lambda: time.time() > taken + 1.5, 5, "the window to pass")  # the clock, not a call
    done = run_dialerd("run", "-c", str(config), input=request)
    (deliberate,) = result_lines(done.stdout)
    assert deliberate["outcome"] == "dialed" and deliberate["id"] == original["id"] + ".2"
    assert [a["to"] for a in sim.arrivals()] == [NUMBERS[0]] * 2


def test_with_the_window_off_every_request_is_dialed(tmp_path, simulator):
    sim = simulator("--latency", "0.01-0.03")
    config = sim_config(tmp_path, sim, dedupe_window_s=0)
    request = json.dumps({"to": NUMBERS[0]}).encode() + b"\n"
    done = run_dialerd("run", "-c", str(config), input=request * 3)
    results = sorted(result_lines(done.stdout), key=lambda r: r["source"])
    assert [r["outcome"] for r in results] == ["dialed"] * 3
    first = results[0]["id"]
    assert [r["id"] for r in results] == [first, first + ".2", first + ".3"]


def test_a_csv_submitted_twice_places_every_call_once_and_leads_back_to_its_rows(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.01-0.03")
    results = tmp_path / "results.jsonl"
    config = sim_config(tmp_path, sim, results=str(results), spool={"dir": str(tmp_path / "spool")})
    export = tmp_path / "crm-export.csv"
    export.write_text("Phone,Name\n" + "".join(f"{n},Row {r}\n" for r, n in enumerate(NUMBERS, 2)))
    daemon = daemons("-c", str(config))
    daemon.wait_running()

    def submit(ids_out: Path) -> str:
        done = run_dialerd(
            "submit", "-c", str(config), "--map", "Phone=to", "--ids-out", str(ids_out),
            str(export), timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stderr.decode().splitlines()[-1]

    assert submit(tmp_path / "first.csv").endswith(
        "; 0 taken already or given twice: duplicates, not dialed again"
    )
    wait_for(lambda: len(read_results(results)) == len(NUMBERS), 30, "the first submission")
    said = submit(tmp_path / "again.csv")
    assert said.endswith(
        f"; {len(NUMBERS)} taken already or given twice: duplicates, not dialed again"
    )
    wait_for(lambda: len(read_results(results)) == 2 * len(NUMBERS), 30, "the second one")
    assert daemon.stop()[0] == 0
    assert sim.placed() == Counter(NUMBERS), "each number once"

    first, again = (ids(tmp_path / name) for name in ("first.csv", "again.csv"))
    assert first == again  # each row's id, the same both times
    by_outcome: dict[str, dict] = {"dialed": {}, "duplicate": {}}
    for result in read_results(results):
        by_outcome[result["outcome"]][result["source"]] = result
    rows = [f"submit:crm-export.csv:{row}" for row in range(2, len(NUMBERS) + 2)]
    assert sorted(by_outcome["dialed"]) == sorted(by_outcome["duplicate"]) == sorted(rows)
    for row, source in enumerate(rows, 2):
        dialed, duplicate = by_outcome["dialed"][source], by_outcome["duplicate"][source]
        assert dialed["id"] == duplicate["id"] == first[(str(export), str(row))]
        assert f"repeats request {dialed['id']} ({source}, taken " in duplicate["error"]


def ids(path: Path) -> dict[tuple[str, str], str]:
    with path.open(newline="") as file:
        return {(row["file"], row["row"]): row["id"] for row in csv.DictReader(file)}


def test_a_repeat_after_the_window_takes_the_first_free_suffix(ledger_conn):
    """Each repeat after the window takes the next suffix; a pruned one's id is still taken."""
    conn = ledger_conn
    request = build_request({"to": NUMBERS[0]}, CONFIG, "stdin:1")
    key = request.id
    assert take(conn, 1, request, 0, 10) == (key, None)
    assert take(conn, 1, request, 100, 10) == (f"{key}.2", None)
    conn.execute("UPDATE requests SET state = 'final', finished_at = 150 WHERE id = ?", (key,))
    assert prune(conn, now=160, retention_s=5, batch=10) == 1
    assert conn.execute("SELECT id FROM requests").fetchall() == [(f"{key}.2",)]
    assert take(conn, 1, request, 200, 10) == (f"{key}.3", None)
    duplicate_id, error = take(conn, 1, request, 205, 10)
    assert duplicate_id == f"{key}.3" and error.startswith(f"repeats request {key}.3 (stdin:1")


def test_a_repeat_of_a_pruned_request_within_the_window_is_a_duplicate_of_it(ledger_conn):
    conn = ledger_conn
    request = build_request({"to": NUMBERS[0]}, CONFIG, "stdin:1")
    assert take(conn, 1, request, 0, 100) == (request.id, None)
    conn.execute("UPDATE requests SET state = 'final', finished_at = 1")
    assert prune(conn, now=10, retention_s=5, batch=10) == 1
    duplicate_id, error = take(conn, 1, request, 20, 100)
    assert duplicate_id == request.id
    assert error.startswith(f"repeats request {request.id} (pruned since, taken 1970-01-01T")
    assert take(conn, 1, request, 150, 100) == (f"{request.id}.2", None)
