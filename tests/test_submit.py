"""`dialerd submit` (SPEC §2, §4, §5): validate requests, drop them atomically into the spool."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import run_dialerd, write_config

import dialerd.submit as submit_module
from dialerd.cli import main
from dialerd.config import load_config
from dialerd.sources import Batch, parse_spool_file, spool_chunks
from dialerd.submit import drop_into_spool, read_input

GOOD = {"to": "+44 7700 900123"}
BAD_TO = {"to": "not a number"}


@pytest.fixture
def stdin(monkeypatch):
    """Set what `dialerd submit -` reads."""

    def feed(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    return feed


def submit(env: Path, *args: str, capsys) -> tuple[int, str]:
    """Run `dialerd submit -c CONFIG ARGS` in this process: the exit code and stderr."""
    code = main(["submit", "-c", str(env), *args])
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays free: everything is said on stderr
    return code, captured.err


def incoming(env: Path) -> Path:
    return env.parent / "spool" / "incoming"


def spooled(env: Path) -> list[dict]:
    """The requests of the one file submit left in incoming/ (and nothing else is there), less
    the sources submit writes (see spooled_sources), and less the + of every number: each has
    one, so that the daemon reads it as written whatever its default_country."""
    documents = spooled_lines(env)
    for document in documents:
        del document["source"]
        for field in ("to", "from"):
            if field in document and not document[field].startswith("sip:"):
                assert document[field].startswith("+"), document
                document[field] = document[field][1:]
    return documents


def spooled_sources(env: Path) -> list[str]:
    return [document["source"] for document in spooled_lines(env)]


def spooled_lines(env: Path) -> list[dict]:
    names = sorted(p.name for p in incoming(env).iterdir())
    assert len(names) == 1, names
    assert not names[0].startswith(".")
    text = (incoming(env) / names[0]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def read_as_the_daemon(spool_file: Path, config) -> Batch:
    (batch, _last), *more = spool_chunks(spool_file.read_bytes(), "spool:x", config)
    assert more == []
    return batch


def nothing_spooled(env: Path) -> bool:
    return not incoming(env).exists() or not any(incoming(env).iterdir())


def lines(*documents) -> bytes:
    return b"".join(
        (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n" for d in documents
    )


def utc(*fields: int) -> float:
    return dt.datetime(*fields, tzinfo=dt.UTC).timestamp()


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# --- formats -------------------------------------------------------------------------------------


def test_json_lines(env, tmp_path, capsys):
    data = lines(
        {"to": "+44 7700 900123", "id": "r1"},
        b"",
        {"to": "+1 (212) 555-0123", "agent_id": "agent-us", "meta": {"row": 2}},
        b"   ",
        {"to": "sip:alice@example.com", "session_parameters": {"CALLER_NAME": "Diane Miller"}},
    )
    code, err = submit(env, write(tmp_path, "calls.jsonl", data), capsys=capsys)
    assert code == 0, err
    assert "submitted 3 request(s)" in err
    documents = spooled(env)
    assert [d["to"] for d in documents] == ["447700900123", "12125550123", "sip:alice@example.com"]
    assert [d["agent_id"] for d in documents] == ["agent-eu", "agent-us", "agent-eu"]
    assert documents[0]["id"] == "r1"
    assert documents[1]["meta"] == {"row": 2}
    assert documents[2]["session_parameters"] == {"CALLER_NAME": "Diane Miller"}


def test_a_json_object(env, tmp_path, capsys):
    data = json.dumps({"to": "447700900123", "id": "one", "meta": {"a": [1, 2]}}, indent=2)
    assert data.count("\n") > 3  # spread over lines: read as one document, not as lines
    code, err = submit(env, write(tmp_path, "one.json", data.encode()), capsys=capsys)
    assert code == 0, err
    assert spooled(env) == [
        {"id": "one", "to": "447700900123", "agent_id": "agent-eu", "meta": {"a": [1, 2]}}
    ]


def test_a_json_array(env, tmp_path, capsys):
    data = json.dumps([{"to": "447700900123"}, {"to": "12125550123", "agent_id": "agent-us"}])
    code, err = submit(env, write(tmp_path, "many.json", data.encode()), capsys=capsys)
    assert code == 0, err
    assert [(d["to"], d["agent_id"]) for d in spooled(env)] == [
        ("447700900123", "agent-eu"),
        ("12125550123", "agent-us"),
    ]


def test_a_json_array_reports_bad_items_by_position(env, tmp_path, capsys):
    data = json.dumps([GOOD, BAD_TO, GOOD, [1]], indent=1)
    code, err = submit(env, write(tmp_path, "many.json", data.encode()), capsys=capsys)
    assert code == 65
    starts = [n for n, line in enumerate(data.splitlines(), 1) if line in (" {", " [")]
    assert f":{starts[1]}: to: " in err and f":{starts[3]}: " in err  # each item's first line
    assert f":{starts[0]}:" not in err and f":{starts[2]}:" not in err
    assert nothing_spooled(env)


CSV = (
    "\ufeffto,agent_id,id,CALLER_NAME,Greeting,hangup_on_answer_machine,not_before\r\n"
    '+44 7700 900123,agent-eu,r1,"Miller, Diane","Hello,\r\nDiane",yes,2026-11-24T12:00:00Z\r\n'
    '"+1 (212) 555-0123",agent-us,r2,"Zoë ""Z"" Ng",,no,\r\n'
    "447700900124,,,,Hi,,\r\n"
)


def test_csv_with_a_header(env, tmp_path, capsys):
    code, err = submit(env, write(tmp_path, "calls.csv", CSV.encode()), capsys=capsys)
    assert code == 0, err
    first, second, third = spooled(env)
    assert first == {
        "id": "r1",
        "to": "447700900123",
        "agent_id": "agent-eu",
        "session_parameters": {"CALLER_NAME": "Miller, Diane", "Greeting": "Hello,\r\nDiane"},
        "hangup_on_answer_machine": True,
        "not_before": "2026-11-24T12:00:00Z",
    }
    assert second == {
        "id": "r2",
        "to": "12125550123",
        "agent_id": "agent-us",
        "session_parameters": {"CALLER_NAME": 'Zoë "Z" Ng'},
        "hangup_on_answer_machine": False,
    }
    # Empty cells are left out: the default agent, an id made by the daemon, only the given
    # parameter.
    assert third["to"] == "447700900124" and third["agent_id"] == "agent-eu"
    assert third["session_parameters"] == {"Greeting": "Hi"}
    assert "id" not in third


def test_csv_without_bom_and_with_lf(env, tmp_path, capsys):
    data = b"to,NAME\n447700900123,Ann\n12125550123,Bob\n"
    code, err = submit(env, "--skip-invalid", write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 0, err
    assert [d["session_parameters"]["NAME"] for d in spooled(env)] == ["Ann", "Bob"]


def test_csv_bad_rows_are_reported_by_line(env, tmp_path, capsys):
    data = b"to,agent_id\n447700900123,agent-eu\nnot a number,agent-eu\n447700900123,nobody\n"
    path = write(tmp_path, "c.csv", data)
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    assert f"{path}:3: to: " in err
    assert f"{path}:4: agent_id: " in err
    assert f"{path}:2:" not in err
    assert nothing_spooled(env)


@pytest.mark.parametrize(
    ("cell", "expected"), [("true", True), ("FALSE", False), ("1", True), ("0", False)]
)
def test_csv_booleans(env, tmp_path, capsys, cell, expected):
    data = f"to,hangup_on_answer_machine\n447700900123,{cell}\n".encode()
    code, err = submit(env, write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["hangup_on_answer_machine"] is expected


def test_csv_bad_boolean(env, tmp_path, capsys):
    data = b"to,hangup_on_answer_machine\n447700900123,maybe\n"
    code, err = submit(env, write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 65
    assert ":2: hangup_on_answer_machine: " in err


def test_csv_with_only_a_header(env, tmp_path, capsys):
    code, err = submit(env, write(tmp_path, "c.csv", b"to,NAME\n"), capsys=capsys)
    assert code == 65
    assert "no valid request" in err
    assert nothing_spooled(env)


def test_csv_not_utf8_is_refused(env, tmp_path, capsys):
    # A cp1252 export: the names must not arrive as U+FFFD.
    data = "to,CALLER_NAME\n447700900123,René\n".encode("cp1252")
    code, err = submit(env, write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 65
    assert "UTF-8" in err
    assert nothing_spooled(env)


def test_csv_with_a_runaway_quote_is_bad_data(env, tmp_path, capsys):
    # An unclosed quote swallows the rest of the file into one field, past csv's field limit.
    rows = "".join(f"4477009{n:05d},Name {n}\n" for n in range(12_000))
    data = f'to,NAME\n447700900123,"Unclosed\n{rows}'.encode()
    assert len(data) > 131_072
    code, err = submit(env, write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 65
    assert "c.csv" in err
    assert nothing_spooled(env)


# --- all or nothing ------------------------------------------------------------------------------


def test_all_or_nothing(env, tmp_path, capsys):
    data = lines(GOOD, BAD_TO, GOOD, b"{not json", {"to": "447700900123", "colour": "red"}, GOOD)
    path = write(tmp_path, "calls.jsonl", data)
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    assert f"{path}:2: to: " in err
    assert f"{path}:4: not JSON" in err
    assert f"{path}:5: unknown field 'colour'" in err
    for good in (1, 3, 6):
        assert f"{path}:{good}:" not in err
    assert "3 invalid request(s); nothing submitted" in err
    assert nothing_spooled(env)


def test_skip_invalid_submits_the_valid_ones(env, tmp_path, capsys):
    data = lines({"to": "447700900123", "id": "a"}, BAD_TO, {"to": "447700900124", "id": "b"})
    path = write(tmp_path, "calls.jsonl", data)
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert f"{path}:2: to: " in err
    assert "submitted 2 request(s)" in err and "skipped 1 invalid" in err
    assert [d["id"] for d in spooled(env)] == ["a", "b"]


def test_skip_invalid_with_nothing_valid(env, tmp_path, capsys):
    code, err = submit(
        env, "--skip-invalid", write(tmp_path, "x.jsonl", lines(BAD_TO, BAD_TO)), capsys=capsys
    )
    assert code == 65
    assert ":1: to:" in err and ":2: to:" in err
    assert nothing_spooled(env)


def test_several_files_make_one_submission(env, tmp_path, capsys):
    first = write(tmp_path, "a.jsonl", lines({"to": "447700900123", "id": "a"}))
    second = write(tmp_path, "b.csv", b"to,id\n447700900124,b\n")
    code, err = submit(env, first, second, capsys=capsys)
    assert code == 0, err
    assert [d["id"] for d in spooled(env)] == ["a", "b"]


def test_a_bad_line_in_any_file_stops_all(env, tmp_path, capsys):
    first = write(tmp_path, "a.jsonl", lines(GOOD))
    second = write(tmp_path, "b.jsonl", lines(GOOD, BAD_TO))
    code, err = submit(env, first, second, capsys=capsys)
    assert code == 65
    assert f"{second}:2: to:" in err
    assert nothing_spooled(env)


@pytest.mark.parametrize(
    "data",
    [b"", b"\n\n", b"\xff\xfe{}", b'{"to": "447700900123"}\x00\n'],
)
def test_unreadable_input(env, tmp_path, capsys, data):
    code, err = submit(env, write(tmp_path, "x.jsonl", data), capsys=capsys)
    assert code == 65
    assert "x.jsonl" in err
    assert nothing_spooled(env)


def test_a_json_file_with_a_bom(env, tmp_path, capsys):
    data = "\ufeff" + json.dumps([GOOD, GOOD])
    code, err = submit(env, write(tmp_path, "bom.json", data.encode()), capsys=capsys)
    assert code == 0, err
    assert len(spooled(env)) == 2


def test_nan_is_not_json(env, tmp_path, capsys):
    data = b'[{"to": "447700900123", "meta": {"score": NaN}}]'
    code, err = submit(env, write(tmp_path, "nan.json", data), capsys=capsys)
    assert code == 65
    assert "nan.json" in err
    assert nothing_spooled(env)


@pytest.mark.parametrize("as_array", [False, True])
def test_a_huge_integer_is_bad_data_not_a_crash(env, tmp_path, capsys, as_array):
    line = b'{"to": "447700900123", "meta": {"n": ' + b"1" * 5000 + b"}}"
    data = b"[" + json.dumps(GOOD).encode() + b", " + line + b"]" if as_array else lines(GOOD, line)
    code, err = submit(env, write(tmp_path, "big.json", data), capsys=capsys)
    assert code == 65
    assert "big.json" in err
    assert nothing_spooled(env)


def test_a_lone_surrogate_is_bad_data_not_a_crash(env, tmp_path, capsys):
    data = lines(GOOD, b'{"to": "447700900123", "meta": {"name": "\\ud800"}}')
    code, err = submit(env, write(tmp_path, "s.jsonl", data), capsys=capsys)
    assert code == 65
    assert "s.jsonl:2:" in err and "s.jsonl:1:" not in err
    assert nothing_spooled(env)


# --- what goes into the spool --------------------------------------------------------------------


def test_ids_made_from_the_content_are_made_again_by_the_daemon(env, tmp_path, capsys):
    given = {**GOOD, "id": "crm-1"}
    code, err = submit(env, write(tmp_path, "x.jsonl", lines(GOOD, given)), capsys=capsys)
    assert code == 0, err
    assert ["id" in d for d in spooled(env)] == [False, True]
    # The daemon makes the same id from the content: the same list fed again is a duplicate.
    spool_file = next(incoming(env).iterdir())
    config = load_config(env)
    batch = read_as_the_daemon(spool_file, config)
    (row,) = read_input(lines(GOOD), "y.jsonl", config).rows
    ours = row.request
    assert [r.id for r in batch.requests][1] == "crm-1"
    assert batch.requests[0].id_from_content and batch.requests[0].id.startswith("c-")
    assert ours.id == batch.requests[0].id
    assert batch.invalid == []


def test_the_spool_file_reads_back_as_the_same_requests(env, tmp_path, capsys):
    documents = [
        {
            "to": "+44 7700 900123",
            "from": "+44 7700 900000",
            "id": "f1",
            "session_parameters": [{"name": "CALLER_NAME", "value": "Diane"}],
            "hangup_on_answer_machine": False,
            "not_before": "2026-11-24T13:00:00+01:00",
            "expires_at": "2026-11-24T18:00:00Z",
            "meta": {"row": 1, "nested": {"x": None}},
        },
        {"to": "12125550123", "agent_id": "agent-us", "id": "f2"},
    ]
    config = load_config(env)
    original = [
        r.api_body() for r in parse_spool_file(json.dumps(documents).encode(), "o", config).requests
    ]
    code, err = submit(
        env, write(tmp_path, "x.json", json.dumps(documents).encode()), capsys=capsys
    )
    assert code == 0, err
    first, second = spooled(env)
    assert first["from"] == "447700900000" and "agent_id" not in first
    assert first["not_before"] == "2026-11-24T12:00:00Z"
    assert first["expires_at"] == "2026-11-24T18:00:00Z"
    assert first["meta"] == {"row": 1, "nested": {"x": None}}
    batch = read_as_the_daemon(next(incoming(env).iterdir()), config)
    assert [r.api_body() for r in batch.requests] == original
    assert [(r.not_before, r.expires_at, r.meta) for r in batch.requests] == [
        (utc(2026, 11, 24, 12), utc(2026, 11, 24, 18), {"row": 1, "nested": {"x": None}}),
        (None, None, None),
    ]


def test_the_file_appears_in_incoming_only_by_rename(env, tmp_path, capsys, monkeypatch):
    seen: list[tuple[str, str, list[str], bytes]] = []
    real_rename, real_replace = os.rename, os.replace

    def spy(real):
        def rename(source, target, *args, **kwargs):
            source, target = Path(source), Path(target)
            if target.parent == incoming(env):
                seen.append(
                    (
                        source.name,
                        target.name,
                        sorted(p.name for p in incoming(env).iterdir()),
                        source.read_bytes(),
                    )
                )
            return real(source, target, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", spy(real_rename))
    monkeypatch.setattr(os, "replace", spy(real_replace))
    code, err = submit(env, write(tmp_path, "x.jsonl", lines(GOOD, GOOD)), capsys=capsys)
    assert code == 0, err
    assert len(seen) == 1
    source, target, before, content = seen[0]
    assert source == f".{target}.part"  # written in incoming/ under a name the daemon ignores
    assert not target.startswith(".") and target.endswith(".jsonl")
    assert len(target) > 32 + len("submit-YYYYmmddTHHMMSS-.jsonl") - 1  # 128 random bits
    assert all(name.startswith(".") for name in before)  # nothing visible before the rename
    final = incoming(env) / target
    assert final.read_bytes() == content  # complete when renamed
    assert sorted(p.name for p in incoming(env).iterdir()) == [target]


def test_a_failed_write_leaves_nothing_behind(env, tmp_path, capsys, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(submit_module.os, "fsync", broken_fsync)
    code, err = submit(env, write(tmp_path, "x.jsonl", lines(GOOD)), capsys=capsys)
    assert code == 73
    assert "No space left on device" in err
    assert nothing_spooled(env)  # not even the dot file


def test_two_submissions_never_share_a_file(env, tmp_path):
    config = load_config(env)
    (first,) = drop_into_spool(config.spool_dir, [b'{"id": "a"}\n'])
    (second,) = drop_into_spool(config.spool_dir, [b'{"id": "b"}\n'])
    assert first != second
    assert first.parent == second.parent == incoming(env)
    assert (first.read_text(), second.read_text()) == ('{"id": "a"}\n', '{"id": "b"}\n')


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_spool_file_is_readable_by_the_daemon(env, tmp_path, capsys, umask):
    # The daemon runs as its own user, of neither the file's user nor its group (incoming/'s,
    # the submitters'): the file is 0604 whatever the submitter's umask, readable by the
    # daemon and by no other submitter.
    old = os.umask(umask)
    try:
        code, err = submit(env, write(tmp_path, "x.jsonl", lines(GOOD)), capsys=capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    spool_file = next(incoming(env).iterdir())
    assert stat.S_IMODE(spool_file.stat().st_mode) == 0o604
    assert spool_file.stat().st_gid == incoming(env).stat().st_gid


def test_read_input_detects_the_format(env):
    config = load_config(env)
    as_lines = read_input(lines(GOOD, GOOD), "l", config)
    as_array = read_input(json.dumps([GOOD]).encode(), "a", config)
    as_csv = read_input(b"to\n447700900123\n", "c", config)
    assert (len(as_lines.rows), len(as_array.rows), len(as_csv.rows)) == (2, 1, 1)
    assert as_lines.errors == as_array.errors == as_csv.errors == []
    bad = read_input(lines(GOOD, BAD_TO), "l", config)
    assert [row.line for row in bad.rows] == [1]
    assert len(bad.errors) == 1 and bad.errors[0].startswith("l:2: to: ")


# --- stdin ---------------------------------------------------------------------------------------


def test_stdin_with_a_dash(env, stdin, capsys):
    stdin(lines({"to": "447700900123", "id": "s1"}, BAD_TO))
    code, err = submit(env, "--skip-invalid", "-", capsys=capsys)
    assert code == 0, err
    assert "stdin:2: to: " in err
    assert [d["id"] for d in spooled(env)] == ["s1"]


def test_stdin_is_the_default(env, stdin, capsys):
    stdin(b"to,NAME\n447700900123,Ann\n")
    code, err = submit(env, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["session_parameters"] == {"NAME": "Ann"}


def test_the_real_command_reads_stdin(env, tmp_path):
    done = run_dialerd(
        "submit", "-c", str(env), "-", input=lines(GOOD, {"to": "12125550123"}), timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert b"submitted 2 request(s)" in done.stderr
    assert [d["to"] for d in spooled(env)] == ["447700900123", "12125550123"]


def test_the_real_command_refuses_bad_data(env, tmp_path):
    done = run_dialerd("submit", "-c", str(env), "-", input=lines(GOOD, BAD_TO), timeout=20)
    assert done.returncode == 65
    assert b"stdin:2: to: " in done.stderr
    assert b"Traceback" not in done.stderr
    assert nothing_spooled(env)


# --- exit codes ----------------------------------------------------------------------------------


def test_usage_error(env, capsys):
    code = main(["submit", "-c", str(env), "--no-such-option"])
    assert code == 64
    assert "--no-such-option" in capsys.readouterr().err


def test_bad_config(tmp_path, capsys):
    path = write_config(tmp_path, {"a": {"region": "mars", "rate": 1}}, spool={"dir": "/s"})
    assert main(["submit", "-c", str(path), "-"]) == 78
    assert "agents.a.region" in capsys.readouterr().err


def test_config_without_spool(tmp_path, capsys, stdin):
    path = write_config(tmp_path)
    stdin(lines(GOOD))
    assert main(["submit", "-c", str(path), "-"]) == 78
    assert "spool.dir" in capsys.readouterr().err


def test_missing_input_file(env, tmp_path, capsys):
    code, err = submit(env, str(tmp_path / "absent.jsonl"), capsys=capsys)
    assert code == 66  # EX_NOINPUT
    assert "absent.jsonl" in err
    assert nothing_spooled(env)
