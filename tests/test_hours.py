"""Calling hours in the callee's local time, on a fake clock: every moment is passed in."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialerd.config import CallingHours
from dialerd.hours import CallingWindow

LONDON_MOBILE = "447911123456"  # Europe/London and the Crown Dependencies, all one offset
NEW_YORK = "12125551234"
HONOLULU = "18085551234"
AUSTRALIAN_MOBILE = "61412345678"  # Cocos (UTC+6:30) to Lord Howe (UTC+11 in summer)
US_TOLL_FREE = "18005551234"  # Pago Pago (UTC-11) to Guam (UTC+10)
RUSSIAN_MOBILE = "79161234567"  # Bucharest (UTC+2) to Anadyr (UTC+12)
UNPLACED = "447700900123"  # a UK number phonenumbers places in no zone
ALL_DAYS = frozenset(range(7))


def window(
    start: str = "08:00",
    end: str = "21:00",
    days: frozenset[int] = ALL_DAYS,
    default_timezone: str = "Europe/London",
    holidays: tuple[str, ...] = (),
) -> CallingWindow:
    return CallingWindow(
        CallingHours(
            start=dt.time.fromisoformat(start),
            end=dt.time.fromisoformat(end),
            days=days,
            default_timezone=default_timezone,
            holidays=frozenset(dt.date.fromisoformat(d) for d in holidays),
        )
    )


def at(text: str) -> float:
    """A moment written in ISO 8601 with its offset."""
    return dt.datetime.fromisoformat(text).timestamp()


def utc(moment: float | None) -> str | None:
    if moment is None:
        return None
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_inside_the_window_is_now_and_outside_is_the_next_opening():
    hours = window()
    now = at("2026-12-01T12:00:00+00:00")
    assert hours.next_open(LONDON_MOBILE, now) == now
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-12-01T07:59:59+00:00"))) == (
        "2026-12-01T08:00:00Z"
    )
    assert hours.next_open(LONDON_MOBILE, at("2026-12-01T08:00:00+00:00")) == at(
        "2026-12-01T08:00:00+00:00"
    ), "start is inside the window"
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-12-01T21:00:00+00:00"))) == (
        "2026-12-02T08:00:00Z"
    ), "end is outside it"


def test_the_window_is_in_the_callees_zone_not_the_daemons():
    hours = window()
    noon_utc = at("2026-12-01T12:00:00+00:00")  # 07:00 in New York, 02:00 in Honolulu
    assert utc(hours.next_open(NEW_YORK, noon_utc)) == "2026-12-01T13:00:00Z"
    assert utc(hours.next_open(HONOLULU, noon_utc)) == "2026-12-01T18:00:00Z"
    assert hours.next_open(LONDON_MOBILE, noon_utc) == noon_utc


def test_sip_addresses_and_unplaced_numbers_use_the_default_zone():
    hours = window(default_timezone="America/New_York")
    noon_utc = at("2026-12-01T12:00:00+00:00")
    for to in ("sip:alice@example.com", UNPLACED):
        assert hours.zones(to) == ("America/New_York",)
        assert utc(hours.next_open(to, noon_utc)) == "2026-12-01T13:00:00Z"


def test_a_window_across_midnight():
    hours = window(start="22:00", end="06:00")
    assert hours.next_open(LONDON_MOBILE, at("2026-12-01T23:30:00+00:00")) is not None
    late = at("2026-12-02T05:59:00+00:00")
    assert hours.next_open(LONDON_MOBILE, late) == late
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-12-02T06:00:00+00:00"))) == (
        "2026-12-02T22:00:00Z"
    )


def test_days_are_the_callees_local_weekdays_on_either_side_of_midnight():
    weekdays = frozenset(range(5))  # mon-fri
    hours = window(start="00:00", end="23:59", days=weekdays)
    # Friday 23:00 in Honolulu is already Saturday 09:00 UTC: Honolulu may still be called,
    # London (Saturday) may not until Monday.
    friday_night_in_honolulu = at("2026-12-04T23:00:00-10:00")
    assert hours.next_open(HONOLULU, friday_night_in_honolulu) == friday_night_in_honolulu
    assert utc(hours.next_open(LONDON_MOBILE, friday_night_in_honolulu)) == ("2026-12-07T00:00:00Z")


def test_a_number_in_several_zones_waits_for_the_window_to_be_open_in_all():
    hours = window()
    # December: Cocos is at UTC+6:30, Lord Howe at UTC+11. Cocos reaches 08:00 last (01:30
    # UTC), Lord Howe 21:00 first (10:00 UTC): open from 01:30 to 10:00 UTC.
    assert hours.zones(AUSTRALIAN_MOBILE)[0] == "Australia/Adelaide"
    assert utc(hours.next_open(AUSTRALIAN_MOBILE, at("2026-12-01T15:00:00+00:00"))) == (
        "2026-12-02T01:30:00Z"
    )
    still_open = at("2026-12-02T09:59:00+00:00")
    assert hours.next_open(AUSTRALIAN_MOBILE, still_open) == still_open
    assert utc(hours.next_open(AUSTRALIAN_MOBILE, at("2026-12-02T10:00:00+00:00"))) == (
        "2026-12-03T01:30:00Z"
    )
    # Bucharest (UTC+2) to Anadyr (UTC+12): only 06:00 to 09:00 UTC is inside both.
    assert utc(hours.next_open(RUSSIAN_MOBILE, at("2026-12-01T09:00:00+00:00"))) == (
        "2026-12-02T06:00:00Z"
    )


def test_zones_too_far_apart_for_the_window_never_open():
    # Only the local time of day matters when every day is allowed: Guam and Pago Pago, 21
    # hours apart, are 3 hours apart on the clock, and a 13-hour window fits both.
    assert window().next_open(US_TOLL_FREE, at("2026-12-01T12:00:00+00:00")) is not None
    one_hour = window(start="09:00", end="10:00")
    assert one_hour.next_open(US_TOLL_FREE, at("2026-12-01T12:00:00+00:00")) is None
    assert one_hour.next_open(RUSSIAN_MOBILE, 0.0) is None


def test_holidays_are_local_dates():
    hours = window(holidays=("2026-12-25", "2026-12-26"))
    christmas_eve_evening = at("2026-12-24T22:00:00+00:00")
    assert utc(hours.next_open(LONDON_MOBILE, christmas_eve_evening)) == "2026-12-27T08:00:00Z"
    # Christmas Day in London is still Christmas Eve in Honolulu until 10:00 UTC.
    assert hours.next_open(HONOLULU, at("2026-12-25T05:00:00+00:00")) == at(
        "2026-12-25T05:00:00+00:00"
    )


def test_a_year_of_holidays_and_weekdays_is_searched_through():
    holidays = tuple(str(dt.date(2027, 1, 1) + dt.timedelta(days=n)) for n in range(300))
    hours = window(holidays=holidays)
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-12-31T22:00:00+00:00"))) == (
        "2027-10-28T07:00:00Z"
    ), "08:00 BST"


def test_dst_change_days_move_the_window_in_utc():
    hours = window()
    # London goes to BST (UTC+1) on 2026-03-29 at 01:00 UTC, back to GMT on 2026-10-25.
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-03-28T21:30:00+00:00"))) == (
        "2026-03-29T07:00:00Z"
    )
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-10-24T20:30:00+00:00"))) == (
        "2026-10-25T08:00:00Z"
    )
    # New York springs forward on 2026-03-08: the window closes at 21:00 EDT, 01:00 UTC.
    assert utc(hours.next_open(NEW_YORK, at("2026-03-09T01:00:00+00:00"))) == (
        "2026-03-09T12:00:00Z"
    )


def test_a_start_in_the_hour_a_dst_change_skips_opens_at_the_change():
    # 01:30 does not happen in London on 2026-03-29: the clock goes from 01:00 to 02:00 (BST),
    # so the window opens at the change, the first local moment past 01:30.
    hours = window(start="01:30", end="05:00")
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-03-29T00:10:00+00:00"))) == (
        "2026-03-29T01:00:00Z"
    )


def test_an_end_in_the_hour_a_dst_change_repeats_closes_at_its_first_pass():
    # On 2026-10-25 London's 01:00-02:00 happens twice; a window ending at 01:30 ends at the
    # first 01:30 (00:30 UTC), opens again when the clock goes back to 01:00 (01:00 UTC) and
    # ends again at the second 01:30 (01:30 UTC).
    hours = window(start="22:00", end="01:30")
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-10-25T00:45:00+00:00"))) == (
        "2026-10-25T01:00:00Z"
    )
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-10-25T01:30:00+00:00"))) == (
        "2026-10-25T22:00:00Z"
    )


def test_the_answer_kept_for_a_set_of_zones_is_not_used_outside_its_interval():
    hours = window()
    assert utc(hours.next_open(LONDON_MOBILE, at("2026-12-01T07:00:00+00:00"))) == (
        "2026-12-01T08:00:00Z"
    )
    earlier = at("2026-11-30T12:00:00+00:00")  # before what was learnt: asked afresh
    assert hours.next_open(LONDON_MOBILE, earlier) == earlier
    later = at("2026-12-01T22:00:00+00:00")
    assert utc(hours.next_open(LONDON_MOBILE, later)) == "2026-12-02T08:00:00Z"


def brute_force_next_open(hours: CallingWindow, to: str, now: float) -> float | None:
    """The first whole minute from `now` (or `now` itself) at which every zone is open."""
    zones = [zoneinfo.ZoneInfo(zone) for zone in hours.zones(to)]

    def open_at(moment: float) -> bool:
        utc_time = dt.datetime.fromtimestamp(moment, dt.UTC)
        return all(hours._open_at(utc_time.astimezone(zone)) for zone in zones)

    if open_at(now):
        return now
    minute = (now // 60 + 1) * 60
    for step in range(8 * 24 * 60):
        if open_at(minute + step * 60):
            return minute + step * 60
    return None


@settings(max_examples=60, deadline=None)
@given(
    now=st.integers(at("2026-01-01T00:00:00+00:00"), at("2027-12-31T00:00:00+00:00")),
    start=st.sampled_from(["00:00", "07:30", "08:00", "20:00", "22:15"]),
    end=st.sampled_from(["06:00", "09:00", "17:45", "21:00", "23:59"]),
    days=st.frozensets(st.integers(0, 6), min_size=1),
    to=st.sampled_from([LONDON_MOBILE, NEW_YORK, HONOLULU, AUSTRALIAN_MOBILE, "sip:a@b"]),
)
def test_the_next_opening_matches_a_minute_by_minute_search(now, start, end, days, to):
    if start == end:
        return
    hours = window(start=start, end=end, days=days, default_timezone="America/Sao_Paulo")
    assert hours.next_open(to, float(now)) == brute_force_next_open(hours, to, float(now))


@pytest.mark.parametrize("to", [LONDON_MOBILE, AUSTRALIAN_MOBILE, RUSSIAN_MOBILE])
def test_every_moment_of_a_week_agrees_with_the_kept_answers(to):
    """Asked in order, minute by minute, as a lane would: the kept answers stay right."""
    hours = window(days=frozenset(range(6)))
    fresh = window(days=frozenset(range(6)))
    start = at("2026-10-20T00:00:00+00:00")  # a week with London's DST change in it
    for minute in range(0, 7 * 24 * 60, 7):
        moment = start + minute * 60
        fresh._known.clear()
        assert hours.next_open(to, moment) == fresh.next_open(to, moment), utc(moment)
