"""A request (SPEC §4): validation into what the API is sent, and decoding of input lines."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dialerd.config import build_config
from dialerd.numbers import normalise
from dialerd.request import (
    MAX_LINE_BYTES,
    InvalidRequest,
    Request,
    build_request,
    decode_line,
)

TO = "447700900123"

CONFIG = build_config(
    {
        "agents": {
            "agent-eu": {"region": "eu", "rate": 5, "number": "447700900000"},
            "agent-us": {"region": "us", "rate": 3, "number": "+1 202 555 0100"},
        },
        "default_agent": "agent-eu",
    }
)
NO_DEFAULT = build_config(
    {
        "agents": {
            "agent-eu": {"region": "eu", "rate": 5},
            "agent-us": {"region": "us", "rate": 3},
        },
    }
)


def build(config=CONFIG, **fields) -> Request:
    fields.setdefault("to", TO)
    return build_request(fields, config, "test:1")


def refused(config=CONFIG, **fields) -> InvalidRequest:
    fields.setdefault("to", TO)
    with pytest.raises(InvalidRequest) as caught:
        build_request(fields, config, "test:1")
    return caught.value


# --- to ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "digits"),
    [
        ("+44 7700 900123", "447700900123"),
        ("447700900123", "447700900123"),
        ("+44 (7700) 900-123", "447700900123"),
        ("+1 (212) 555-0123", "12125550123"),
        ("+33.1.23.45.67.89", "33123456789"),
        ("+49-30-1234567", "49301234567"),
        ("  +44\t7700 900123\n", "447700900123"),
        ("1.800.555.0100", "18005550100"),
    ],
)
def test_numbers_become_digits_only(raw, digits):
    assert normalise(raw) == digits
    assert build(to=raw).to == digits
    assert build(to=raw).api_body()["to"] == digits


def test_a_possible_number_outside_known_ranges_is_still_dialed():
    # 07700 900xxx is reserved for drama: possible, but not a valid assigned number.
    import phonenumbers

    assert not phonenumbers.is_valid_number(phonenumbers.parse("+447700900123"))
    assert normalise("+447700900123") == "447700900123"


@pytest.mark.parametrize(
    "raw",
    [
        "+44 12",  # too short for the UK
        "+1 212",  # too short for NANP
        "+44 7700 900123 4567 89",  # too long
        "+49 1",
    ],
)
def test_impossible_numbers_are_invalid(raw):
    # "+49 1" is too short for Germany; it must not be blamed on the country code.
    with pytest.raises(ValueError, match="not a possible number"):
        normalise(raw)
    assert str(refused(to=raw)).startswith("to: ")


@pytest.mark.parametrize("raw", ["+999 1234567", "+0 7700 900123", "0 7700 900123"])
def test_unknown_country_codes_are_invalid(raw):
    error = refused(to=raw)
    assert str(error).startswith("to: ") and "country code" in str(error)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "call me",
        "+44 7700 90012a",
        "++447700900123",
        "44+7700900123",
        "+44/7700/900123",
        "\u0664\u0664\u0667\u0667\u0660\u0660\u0669\u0660\u0660\u0661\u0662\u0663",  # Arabic digits
        "+44 7700 900１23",  # a full-width digit
        "x" * 1000,
    ],
)
def test_malformed_numbers_are_invalid(raw):
    with pytest.raises(ValueError):
        normalise(raw)
    assert str(refused(to=raw)).startswith("to: ")


@pytest.mark.parametrize("raw", [447700900123, None, ["447700900123"], {"n": 1}, True])
def test_to_must_be_a_string(raw):
    assert str(refused(to=raw)).startswith("to: ")


def test_to_is_required():
    with pytest.raises(InvalidRequest, match="^to: required$"):
        build_request({"id": "x"}, CONFIG, "test:1")


@pytest.mark.parametrize(
    "raw",
    ["sip:alice@example.com", "sip:1001@10.0.0.1:5060", "sip:bob@pbx.example.com;transport=tls"],
)
def test_sip_addresses_are_kept(raw):
    assert normalise(raw) == raw
    assert build(to=raw).api_body()["to"] == raw


@pytest.mark.parametrize(
    "raw",
    [
        "sip:",
        "sip:alice",
        "sip:@host",
        "sip:alice@",
        "sip:a b@host",
        "sip:a@b@c",
        "sip:alice@ho st",
    ],
)
def test_malformed_sip_is_refused(raw):
    with pytest.raises(ValueError, match="sip"):
        normalise(raw)
    assert str(refused(to=raw)).startswith("to: ")


# --- session_parameters --------------------------------------------------------------------------


def test_session_parameters_as_a_mapping():
    request = build(session_parameters={"CALLER_NAME": "Diane Miller", "VIP": True, "N": 3})
    assert request.api_body()["session_parameters"] == [
        {"name": "CALLER_NAME", "value": "Diane Miller"},
        {"name": "VIP", "value": True},
        {"name": "N", "value": 3},
    ]


def test_session_parameters_as_the_api_list():
    given_list = [{"name": "CALLER_NAME", "value": "Diane Miller"}, {"name": "N", "value": 1.5}]
    assert build(session_parameters=given_list).api_body()["session_parameters"] == given_list


def test_both_shapes_give_the_same_body():
    as_dict = build(session_parameters={"A": "1", "B": "2"}).api_body()
    as_list = build(
        session_parameters=[{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    ).api_body()
    assert as_dict == as_list


def test_empty_session_parameters_are_not_sent():
    assert "session_parameters" not in build(session_parameters={}).api_body()
    assert "session_parameters" not in build(session_parameters=[]).api_body()
    assert "session_parameters" not in build().api_body()


@pytest.mark.parametrize(
    "raw",
    [
        "CALLER_NAME=Diane",
        42,
        None,
        ["CALLER_NAME"],
        [{"name": "A"}],
        [{"value": "x"}],
        [{"name": "A", "value": "x", "extra": 1}],
        [{"name": "", "value": "x"}],
        [{"name": 5, "value": "x"}],
        [["A", "x"]],
        {"": "x"},
        {"A": {"nested": 1}},
        {"A": ["x"]},
        {"A": None},
    ],
)
def test_bad_session_parameters_are_refused(raw):
    assert str(refused(session_parameters=raw)).startswith("session_parameters: ")


# --- fields --------------------------------------------------------------------------------------


def test_unknown_fields_are_named():
    error = refused(callerid="447700900000")
    assert "callerid" in str(error)
    error = refused(status_url="https://evil.example.com", colour="red")
    assert "status_url" in str(error) and "colour" in str(error)


@pytest.mark.parametrize("value", [[], "text", 5, None, True])
def test_a_request_is_an_object(value):
    with pytest.raises(InvalidRequest, match="JSON object"):
        build_request(value, CONFIG, "test:1")


def test_a_full_request():
    request = build_request(
        {
            "to": "+44 7700 900123",
            "agent_id": "agent-us",
            "id": "req-17",
            "session_parameters": {"CALLER_NAME": "Diane Miller"},
            "hangup_on_answer_machine": True,
            "not_before": "2026-11-24T12:00:00Z",
            "expires_at": "2026-11-24T14:00:00+01:00",
            "meta": {"row": 17, "tags": ["a"]},
        },
        CONFIG,
        "stdin:17",
    )
    assert request.id == "req-17"
    assert request.to == "447700900123"
    assert request.agent_id == "agent-us"
    assert request.sender is None
    assert request.not_before == dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC).timestamp()
    assert request.expires_at == dt.datetime(2026, 11, 24, 13, tzinfo=dt.UTC).timestamp()
    assert request.meta == {"row": 17, "tags": ["a"]}
    assert request.source == "stdin:17"
    assert request.api_body() == {
        "to": "447700900123",
        "agent_id": "agent-us",
        "session_parameters": [{"name": "CALLER_NAME", "value": "Diane Miller"}],
        "hangup_on_answer_machine": True,
    }


def test_the_api_body_has_only_api_fields():
    body = build(id="x", meta={"k": 1}, not_before="2026-01-01T00:00:00Z").api_body()
    assert body == {"to": TO, "agent_id": "agent-eu"}
    json.dumps(body, allow_nan=False)


# --- id ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "A-z_0.9:x", "x" * 128, "2026-11-24T12:00:00Z"])
def test_good_ids(value):
    assert build(id=value).id == value


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "has space", "slash/no", "é", "new\nline", "id\n", 5, None, ["a"]]
)
def test_bad_ids(value):
    error = refused(id=value)
    assert str(error).startswith("id: ")


def test_an_id_is_made_from_the_content_when_absent():
    first = build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:00Z")
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", first.id) and first.id_from_content
    # The same call, written otherwise: parameters in another order, another notation of the
    # number, the agent by its number, another offset for the same moment.
    same = build(
        to="+44 7700 900123",
        session_parameters=[{"name": "B", "value": 2}, {"name": "A", "value": "1"}],
        not_before="2026-12-02T11:00:00+01:00",
        **{"from": "447700900000"},
    )
    assert same.id == first.id
    # What does not decide the call does not count: meta, expiry.
    assert build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:00Z",
                 meta={"row": 2}, expires_at="2027-01-01T00:00:00Z").id == first.id  # fmt: skip
    # What does, does.
    others = [
        build(to="447700900124", session_parameters={"A": "1", "B": 2}),
        build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:01Z"),
        build(session_parameters={"A": "1", "B": "2"}, not_before="2026-12-02T10:00:00Z"),
        build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:00Z",
              agent_id="agent-us"),
        build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:00Z",
              hangup_on_answer_machine=False),
        build(session_parameters={"A": "1", "B": 2}, not_before="2026-12-02T10:00:00Z",
              campaign="winter"),
    ]  # fmt: skip
    assert len({first.id, *(other.id for other in others)}) == 1 + len(others)


def test_a_given_id_is_kept():
    request = build(id="crm-17")
    assert request.id == "crm-17" and not request.id_from_content


@pytest.mark.parametrize("value", ["", "x" * 65, "has space", "é", 5, None])
def test_bad_campaigns(value):
    assert str(refused(campaign=value)).startswith("campaign: ")


# --- agent_id / from -----------------------------------------------------------------------------


def test_default_agent_when_none_is_named():
    request = build()
    assert request.agent_id == "agent-eu" and request.sender is None
    assert request.api_body()["agent_id"] == "agent-eu"


def test_agent_id_names_the_agent():
    assert build(agent_id="agent-us").agent_id == "agent-us"


@pytest.mark.parametrize(
    ("sender", "agent", "number"),
    [
        ("447700900000", "agent-eu", "447700900000"),
        ("+44 7700 900000", "agent-eu", "447700900000"),
        ("+1 (202) 555-0100", "agent-us", "12025550100"),
    ],
)
def test_from_maps_to_the_agent_with_that_number(sender, agent, number):
    request = build(**{"from": sender})
    assert request.agent_id == agent
    assert request.sender == number
    body = request.api_body()
    assert body["from"] == number
    assert "agent_id" not in body


def test_from_that_is_no_agents_number_is_refused():
    error = refused(**{"from": "447700900999"})
    assert str(error).startswith("from: ") and "447700900999" in str(error)


@pytest.mark.parametrize("sender", ["not a number", 447700900000, "sip:agent@example.com"])
def test_bad_from_is_refused(sender):
    assert str(refused(**{"from": sender})).startswith("from: ")


def test_agent_id_and_from_together_are_refused():
    error = refused(agent_id="agent-eu", **{"from": "447700900000"})
    assert "agent_id" in str(error) and "from" in str(error)


@pytest.mark.parametrize("agent", ["agent-xx", "", 5, None, ["agent-eu"]])
def test_an_agent_not_in_the_config_is_refused(agent):
    error = refused(agent_id=agent)
    assert str(error).startswith("agent_id: ")


def test_no_default_agent_and_none_named():
    error = refused(config=NO_DEFAULT)
    assert str(error).startswith("agent_id: ") and "default_agent" in str(error)
    assert build(config=NO_DEFAULT, agent_id="agent-us").agent_id == "agent-us"


def test_from_with_no_numbers_configured():
    assert str(refused(config=NO_DEFAULT, **{"from": "447700900000"})).startswith("from: ")


# --- times ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-24T12:00:00Z", dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)),
        ("2026-11-24T12:00:00+00:00", dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)),
        ("2026-11-24T14:30:00+02:30", dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)),
        ("2026-11-24T07:00:00-05:00", dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)),
        ("2026-11-24T12:00:00.250Z", dt.datetime(2026, 11, 24, 12, 0, 0, 250000, tzinfo=dt.UTC)),
    ],
)
def test_times_with_an_offset(raw, expected):
    assert build(not_before=raw).not_before == expected.timestamp()
    assert build(expires_at=raw).expires_at == expected.timestamp()


@pytest.mark.parametrize(
    "raw", ["2026-11-24T12:00:00", "2026-11-24", "tomorrow", "", 1764000000, None, "12:00Z"]
)
@pytest.mark.parametrize("name", ["not_before", "expires_at"])
def test_times_need_a_utc_offset(raw, name):
    assert str(refused(**{name: raw})).startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("not_before", "expires_at"),
    [
        ("2026-11-24T12:00:00Z", "2026-11-24T12:00:00Z"),
        ("2026-11-24T12:00:00Z", "2026-11-24T11:59:59Z"),
        ("2026-11-24T12:00:00Z", "2026-11-24T13:00:00+02:00"),  # 11:00 UTC
        ("1970-01-01T00:00:00Z", "1969-12-31T00:00:00Z"),
    ],
)
def test_expires_at_must_be_after_not_before(not_before, expires_at):
    error = refused(not_before=not_before, expires_at=expires_at)
    assert str(error).startswith("expires_at: ")


def test_expires_at_after_not_before():
    request = build(not_before="2026-11-24T12:00:00Z", expires_at="2026-11-24T12:00:01Z")
    assert request.expires_at - request.not_before == 1


# --- meta and hangup_on_answer_machine -----------------------------------------------------------


def test_meta_is_kept_untouched():
    meta = {"row": 17, "nested": {"list": [1, "two", None, 3.5]}, "ünïcode": "✓"}
    assert build(meta=meta).meta == meta
    assert build(meta={}).meta == {}
    assert build().meta is None


@pytest.mark.parametrize("meta", [[1, 2], "row 17", 17, None, True])
def test_meta_must_be_an_object(meta):
    assert str(refused(meta=meta)).startswith("meta: ")


@pytest.mark.parametrize("value", [True, False])
def test_hangup_on_answer_machine_boolean(value):
    request = build(hangup_on_answer_machine=value)
    assert request.hangup_on_answer_machine is value
    assert request.api_body()["hangup_on_answer_machine"] is value


def test_hangup_on_answer_machine_absent_is_not_sent():
    assert "hangup_on_answer_machine" not in build().api_body()


@pytest.mark.parametrize("value", ["true", 1, 0, None, "yes", []])
def test_hangup_on_answer_machine_only_boolean(value):
    error = refused(hangup_on_answer_machine=value)
    assert str(error).startswith("hangup_on_answer_machine: ")


# --- the partial request of an invalid one -------------------------------------------------------


def test_partial_keeps_id_to_agent_and_meta():
    error = refused(id="req-9", to="not a number", agent_id="agent-us", meta={"row": 9})
    assert error.partial == {
        "id": "req-9",
        "to": "not a number",
        "agent_id": "agent-us",
        "meta": {"row": 9},
    }


def test_partial_has_the_resolved_default_agent():
    error = refused(id="req-9", hangup_on_answer_machine="yes")
    assert error.partial == {"id": "req-9", "to": TO, "agent_id": "agent-eu"}


def test_partial_of_an_unknown_field():
    error = refused(id="r", colour="red")
    assert error.partial == {"id": "r", "to": TO}
    assert "status_url" not in error.partial


def test_partial_of_a_non_object_is_empty():
    with pytest.raises(InvalidRequest) as caught:
        build_request([1], CONFIG, "s")
    assert caught.value.partial == {}


# --- decode_line ---------------------------------------------------------------------------------


def test_decode_line():
    assert decode_line(b'{"to": "447700900123"}') == {"to": "447700900123"}
    assert decode_line('{"name": "Zoë ✓"}'.encode()) == {"name": "Zoë ✓"}
    assert decode_line(b'  {"a": 1}  \r') == {"a": 1}


def test_a_line_of_64_kib_is_fine_and_one_byte_more_is_not():
    head = b'{"to": "447700900123", "meta": {"pad": "'
    tail = b'"}}'
    line = head + b"x" * (MAX_LINE_BYTES - len(head) - len(tail)) + tail
    assert len(line) == 64 * 1024
    assert decode_line(line)["to"] == TO
    longer = head + b"x" * (MAX_LINE_BYTES - len(head) - len(tail) + 1) + tail
    with pytest.raises(InvalidRequest, match="64 KiB"):
        decode_line(longer)


@pytest.mark.parametrize(
    "line",
    [b'{"to": "\xff"}', b"\xc3\x28", b'{"to": "\xed\xa0\x80"}', b"\xef\xbb"],
)
def test_not_utf8(line):
    with pytest.raises(InvalidRequest, match="UTF-8"):
        decode_line(line)


def test_nul_bytes():
    with pytest.raises(InvalidRequest, match="NUL"):
        decode_line(b'{"to": "447700900123"}\x00')


@pytest.mark.parametrize(
    "line", [b"", b"to=447700900123", b'{"to": "447700900123"', b"{'to': 1}", b'{"a": 1} {"b": 2}']
)
def test_not_json(line):
    with pytest.raises(InvalidRequest, match="^not JSON"):
        decode_line(line)


def test_deep_nesting():
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        decode_line(b"[" * 30_000 + b"]" * 30_000)
    line = b'{"to": "447700900123", "meta": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001
    assert len(line) < MAX_LINE_BYTES
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        decode_line(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"to": "447700900123", "meta": {"score": NaN}}',
        b'{"to": "447700900123", "session_parameters": {"X": Infinity}}',
        b'{"to": "447700900123", "session_parameters": {"X": -Infinity}}',
        b'{"to": "447700900123", "meta": {"big": 1e999}}',
    ],
)
def test_non_json_numbers_are_refused(line):
    # NaN and Infinity are not JSON: accepted, they would reach the API and the results as
    # bodies no strict JSON parser reads.
    with pytest.raises(InvalidRequest):
        build_request(decode_line(line), CONFIG, "test:1")


@pytest.mark.parametrize(
    "line",
    [
        b'{"to": "447700900123", "meta": {"name": "\\ud800"}}',
        b'{"to": "447700900123", "session_parameters": {"N": "x\\udfff"}}',
    ],
)
def test_lone_surrogate_escapes_are_refused(line):
    # A lone surrogate is no character: it cannot be written out as UTF-8 again.
    with pytest.raises(InvalidRequest):
        build_request(decode_line(line), CONFIG, "test:1")


def test_an_integer_of_thousands_of_digits_is_invalid_not_an_error():
    # Python refuses to convert integers of over 4300 digits with a plain ValueError: it must
    # come out as InvalidRequest, or it escapes every `except InvalidRequest` of the sources.
    line = b'{"to": "447700900123", "meta": {"n": ' + b"1" * 5000 + b"}}"
    assert len(line) < MAX_LINE_BYTES
    with pytest.raises(InvalidRequest, match="^not JSON"):
        decode_line(line)


def test_paired_surrogate_escapes_are_characters():
    request = build_request(
        decode_line(b'{"to": "447700900123", "meta": {"e": "\\ud83d\\ude00"}}'), CONFIG, "t"
    )
    assert request.meta == {"e": "\U0001f600"}


# --- properties ----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(
        [
            TO,
            "+44 7700 900123",
            "sip:a@b",
            "agent-eu",
            "agent-us",
            "447700900000",
            "2026-11-24T12:00:00Z",
            "2026-11-24T12:00:00",
            {"A": "b"},
            [{"name": "A", "value": "b"}],
            "9" * 300,
        ]
    ),
)
REQUESTS = st.dictionaries(
    st.sampled_from(
        ["to", "agent_id", "from", "id", "session_parameters", "hangup_on_answer_machine"]
        + ["not_before", "expires_at", "meta", "other"]
    ),
    FIELD_VALUES,
    max_size=6,
)


def check_accepted(request: Request) -> None:
    """What was accepted can be sent and recorded as strict JSON."""
    body = request.api_body()
    json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8")
    json.dumps(request.meta, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert body["to"] == request.to
    assert request.to.startswith("sip:") or request.to.isdigit()
    assert ("from" in body) != ("agent_id" in body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(REQUESTS, JSON_VALUES))
@example({"to": TO, "from": "447700900000"})
@example({"to": TO, "not_before": "0001-01-01T00:00:00+14:00"})
@example({"to": TO, "expires_at": "9999-12-31T23:59:59-14:00"})
def test_any_json_value_is_a_request_or_invalid(value):
    try:
        request = build_request(value, CONFIG, "prop")
    except InvalidRequest as error:
        assert str(error)
        assert isinstance(error.partial, dict)
        return
    check_accepted(request)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
@example(b'{"to": "447700900123"}')
@example(b"\xef\xbb\xbf{}")
@example(b"[" * 3000)
@example(b'{"to": "+4477009001\xc3\xa9"}')
@example(b'{"meta": {"n": ' + b"9" * 4400 + b"}}")
def test_any_bytes_give_a_request_or_invalid(data):
    try:
        request = build_request(decode_line(data), CONFIG, "prop")
    except InvalidRequest as error:
        assert str(error)
        return
    check_accepted(request)


@settings(max_examples=100, deadline=None)
@given(REQUESTS, st.sampled_from([True, False]))
def test_any_request_as_a_json_line_is_a_request_or_invalid(value, ascii_only):
    line = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        request = build_request(decode_line(line), CONFIG, "prop")
    except InvalidRequest:
        return
    check_accepted(request)
    assert request.id == value.get("id", request.id)


@pytest.mark.parametrize("raw", ["4" * 100_000, "+44 " + " " * 100_000 + "7700900123", "(" * 70])
def test_a_number_written_longer_than_any_is_refused_in_a_short_message(raw):
    error = refused(to=raw)
    assert "longer than any phone number" in str(error)
    assert len(str(error)) < 120
