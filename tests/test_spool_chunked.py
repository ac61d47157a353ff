"""A spool file taken a chunk at a time (SPEC 5, 8.1, 8.3, 8.10): a submitter's file of one good
line and many bad ones neither stops the sends, nor takes the daemon's memory, nor delays a stop;
each line gets one result across a stop or a crash in the middle of the file. Then, in this
process: the chunked parser, the ledger's record of a file in part, and the batch's budget."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_for
from test_request import CONFIG
from test_spool_attacks import (
    drop,
    line,
    make_spool,
    rss_kib,
    spool_running,
    started,
    stopped_in_time,
)

import dialerd.sources as sources_module
from dialerd import ledger as ledger_module
from dialerd import sources
from dialerd.ledger import Ledger, SpoolChunk, SpoolRecord
from dialerd.ledger import intake as intake_module
from dialerd.results import ResultsWriter
from dialerd.sources import CHUNK_ITEMS, Intake, Rejected, parse_spool_file, spool_chunks

JUNK_LINES = 300_000
RATE = 5  # agent-a's, at the simulator and in the config
BACKLOG = 100  # 20 s of sends at RATE: work queued through the whole intake
MAX_GAP_S = 1.0
# The daemon runs in about 60 MiB; the file is 600 KiB, a chunk of invalid items about 1 MiB,
# and its NAME.errors text, read back whole for the note, 300,000 lines of about 60 bytes (18
# MiB, with its str twice that). Taken whole, as one batch, every line's result was a dict and a
# string at once: about 350 bytes per byte of the file (210 MiB here, 750 MiB for 2 MiB).
RSS_LIMIT_KIB = 150 * 1024
JUNK_SOURCE = b'"source": "spool:junk.jsonl:'


def junk_file() -> bytes:
    return line("v1", 555) + b"x\n" * JUNK_LINES


def items_recorded(state: Path, name: str = "junk.jsonl") -> tuple[bool, int | None]:
    """(whether the ledger has a row for the file, its count of items recorded)."""
    conn = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT items FROM spool_files WHERE name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:  # the table is being made
        return False, None
    finally:
        conn.close()
    return (row is not None), (row[0] if row else None)


def junk_results(state: Path) -> list[dict]:
    """The results of the junk file's lines, once every line has one in results.jsonl (after
    a crash, the last lines written may come again: see results.py)."""
    path = state / "results.jsonl"
    wait_for(
        lambda: path.exists() and path.read_bytes().count(JUNK_SOURCE) >= JUNK_LINES + 1,
        120,
        "a result for every line of the file",
    )
    wait_for(lambda: b'"id": "v1"' in path.read_bytes(), 60, "the good line's result")
    results = [json.loads(text) for text in path.read_text().splitlines()]
    return [r for r in results if r["source"].startswith("spool:junk.jsonl:")]


def check_one_result_per_line(spool: Path, results: list[dict], repeats: int = 0) -> None:
    """Each line of the file has one result in the ledger, and one in results.jsonl but for at
    most `repeats` lines written again whole after a crash."""
    conn = sqlite3.connect(spool.parent / "state" / "ledger.sqlite3")
    try:
        recorded = conn.execute(
            "SELECT count(*), count(DISTINCT source) FROM rejects"
            " WHERE source LIKE 'spool:junk.jsonl:%'"
        ).fetchone()
        requests = conn.execute(
            "SELECT count(*) FROM requests WHERE source LIKE 'spool:junk.jsonl:%'"
        ).fetchone()[0]
    finally:
        conn.close()
    assert recorded == (JUNK_LINES, JUNK_LINES) and requests == 1, (recorded, requests)
    unique = {json.dumps(r, sort_keys=True): r for r in results}
    assert len(results) - len(unique) <= repeats, len(results) - len(unique)
    results = list(unique.values())
    sources_seen = Counter(r["source"] for r in results)
    assert len(results) == JUNK_LINES + 1 and set(sources_seen.values()) == {1}
    assert set(sources_seen) == {f"spool:junk.jsonl:{n}" for n in range(1, JUNK_LINES + 2)}
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes == {"invalid": JUNK_LINES, "dialed": 1}, outcomes
    assert next(r for r in results if r["outcome"] == "dialed")["id"] == "v1"
    errors = (spool / "done" / "junk.jsonl.errors").read_text().splitlines()
    assert len(errors) == JUNK_LINES and len(set(errors)) == JUNK_LINES
    assert errors[0].startswith("spool:junk.jsonl:2: ") and errors[-1].startswith(
        f"spool:junk.jsonl:{JUNK_LINES + 1}: "
    )
    assert os.listdir(spool / "incoming") == []


def test_a_file_of_many_bad_lines_neither_stops_the_sends_nor_takes_memory_nor_delays_a_stop(
    tmp_path, simulator, daemons
):
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    state = tmp_path / "state"
    drop(spool, "backlog.jsonl", b"".join(line(f"b-{n}", n) for n in range(BACKLOG)))
    wait_for(lambda: len(sim.arrivals()) >= 5, 10, "the first sends")
    drop(spool, "junk.jsonl", junk_file())
    most_kib = 0

    def halfway() -> bool:
        nonlocal most_kib
        most_kib = max(most_kib, rss_kib(daemon.proc.pid))
        return (items_recorded(state)[1] or 0) >= JUNK_LINES // 2

    wait_for(halfway, 60, "half the file recorded")
    stopped_at = time.monotonic()
    stopped_in_time(daemon)  # SIGTERM in the middle of the file
    stop_s = time.monotonic() - stopped_at

    assert items_recorded(state)[1] is not None  # not complete: the file is left to go on
    assert os.listdir(spool / "incoming") == ["junk.jsonl"]
    assert most_kib < RSS_LIMIT_KIB, f"{most_kib} KiB"
    times = sorted(a["at"] for a in sim.arrivals() if a["at"] <= stopped_at)
    assert len(times) < BACKLOG  # the queue held work until the stop
    achieved = (len(times) - 1) / (times[-1] - times[0])
    gap = max(later - earlier for earlier, later in zip(times, times[1:], strict=False))
    print(f"rate {achieved:.2f}/s, gap {gap:.2f} s, {most_kib // 1024} MiB, stop {stop_s:.2f} s")
    assert achieved >= 0.95 * RATE, achieved
    assert gap <= MAX_GAP_S, gap

    again = daemons("-c", str(config))
    again.wait_running()
    check_one_result_per_line(spool, junk_results(state))
    wait_for(lambda: sum(sim.placed().values()) >= BACKLOG + 1, 60, "the backlog sent")
    placed = sim.placed()
    assert placed["447700900555"] == 1 and set(placed.values()) == {1}, placed
    stopped_in_time(again)


def test_a_crash_in_the_middle_of_a_file_gives_each_line_one_result(tmp_path, simulator, daemons):
    sim, config, daemon, spool = started(tmp_path, simulator, daemons)
    state = tmp_path / "state"
    drop(spool, "junk.jsonl", junk_file())
    results = state / "results.jsonl"

    def in_the_middle() -> bool:
        dialed = results.exists() and b'"id": "v1"' in results.read_bytes()
        return dialed and (items_recorded(state)[1] or 0) > 0

    # The good line's call answered first: a crash while it is in flight leaves it in_doubt.
    wait_for(in_the_middle, 60, "the good line dialed and a part of the file recorded")
    daemon.kill()  # SIGKILL: no stop of any kind
    assert items_recorded(state)[1] is not None

    again = daemons("-c", str(config))
    again.wait_running()
    check_one_result_per_line(spool, junk_results(state), repeats=ResultsWriter.BATCH)
    assert sim.placed() == Counter(["447700900555"])
    stopped_in_time(again)


# -- the chunked parser ---------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_ITEMS", 3)
    return 3


def good(number: int, **more) -> dict:
    return {"to": f"447700900{number:03d}", **more}


FORMS = {
    "lines": (
        b"".join(
            json.dumps(good(n)).encode() + b"\n" + (b"not JSON\n" if n % 3 == 0 else b"\n")
            for n in range(1, 9)
        ),
        [
            source
            for n in range(1, 9)
            for source in (
                [f"spool:f:{2 * n - 1}", f"spool:f:{2 * n}"]
                if n % 3 == 0
                else [f"spool:f:{2 * n - 1}"]
            )
        ],
    ),
    "array": (
        (
            "[\n"  # an item a line, each named by the line it starts on
            + ",\n".join(
                json.dumps(item)
                for item in [good(1), "not an object", *(good(n) for n in range(2, 8)), {"to": 1}]
            )
            + "\n]"
        ).encode(),
        [f"spool:f:{n}" for n in range(2, 11)],
    ),
    "object": (b"\n" + json.dumps(good(1)).encode(), ["spool:f:2"]),
    "empty array": (b" [ ] \n", []),
}


def chunk_sources(chunks) -> list[list[str]]:
    """Each chunk's sources, requests and invalid ones each in the order of the chunk."""
    return [
        [r.source for r in batch.requests] + [i["source"] for i in batch.invalid]
        for batch, _last in chunks
    ]


@pytest.mark.parametrize("form", FORMS)
def test_chunks_hold_the_items_of_the_file_in_order(small_chunks, form):
    data, expected = FORMS[form]
    for skip in range(len(expected) + 1):
        chunks = list(spool_chunks(data, "spool:f", CONFIG, skip))
        left = expected[skip:]
        assert [last for _batch, last in chunks] == [False] * (len(chunks) - 1) + [True]
        slices = [left[i : i + small_chunks] for i in range(0, max(len(left), 1), small_chunks)]
        got = chunk_sources(chunks)
        assert [sorted(c, key=expected.index) for c in got] == slices, skip
        assert all(
            c == sorted(c, key=expected.index)
            for c in ([r.source for r in batch.requests] for batch, _ in chunks)
        )
    whole = parse_spool_file(data, "spool:f", CONFIG)
    assert sorted(chunk_sources([(whole, True)])[0], key=expected.index) == expected
    assert len(whole.errors) == len(whole.invalid)


def test_an_array_is_read_as_loads_reads_it_or_else_as_lines(small_chunks):
    """Not a strict JSON array (NaN, a trailing comma, a lone surrogate, more after it): its
    lines, as before."""
    for data in (
        b'[{"to": "447700900001"}, NaN]',
        b'[{"to": "447700900001"},]',
        b'[{"to": "447700900001", "meta": {"a": "\\ud800"}}]',
    ):
        with pytest.raises(Rejected):
            spool_chunks(data, "spool:f", CONFIG)
    data = b'[{"to": "447700900001"}]\n{"to": "447700900002"}\n'
    sources_seen = [
        r.source for batch, _ in spool_chunks(data, "spool:f", CONFIG) for r in batch.requests
    ]
    assert sources_seen == ["spool:f:2"]  # the array's line is an invalid line of its own


def test_rejection_is_decided_before_any_chunk(monkeypatch):
    made = []
    real_chunked = sources._chunked
    monkeypatch.setattr(sources, "_chunked", lambda *a: made.append(True) or real_chunked(*a))
    for data in (b"x\n" * 100_000, b'{"to": "1"}\xff\n', b'{"to": "1"}\n\x00\n', b"\n\n"):
        with pytest.raises(Rejected):
            spool_chunks(data, "spool:f", CONFIG)  # raised at the call, not at the first chunk
    assert made == []
    chunks = spool_chunks(b"x\n" * 100_000 + json.dumps(good(1)).encode(), "f", CONFIG)
    batch, last = next(chunks)
    assert len(batch.invalid) == CHUNK_ITEMS and not last


# -- the ledger's record of a file in part ----------------------------------------------------


def test_an_older_ledgers_spool_files_read_as_complete(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "ledger.sqlite3", isolation_level=None)
    conn.executescript(ledger_module.SCHEMA)
    conn.executescript(f"{ledger_module.MIGRATIONS[0]}; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO spool_files VALUES ('old.jsonl', 'd1', 'spool:old.jsonl:2: bad\n')")
    conn.close()

    ledger = Ledger(state)
    ledger.open()
    try:
        conn = ledger_module.connect(ledger.path, read_only=True)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(ledger_module.MIGRATIONS)
        conn.close()
        recorded = intake_module.spool_files(ledger._conn, ["old.jsonl"], 10)
    finally:
        ledger.close()
    assert recorded == {"old.jsonl": SpoolRecord("d1", None, "spool:old.jsonl:2: bad\n")}


def test_a_file_recorded_chunk_by_chunk_counts_its_items_and_gathers_its_errors(tmp_path):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    ledger_module.create_schema(conn)
    invalid = [{"source": "s", "error": "e"}] * 2

    def add(digest: str, start: int, errors: str | None, last: bool) -> SpoolRecord:
        chunk = SpoolChunk("f", digest, start, errors, last)
        intake_module.add(conn, 1, [], invalid, chunk, 0)
        return intake_module.spool_files(conn, ["f"], 10)["f"]

    assert add("d1", 0, "one\n", False) == SpoolRecord("d1", 2, "one\n")
    assert add("d1", 2, None, False) == SpoolRecord("d1", 4, "one\n")
    assert add("d1", 4, "three\n", True) == SpoolRecord("d1", None, "one\nthree\n")
    # Another file of the name (the first one was taken away before its move): afresh.
    assert add("d2", 0, None, False) == SpoolRecord("d2", 2, None)
    intake_module.forget_spool_files(conn, ["f"])
    assert intake_module.spool_files(conn, ["f"], 10) == {}
    assert conn.execute("SELECT count(*) FROM spool_file_errors").fetchone()[0] == 0


# -- the batch's budget -----------------------------------------------------------------------

BUDGET_FILES = 40


async def test_a_batch_of_files_of_many_bad_lines_never_makes_one_giant_commit(
    tmp_path, monkeypatch
):
    """BUDGET_FILES files of CHUNK_ITEMS bad lines each (one chunk each): recorded side by side,
    they were one group commit of them all; now no more than CHUNK_ITEMS items at once."""
    spool = make_spool(tmp_path)
    for index in range(BUDGET_FILES):
        drop(spool, f"junk-{index}.jsonl", line(f"g-{index}", index) + b"x\n" * (CHUNK_ITEMS - 1))
    in_flight = most = 0
    real_record = Intake.record

    async def watched(self, batch, spool_file=None):
        nonlocal in_flight, most
        in_flight += len(batch)
        most = max(most, in_flight)
        try:
            await real_record(self, batch, spool_file)
        finally:
            in_flight -= len(batch)

    monkeypatch.setattr(Intake, "record", watched)
    await spool_running(
        spool,
        tmp_path / "state",
        lambda: len(os.listdir(spool / "done")) == 2 * BUDGET_FILES,
        timeout=120,
    )
    assert 0 < most <= CHUNK_ITEMS, most


def test_a_note_lists_the_first_bad_lines_and_counts_the_rest():
    chunks = ["a\nb\n", "c\nd\ne\n", "f\n"]
    assert intake_module._note(chunks, 10) == "a\nb\nc\nd\ne\nf\n"
    assert intake_module._note(chunks, 3) == (
        "a\nb\nc\n... and 3 more invalid lines, each with its own invalid result\n"
    )
    assert intake_module._note(chunks, 2).startswith("a\nb\n... and 4 more")
    assert intake_module._note([], 5) is None


@pytest.mark.parametrize(
    "given",
    ["stdin:1", "spool:other.jsonl:4", "submit:", "submit:x\n:1", "submit:" + "x" * 512, 7],
)
def test_an_item_may_name_only_a_submitted_source_for_itself(given):
    """Submitters may not trust each other: a spool line may say which submitted row it is,
    never pass itself off as stdin's or another spool file's."""
    data = json.dumps({"to": "447700900123", "source": given}).encode() + b"\n"
    ((batch, _last),) = spool_chunks(data, "spool:f", CONFIG)
    assert batch.requests == []
    assert batch.errors == [
        "spool:f:1: source: must be submit: and more, in all at most 512 printable characters"
    ]


def test_a_submitted_source_is_kept():
    data = json.dumps({"to": "447700900123", "source": "submit:crm.csv:17"}).encode()
    ((batch, _last),) = spool_chunks(data, "spool:f", CONFIG)
    assert [r.source for r in batch.requests] == ["submit:crm.csv:17"]


def test_a_fault_of_ours_in_one_item_refuses_that_item_only(monkeypatch):
    """An exception no validation meant to raise is a bug; it must not stop the source (a
    spool scan, the stdin reader) nor lose the items beside it."""
    real = sources_module.build_request

    def faulty(document, config, source):
        if document.get("to") == "447700900124":
            raise RuntimeError("a bug")
        return real(document, config, source)

    monkeypatch.setattr(sources_module, "build_request", faulty)
    data = b"".join(json.dumps({"to": f"44770090012{n}"}).encode() + b"\n" for n in (3, 4, 5))
    ((batch, _last),) = spool_chunks(data, "spool:f", CONFIG)
    assert [r.to for r in batch.requests] == ["447700900123", "447700900125"]
    assert batch.errors == ["spool:f:2: could not be validated (RuntimeError: a bug)"]
