"""Phone numbers, read one way everywhere: a request's `to` and `from`, an agent's `number` and the
do-not-call list all become the E.164 digits phonenumbers formats (no `+`), so that the list,
the per-number cap and `from` compare like with like.

The rules, in their order: a number written with `+` or `00` is international; one in national
format (a leading trunk `0`, or an area code in parentheses) is read in `default_country`; bare
digits are digits with their country code, unless `default_country` is set and they are a valid
national number of it. A `sip:` address is taken as written.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber

WRITTEN = re.compile(r"[+0-9\s\-.()]+")  # what a number may be written with: no letters, no ext.
PUNCTUATION = re.compile(r"[\s\-.()]")
SIP_ADDRESS = re.compile(r"sip:[^@\s]+@[^@\s]+")
REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS)
MAX_DIGITS = 20  # a country code and the longest national number phonenumbers knows (17)
MAX_WRITTEN = 64  # characters of a number as written, punctuation included; messages quote it
NORTH_AMERICA = "US"  # reads every number of the North American plan (+1)
NORTH_AMERICAN_DIGITS = 10
FIX = "write it with + and its country code, or set default_country"


class NotANumber(ValueError):
    """The text is no number dialerd can dial; the message says why and how to fix it."""


def normalise(raw: Any, default_country: str | None = None) -> str:
    """`raw` as the E.164 digits of its number, or a sip: address as written; NotANumber if not."""
    if not isinstance(raw, str) or not raw.strip():
        raise NotANumber(f"must be a phone number or sip: address, not {raw!r}")
    text = raw.strip()
    if len(text) > MAX_WRITTEN and text[:4].lower() != "sip:":
        raise NotANumber(f"{text[:20]!r}... is longer than any phone number as written")
    if text[:4].lower() == "sip:":
        if not SIP_ADDRESS.fullmatch(text):
            raise NotANumber(f"{text[:80]!r} is not a sip:user@host address")
        return text
    if not WRITTEN.fullmatch(text) or not text.isascii():
        raise NotANumber(f"{text!r} is not a phone number (digits, spaces and + - . ( ) only)")
    digits = PUNCTUATION.sub("", text)
    if len(digits) > MAX_DIGITS:
        raise NotANumber(f"{text!r} has more digits than any phone number")
    if digits.startswith("+"):
        return _digits(_international(digits[1:], text))
    if digits.startswith("00"):
        return _digits(_international(digits[2:], text))
    if "+" in digits or not digits:
        raise NotANumber(f"{text!r} is not a phone number (a + belongs before the country code)")
    if digits.startswith("0") or text.startswith("("):
        return _national(text, default_country)
    return _bare(digits, text, default_country)


def _international(digits: str, text: str) -> PhoneNumber:
    """Digits after `+` (or `00`): the country code, then the national number."""
    if not digits.isdigit():
        raise NotANumber(f"{text!r} is not a phone number (a + belongs before the country code)")
    country_code, national = _split_country_code(digits)
    if country_code is None:
        raise NotANumber(f"{text!r} has no known country code")
    prefix = _national_prefix(country_code)
    if prefix is None or not prefix.match(national):
        # As written: nothing for phonenumbers.parse to strip, and at a fraction of its cost.
        number = _number(country_code, national)
    else:  # a trunk prefix written after the country code (+49 030 ...): the library drops it
        number = _parse("+" + digits, None, text)
    if not phonenumbers.is_possible_number(number):
        region = phonenumbers.region_code_for_country_code(country_code)
        raise NotANumber(f"{text!r} is not a possible number for +{country_code} ({region})")
    return number


def _national(text: str, default_country: str | None) -> str:
    if default_country is None:
        raise NotANumber(f"{text!r} is in national format: {FIX}")
    number = _parse(text, default_country, text)
    if not phonenumbers.is_possible_number(number):
        raise NotANumber(f"{text!r} is not a possible number in {default_country}")
    return _digits(number)


def _bare(digits: str, text: str, default_country: str | None) -> str:
    if default_country is not None and _may_be_national(digits, default_country):
        try:
            number = phonenumbers.parse(digits, default_country)
        except NumberParseException:
            pass
        else:
            if phonenumbers.is_valid_number(number):
                return _digits(number)
    try:
        international = _international(digits, text)
    except NotANumber as error:
        raise NotANumber(f"{error}: {FIX}") from None
    _refuse_north_american(digits, international, text)
    return _digits(international)


def _refuse_north_american(digits: str, international: PhoneNumber, text: str) -> None:
    """Bare digits that are a valid North American number but no valid number read with a
    country code are refused: its national numbers carry no trunk prefix, so one written
    without its 1 (6125551234) reads as another country's possible number (+61 25551234)."""
    if len(digits) != NORTH_AMERICAN_DIGITS or phonenumbers.is_valid_number(international):
        return
    if phonenumbers.is_valid_number(_parse(digits, NORTH_AMERICA, text)):
        raise NotANumber(
            f"{text!r} reads as +{digits}, which is no valid number, and is a valid North "
            f"American number (+1 {digits}): {FIX}"
        )


def _may_be_national(digits: str, region: str) -> bool:
    """Whether `digits` could be a valid national number of `region`: of one of its lengths,
    starting with its trunk prefix (which the library strips), or its country code followed by
    a trunk prefix (which the library reads as the number with its code: 44 000000 in Jersey).
    Most bare digits are numbers with a country code and need no second reading."""
    lengths, country_code, prefix = _national_reading(region)
    if len(digits) in lengths or (prefix is not None and prefix.match(digits)):
        return True
    return (
        prefix is not None
        and digits.startswith(country_code)
        and bool(prefix.match(digits[len(country_code) :]))
    )


@functools.cache
def _national_reading(region: str) -> tuple[frozenset[int], str, re.Pattern | None]:
    """The national number lengths of a region's country code (a number read in Tristan da Cunha
    may be one of Saint Helena's), that code, and the region's trunk prefix pattern."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    prefix = metadata.national_prefix_for_parsing
    sharing = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[metadata.country_code]
    lengths = frozenset().union(
        *(
            phonenumbers.PhoneMetadata.metadata_for_region(r).general_desc.possible_length
            for r in sharing
        )
    )
    return (
        lengths,
        str(metadata.country_code),
        re.compile(prefix) if prefix else None,
    )


def _split_country_code(digits: str) -> tuple[int | None, str]:
    if digits.startswith("0"):
        return None, digits  # no country code starts with 0
    for length in range(1, 4):
        if int(digits[:length]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return int(digits[:length]), digits[length:]
    return None, digits


@functools.cache
def _national_prefix(country_code: int) -> re.Pattern | None:
    """The pattern phonenumbers strips as a trunk prefix from numbers of this country code."""
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    pattern = metadata.national_prefix_for_parsing if metadata else None
    return re.compile(pattern) if pattern else None


def _number(country_code: int, national: str) -> PhoneNumber:
    """The number as phonenumbers.parse makes it from a national number with nothing to strip."""
    if not national:
        return PhoneNumber(country_code=country_code, national_number=0)
    number = PhoneNumber(country_code=country_code, national_number=int(national))
    if len(national) > 1 and national[0] == "0":  # significant in some countries (Italy)
        number.italian_leading_zero = True
        zeros = len(national) - len(national.lstrip("0"))
        number.number_of_leading_zeros = min(zeros, len(national) - 1)
    return number


def _parse(written: str, region: str | None, text: str) -> PhoneNumber:
    try:
        return phonenumbers.parse(written, region)
    except NumberParseException as error:
        if error.error_type == NumberParseException.INVALID_COUNTRY_CODE:
            raise NotANumber(f"{text!r} has no known country code") from None
        raise NotANumber(f"{text!r} is not a possible number") from None


def _digits(number: PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]


def other_reading(raw: str, read: str, default_country: str | None) -> str | None:
    """The valid number that bare digits are when read with their country code, when
    normalise() read them (as `read`) as a national number of `default_country`:
    2015550123 is +1 201 555 0123 in the US, and +20 15550123 as well. None when `raw` reads
    one way only."""
    text = raw.strip()
    digits = PUNCTUATION.sub("", text)
    if default_country is None or not digits.isdigit() or digits[0] == "0" or text[0] == "(":
        return None
    try:
        international = _international(digits, text)
    except NotANumber:
        return None
    other = _digits(international)
    return other if other != read and phonenumbers.is_valid_number(international) else None


def written(number: str) -> str:
    """A number as normalise() gives it, written to read back as itself whatever the reader's
    default_country (bare digits may be a national number of it): with its +."""
    return number if number[:4].lower() == "sip:" else "+" + number


def country_problem(raw: Any) -> str | None:
    """What is wrong with a `default_country` value, or None."""
    if not isinstance(raw, str) or raw.upper() not in REGIONS:
        hint = " (the United Kingdom is GB)" if str(raw).upper() == "UK" else ""
        return f"{raw!r} is not an ISO 3166-1 alpha-2 country code{hint}"
    return None
