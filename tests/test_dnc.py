"""The do-not-call list: any notation, checked right before each send, read again on change."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from collections import Counter

from conftest import read_results, run_dialerd, sim_config, wait_for

from dialerd.dnc import DoNotCall, read_list


def test_a_list_is_read_in_any_notation_with_comments_and_bad_lines_skipped(tmp_path):
    path = tmp_path / "dnc.txt"
    path.write_text(
        "# do not call\n"
        "+44 7700 900123\n"
        "\n"
        "447700900124  # asked on 2026-11-02\n"
        "(+1) 202-555-0100\n"
        "sip:alice@example.com\n"
        "12\n"
        "not a number\n"
    )
    numbers, problems = read_list(path, None)
    assert numbers == {"447700900123", "447700900124", "12025550100", "sip:alice@example.com"}
    assert [problem.split(":")[0] for problem in problems] == ["line 7", "line 8"]


def test_bare_digits_that_read_two_ways_block_both_numbers(tmp_path):
    """447400123456 is +44 7400 123456, and, read as a national number of DE, +49 447400123456:
    a do-not-call list blocks both rather than guess, and says which lines to fix."""
    path = tmp_path / "dnc.txt"
    path.write_text("447400123456\n+447400123457\n030 123456\n")
    numbers, problems = read_list(path, "DE")
    assert numbers == {"49447400123456", "447400123456", "447400123457", "4930123456"}
    assert problems == [
        "line 1: '447400123456' reads as +49447400123456 (a national number of DE) and as "
        "+447400123456: both are blocked; write it with +"
    ]
    dnc = DoNotCall()
    dnc.use(path, "DE")
    assert dnc.reason("447400123456") and dnc.reason("49447400123456")


def test_the_list_is_read_again_when_it_changes_and_kept_when_it_cannot_be(tmp_path):
    path = tmp_path / "dnc.txt"
    path.write_text("447700900123\n")
    dnc = DoNotCall()
    dnc.use(path, None)
    assert dnc.reason("447700900123") and dnc.reason("447700900999") is None
    path.write_text("447700900123\n447700900999\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    dnc.refresh()
    assert "do-not-call" in dnc.reason("447700900999")
    path.unlink()
    dnc.refresh()
    assert dnc.reason("447700900999"), "a list that cannot be read keeps the one in force"
    dnc.use(None, None)
    assert dnc.reason("447700900123") is None


def spool_file(spool, name: str, requests: list[dict]) -> None:
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    staged = spool / f".{name}"
    staged.write_text("".join(json.dumps(request) + "\n" for request in requests))
    staged.rename(incoming / name)


def test_listed_numbers_are_blocked_even_when_listed_while_queued(tmp_path, simulator, daemons):
    sim = simulator("--latency", "0.01-0.03")
    dnc = tmp_path / "dnc.txt"
    dnc.write_text("+44 7700 900 201\n")
    spool = tmp_path / "spool"
    config = sim_config(tmp_path, sim, spool={"dir": str(spool)}, dnc_file=str(dnc))
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).isoformat()
    spool_file(spool, "a.jsonl", [
        {"id": "listed", "to": "447700900201"},
        {"id": "free", "to": "447700900202"},
        {"id": "listed-while-queued", "to": "447700900203", "not_before": later},
    ])  # fmt: skip
    results = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: len(read_results(results)) == 2, 10, "the first two outcomes")
    dnc.write_text("+44 7700 900 201\n447700900203\n")
    wait_for(lambda: len(read_results(results)) == 3, 10, "the queued one at its due time")
    assert daemon.stop()[0] == 0

    by_id = {result["id"]: result for result in read_results(results)}
    assert {key: result["outcome"] for key, result in by_id.items()} == {
        "listed": "blocked", "free": "dialed", "listed-while-queued": "blocked",
    }  # fmt: skip
    assert "do-not-call" in by_id["listed"]["error"]
    assert Counter(a["to"] for a in sim.arrivals()) == Counter({"447700900202": 1})


def test_a_list_that_cannot_be_read_stops_the_start_and_refuses_a_reload(
    tmp_path, simulator, daemons
):
    sim = simulator()
    missing = tmp_path / "nowhere" / "dnc.txt"
    config = sim_config(tmp_path, sim, dnc_file=str(missing))
    refused = run_dialerd("run", "-c", str(config), input=b"")
    assert refused.returncode == 78  # the config's own fault: not restarted by the unit
    assert (
        f"dnc_file: cannot read it: No such file or directory ({missing})"
        in refused.stderr.decode()
    )

    dnc = tmp_path / "dnc.txt"
    dnc.write_text("447700900301\n")
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")}, dnc_file=str(dnc))
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    config.write_text(config.read_text().replace(str(dnc), str(missing)))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.stderr, 10, "the refused reload")
    assert "dnc_file: cannot read it" in daemon.stderr
    assert daemon.stop()[0] == 0
