"""Numbers (SPEC §4 *Numbers*): one normaliser for `to`, `from`, agents' numbers, the
do-not-call list and the cap; national format read in default_country; the same digits however
a number is written; a ledger of an older version's numbers rewritten."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from collections import Counter

import phonenumbers
import pytest
from conftest import ledger_of_version, result_lines, run_dialerd, sim_config
from hypothesis import example, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from dialerd.config import ConfigError, build_config
from dialerd.ledger import MIGRATIONS, Ledger
from dialerd.numbers import NotANumber, normalise
from dialerd.request import InvalidRequest, build_request

REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)


def e164_digits(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)[1:]


def example_numbers() -> list[tuple[str, phonenumbers.PhoneNumber]]:
    """phonenumbers' own example of a mobile and a fixed-line number, for every region."""
    examples = []
    for region in REGIONS:
        for kind in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                examples.append((region, number))
    return examples


EXAMPLES = example_numbers()


def test_every_example_number_is_the_same_digits_in_every_notation():
    assert len(EXAMPLES) > 400  # every region, nearly all with both kinds
    wrong = []
    for region, number in EXAMPLES:
        digits = e164_digits(number)
        notations = {
            "E.164": phonenumbers.format_number(number, PhoneNumberFormat.E164),
            "international": phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL),
            "00": "00" + phonenumbers.format_number(number, PhoneNumberFormat.E164)[1:],
            "bare": digits,
        }
        for notation, text in notations.items():
            if normalise(text) != digits:
                wrong.append((region, notation, text))
        national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
        try:
            read = normalise(national, region)
        except NotANumber as error:
            wrong.append((region, "national", national, str(error)))
        else:
            if read != digits:
                wrong.append((region, "national", national, read))
    assert wrong == []


@pytest.mark.parametrize(
    ("written", "digits"),
    [("(555) 010-1234", "15550101234"), ("(201) 555-0123", "12015550123"),
     ("6125551234", "16125551234"), ("2015550123", "12015550123")],
)  # fmt: skip
def test_wrong_country_numbers_are_invalid_without_default_country_and_right_with_it(
    written, digits
):
    assert normalise(written, "US") == digits
    if written == "2015550123":  # +20 15550123 is a valid Egyptian number: bare digits are that
        assert normalise(written) == "2015550123"
        return
    with pytest.raises(NotANumber, match="set default_country") as refused:
        normalise(written)
    assert "write it with + and its country code" in str(refused.value)


@pytest.mark.parametrize(
    ("written", "digits"),
    [("+49 030 123456", "4930123456"), ("+49 (0)30 123456", "4930123456"),
     ("0049 030 123456", "4930123456"), ("49030123456", "4930123456"),
     ("+44 (0)7700 900000", "447700900000"), ("44 (0)7700 900000", "447700900000"),
     ("(+1) 202-555-0100", "12025550100"), ("1 (202) 555-0100", "12025550100")],
)  # fmt: skip
def test_a_trunk_zero_after_the_country_code_is_dropped(written, digits):
    assert normalise(written) == digits


@pytest.mark.parametrize(
    ("written", "country", "digits"),
    [("07700 900123", "GB", "447700900123"), ("030 123456", "DE", "4930123456"),
     ("8 (912) 345-67-89", "RU", "79123456789"), ("011 44 7700 900123", "US", "447700900123"),
     ("447700900123", "GB", "447700900123"), ("12015550123", "US", "12015550123")],
)  # fmt: skip
def test_national_and_bare_numbers_with_default_country(written, country, digits):
    assert normalise(written, country) == digits


@pytest.mark.parametrize(
    ("written", "says"),
    [("07700 900123", "national format"), ("+44 12", "not a possible number for +44 (GB)"),
     ("1-800-FLOWERS", "digits, spaces"), ("+44 7700 900123 ext. 5", "digits, spaces"),
     ("44+7700900123", "a + belongs"), ("9" * 30, "more digits"),
     ("99912345678", "no known country code: write it with +")],
)  # fmt: skip
def test_each_refusal_says_what_is_wrong(written, says):
    with pytest.raises(NotANumber, match=re.escape(says)):
        normalise(written)


# -- against phonenumbers itself ----------------------------------------------------------------


def possible_digits(text: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    return e164_digits(number) if phonenumbers.is_possible_number(number) else None


digit_strings = st.text(alphabet="0123456789", min_size=1, max_size=18)


@settings(max_examples=3000, deadline=None)
@given(digits=digit_strings)
@example(digits="49030123456")  # a trunk 0 after the country code
@example(digits="390612345678")  # Italy's leading 0, which is kept
def test_international_numbers_are_what_phonenumbers_makes_of_them(digits):
    expected = possible_digits("+" + digits, None)
    try:
        got = normalise("+" + digits)
    except NotANumber:
        got = None
    assert got == expected


@settings(max_examples=3000, deadline=None)
@given(digits=digit_strings, region=st.sampled_from(REGIONS))
@example(digits="2015550123", region="US")
@example(digits="6125551234", region="GB")
@example(digits="44000000", region="JE")  # the country code, then a number Jersey completes
@example(digits="20000", region="TA")  # a number of another region with the same code
def test_bare_and_national_digits_follow_the_rules_in_their_order(digits, region):
    if digits.startswith("00"):
        return  # international, as above
    try:
        got = normalise(digits, region)
    except NotANumber:
        got = None
    if digits.startswith("0"):  # national format: read in the region, possible there
        assert got == possible_digits(digits, region)
        return
    try:
        national = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        national = None
    if national is not None and phonenumbers.is_valid_number(national):
        assert got == e164_digits(national)  # a valid national number is read as one first
    elif got is not None:
        assert got == possible_digits("+" + digits, None)  # else digits with a country code


# -- every place a number is read -------------------------------------------------------------


def test_from_written_with_a_trunk_zero_is_the_agents_number():
    config = build_config(
        {"agents": {"uk": {"region": "eu", "rate": 1, "number": "+44 (0)7700 900000"},
                    "us": {"region": "us", "rate": 1, "number": "(202) 555-0100"}},
         "default_agent": "uk", "default_country": "us"}
    )  # fmt: skip
    assert config.default_country == "US"
    assert config.agents["uk"].number == "447700900000"
    assert config.agents["us"].number == "12025550100"
    for written in ("+44 (0)7700 900000", "+44 7700 900000", "447700900000"):
        request = build_request({"to": "+44 7700 900123", "from": written}, config, "t:1")
        assert (request.agent_id, request.sender) == ("uk", "447700900000")
    request = build_request({"to": "(202) 555-0199", "from": "202 555 0100"}, config, "t:1")
    assert (request.to, request.agent_id) == ("12025550199", "us")


def test_a_national_number_without_default_country_is_an_invalid_request():
    config = build_config({"agents": {"a": {"region": "eu", "rate": 1}}})
    with pytest.raises(InvalidRequest, match="^to: '07700 900123' is in national format"):
        build_request({"to": "07700 900123"}, config, "t:1")


@pytest.mark.parametrize("country", ["UK", "XX", "gbr", 44, ""])
def test_default_country_must_be_a_region(country):
    with pytest.raises(ConfigError) as refused:
        build_config({"agents": {"a": {"region": "eu", "rate": 1}}, "default_country": country})
    assert refused.value.problems[0].startswith("default_country: ")
    if country == "UK":
        assert "GB" in refused.value.problems[0]


def test_an_agent_number_in_national_format_needs_default_country():
    with pytest.raises(ConfigError) as refused:
        build_config({"agents": {"a": {"region": "eu", "rate": 1, "number": "07700 900000"}}})
    assert refused.value.problems[0].startswith("agents.a.number: ")


def test_trunk_zero_forms_are_blocked_by_the_list_and_counted_together_by_the_cap(
    tmp_path, simulator
):
    sim = simulator("--latency", "0.01-0.03")
    dnc = tmp_path / "dnc.txt"
    dnc.write_text("+4930123456\n030 7654321\n")  # the second in national format (DE)
    config = sim_config(
        tmp_path, sim, dnc_file=str(dnc), default_country="DE",
        max_calls_per_number={"count": 1, "per_s": 3600},
    )  # fmt: skip
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)).isoformat()  # before the cap opens
    lines = [
        {"id": "listed", "to": "+49 030 123456"},
        {"id": "listed-national", "to": "+49 30 7654321"},
        {"id": "first", "to": "+49 30 555666"},
        {"id": "again-with-0", "to": "+49 (0)30 555666", "expires_at": soon},
        {"id": "again-national", "to": "030 555666", "expires_at": soon},
    ]
    done = run_dialerd(
        "run", "-c", str(config), input="".join(json.dumps(x) + "\n" for x in lines).encode()
    )
    assert done.returncode == 0, done.stderr
    outcomes = {r["id"]: (r["outcome"], r["to"]) for r in result_lines(done.stdout)}
    assert outcomes == {
        "listed": ("blocked", "4930123456"),
        "listed-national": ("blocked", "49307654321"),
        "first": ("dialed", "4930555666"),
        "again-with-0": ("blocked", "4930555666"),
        "again-national": ("blocked", "4930555666"),
    }
    assert Counter(a["to"] for a in sim.arrivals()) == Counter({"4930555666": 1})


def test_numbers_an_older_ledger_stored_are_rewritten(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    conn = ledger_of_version(state / "ledger.sqlite3", 2)
    old = "49030123456"  # +49 030 123456 as the version before kept it
    for seq, (state_of, sender) in enumerate([("queued", "4407700900000"), ("final", None)], 1):
        body = {"to": old, **({"from": sender} if sender else {"agent_id": "a"})}
        conn.execute(
            "INSERT INTO requests (seq, id, run, agent_id, to_number, body, source, due_at,"
            " state, created_at) VALUES (?, ?, 1, 'a', ?, ?, 'stdin:1', 0, ?, 0)",
            (seq, f"r{seq}", old, json.dumps(body), state_of),
        )
    conn.execute("INSERT INTO number_calls VALUES (2, ?, 0, 1)", (old,))
    conn.execute("INSERT INTO number_calls VALUES (3, 'sip:alice@example.com', 0, 1)")
    conn.close()

    ledger = Ledger(state)
    ledger.open()
    ledger.close()
    conn = sqlite3.connect(state / "ledger.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    rows = conn.execute("SELECT id, to_number, body FROM requests ORDER BY seq").fetchall()
    assert [(id_, to) for id_, to, _ in rows] == [("r1", "4930123456"), ("r2", "4930123456")]
    assert json.loads(rows[0][2]) == {"to": "4930123456", "from": "447700900000"}
    assert json.loads(rows[1][2])["to"] == old, "a final request's body is history"
    assert conn.execute("SELECT to_number FROM number_calls ORDER BY seq").fetchall() == [
        ("4930123456",), ("sip:alice@example.com",)
    ]  # fmt: skip
