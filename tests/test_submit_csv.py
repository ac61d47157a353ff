"""`dialerd submit --csv`, `--map`, `--delimiter` and `--encoding` (SPEC §2, §4): CSV columns to
request fields and session parameters, a header's faults told once, delimiters and encodings as
spreadsheets write them, the report of where each column goes, and the progress bar on a
terminal."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import SUBMIT_AGENTS, dialerd, dialerd_env, write_config
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_submit import GOOD, incoming, nothing_spooled, spooled, submit, write

from dialerd.cli import main
from dialerd.submit import CSV_FIELDS, PROGRESS_MIN_ROWS


def without_ids(documents: list[dict]) -> list[dict]:
    """The spooled requests less the ids that submit generated."""
    return [{k: v for k, v in document.items() if k != "id"} for document in documents]


# --- CSV as spreadsheets write it -----------------------------------------------------------------


def test_quoting_embedded_newlines_a_bom_and_crlf(env, tmp_path, capsys):
    data = (
        "\ufeffto,NAME,NOTE\r\n"
        '447700900123,"Miller, Diane","said ""call me""\r\nafter six"\r\n'
        '447700900124,"Ng\nZoë",plain\r\n'
        "447700900125,Ann,\r\n"
    ).encode()
    code, err = submit(env, "--csv", write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [
        {"to": "447700900123", "agent_id": "agent-eu",
         "session_parameters": {"NAME": "Miller, Diane", "NOTE": 'said "call me"\r\nafter six'}},
        {"to": "447700900124", "agent_id": "agent-eu",
         "session_parameters": {"NAME": "Ng\nZoë", "NOTE": "plain"}},
        {"to": "447700900125", "agent_id": "agent-eu", "session_parameters": {"NAME": "Ann"}},
    ]  # fmt: skip


def test_a_bad_row_is_named_by_the_line_it_starts_on(env, tmp_path, capsys):
    data = (
        b"to,NOTE\r\n"  # line 1
        b'447700900123,"one\r\ntwo\r\nthree"\r\n'  # lines 2-4
        b'not a number,"four\nfive"\r\n'  # lines 5-6
        b"\r\n"  # line 7, blank
        b"447700900124,x,surplus\r\n"  # line 8
        b"447700900125,ok\r\n"  # line 9
    )
    path = write(tmp_path, "c.csv", data)
    code, err = submit(env, "--csv", path, capsys=capsys)
    assert code == 65
    assert f"{path}:5: to: " in err
    assert f"{path}:8: 3 cells, but the header has 2 columns" in err
    for good in (2, 3, 4, 6, 7, 9):
        assert f"{path}:{good}:" not in err
    assert "2 invalid request(s); nothing submitted" in err
    assert nothing_spooled(env)

    code, err = submit(env, "--csv", "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert [d["to"] for d in spooled(env)] == ["447700900123", "447700900125"]


def test_blank_cells_are_absent_fields_and_parameters(env, tmp_path, capsys):
    data = (
        b"to,agent_id,id,not_before,hangup_on_answer_machine,NAME,GREETING,\n"
        b"447700900123,, ,,  ,Ann,  ,\n"  # blank or only spaces: absent
        b",,,,,,,\n"  # a row of empty cells is a blank line
        b"12125550123,agent-us\n"  # a short row: the missing cells are absent
        b"447700900124,,,,,,,kept out\n"  # the column with no name is ignored
    )
    code, err = submit(env, "--csv", write(tmp_path, "c.csv", data), capsys=capsys)
    assert code == 0, err
    first, second, third = spooled(env)
    assert {k: v for k, v in first.items() if k != "id"} == {
        "to": "447700900123",
        "agent_id": "agent-eu",
        "session_parameters": {"NAME": "Ann"},
    }
    assert "id" not in first  # a blank id cell: the id is made from the content
    assert without_ids([second, third]) == [
        {"to": "12125550123", "agent_id": "agent-us"},
        {"to": "447700900124", "agent_id": "agent-eu"},
    ]


def test_csv_is_read_as_csv_whatever_it_starts_with(env, tmp_path, capsys):
    path = write(tmp_path, "c.txt", b"[to],NAME\n447700900123,Ann\n")
    code, err = submit(env, path, capsys=capsys)
    assert code == 65  # sniffed as a JSON array, and refused
    assert "JSON" in err
    code, err = submit(env, "--csv", "--map", "[to]=to", path, capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [
        {"to": "447700900123", "agent_id": "agent-eu", "session_parameters": {"NAME": "Ann"}}
    ]


def test_an_empty_input_read_as_csv(env, tmp_path, capsys):
    path = write(tmp_path, "empty.csv", b"\n\r\n")
    code, err = submit(env, "--csv", path, capsys=capsys)
    assert code == 65
    assert f"{path}: no header row" in err
    assert nothing_spooled(env)


# --- --map ----------------------------------------------------------------------------------------


def test_map_sends_columns_to_fields_parameters_and_nowhere(env, tmp_path, capsys):
    data = (
        b"Phone,Line,First name,Internal code,Greeting,to\n"
        b"+44 7700 900123,agent-us,Diane,X-1,Hello,ignored\n"
    )
    code, err = submit(
        env,
        "--map", "Phone=to",
        "--map", "Line=agent_id",
        "--map", "First name=session_parameters.CALLER_NAME",
        "--map", "Internal code=-",
        "--map", "to=-",  # a column named like a field, sent nowhere
        write(tmp_path, "crm-export.csv", data),
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    # Greeting, not mapped, still goes by its name: a session parameter.
    assert without_ids(spooled(env)) == [
        {
            "to": "447700900123",
            "agent_id": "agent-us",
            "session_parameters": {"CALLER_NAME": "Diane", "Greeting": "Hello"},
        }
    ]


def test_map_applies_the_fields_rules(env, tmp_path, capsys):
    data = b"phone,AMD,start\n447700900123,yes,2026-11-24T13:00:00+01:00\n447700900124,maybe,\n"
    path = write(tmp_path, "c.csv", data)
    options = ("--map", "phone=to", "--map", "AMD=hangup_on_answer_machine")
    code, err = submit(env, *options, "--map", "start=not_before", path, capsys=capsys)
    assert code == 65
    assert f"{path}:3: hangup_on_answer_machine: " in err and f"{path}:2:" not in err
    code, err = submit(
        env, *options, "--map", "start=not_before", "--skip-invalid", path, capsys=capsys
    )
    assert code == 0, err
    (document,) = spooled(env)
    assert document["hangup_on_answer_machine"] is True
    assert document["not_before"] == "2026-11-24T12:00:00Z"


def test_a_map_naming_a_column_the_header_lacks_is_a_usage_error(env, tmp_path, capsys):
    path = write(tmp_path, "c.csv", b"to,Name\n447700900123,Ann\n")
    code, err = submit(env, "--map", "Nmae=session_parameters.NAME", path, capsys=capsys)
    assert code == 64
    assert err == f"dialerd: submit: --map names column 'Nmae', which the header of {path} lacks\n"
    assert nothing_spooled(env)


@pytest.mark.parametrize(
    ("option", "complaint"),
    [
        ("to", "expected COLUMN=FIELD"),
        ("=to", "expected COLUMN=FIELD"),
        ("phone=colour", "FIELD must be one of to, agent_id, from, id,"),
        ("phone=meta", "FIELD must be one of"),
        ("phone=session_parameters.", "FIELD must be one of"),
        ("phone=session_parameters", "FIELD must be one of"),
    ],
)
def test_a_bad_map_is_a_usage_error(env, tmp_path, capsys, option, complaint):
    path = write(tmp_path, "c.csv", b"phone\n447700900123\n")
    code, err = submit(env, "--map", option, path, capsys=capsys)
    assert code == 64
    assert err.startswith(f"dialerd: submit: --map {option!r}: {complaint}")
    assert err.count("\n") == 1
    assert nothing_spooled(env)


def test_a_column_mapped_twice_is_a_usage_error(env, tmp_path, capsys):
    path = write(tmp_path, "c.csv", b"phone\n447700900123\n")
    code, err = submit(env, "--map", "phone=to", "--map", "phone=-", path, capsys=capsys)
    assert code == 64
    assert "--map names column 'phone' twice" in err


@pytest.mark.parametrize(
    ("header", "options", "complaint"),
    [
        (b"to,to", (), "columns 'to' and 'to' both give to"),
        (b"to, to ", (), "columns 'to' and 'to' both give to"),
        (b"to,NAME,NAME", (), "columns 'NAME' and 'NAME' both give session_parameters.NAME"),
        (b"to,phone", ("--map", "phone=to"), "columns 'to' and 'phone' both give to"),
    ],
)
def test_two_columns_for_one_field_are_bad_data(env, tmp_path, capsys, header, options, complaint):
    path = write(tmp_path, "c.csv", b"\n" + header + b"\n447700900123,447700900124,x\n" * 6000)
    code, err = submit(env, *options, "--skip-invalid", path, capsys=capsys)
    assert code == 65
    fix = "remove or rename one, or --map it elsewhere"
    assert err == refused(f"{path}:2: {complaint}: {fix}")  # the header's line
    assert nothing_spooled(env)


# --- the header's faults: one message, before any row, and nothing spooled ----------------------

# Enough rows that a message per row would show.
CRM_ROWS = "".join(f"4477009{n:05d},Name {n}\n" for n in range(6000))


def refused(*faults: str) -> str:
    """All that submit says of a bad header: its faults ("NAME:LINE: ..."), as one message."""
    if len(faults) == 1:
        return f"dialerd: bad CSV header, nothing submitted: {faults[0]}\n"
    return "dialerd: bad CSV header, nothing submitted:\n" + "".join(f"  {f}\n" for f in faults)


def map_option(column: str, destination: str) -> str:
    return "--map " + shlex.quote(f"{column}={destination}")


@pytest.mark.parametrize("skip_invalid", [(), ("--skip-invalid",)])
@pytest.mark.parametrize(
    ("header", "likeliest"),
    [
        ("Phone,First name", "Phone"),
        ("First name,MOBILE NUMBER", "MOBILE NUMBER"),
        ("Name,tel", "tel"),
        ("PhoneNumber,Name", "PhoneNumber"),
        ("cell_phone,Name", "cell_phone"),
        ("Name,MSISDN", "MSISDN"),
        ("Account number,Mobile", "Mobile"),  # a number, but Mobile is likelier
    ],
)
def test_no_column_for_to_is_one_message_naming_the_likely_column(
    env, tmp_path, capsys, header, likeliest, skip_invalid
):
    path = write(tmp_path, "crm.csv", f"{header}\n{CRM_ROWS}".encode())
    code, err = submit(env, *skip_invalid, path, capsys=capsys)
    assert code == 65
    listed = ", ".join(repr(column) for column in header.split(","))
    fix = f"{map_option(likeliest, 'to')} takes the numbers from {likeliest!r}"
    assert err == refused(f"{path}:1: no column for to (the header has {listed}): {fix}")
    assert nothing_spooled(env)


def test_no_column_for_to_and_none_like_a_phone(env, tmp_path, capsys):
    path = write(tmp_path, "crm.csv", f"Name,Notes\n{CRM_ROWS}".encode())
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    assert err == refused(
        f"{path}:1: no column for to (the header has 'Name', 'Notes'): "
        "name the column of numbers to, or add --map COLUMN=to"
    )
    assert nothing_spooled(env)


LOOKALIKES = [
    ("To", "to"),
    ("TO", "to"),
    ("agentId", "agent_id"),
    ("Agent ID", "agent_id"),
    ("AGENT-ID", "agent_id"),
    ("agent", "agent_id"),
    ("ID", "id"),
    ("From", "from"),
    ("notBefore", "not_before"),
    ("Expires_At", "expires_at"),
    ("expires", "expires_at"),
    ("hangup", "hangup_on_answer_machine"),
    ("Hangup on answer machine", "hangup_on_answer_machine"),
]


def lookalike_fault(path: str, line: int, column: str, field: str) -> str:
    return (
        f"{path}:{line}: column {column!r} looks like {field} but would be a session parameter: "
        f"{map_option(column, field)} makes it {field}, "
        f"{map_option(column, 'session_parameters.' + column)} keeps it a parameter, "
        "or rename it"
    )


@pytest.mark.parametrize("skip_invalid", [(), ("--skip-invalid",)])
@pytest.mark.parametrize(("column", "field"), LOOKALIKES)
def test_a_column_like_a_fields_name_is_one_message(
    env, tmp_path, capsys, column, field, skip_invalid
):
    # Before, such a column quietly became a session parameter: calls from the default agent,
    # with no expiry.
    header = f"{column},NAME" if field == "to" else f"to,{column}"
    path = write(tmp_path, "crm.csv", f"{header}\n{CRM_ROWS}".encode())
    code, err = submit(env, *skip_invalid, path, capsys=capsys)
    assert code == 65
    assert err == refused(lookalike_fault(path, 1, column, field))
    assert nothing_spooled(env)


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("agent_id", {"agent_id": "agent-us"}),
        ("session_parameters.agentId", {"agent_id": "agent-eu",
                                        "session_parameters": {"agentId": "agent-us"}}),
        ("-", {"agent_id": "agent-eu"}),
    ],
)  # fmt: skip
def test_a_map_routes_a_column_like_a_fields_name(env, tmp_path, capsys, destination, expected):
    path = write(tmp_path, "crm.csv", b"to,agentId\n447700900123,agent-us\n")
    code, err = submit(env, "--map", f"agentId={destination}", path, capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [{"to": "447700900123", **expected}]


def test_every_fault_of_a_header_in_one_message(env, tmp_path, capsys):
    path = write(tmp_path, "crm.csv", f"Mobile,agentId,Expires,NAME,NAME\n{CRM_ROWS}".encode())
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 65
    assert err == refused(
        f"{path}:1: no column for to (the header has 'Mobile', 'agentId', 'Expires', 'NAME', "
        "'NAME'): --map Mobile=to takes the numbers from 'Mobile'",
        lookalike_fault(path, 1, "agentId", "agent_id"),
        lookalike_fault(path, 1, "Expires", "expires_at"),
        f"{path}:1: columns 'NAME' and 'NAME' both give session_parameters.NAME: "
        "remove or rename one, or --map it elsewhere",
    )
    assert nothing_spooled(env)


def test_the_header_of_each_input_is_told_and_none_is_spooled(env, tmp_path, capsys):
    first = write(tmp_path, "first.csv", f"Phone,Name\n{CRM_ROWS}".encode())
    good = write(tmp_path, "good.csv", b"to,Name\n447700900123,Ann\n")
    last = write(tmp_path, "last.csv", b"to,Expires\n447700900124,2030-01-01T00:00:00Z\n")
    code, err = submit(env, "--skip-invalid", first, good, last, capsys=capsys)
    assert code == 65
    assert err == f"{good}: columns: to → to, Name → session_parameters.Name\n" + refused(
        f"{first}:1: no column for to (the header has 'Phone', 'Name'): "
        "--map Phone=to takes the numbers from 'Phone'",
        lookalike_fault(last, 1, "Expires", "expires_at"),
    )
    assert nothing_spooled(env)


@st.composite
def field_lookalikes(draw) -> tuple[str, str]:
    """A field's name, or its first words, spelt with any case and any spaces, '-' or '_'
    between its letters, but not as the field itself; and that field."""
    name = draw(st.sampled_from(CSV_FIELDS))
    words = name.split("_")
    letters = "".join(words[: draw(st.integers(1, len(words)))])
    column = letters[0]
    for letter in letters[1:]:
        column += draw(st.sampled_from(["", " ", "-", "_", " - "])) + letter
    column = "".join(draw(st.sampled_from([c, c.upper()])) for c in column)
    assume(column not in CSV_FIELDS)
    return column, name


CELLS = {
    "to": "447700900123",
    "agent_id": "agent-us",
    "from": "447700900000",
    "id": "row-1",
    "not_before": "2026-11-24T12:00:00Z",
    "expires_at": "2099-01-01T00:00:00Z",
    "hangup_on_answer_machine": "yes",
    "campaign": "spring-2027",
    "priority": "7",
    "timezone": "America/Phoenix",
}


@settings(max_examples=150, deadline=None)
@given(field_lookalikes(), st.sampled_from([None, "field", "parameter", "nowhere"]))
def test_a_column_like_a_field_is_routed_or_refused_never_a_parameter(
    tmp_path_factory, lookalike, route
):
    column, name = lookalike
    directory = tmp_path_factory.mktemp("lookalike")
    env = write_config(
        directory, SUBMIT_AGENTS, default_agent="agent-eu", spool={"dir": str(directory / "spool")}
    )
    header, row = (
        ([column], [CELLS["to"]]) if name == "to" else (["to", column], [CELLS["to"], CELLS[name]])
    )
    path = write(directory, "crm.csv", f"{','.join(header)}\n{','.join(row)}\n".encode())
    options = {
        None: [],
        "field": ["--map", f"{column}={name}"],
        "parameter": ["--map", f"{column}=session_parameters.{column}"],
        "nowhere": ["--map", f"{column}=-"],
    }[route]
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        code = main(["submit", "-c", str(env), *options, path])
    if route is None or (name == "to" and route != "field"):  # unrouted, or no `to` left
        assert code == 65, said.getvalue()
        assert said.getvalue().count("\n") == 1 and repr(column) in said.getvalue()
        assert nothing_spooled(env)
        return
    assert code == 0, said.getvalue()
    (document,) = spooled(env)
    if route == "field":
        assert name in document and "session_parameters" not in document
    elif route == "parameter":
        assert document["session_parameters"] == {column: CELLS[name]}
    else:  # nowhere: as if the column were not there
        assert without_ids([document]) == [{"to": CELLS["to"], "agent_id": "agent-eu"}]


# --- delimiters -----------------------------------------------------------------------------------

DIANE = {"to": "447700900123", "agent_id": "agent-eu",
         "session_parameters": {"First name": "Diane", "Last name": "Miller"}}  # fmt: skip


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_the_delimiter_is_sniffed_from_the_header(env, tmp_path, capsys, delimiter):
    data = delimiter.join(["to", "First name", "Last name"]) + "\n"
    data += delimiter.join(["447700900123", "Diane", "Miller"]) + "\n"
    code, err = submit(env, write(tmp_path, "c.csv", data.encode()), capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [DIANE]


def test_the_delimiter_giving_the_most_columns_wins_and_quotes_count(env, tmp_path, capsys):
    # Three commas against two semicolons, but the commas are inside a quoted cell.
    data = '"Notes, a, b, c";to;Name\n"x, y";447700900123;"Miller; Diane|Ng\tZoë"\n'
    code, err = submit(env, write(tmp_path, "c.csv", data.encode()), capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [
        {"to": "447700900123", "agent_id": "agent-eu",
         "session_parameters": {"Notes, a, b, c": "x, y", "Name": "Miller; Diane|Ng\tZoë"}}
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [("to,Name;x", ","), ("to;Name\tx", ";"), ("to\tName|x", "\t"), ("to", ",")],
)
def test_a_tie_goes_to_the_first_of_comma_semicolon_tab_pipe(
    env, tmp_path, capsys, header, delimiter
):
    path = write(tmp_path, "c.csv", f"{header}\n447700900123\n".encode())
    code, err = submit(env, path, capsys=capsys)
    assert code == 0, err
    columns = header.split(delimiter)
    assert err.splitlines()[0] == f"{path}: columns: " + ", ".join(
        f"{column} → " + ("to" if column == "to" else f"session_parameters.{column}")
        for column in columns
    )


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_excels_sep_line_says_the_delimiter_and_is_not_the_header(env, tmp_path, capsys, delimiter):
    rows = ["to,First name;Last name|x\tx", "447700900123,Diane;Miller|x\tx", "not a number"]
    data = f"\ufeffsep={delimiter}\r\n" + "".join(f"{row}\r\n" for row in rows)
    path = write(tmp_path, "c.csv", data.encode())
    code, err = submit(env, path, capsys=capsys)
    if delimiter != ",":  # the header has no column named to
        assert code == 65
        assert f"{path}:2: no column for to" in err  # the file's own lines: the header is 2
        return
    assert code == 65
    assert f"{path}:4: to: " in err and f"{path}:3:" not in err
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [
        {"to": "447700900123", "agent_id": "agent-eu",
         "session_parameters": {"First name;Last name|x\tx": "Diane;Miller|x\tx"}}
    ]  # fmt: skip


def test_a_sep_line_with_semicolons_as_excel_writes_it(env, tmp_path, capsys):
    data = "sep=;\r\nto;First name;Last name\r\n447700900123;Diane;Miller\r\nbad;x;y\r\n"
    path = write(tmp_path, "excel.csv", data.encode())
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert f"{path}:4: to: " in err
    assert without_ids(spooled(env)) == [DIANE]


@pytest.mark.parametrize("option", ["|", "\\t", "tab", "TAB", "\t"])
def test_the_delimiter_option_overrides_sniffing(env, tmp_path, capsys, option):
    delimiter = "|" if option == "|" else "\t"
    data = f"to{delimiter}a,b,c\n447700900123{delimiter}x,y,z\n"
    path = write(tmp_path, "c.csv", data.encode())
    code, err = submit(env, path, capsys=capsys)
    assert code == 65  # sniffed: commas, three columns ("to|a", "b", "c"), none of them to
    assert "no column for to" in err
    code, err = submit(env, "--delimiter", option, path, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["session_parameters"] == {"a,b,c": "x,y,z"}


def test_the_delimiter_option_overrides_a_sep_line(env, tmp_path, capsys):
    path = write(tmp_path, "c.csv", b"sep=;\nto|a;b\n447700900123|x;y\n")
    code, err = submit(env, "--delimiter", "|", path, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["session_parameters"] == {"a;b": "x;y"}


@pytest.mark.parametrize("option", ["x", ":", "", ",,", "space", "\\n"])
def test_another_delimiter_is_a_usage_error(env, tmp_path, capsys, option):
    path = write(tmp_path, "c.csv", b"to\n447700900123\n")
    code, err = submit(env, "--delimiter", option, path, capsys=capsys)
    assert code == 64
    assert err == f"dialerd: submit: --delimiter {option!r}: expected , ; | or tab\n"
    assert nothing_spooled(env)


# --- encodings and BOMs ---------------------------------------------------------------------------

EXCEL_EXPORT = "to;Last name;First name\r\n447700900123;Müller;Zoë\r\n"
MULLER = {"to": "447700900123", "agent_id": "agent-eu",
          "session_parameters": {"Last name": "Müller", "First name": "Zoë"}}  # fmt: skip


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1", "utf-16", "UTF-8", "utf-8-sig"])
def test_the_encoding_option_reads_a_csv(env, tmp_path, capsys, encoding):
    path = write(tmp_path, "export.csv", EXCEL_EXPORT.encode(encoding))
    code, err = submit(env, "--encoding", encoding, path, capsys=capsys)
    assert code == 0, err
    assert without_ids(spooled(env)) == [MULLER]


def test_a_file_not_in_utf8_names_the_byte_and_line_and_the_option(env, tmp_path, capsys):
    data = EXCEL_EXPORT.encode("cp1252")
    path = write(tmp_path, "export.csv", data)
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 65
    byte = data.index("ü".encode("cp1252")) + 1
    assert err.splitlines()[0] == (
        f"{path}: not UTF-8 at byte {byte}, line 2: "
        "pass its encoding, e.g. --encoding cp1252 for an Excel export"
    )
    assert nothing_spooled(env)


def test_a_file_not_in_the_given_encoding(env, tmp_path, capsys):
    data = b"to,Name\n447700900123,\x81\n"  # 0x81 has no character in cp1252
    path = write(tmp_path, "export.csv", data)
    code, err = submit(env, "--encoding", "cp1252", path, capsys=capsys)
    assert code == 65
    assert err.splitlines()[0] == (
        f"{path}: not cp1252 at byte {len(data) - 1}, line 2: pass its own encoding with --encoding"
    )
    assert nothing_spooled(env)


def test_text_that_decodes_to_half_a_character_is_refused(env, tmp_path, capsys):
    path = write(tmp_path, "c.csv", b"to,Name\n447700900123,+2D0-\n")  # UTF-7: half a pair
    code, err = submit(env, "--encoding", "utf-7", path, capsys=capsys)
    assert code == 65
    assert err.splitlines()[0] == (
        f"{path}: not utf-7 at line 2: pass its own encoding with --encoding"
    )
    assert nothing_spooled(env)


@pytest.mark.parametrize("name", ["no-such-codec", "base64", "rot13", ""])
def test_an_unknown_encoding_is_a_usage_error(env, tmp_path, capsys, name):
    path = write(tmp_path, "c.csv", b"to\n447700900123\n")
    code, err = submit(env, "--encoding", name, path, capsys=capsys)
    assert code == 64
    assert err == (
        f"dialerd: submit: --encoding {name!r}: not a text encoding Python knows "
        "(such as utf-8, cp1252, latin-1)\n"
    )
    assert nothing_spooled(env)


JOSE = {"to": "447700900123", "meta": {"name": "José"}}


@pytest.mark.parametrize(
    "text",
    [json.dumps(JOSE, ensure_ascii=False) + "\n" + json.dumps(GOOD) + "\n",  # JSON lines
     json.dumps(JOSE, ensure_ascii=False, indent=2),  # a JSON object
     json.dumps([JOSE, GOOD], ensure_ascii=False)],  # a JSON array
)  # fmt: skip
def test_every_json_input_takes_the_encoding_and_a_bom(env, tmp_path, capsys, text):
    latin = write(tmp_path, "latin.json", text.encode("cp1252"))
    code, err = submit(env, latin, capsys=capsys)
    assert code == 65
    assert f"{latin}: not UTF-8 at byte" in err and "--encoding cp1252" in err
    utf16 = write(tmp_path, "utf16.json", text.encode("utf-16"))
    code, err = submit(env, "--encoding", "cp1252", latin, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["meta"] == {"name": "José"}
    assert err.startswith("submitted ")  # no column report: not CSV
    for path in incoming(env).iterdir():
        path.unlink()
    code, err = submit(env, "--encoding", "utf-16", utf16, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["meta"] == {"name": "José"}
    for path in incoming(env).iterdir():
        path.unlink()
    with_bom = write(tmp_path, "bom.json", b"\xef\xbb\xbf" + text.encode())
    code, err = submit(env, with_bom, capsys=capsys)
    assert code == 0, err
    assert spooled(env)[0]["meta"] == {"name": "José"}


def test_a_bom_and_crlf_in_a_semicolon_csv(env, tmp_path, capsys):
    data = ("\ufeff" + EXCEL_EXPORT + "bad;x;y\r\n").encode()
    path = write(tmp_path, "export.csv", data)
    code, err = submit(env, "--skip-invalid", path, capsys=capsys)
    assert code == 0, err
    assert f"{path}:3: to: " in err
    assert err.startswith(f"{path}: columns: to → to, Last name → session_parameters.Last name")
    assert without_ids(spooled(env)) == [MULLER]


# --- where the columns go -------------------------------------------------------------------------


def test_submit_says_once_where_each_column_of_each_csv_goes(env, tmp_path, capsys):
    crm = write(tmp_path, "crm.csv", b"Phone,First name,Notes,\n+44 7700 900123,Diane,x,1\n")
    plain = write(
        tmp_path, "plain.csv", b"Notes;expires_at;Phone\n;2099-01-01T00:00:00Z;447700900124\n"
    )
    options = ("--map", "Phone=to", "--map", "Notes=-")
    code, err = submit(env, *options, crm, plain, capsys=capsys)
    assert code == 0, err
    columns_of_crm, columns_of_plain, summary = err.splitlines()
    assert columns_of_crm == (
        f"{crm}: columns: Phone → to, First name → session_parameters.First name, "
        "Notes → - (ignored), (no name) → - (ignored)"
    )
    assert columns_of_plain == (
        f"{plain}: columns: Notes → - (ignored), expires_at → expires_at, Phone → to"
    )
    assert summary.startswith("submitted 2 request(s) as ")


def test_the_columns_are_told_before_the_bad_rows(env, tmp_path, capsys):
    path = write(tmp_path, "crm.csv", b"to,Name\nnot a number,Ann\n")
    code, err = submit(env, path, capsys=capsys)
    assert code == 65
    columns, bad_row, summary = err.splitlines()
    assert columns == f"{path}: columns: to → to, Name → session_parameters.Name"
    assert bad_row.startswith(f"{path}:2: to: ")
    assert summary.startswith("dialerd: 1 invalid request(s); nothing submitted")


# --- the progress bar -----------------------------------------------------------------------------


def many_rows(tmp_path: Path, count: int) -> str:
    rows = "".join(f"4477009{n:05d},Name {n}\n" for n in range(count))
    return write(tmp_path, "many.csv", f"to,NAME\n{rows}".encode())


def submit_on_a_terminal(env: Path, *args: str, timeout: float = 30) -> tuple[int, str]:
    """Run the real `dialerd submit` with its stderr on a pseudo-terminal; the exit code and
    what the terminal showed."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = dialerd(
            "submit", "-c", str(env), *args,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower,
        )  # fmt: skip
    finally:
        os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(timeout=5), shown.decode(errors="replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_a_long_input_shows_a_progress_bar_on_a_terminal(env, tmp_path):
    code, shown = submit_on_a_terminal(env, "--csv", many_rows(tmp_path, PROGRESS_MIN_ROWS))
    assert code == 0, shown
    assert "100%|" in shown and f"{PROGRESS_MIN_ROWS}/{PROGRESS_MIN_ROWS}" in shown, shown
    assert "many.csv" in shown and " rows" in shown
    assert f"submitted {PROGRESS_MIN_ROWS} request(s)" in shown
    assert len(spooled(env)) == PROGRESS_MIN_ROWS


def test_a_hundred_thousand_rows_under_the_bar_are_all_spooled(env, tmp_path):
    count = 100_000
    path = many_rows(tmp_path, count)
    code, shown = submit_on_a_terminal(env, path, timeout=120)
    assert code == 0, shown[-2000:]
    assert "100%|" in shown and f"{count}/{count}" in shown, shown[-2000:]
    assert shown.index(f"{path}: columns: ") < shown.index(f"submitted {count} request(s)")
    assert [d["to"] for d in spooled(env)] == [f"4477009{n:05d}" for n in range(count)]


def test_a_short_input_shows_no_bar_on_a_terminal(env, tmp_path):
    path = many_rows(tmp_path, 20)
    code, shown = submit_on_a_terminal(env, path)
    assert code == 0, shown
    columns, said = shown.splitlines()
    assert columns == f"{path}: columns: to → to, NAME → session_parameters.NAME"
    assert said.startswith("submitted 20 request(s) as ")


def test_no_bar_when_stderr_is_not_a_terminal(env, tmp_path):
    path = many_rows(tmp_path, PROGRESS_MIN_ROWS)
    done = subprocess.run(
        [sys.executable, "-m", "dialerd", "submit", "-c", str(env), path],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        env=dialerd_env(),
    )
    assert done.returncode == 0, done.stderr
    columns, said = done.stderr.decode().splitlines()
    assert columns.startswith(f"{path}: columns: ")
    assert said.startswith(f"submitted {PROGRESS_MIN_ROWS} request(s) as ")
    assert "%|" not in said


def test_the_bar_is_imported_only_for_a_long_input_on_a_terminal(env, tmp_path):
    """`dialerd --help` and a submit to a log stay as quick as they were."""
    probe = (
        "import sys, contextlib, io\n"
        "from dialerd.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(sys.argv[1:])\n"
        "print('tqdm' in sys.modules, file=sys.stderr)\n"
    )
    for args in (["--help"], ["submit", "-c", str(env), many_rows(tmp_path, 30)]):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            env=dialerd_env(),
        )
        assert done.stderr.decode().splitlines()[-1] == "False", done.stderr
