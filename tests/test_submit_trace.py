"""`dialerd submit` leads every result back to its input row (SPEC §6 `source`, `--ids-out`),
sets campaigns (`--campaign`), and says how many of its rows the ledger has taken already."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sqlite3
import time
from pathlib import Path

import phonenumbers
import pytest
from conftest import run_dialerd
from phonenumbers import PhoneNumberFormat
from test_numbers import EXAMPLES
from test_submit import (
    GOOD,
    incoming,
    lines,
    nothing_spooled,
    spooled,
    spooled_sources,
    stdin,  # noqa: F401 (a fixture)
    submit,
    write,
)

import dialerd.submit as submit_module
from dialerd.config import build_config, load_config
from dialerd.ledger import Ledger, foresee_intake
from dialerd.request import MAX_LINE_BYTES, build_request
from dialerd.sources import spool_chunks
from dialerd.submit import drop_into_spool, read_input

CRM = b"to,Name\n447700900123,Ann\n\n447700900124,Bob\n447700900125,Cy\n"  # a blank line 3


def ids_out(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def take(env: Path, *requests: dict) -> None:
    """Record requests in the ledger, as the daemon would have taken them earlier."""
    config = load_config(env)
    built = [build_request(r, config, f"spool:earlier:{n}") for n, r in enumerate(requests, 1)]

    async def add() -> None:
        ledger = Ledger(config.state_dir)
        ledger.open()
        try:
            await ledger.add(built, [], None, config.dedupe_window_s)
        finally:
            ledger.close()

    asyncio.run(add())


# --- sources ------------------------------------------------------------------------------------


def test_a_csv_rows_source_is_the_file_and_the_line_it_starts_on(env, tmp_path, capsys):
    data = b'to,Note\n447700900123,"two\nlines"\n447700900124,x\n'
    (tmp_path / "exports").mkdir()
    code, err = submit(env, write(tmp_path / "exports", "crm-export.csv", data), capsys=capsys)
    assert code == 0, err
    # The header is line 1; a quoted cell's newline makes the next row start on line 4.
    assert spooled_sources(env) == ["submit:crm-export.csv:2", "submit:crm-export.csv:4"]


def test_a_sep_line_counts_as_a_line(env, tmp_path, capsys):
    code, err = submit(
        env, write(tmp_path, "x.csv", b"sep=;\nto;Name\n447700900123;Ann\n"), capsys=capsys
    )
    assert code == 0, err
    assert spooled_sources(env) == ["submit:x.csv:3"]  # the line an editor shows


def test_json_lines_and_array_items_are_named_by_their_first_line(env, tmp_path, capsys):
    array = b'[\n  {"to": "447700900123"},\n  {\n    "to": "447700900124"\n  }\n]\n'
    jsonl = lines({"to": "447700900125"}, b"", {"to": "447700900126"})
    code, err = submit(
        env, write(tmp_path, "a.json", array), write(tmp_path, "b.jsonl", jsonl), capsys=capsys
    )
    assert code == 0, err
    assert spooled_sources(env) == [
        "submit:a.json:2",
        "submit:a.json:3",
        "submit:b.jsonl:1",
        "submit:b.jsonl:3",
    ]


def test_stdin_is_named_stdin(env, stdin, capsys):  # noqa: F811
    stdin(b"to\n447700900123\n")
    code, err = submit(env, "-", capsys=capsys)
    assert code == 0, err
    assert spooled_sources(env) == ["submit:stdin:2"]


def test_a_file_name_no_daemon_would_take_is_made_printable(env, tmp_path, capsys):
    name = "crm\nexport\x1b[31m.csv"
    code, err = submit(env, write(tmp_path, name, b"to\n447700900123\n"), capsys=capsys)
    assert code == 0, err
    assert spooled_sources(env) == ["submit:crm?export?[31m.csv:2"]


def test_a_source_in_the_input_is_no_field(env, tmp_path, capsys):
    data = lines({"to": "447700900123", "source": "stdin:1"})
    path = write(tmp_path, "x.jsonl", data)
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    assert f"{path}:1: unknown field 'source'" in err
    assert nothing_spooled(env)


def test_errors_name_the_input_as_given(env, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    path = write(tmp_path / "in", "x.jsonl", lines(GOOD, {"to": "+1"}))
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert f"{path}:2: to: " in err  # the path typed, not the source's name
    assert spooled_sources(env) == ["submit:x.jsonl:1"]


# --- --campaign ---------------------------------------------------------------------------------


def test_campaign_is_set_on_every_request_and_makes_its_own_ids(env, tmp_path, capsys):
    path = write(tmp_path, "x.csv", b"to,id\n447700900123,\n447700900124,row-2\n")
    code, err = submit(
        env, "--campaign", "spring-2027", "--ids-out", str(tmp_path / "a.csv"), path, capsys=capsys
    )
    assert code == 0, err
    first, second = spooled(env)
    assert first["campaign"] == second["campaign"] == "spring-2027"
    code, err = submit(env, "--ids-out", str(tmp_path / "b.csv"), path, capsys=capsys)
    assert code == 0, err
    with_campaign, without = ids_out(tmp_path / "a.csv"), ids_out(tmp_path / "b.csv")
    # The same call in another campaign is another request; a given id stays as it is.
    assert with_campaign[0]["id"] != without[0]["id"]
    assert with_campaign[1]["id"] == without[1]["id"] == "row-2"


def test_a_row_of_another_campaign_is_a_bad_row(env, tmp_path, capsys):
    path = write(tmp_path, "x.csv", b"to,campaign\n447700900123,spring\n447700900124,autumn\n")
    code, err = submit(env, "--campaign", "spring", "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert f"{path}:3: campaign: 'autumn', but --campaign says 'spring'" in err
    assert [d["to"] for d in spooled(env)] == ["447700900123"]


@pytest.mark.parametrize("campaign", ["", "a b", "x" * 65, "spring/2027", "é"])
def test_a_bad_campaign_is_a_usage_error(env, tmp_path, capsys, campaign):
    code, err = submit(env, "--campaign", campaign, write(tmp_path, "x.csv", CRM), capsys=capsys)
    assert code == 64
    assert f"--campaign {campaign!r}: expected 1-64 of A-Za-z0-9._:-" in err
    assert nothing_spooled(env)


# --- --ids-out ----------------------------------------------------------------------------------


def test_ids_out_gives_each_rows_file_line_and_id(env, tmp_path, capsys):
    crm = write(tmp_path, "crm.csv", CRM)
    more = write(tmp_path, "more.jsonl", lines({"to": "447700900126", "id": "given"}))
    out = tmp_path / "ids.csv"
    code, err = submit(env, "--ids-out", str(out), crm, more, capsys=capsys)
    assert code == 0, err
    rows = ids_out(out)
    assert [(r["file"], r["row"]) for r in rows] == [
        (str(crm), "2"),
        (str(crm), "4"),
        (str(crm), "5"),
        (str(more), "1"),
    ]
    config = load_config(env)
    made = [
        build_request({"to": to, "session_parameters": {"Name": name}}, config, "x").id
        for to, name in (("447700900123", "Ann"), ("447700900124", "Bob"), ("447700900125", "Cy"))
    ]
    assert [r["id"] for r in rows] == [*made, "given"]


def test_ids_out_leaves_out_the_rows_not_submitted(env, tmp_path, capsys):
    path = write(tmp_path, "x.csv", b"to\n447700900123\nnot a number\n447700900124\n")
    out = tmp_path / "ids.csv"
    code, err = submit(env, "--skip-invalid", "--ids-out", str(out), path, capsys=capsys)
    assert code == 0, err
    assert [r["row"] for r in ids_out(out)] == ["2", "4"]


def test_ids_out_that_cannot_be_written_submits_nothing(env, tmp_path, capsys):
    out = tmp_path / "no such directory" / "ids.csv"
    code, err = submit(env, "--ids-out", str(out), write(tmp_path, "x.csv", CRM), capsys=capsys)
    assert code == 73
    assert f"cannot write --ids-out {out}: No such file or directory" in err
    assert nothing_spooled(env)


def test_ids_out_is_removed_when_the_spool_cannot_be_written(env, tmp_path, capsys, monkeypatch):
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(submit_module.os, "fsync", full_disk)
    out = tmp_path / "ids.csv"
    code, err = submit(env, "--ids-out", str(out), write(tmp_path, "x.csv", CRM), capsys=capsys)
    assert code == 73, err
    assert not out.exists() and nothing_spooled(env)


# --- what the ledger has taken already ----------------------------------------------------------


def test_submit_says_how_many_rows_were_taken_already(env, tmp_path, capsys):
    take(env, {"to": "447700900123", "session_parameters": {"Name": "Ann"}}, {"id": "x", **GOOD})
    data = CRM + b"447700900123,Ann\n"  # a repeat within the input as well
    code, err = submit(env, write(tmp_path, "crm.csv", data), capsys=capsys)
    assert code == 0, err
    assert err.splitlines()[-1].endswith(
        "submitted 4 request(s) as "
        + next(incoming(env).iterdir()).name
        + "; 2 taken already or given twice: duplicates, not dialed again"
    )


def test_nothing_taken_with_no_ledger_yet(env, tmp_path, capsys):
    code, err = submit(env, write(tmp_path, "crm.csv", CRM), capsys=capsys)
    assert code == 0, err
    assert err.endswith("; 0 taken already or given twice: duplicates, not dialed again\n")
    assert not (env.parent / "state" / "ledger.sqlite3").exists()  # submit made none


def test_a_ledger_submit_cannot_read_is_said_and_the_rows_submitted(env, tmp_path, capsys):
    take(env, GOOD)
    ledger = env.parent / "state" / "ledger.sqlite3"
    ledger.write_bytes(b"not a database" * 100)
    code, err = submit(env, write(tmp_path, "crm.csv", CRM), capsys=capsys)
    assert code == 0, err
    assert "cannot tell which requests were taken already: " in err
    assert len(spooled(env)) == 3
    assert "taken already or given twice" not in err


def test_a_repeat_after_the_window_is_foreseen_under_its_own_id(env, tmp_path):
    config = load_config(env)
    take(env, GOOD)
    request = build_request(GOOD, config, "x")
    given = build_request({**GOOD, "id": "given"}, config, "x")
    assert foresee_intake(config.state_dir, [request, request, given], 86400) == [
        (request.id, True),
        (request.id, True),
        ("given", False),
    ]
    # Window 0: every one is a request of its own, as the daemon numbers them.
    assert foresee_intake(config.state_dir, [request, request], 0) == [
        (f"{request.id}.2", False),
        (f"{request.id}.3", False),
    ]
    stored = sqlite3.connect(config.state_dir / "ledger.sqlite3")
    assert stored.execute("SELECT count(*) FROM requests").fetchone() == (1,)  # written to nothing
    stored.close()


# --- what submit writes, the daemon reads as submit read it ----------------------------------


@pytest.mark.parametrize("country", [None, "DE", "IT", "IN", "BR", "US", "GB"])
def test_every_example_number_reads_back_as_itself_under_any_default_country(country):
    """Digits without their + are a national number of many a country: 447700900123 in DE
    is +49 447700900123. So every number goes into the spool with its +."""
    agents = {"a": {"region": "eu", "rate": 5, "number": "+376 712345"}}
    config = build_config({"agents": agents, "default_agent": "a", "default_country": country})
    examples = [
        phonenumbers.format_number(number, PhoneNumberFormat.E164) for _region, number in EXAMPLES
    ]
    data = "".join(json.dumps({"to": to}) + "\n" for to in examples)
    data += json.dumps({"to": examples[0], "from": "+376712345"}) + "\n"
    submission = read_input(data.encode(), "x.jsonl", config)
    assert submission.errors == []
    spool_file = b"".join(row.spool_line for row in submission.rows)
    (batch, _last), *more = spool_chunks(spool_file, "spool:x", config)
    assert batch.errors == [] and more == []
    assert [r.to for r in batch.requests] == [row.request.to for row in submission.rows]
    assert [r.id for r in batch.requests] == [row.request.id for row in submission.rows]
    assert batch.requests[-1].sender == "376712345"


def test_a_row_too_long_for_a_spool_line_is_a_bad_row(env, tmp_path, capsys):
    cell = "x" * (MAX_LINE_BYTES - 200)
    name = "n" * 250 + ".csv"  # its source makes the line longer still
    data = f"to,Note\n447700900123,{cell}\n447700900124,short\n".encode()
    code, err = submit(env, "--skip-invalid", write(tmp_path, name, data), capsys=capsys)
    assert code == 0, err
    assert f"{name}:2: 65," in err and "bytes as a spool line, over the 64 KiB" in err
    assert [d["to"] for d in spooled(env)] == ["447700900124"]


def test_a_submission_too_large_for_one_spool_file_is_dropped_as_several(env):
    config = load_config(env)
    lines_ = [json.dumps({"to": f"+4477009{n:05d}"}).encode() + b"\n" for n in range(100)]
    paths = drop_into_spool(config.spool_dir, lines_, max_file_bytes=10 * len(lines_[0]))
    assert len(paths) == 10
    assert sorted(b"".join(path.read_bytes() for path in paths).splitlines(keepends=True)) == (
        sorted(lines_)
    )
    assert all(path.stat().st_size <= 10 * len(lines_[0]) for path in paths)
    assert not [p for p in incoming(env).iterdir() if p.name.startswith(".")]


def test_a_moment_that_rounds_out_of_range_is_a_bad_row_not_a_crash(env, tmp_path, capsys):
    data = lines(GOOD, {"to": "447700900124", "not_before": "9999-12-31T23:59:59.999999Z"})
    path = write(tmp_path, "x.jsonl", data)
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    assert f"{path}:2: not_before: '9999-12-31T23:59:59.999999Z' is out of range" in err
    assert nothing_spooled(env)


def test_a_path_that_is_not_utf8_is_written_to_ids_out_as_its_bytes(env, tmp_path):
    path = os.fsencode(tmp_path) + b"/crm-\xff.csv"
    with open(path, "wb") as file:
        file.write(b"to\n447700900123\n")
    out = tmp_path / "ids.csv"
    done = run_dialerd("submit", "-c", str(env), "--ids-out", str(out), os.fsdecode(path))
    assert done.returncode == 0, done.stderr
    (row,) = csv.DictReader(out.read_bytes().decode("utf-8", "surrogateescape").splitlines())
    assert os.fsencode(row["file"]) == path
    assert spooled_sources(env) == ["submit:crm-?.csv:2"]


def test_ids_out_that_is_an_input_is_a_usage_error(env, tmp_path, capsys):
    path = write(tmp_path, "crm.csv", CRM)
    code, err = submit(env, "--ids-out", path, path, capsys=capsys)
    assert code == 64
    assert f"--ids-out {path} is one of the inputs" in err
    assert (tmp_path / "crm.csv").read_bytes() == CRM and nothing_spooled(env)


def test_an_id_of_the_content_form_cannot_be_given(env, tmp_path, capsys):
    """Given, it could take the id a request's content makes, and make that request a false
    duplicate, or block its repeats after the window for ever."""
    config = load_config(env)
    made = build_request(GOOD, config, "x").id
    given = [made, f"{made}.2", f"{made}-mine", "c-" + "f" * 24, "c-mine", f"x{made}"]
    path = write(tmp_path, "x.jsonl", lines(*({**GOOD, "id": id_} for id_ in given)))
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    for line, id_ in enumerate(given[:4], 1):
        assert f"{path}:{line}: id: {id_!r} starts as an id made from a request" in err
    assert [d["id"] for d in spooled(env)] == given[4:]


def test_submit_foresees_on_either_engine_with_pruned_ids_and_ids_of_a_key_kept_together(
    ledger_conn, ledger_where
):
    """The ids made from a request's content, `key`, `key.2`...: found by a range of ids on
    both engines, byte-wise (a locale's order on PostgreSQL could put others between them), and
    a pruned one by its digest."""
    from test_request import CONFIG

    from dialerd.ledger.intake import add
    from dialerd.ledger.retention import id_digest

    request = build_request({"to": "+447700900123"}, CONFIG, "test:1")  # no id: from content
    add(ledger_conn, 1, [request, request], [], None, 0)  # recorded as key and key.2
    ledger_conn.execute(
        "INSERT INTO pruned_ids (digest, taken_at, until) VALUES (?, ?, ?)",
        (id_digest(f"{request.id}.3"), time.time(), time.time() + 3600),
    )
    state_dir, cluster = ledger_where
    assert foresee_intake(state_dir, [request], 0, cluster) == [(f"{request.id}.4", False)]
    assert foresee_intake(state_dir, [request], 86400, cluster) == [(f"{request.id}.3", True)]
