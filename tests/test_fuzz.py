"""Fuzzing with hypothesis, wider than the unit tests: whole spool files and submit input (JSON
and CSV) down to the ledger's intake, the config loader (documents and raw files), and the
callback listener on 127.0.0.1 over raw HTTP.

Each property is what an operator relies on: bad input gives a named, orderly refusal (never a
crash, never a 500), and whatever is accepted can be sent and recorded as strict JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import csv
import datetime as dt
import hashlib
import hmac
import io
import json
import math
import os
import re
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_request import CONFIG, NO_DEFAULT, TO

from dialerd import ledger as ledger_module
from dialerd.callbacks import (
    CALLBACK_FIELDS,
    MAC_BYTES,
    MAX_BODY,
    NONCE_BYTES,
    CallbackListener,
    StatusUrls,
    load_secret,
)
from dialerd.config import (
    APPROVED_RATES,
    CALLBACK_STATUSES,
    MAX_CONNECTIONS,
    TOP_KEYS,
    Config,
    ConfigError,
    Listen,
    RedialPolicy,
    build_config,
    load_config,
)
from dialerd.ledger import Ledger
from dialerd.ledger import intake as intake_module
from dialerd.metrics import Metrics
from dialerd.request import FIELDS, InvalidRequest, Request, build_request, decode_line, loads
from dialerd.results import RESULT_FIELDS, result_line
from dialerd.sources import Batch, Intake, Rejected, parse_spool_file, spool_chunks
from dialerd.spool import SpoolSource
from dialerd.spooldir import escaped_name, name_problem
from dialerd.submit import read_input


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CONFIGS = {"default agent": CONFIG, "no default agent": NO_DEFAULT}
CONFIG_NAMES = st.sampled_from(sorted(CONFIGS))  # by name: a failing example reads well


# -- helpers -------------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} in strict JSON")


def strict_json(text: str) -> Any:
    """Parse as the strict JSON a consumer of results expects: no NaN, no Infinity."""
    return json.loads(text, parse_constant=_no_constant)


def check_accepted(request: Request) -> None:
    """A valid request can be sent and recorded as strict JSON, in UTF-8."""
    body = request.api_body()
    json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8")
    json.dumps(request.meta, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert body["to"] == request.to
    assert request.to.startswith("sip:") or (request.to.isdigit() and request.to.isascii())
    assert ("from" in body) != ("agent_id" in body)
    assert request.agent_id in CONFIG.agents


def check_invalid_fields(fields: dict) -> None:
    """The fields of an `invalid` result give a strict-JSON result line, as the ledger writes it."""
    assert isinstance(fields["error"], str) and fields["error"]
    assert isinstance(fields["source"], str) and fields["source"]
    line = result_line(at=time.time(), outcome="invalid", **fields)
    record = strict_json(line)
    assert list(record) == [*RESULT_FIELDS, "at"]
    assert record["outcome"] == "invalid"
    line.encode("utf-8")


def check_batch(batch: Batch) -> None:
    for request in batch.requests:
        check_accepted(request)
    for fields in batch.invalid:
        check_invalid_fields(fields)
    assert len(batch.errors) == len(batch.invalid)


def record_in_ledger(batch: Batch) -> None:
    """What the ledger's intake does with a batch, on a fresh database: it must take any batch
    the parser produced, and every line it queues for the results is strict JSON."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        ledger_module.create_schema(conn)
        conn.execute("BEGIN")
        intake = intake_module.add(conn, 1, batch.requests, batch.invalid, None, 86400)
        conn.execute("COMMIT")
        lines = conn.execute("SELECT line, outcome FROM outbox").fetchall()
        assert intake.accepted + intake.rejected == len(batch)
        assert len(lines) == intake.rejected
        for line, outcome in lines:
            record = strict_json(line)
            assert record["outcome"] == outcome
            assert outcome in ("invalid", "duplicate")
        for (body,) in conn.execute("SELECT body FROM requests"):
            strict_json(body)
    finally:
        conn.close()


class Shown(bytes):
    """Bytes that a failing example shows by a short description, not in full."""

    def __new__(cls, data: bytes, description: str) -> Shown:
        shown = super().__new__(cls, data)
        shown.description = description
        return shown

    def __repr__(self) -> str:
        return self.description


# Hypothesis raises the recursion limit by some thousands while a test runs: nesting meant to be
# too deep must be deeper than that.
TOO_DEEP = 100_000


def splice(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Byte-level damage: at each position, delete some bytes and insert others."""
    buffer = bytearray(data)
    for position, delete, insert in edits:
        at = position % (len(buffer) + 1)
        buffer[at : at + delete] = insert
    return bytes(buffer)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.integers(0, 3),
        st.binary(max_size=3)
        | st.sampled_from(
            [b"\n", b'"', b"\\", b"{", b"}", b"[", b",", b"\x00", b"\xff", b"\\ud800"]
        ),
    ),
    max_size=4,
)


# -- 1. requests, spool files and submit input ---------------------------------------------------

FIELD_NAMES = sorted(FIELDS) + ["other", "To", "id ", ""]
INTERESTING = st.sampled_from(
    [
        TO,
        "+44 7700 900123",
        "(44) 7700-900.123",
        "+4477009001\u0661",  # an Arabic-Indic digit
        "447700900",
        "9" * 300,
        "sip:alice@example.com",
        "SIP:alice@example.com",
        "sip:@",
        "agent-eu",
        "agent-us",
        "agent-x",
        "447700900000",
        "+1 202 555 0100",
        "2026-11-24T12:00:00Z",
        "2026-11-24T12:00:00.250+01:00",
        "2026-11-24T12:00:00.750+01:00",
        "2026-11-24T12:00:00",
        "2026-11-24",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "req-1",
        "a" * 129,
        {"CALLER_NAME": "Diane Miller"},
        {"": "x"},
        {"N": None},
        [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}],
        [{"name": "A", "value": 1.5}, {"name": "B", "value": True}],
        [{"name": "A"}],
        {"row": 17},
        10**30,
        -(2**63),
        1e308,
        True,
    ]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | INTERESTING
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
GOOD_TO = ["447700900123", "+44 7700 900124", "(44) 7700-900.125", "sip:alice@example.com"]
GOOD_TO += ["+1 202 555 0100", "12025550101", "33 1 23 45 67 89"]
IDS = st.from_regex(r"[A-Za-z0-9._:-]{1,12}", fullmatch=True) | st.sampled_from(["req-1", "req-2"])
OFFSETS = [dt.UTC, dt.timezone(dt.timedelta(hours=1)), dt.timezone(dt.timedelta(hours=-14))]
TIMES = st.one_of(
    st.datetimes(
        dt.datetime(2000, 1, 1), dt.datetime(2100, 1, 1), timezones=st.sampled_from(OFFSETS)
    ).map(lambda moment: moment.isoformat()),
    st.sampled_from(
        ["2026-11-24T12:00:00Z", "2026-11-24T12:00:00.250Z", "2026-11-24T12:00:00.750Z"]
    ),
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-11-24"]),
)
PARAMETERS = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8) | st.integers())
PARAMETERS_LIST = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["A", "B", "CALLER_NAME"]), "value": st.text(max_size=5)}
    ),
    max_size=3,
)
GOOD_REQUESTS = st.fixed_dictionaries(
    {"to": st.sampled_from(GOOD_TO)},
    optional={
        "id": IDS,
        "agent_id": st.sampled_from(["agent-eu", "agent-us"]),
        "session_parameters": PARAMETERS | PARAMETERS_LIST,
        "hangup_on_answer_machine": st.booleans(),
        "not_before": TIMES,
        "expires_at": TIMES,
        "meta": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    },
)
FROM_REQUESTS = st.fixed_dictionaries(
    {"to": st.sampled_from(GOOD_TO), "from": st.sampled_from(["447700900000", "+1 202 555 0100"])},
    optional={"id": IDS},
)
REQUESTISH = st.one_of(
    GOOD_REQUESTS,
    FROM_REQUESTS,
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=7),
    st.builds(  # a good request with one field gone wrong
        lambda request, name, value: {**request, name: value},
        GOOD_REQUESTS,
        st.sampled_from(FIELD_NAMES),
        JSON_VALUES,
    ),
)
DOCUMENTS = REQUESTISH | REQUESTISH | JSON_VALUES


def encode(value: Any, ascii_only: bool = False, indent: int | None = None) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode("utf-8")


ODD_LINES = st.sampled_from(
    [
        b"",
        b"   ",
        b"\r",
        b"\t\x0b\x0c",
        b"NaN",
        b"-Infinity",
        b'{"to": 1e999}',
        b'{"to": "' + TO.encode() + b'", "meta": {"x": NaN}}',
        b'{"to": "' + TO.encode() + b'", "meta": {"s": "\\ud800"}}',
        b'{"to": "' + TO.encode() + b'", "meta": {"s": "\\ud83d\\ude00"}}',
        b'{"to": "' + TO.encode() + b'", "meta": {"n": ' + b"9" * 4400 + b"}}",
        b"[" * 3000,
        b'{"a":' * 3000,
        b"\xef\xbb\xbf{}",
        b"\x00",
        b"{",
        b"}",
        b"\xff\xfe{\x00}\x00",
        b'{"to": "' + TO.encode() + b'"}',
        b'{"to": "' + TO.encode() + b'", "id": "same"}',
        b'{"id": {"a": 1}}',
        b'{"id": [1], "to": "x"}',
        b'{"id": 123456789012345678901234567890}',
        b'{"id": 1.5, "to": 5}',
        b'{"to": "' + TO.encode() + b'", "id": "x", "id": "y"}',
    ]
)
LINES = (
    DOCUMENTS.map(encode)
    | st.builds(encode, DOCUMENTS, st.just(True))
    | ODD_LINES
    | st.binary(max_size=40).map(lambda data: data.replace(b"\n", b""))
    | st.builds(splice, REQUESTISH.map(encode), EDITS).map(lambda data: data.replace(b"\n", b" "))
)
JSON_LINES_FILES = st.builds(
    lambda lines, newline, trailing: newline.join(lines) + (newline if trailing else b""),
    st.lists(LINES, min_size=1, max_size=6),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)
SPOOL_FILES = st.one_of(
    st.binary(max_size=200),
    DOCUMENTS.map(encode),
    st.lists(DOCUMENTS, max_size=5).map(encode),
    st.lists(DOCUMENTS, max_size=4).map(lambda items: encode(items, indent=2)),
    REQUESTISH.map(lambda document: encode(document, indent=2)),
    JSON_LINES_FILES,
    st.builds(splice, JSON_LINES_FILES, EDITS),
)


def expected_shape(data: bytes, config: Config) -> tuple[int, int] | None:
    """(requests, invalid) a spool file must give, by the contract; None: it is rejected.

    A whole JSON object or array is taken as one document; otherwise each non-blank line is a
    request or an `invalid` result, and the file is rejected only when no line parses as JSON.
    A leading BOM is not part of the content.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    try:
        document = loads(text)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict | list):
        items = [document] if isinstance(document, dict) else document
    else:
        items, parsed_any = [], False
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                items.append(decode_line(line))
                parsed_any = True
            except InvalidRequest:
                items.append(InvalidRequest)
        if not parsed_any:
            return None
    valid = 0
    for item in items:
        if item is InvalidRequest:
            continue
        try:
            build_request(item, config, "model")
            valid += 1
        except InvalidRequest:
            pass
    return valid, len(items) - valid


@fuzz(300)
@given(SPOOL_FILES, CONFIG_NAMES)
# a line nested too deeply, then a good one: the good one must not be lost with the file
@example(
    Shown(b"[" * TOO_DEEP + b'\n{"to": "447700900123"}\n', "[[[… too deep, then a good line"),
    "default agent",
)
@example(b'{"id": {"a": 1}}\n{"to": "447700900123"}\n', "default agent")  # a non-string id
@example(b'{"id": [1]}', "default agent")
@example(b'[{"id": 123456789012345678901234567890}]', "default agent")
@example(b'{"to": "447700900123", "id": "d"}\n{"to": "447700900123", "id": "d"}', "default agent")
@example(b'{"to": "447700900123"}\n\x00', "default agent")
@example(b"\xef\xbb\xbf" + b'{"to": "447700900123"}', "default agent")
def test_any_spool_file_is_taken_or_rejected_and_recordable(data, which):
    """SPEC 5: a file is rejected (not UTF-8, NUL, nothing parses) or gives one result per
    request; it never raises anything else, and the ledger's intake records whatever it gave."""
    config = CONFIGS[which]
    shape = expected_shape(data, config)
    try:
        batch = parse_spool_file(data, "fuzz.jsonl", config)
    except Rejected as error:
        event("rejected")
        assert str(error)
        assert shape is None, f"rejected ({error}), though parts of it parse: {shape}"
        return
    event(f"requests: {min(len(batch.requests), 2)}, invalid: {min(len(batch.invalid), 2)}")
    assert shape == (len(batch.requests), len(batch.invalid))
    check_batch(batch)
    record_in_ledger(batch)


# Any name a file may have: bytes but "/" and NUL, up to NAME_MAX.
FILE_NAMES = st.binary(min_size=1, max_size=255).filter(
    lambda name: b"/" not in name and b"\0" not in name and name not in (b".", b"..")
)


async def take_spool(spool: Path, state: Path) -> None:
    """The real spool source over `spool`, with a real ledger, until incoming/ holds nothing it
    would take."""
    ledger = Ledger(state)
    await asyncio.to_thread(ledger.open)
    try:
        intake = Intake(ledger, lambda: CONFIG, lambda _agents: None, lambda: None)
        source = SpoolSource(spool, intake, ledger)
        task = asyncio.create_task(source.run())
        incoming = os.fsencode(spool / "incoming")

        def waiting() -> bool:
            made = all((spool / name).is_dir() for name in ("done", "rejected"))
            return not made or any(not name.startswith(b".") for name in os.listdir(incoming))

        async with asyncio.timeout(20):
            while waiting():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
        source.stop()
        await task  # it ends by itself, having raised nothing
    finally:
        await asyncio.to_thread(ledger.close)


@fuzz(100)
@given(
    st.lists(st.tuples(FILE_NAMES, SPOOL_FILES), min_size=1, max_size=4, unique_by=lambda f: f[0])
)
@example([(b"bad-\xff\xfe.jsonl", b'{"to": "447700900123"}'), (b"good.jsonl", b"{}")])
@example([(b"\xff" * 255, b"not JSON"), (b"x" * 255, b'{"to": "447700900123"}\nnot JSON')])
def test_any_spool_file_names_and_contents_are_taken_or_rejected_never_fatal(files):
    """A spool file's name may be any bytes: the daemon never fails on one; every file whose
    name does not start with "." leaves incoming/, for done/ or rejected/ under a name that is
    UTF-8 without control characters, and one whose name is not such is never read."""
    with tempfile.TemporaryDirectory() as directory:
        spool = Path(directory) / "spool"
        incoming = os.fsencode(spool / "incoming")
        os.makedirs(incoming)
        for name, data in files:
            with open(incoming + b"/" + name, "wb") as file:
                file.write(data)

        asyncio.run(take_spool(spool, Path(directory) / "state"))

        filed = {where: os.listdir(os.fsencode(spool / where)) for where in ("done", "rejected")}
        for names in filed.values():
            for name in names:
                assert name_problem(os.fsdecode(name)) is None and len(name) <= 255, name
        for name, _data in files:
            shown = os.fsdecode(name)
            if name_problem(shown) is not None and not name.startswith(b"."):
                assert os.fsencode(escaped_name(shown))[:200] in b"".join(filed["rejected"])


@fuzz(200)
@given(st.builds(splice, DOCUMENTS.map(encode) | REQUESTISH.map(encode), EDITS), CONFIG_NAMES)
def test_a_damaged_json_line_is_a_request_or_invalid(line, which):
    """A JSON line with bytes inserted, deleted or replaced: a request or InvalidRequest."""
    config = CONFIGS[which]
    try:
        request = build_request(decode_line(line), config, "stdin:1")
    except InvalidRequest as error:
        event("invalid")
        assert str(error)
        check_invalid_fields({**error.partial, "source": "stdin:1", "error": str(error)})
        return
    check_accepted(request)


CSV_COLUMNS = st.sampled_from(
    ["to", "agent_id", "from", "id", "hangup_on_answer_machine", "not_before", "expires_at"]
    + ["meta", "session_parameters", "CALLER_NAME", " to ", "", "a,b", 'q"uote', "to"]
) | st.text(max_size=6)
CSV_CELLS = st.text(max_size=10) | st.sampled_from(
    [TO, "+44 7700 900123", "sip:bob@example.com", "agent-us", "447700900000", "yes", "No"]
    + ["maybe", "2026-11-24T12:00:00Z", "2026-11-24T12:00:00.25Z", "2026-11-24T12:00:00.75Z"]
    + ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "id-1", " ", "a\nb", "\x00"]
)


def write_csv(header: list[str], rows: list[list[str]], newline: str) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


CELLS_BY_COLUMN = {
    "to": st.sampled_from(GOOD_TO),
    "id": IDS,
    "agent_id": st.sampled_from(["agent-eu", "agent-us", " agent-us "]),
    "from": st.sampled_from(["447700900000", "+1 202 555 0100"]),
    "hangup_on_answer_machine": st.sampled_from(["true", "No", "1", " yes "]),
    "not_before": TIMES,
    "expires_at": TIMES,
}


@st.composite
def csv_files(draw) -> bytes:
    """CSV with a header row: mostly sensible cells for the known columns, some not."""
    columns = draw(st.lists(CSV_COLUMNS, max_size=5))
    if draw(st.booleans()):
        columns.insert(draw(st.integers(0, len(columns))), "to")
    columns = columns or ["to"]
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        row = []
        for column in columns:
            sensible = CELLS_BY_COLUMN.get(column, st.text(max_size=6))
            row.append(draw(sensible if draw(st.integers(0, 4)) else CSV_CELLS))
        if draw(st.integers(0, 5)) == 0:  # a ragged row
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(CSV_CELLS, max_size=2))
        rows.append(row)
    return write_csv(columns, rows, draw(st.sampled_from(["\n", "\r\n"])))


CSV_FILES = csv_files()
SUBMIT_INPUT = st.one_of(
    CSV_FILES,
    CSV_FILES.map(lambda data: b"\xef\xbb\xbf" + data),
    st.builds(splice, CSV_FILES, EDITS),
    SPOOL_FILES,
    st.binary(max_size=100),
)


def spool_text(documents: list[dict]) -> bytes:
    """What `drop_into_spool` writes for these documents."""
    return b"".join(
        json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n" for document in documents
    )


def read_as_the_daemon(documents: list[dict], config) -> Batch:
    """The spool file `submit` writes of these documents, read as the daemon reads it."""
    whole = Batch()
    for batch, _last in spool_chunks(spool_text(documents), "spool:submit.jsonl", config):
        whole.requests += batch.requests
        whole.errors += batch.errors
    return whole


@fuzz(300)
@given(SUBMIT_INPUT, CONFIG_NAMES)
@example(
    b"to,not_before,expires_at\n447700900123,2026-11-24T12:00:00.25Z,2026-11-24T12:00:00.75Z\n",
    "default agent",
)
@example(b"to,not_before\n447700900123,0001-01-01T00:00:00+14:00\n", "default agent")
@example(b"to,expires_at\n447700900123,9999-12-31T23:59:59-14:00\n", "default agent")
@example(
    b'{"to": "447700900123", "session_parameters": '
    b'[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}',
    "default agent",
)
@example(b"to,CALLER_NAME\n447700900123,\x00\n", "default agent")
def test_what_submit_accepts_the_daemon_accepts_unchanged(data, which):
    """`dialerd submit` (SPEC 2) validates requests and drops them in the spool: whatever it
    accepts, the daemon must read from the spool file it writes as the same requests."""
    config = CONFIGS[which]
    submission = read_input(data, "input.csv", config)
    documents = [json.loads(row.spool_line) for row in submission.rows]
    event(f"documents: {min(len(documents), 2)}, errors: {bool(submission.errors)}")
    assert all(isinstance(error, str) and error for error in submission.errors)
    if not documents:
        return
    for document in documents:
        json.dumps(document, allow_nan=False, ensure_ascii=False).encode("utf-8")
    batch = read_as_the_daemon(documents, config)
    assert batch.errors == [], batch.errors
    assert len(batch.requests) == len(documents)
    for document, request in zip(documents, batch.requests, strict=True):
        assert request.source == document.pop("source")
        again = build_request(document, config, "again")
        assert request.id == document.get("id", request.id) == again.id
        assert request.api_body() == again.api_body()
        assert (request.not_before, request.expires_at) == (again.not_before, again.expires_at)
        check_accepted(request)
    record_in_ledger(batch)


@fuzz(200)
@given(GOOD_REQUESTS | FROM_REQUESTS | REQUESTISH, CONFIG_NAMES)
@example(
    {"to": TO, "not_before": "2026-11-24T12:00:00.250Z", "expires_at": "2026-11-24T12:00:00.750Z"},
    "default agent",
)
@example({"to": TO, "not_before": "0001-01-01T00:00:00+14:00"}, "default agent")
@example(
    {"to": TO, "session_parameters": [{"name": "A", "value": 1}, {"name": "A", "value": 2}]},
    "default agent",
)
def test_a_submitted_request_is_sent_as_submitted(document, which):
    """The request a JSON submission accepted reaches the API with the same body and times."""
    config = CONFIGS[which]
    try:
        original = build_request(document, config, "input")
    except InvalidRequest:
        event("invalid")
        return
    event("valid")
    submission = read_input(encode(document), "input.json", config)
    assert submission.errors == []
    (row,) = submission.rows
    batch = read_as_the_daemon([json.loads(row.spool_line)], config)
    assert batch.errors == []
    (request,) = batch.requests
    assert request.api_body() == original.api_body()
    assert (request.not_before, request.expires_at) == (original.not_before, original.expires_at)
    assert request.meta == original.meta


# -- 2. the config -------------------------------------------------------------------------------

CONFIG_KEYS = list(TOP_KEYS) + [
    "key_env",
    "key_file",
    "key",
    "endpoints",
    "timeout_s",
    "eu",
    "us",
    "agent-a",
    "region",
    "rate",
    "number",
    "margin",
    "dir",
    "listen",
    "public_url",
    "wait_s",
    *CALLBACK_STATUSES,
    "attempts",
    "delay_s",
    "start",
    "end",
    "days",
    "default_timezone",
    "holidays",
    "count",
    "per_s",
]
CONFIG_STRINGS = st.sampled_from(
    ["eu", "us", "auto", "08:00", "21:00", "8:00", "24:00", "7:60", "127.0.0.1:8080"]
    + ["0.0.0.0:8080", "[::1]:9090", ":8081", "host:99999", "h:\u00b2", "http://x", "https://d/"]
    + ["ftp://x", "http://[::1", "Europe/London", "UTC", "Mars/Olympus", "America", "../etc"]
    + ["mon", "Sun", "funday", "447700900000", "+1 202 555 0100", "\u00b2", "VGAI_KEY", "/tmp/x"]
    + ["-", "", " ", "2024-01-01", "2024-13-45", "busy", "agent-a", "agent a", "a\n"]
)
CONFIG_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100_000),
    st.integers(),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 0.5, 1.0, 3.0, 0.03, 480, 1260]),
    st.text(max_size=10),
    CONFIG_STRINGS,
    st.dates(),
    st.datetimes(),
    st.binary(max_size=4),
)
CONFIG_VALUES = st.recursive(
    CONFIG_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(CONFIG_KEYS) | st.text(max_size=6) | st.integers(0, 9) | st.none(),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)
VALID_DOCUMENT = {
    "api": {
        "key_env": "VGAI_KEY",
        "endpoints": {"eu": "https://eu.example.com/make-call"},
        "timeout_s": 15,
    },
    "agents": {
        "agent-a": {"region": "eu", "rate": 1, "number": "447700900000", "margin": 0.03},
        "agent-b": {"region": "us", "rate": 5},
    },
    "default_agent": "agent-a",
    "state_dir": "/var/lib/dialerd",
    "spool": {"dir": "/var/spool/dialerd"},
    "stdin": "auto",
    "results": "-",
    "callbacks": {
        "listen": "127.0.0.1:8080",
        "public_url": "https://dialer.example.com",
        "wait_s": 120,
    },
    "redial": {"busy": {"attempts": 3, "delay_s": 300}, "timeout": {"attempts": 2}},
    "admin": {"listen": "127.0.0.1:9090"},
    "calling_hours": {
        "start": "08:00",
        "end": "21:00",
        "days": ["mon", "tue"],
        "default_timezone": "Europe/London",
        "holidays": ["2026-12-25"],
    },
    "dnc_file": "/etc/dialerd/dnc.txt",
    "max_calls_per_number": {"count": 3, "per_s": 86400},
    "shutdown_timeout_s": 30,
}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    return found


CONFIG_PATHS = _paths(VALID_DOCUMENT) + [
    ("api", "key"),
    ("agents", "agent-c"),
    ("redial", "failed", "attempts"),
    ("redial", "rejected"),
    ("calling_hours", "other"),
    ("other",),
]
DELETE = object()


def mutate(document: dict, edits: list[tuple[tuple, Any]]) -> dict:
    """A copy of the document with values at some key paths replaced or deleted."""
    document = copy.deepcopy(document)
    for path, value in edits:
        node = document
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return document


NEAR_VALID = st.builds(
    mutate,
    st.just(VALID_DOCUMENT),
    st.lists(
        st.tuples(st.sampled_from(CONFIG_PATHS), CONFIG_VALUES | st.just(DELETE)),
        min_size=1,
        max_size=4,
    ),
)
PROBLEM = re.compile(r"(?s)(?P<key>.+?): (?P<what>.*\S.*)")


def check_config_problems(error: ConfigError) -> None:
    """Every problem is 'key.path: message', or '(file): ...' / '(top): ...'."""
    assert error.problems and isinstance(error.problems, list)
    for problem in error.problems:
        assert isinstance(problem, str)
        if problem.startswith(("(file): ", "(top): ")) or problem.endswith(": unknown key"):
            continue  # an unknown key is named as written, whatever it holds
        match = PROBLEM.fullmatch(problem)
        assert match, problem
        assert match["key"].split(".")[0] in TOP_KEYS, problem


def check_config(config: Config) -> None:
    """What a config that loads promises the rest of the daemon."""
    positive = [config.api.timeout_s, config.shutdown_timeout_s]
    positive += [policy.delay_s for policy in config.redial.values()]
    if config.callbacks:
        positive.append(config.callbacks.wait_s)
    if config.max_calls_per_number:
        positive.append(config.max_calls_per_number.per_s)
        assert config.max_calls_per_number.count >= 1
    for value in positive:
        assert isinstance(value, float) and math.isfinite(value) and value > 0, value
    for policy in config.redial.values():
        assert isinstance(policy.attempts, int) and policy.attempts >= 1
    assert config.agents
    for agent in config.agents.values():
        assert agent.rate in APPROVED_RATES
        assert agent.region in config.api.endpoints
        assert 0 <= agent.margin < 0.5
    assert config.default_agent is None or config.default_agent in config.agents


def build_or_refuse(document: Any) -> None:
    try:
        config = build_config(document)
    except ConfigError as error:
        event(f"refused, {min(len(error.problems), 3)} problems")
        check_config_problems(error)
        return
    event("loaded")
    check_config(config)


@fuzz(300)
@given(NEAR_VALID | CONFIG_VALUES)
@example(mutate(VALID_DOCUMENT, [(("redial", "busy", "attempts"), math.inf)]))
@example(mutate(VALID_DOCUMENT, [(("max_calls_per_number", "count"), -math.inf)]))
@example(mutate(VALID_DOCUMENT, [(("api", "timeout_s"), math.nan)]))
@example(mutate(VALID_DOCUMENT, [(("callbacks", "wait_s"), math.inf)]))
def test_any_config_document_loads_or_names_its_problems(document):
    """SPEC 3: a config is valid or refused with every problem named by its key path."""
    build_or_refuse(document)


YAML_SNIPPETS = st.sampled_from(
    [
        "api: {key_env: VGAI_KEY}",
        "agents:\n  agent-a: {region: eu, rate: 1}",
        "agents: {a: {region: us, rate: 5, number: +1 202 555 0100}}",
        "calling_hours: {start: 08:00, end: 21:00}",
        "calling_hours: {start: 8:00, end: 21:00}",
        "redial: {busy: {attempts: .inf}}",
        "api: {timeout_s: .nan}",
        "shutdown_timeout_s: 1e999",
        "a: !!int x",
        "a: !!bool maybe",
        "a: !!float x",
        "a: !!timestamp x",
        "holidays: [2024-02-30]",
        "a: 2024-13-45",
        "a: " + "9" * 5000,
        "[" * 400,
        "{a: " * 400,
        "a: &x [*x]",
        "a: &y {b: *y}",
        "<<: {a: 1}",
        "<<: 5",
        "a: !!binary '%%%'",
        "a: !!set {x}",
        "? [1]\n: 2",
        "a: !!python/object:os.system x",
        "---\n---",
        "...",
        "%YAML 1.1\n---",
        "\t- x",
        "a: 'unterminated",
        "a: *undefined",
        "- 1\n- 2",
        "plain",
        "",
    ]
)
YAML_FILES = st.one_of(
    NEAR_VALID.map(lambda document: yaml.safe_dump(document).encode()),
    st.builds(splice, NEAR_VALID.map(lambda document: yaml.safe_dump(document).encode()), EDITS),
    st.binary(max_size=200),
    st.lists(YAML_SNIPPETS | st.text(max_size=20), min_size=1, max_size=6).map(
        lambda parts: "\n".join(parts).encode("utf-8", "surrogatepass")
    ),
    st.builds(
        splice,
        st.just(json.dumps(VALID_DOCUMENT, indent=2).encode()),
        EDITS,
    ),
)


@fuzz(200)
@given(data=YAML_FILES)
@example(data=b"state_dir: /x\nholidays_typo: 2024-13-45\n")  # a date no calendar has
@example(data=b"stdin: !!bool maybe\n")
@example(data=b"api: !!int x\n")
@example(data=b"api: !!timestamp x\n")
@example(data=b"shutdown_timeout_s: " + b"9" * 4301 + b"\n")
@example(data=Shown(b"[" * TOO_DEEP, "[[[… too deep"))
def test_any_config_file_loads_or_names_its_problems(tmp_path_factory, data):
    """`load_config` on any bytes: a Config, or ConfigError whose problems say where."""
    path = tmp_path_factory.getbasetemp() / "fuzz-config.yaml"
    path.write_bytes(data)
    try:
        config = load_config(path)
    except ConfigError as error:
        where = error.problems[0].partition(":")[0].split(".")[0]
        event("refused: " + (where if where in {*TOP_KEYS, "(file)", "(top)"} else "other"))
        check_config_problems(error)
        return
    event("loaded")
    check_config(config)


# -- 3. the callback listener --------------------------------------------------------------------

PUBLIC_URL = "https://dialer.example.com/base"
PREFIX = "/base/callbacks/"
REDIAL = {"busy": RedialPolicy(attempts=2, delay_s=3600.0)}
PLACED_CALLS = 12


class Listener:
    """A real Ledger and CallbackListener on 127.0.0.1, run by an event loop in a thread; the
    test plays the lanes: it queues requests and records sends placed with genuine tokens."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.ledger = Ledger(state_dir)
        self.placed: list[str] = []  # tokens of placed calls
        self.unsent: list[str] = []  # genuine tokens no send carried
        self.foreign: list[str] = []  # well-formed tokens under another secret

    def __enter__(self) -> Listener:
        self.thread.start()
        self.ledger.open()
        self.urls = StatusUrls(PUBLIC_URL, load_secret(self.state_dir))
        self.listener = CallbackListener(
            Listen("127.0.0.1", 0),
            self.urls,
            self.ledger,
            lambda: REDIAL,
            lambda effect, agent: None,
            Metrics(),
            max_connections=MAX_CONNECTIONS,
        )
        self.port = int(self.run(self._start()).rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc_info) -> None:
        self.run(self.listener.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.ledger.close()

    def run(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _start(self) -> str:
        requests = [
            build_request({"id": f"fuzz-{n}", "to": TO}, CONFIG, "fuzz")
            for n in range(PLACED_CALLS)
        ]
        await self.ledger.add(requests, [], None, 0)
        pending, _next = await self.ledger.due("agent-eu", time.time() + 1, PLACED_CALLS)
        for item in pending:
            token, _url = self.urls.new()
            await self.ledger.mark_sending(item.seq, token, 1)
            await self.ledger.placed(
                item.seq, token, time.time() + 3600, REDIAL, attempts=1, http_status=200
            )
            self.placed.append(token)
        assert len(self.placed) == PLACED_CALLS
        self.unsent = [self.urls.new()[0] for _ in range(4)]
        other = StatusUrls(PUBLIC_URL, b"another secret")
        self.foreign = [other.new()[0] for _ in range(4)]
        return await self.listener.start()

    def callback_tokens(self) -> set[str]:
        conn = sqlite3.connect(f"file:{self.ledger.path}?mode=ro", uri=True)
        try:
            return {row[0] for row in conn.execute("SELECT DISTINCT token FROM callbacks")}
        finally:
            conn.close()


def http(port: int, method: bytes, target: bytes, body: bytes, headers: bytes = b"") -> int:
    """One HTTP/1.1 exchange over a raw socket, as any client might send it; the status code."""
    head = (
        b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
        % (method, target, port, len(body), headers)
    )
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The server may answer and close before taking it all: read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head + body)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    response = b"".join(chunks)
    statuses = [int(code) for code in re.findall(rb"(?m)^HTTP/1\.[01] (\d{3}) ", response)]
    final = [code for code in statuses if code >= 200]  # past any 100 Continue
    assert final, f"no HTTP answer: {response[:200]!r}"
    return final[0]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token_strategy(bench: Listener) -> st.SearchStrategy[str]:
    placed = st.sampled_from(bench.placed)
    nonce_of = placed.map(lambda t: base64.urlsafe_b64decode(t + "=")[:NONCE_BYTES])
    return st.one_of(
        placed,
        placed,
        st.sampled_from(bench.unsent),
        st.sampled_from(bench.foreign),
        st.text(max_size=50),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=50),
        st.binary(max_size=48).map(b64),
        st.binary(min_size=32, max_size=32).map(b64),
        st.builds(lambda n, mac: b64(n + mac), nonce_of, st.binary(min_size=16, max_size=16)),
        st.builds(
            lambda t, edit: edit(t),
            placed,
            st.sampled_from(
                [
                    lambda t: t + "=",
                    lambda t: t + "==",
                    lambda t: t + "/",
                    lambda t: t[:-1],
                    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
                    lambda t: t[:10] + "!" + t[10:],
                    lambda t: t.upper(),
                    lambda t: t + t,
                    lambda t: t.replace("-", "+").replace("_", "/"),
                    lambda t: " " + t,
                ]
            ),
        ),
    )


def target_strategy(token: str) -> st.SearchStrategy[bytes]:
    """Request targets that carry the token, and others."""
    exact = (PREFIX + quote(token, safe="")).encode()
    return st.one_of(
        st.just(exact),
        st.just(exact),
        st.just((PREFIX + token).encode("utf-8", "surrogatepass")),
        st.just(exact + b"?x=1"),
        st.just(exact + b"/"),
        st.just(b"/callbacks/" + quote(token, safe="").encode()),
        st.just(b"/base/callbacks" + quote(token, safe="").encode()),
        st.just(b"/BASE/callbacks/" + quote(token, safe="").encode()),
        st.just(PREFIX.encode()),
        st.just(b"//base/callbacks/" + quote(token, safe="").encode()),
        st.just(b"/base/x/../callbacks/" + quote(token, safe="").encode()),
        st.just(b"http://dialer.example.com" + exact),
        st.just(b"*"),
        st.text(max_size=30).map(lambda t: quote("/" + t, safe="/%:@!$&'()*+,;=-._~").encode()),
        st.binary(max_size=20).map(lambda b: b"/" + b.replace(b" ", b"").replace(b"\r", b"")),
        st.sampled_from([b"/%ZZ", b"/%FF%FE", b"/base/callbacks/%00", b"/" + b"a" * 9000]),
    ).map(lambda target: target.replace(b"\n", b"").replace(b"\r", b"").replace(b" ", b"") or b"/")


CALLBACK_BODIES = st.fixed_dictionaries(
    {
        "agent_id": st.sampled_from(["agent-eu", "agent-x"]) | JSON_SCALARS,
        "to": st.just(TO) | JSON_SCALARS,
        "conversation_uuid": st.just("CON-1") | JSON_SCALARS,
        "status": st.sampled_from(CALLBACK_STATUSES),
        "timestamp": st.just("2026-11-24T12:00:00Z") | JSON_SCALARS,
    },
    optional={"extra": JSON_VALUES},
)
BODIES = st.one_of(
    CALLBACK_BODIES.map(encode),
    CALLBACK_BODIES.map(encode),
    CALLBACK_BODIES.map(lambda body: encode(body, ascii_only=True)),
    st.builds(
        lambda body, status: {**body, "status": status},
        CALLBACK_BODIES,
        JSON_VALUES | st.sampled_from(["BUSY", "answered", " busy"]),
    ).map(encode),
    st.builds(
        lambda body, drop: {k: v for k, v in body.items() if k != drop},
        CALLBACK_BODIES,
        st.sampled_from(CALLBACK_FIELDS),
    ).map(encode),
    JSON_VALUES.map(encode),
    st.binary(max_size=100),
    st.builds(splice, CALLBACK_BODIES.map(encode), EDITS),
    CALLBACK_BODIES.map(lambda body: json.dumps(body).encode("utf-16")),
    st.sampled_from([b"", b"[" * 100, b"[" * 5000, b"[" * 60000, b'{"a":' * 5000]),
    st.sampled_from([b'{"status": "busy", "x": NaN}', b"9" * 5000, b"\xef\xbb\xbf{}"]),
    st.builds(
        lambda body, size: body + b" " * max(0, size - len(body)),
        CALLBACK_BODIES.map(encode),
        st.integers(MAX_BODY - 2, MAX_BODY + 2),
    ),
)
METHODS = st.one_of(
    st.just(b"POST"),
    st.sampled_from([b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"post"]),
    st.from_regex(rb"[A-Z]{1,8}", fullmatch=True),
)
HEADERS = st.sampled_from(
    [
        b"",
        b"Content-Type: application/json\r\n",
        b"Content-Type: text/plain; charset=latin-1\r\n",
        b"Content-Encoding: gzip\r\n",
        b"Expect: 100-continue\r\n",
        b"X-Forwarded-For: 10.0.0.1\r\n",
    ]
)
DEEP = Shown(b"[" * (MAX_BODY - 100), "[[[… too deep (just under 64 KiB)")
A_CALLBACK = encode(
    {
        "agent_id": "agent-eu",
        "to": TO,
        "conversation_uuid": "CON-1",
        "status": "busy",
        "timestamp": "2026-11-24T12:00:00Z",
    }
)


def body_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or any(name not in body for name in CALLBACK_FIELDS):
        return "shape"
    if body["status"] not in CALLBACK_STATUSES:
        return "status"
    return None


def test_the_callback_listener_answers_anything_in_order(tmp_path):
    """SPEC 7: any method, path, token and body gets 200, 400, 404 or 413 (never a 500), and only
    the genuine token of a placed call ever gets a callback recorded."""
    with Listener(tmp_path / "state") as bench:
        genuine = bench.placed[0]

        @fuzz(200)
        @given(data=st.data())
        # (method, token, body, headers) as explicit examples; drawn otherwise
        @example(data=("POST", genuine, DEEP, b""))  # JSON nested too deeply for json.loads
        @example(data=("POST", genuine, b"\x00\x00", b"Content-Encoding: gzip\r\n"))
        @example(data=("POST", genuine, b"{}", b"Content-Encoding: br\r\n"))
        @example(data=("POST", genuine, A_CALLBACK.ljust(MAX_BODY), b""))  # at the limit: taken
        @example(data=("POST", genuine, A_CALLBACK.ljust(MAX_BODY + 1), b""))  # over it: 413
        def exchange(data):
            if isinstance(data, tuple):
                method, token, body, headers = data
                method, target = method.encode(), (PREFIX + token).encode()
            elif data.draw(st.booleans(), "to a placed call's status_url"):
                method, token = b"POST", data.draw(st.sampled_from(bench.placed), "token")
                target = (PREFIX + token).encode()
                body = data.draw(BODIES, "body")
                headers = data.draw(HEADERS, "headers")
            else:
                method = data.draw(METHODS, "method")
                token = data.draw(token_strategy(bench), "token")
                target = data.draw(target_strategy(token), "target")
                body = data.draw(BODIES, "body")
                headers = data.draw(HEADERS, "headers")
            status = http(bench.port, method, target, body, headers)
            event(f"status {status}")
            assert status in (200, 400, 404, 413), status
            if status == 200:  # only for a target that carries a placed call's token as made
                assert method == b"POST"
                assert any(t.encode() in unquote_to_bytes(target) for t in bench.placed), target
            if status == 413:
                assert len(body) > MAX_BODY
            exact = target == (PREFIX + quote(token, safe="")).encode()
            if method == b"POST" and exact and token in bench.placed and not headers:
                if len(body) > MAX_BODY:
                    assert status == 413, status
                try:
                    decoded = strict_json(body.decode("utf-8"))
                    good = len(body) <= MAX_BODY and body_problem(decoded) is None
                except (ValueError, RecursionError):
                    good = False
                if good:
                    assert status == 200, "a genuine callback of a placed call was refused"
            assert bench.callback_tokens() <= set(bench.placed)

        exchange()
        assert bench.callback_tokens() <= set(bench.placed)


@fuzz(500)
@given(
    st.one_of(
        st.text(),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"),
        st.binary(max_size=64).map(b64),
        st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode()),
        st.binary(min_size=32, max_size=32).map(b64),
        st.characters(codec="utf-8").map(lambda c: "A" * 43 + c),
    )
)
@example("\ud800")
@example("A" * 43 + "\u00e9")
@example("=" * 5)
def test_status_urls_genuine_never_raises(token):
    """Only a token whose MAC is right under this secret is genuine; nothing else raises."""
    urls = StatusUrls(PUBLIC_URL, b"s" * 32)
    verdict = urls.genuine(token)
    assert verdict in (True, False)
    if verdict:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        nonce, mac = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        assert len(mac) == MAC_BYTES
        assert mac == hmac.new(b"s" * 32, nonce, hashlib.sha256).digest()[:MAC_BYTES]
    real, _url = urls.new()
    assert urls.genuine(real)
