"""Calling hours: when a callee may be called, in every time zone their number may be in.

A number maps to one or more time zones (phonenumbers' data); a call is allowed at a moment only
if that moment is inside the window in all of them, so the strictest zone wins. Inside the window
means: the local weekday is one of `days`, the local date is no holiday, and `start` <= local time
< `end` (an `end` before `start` is a window across midnight). SIP addresses and numbers with no
known zone use `default_timezone`.

Whether a set of zones is open changes only at a zone's local start, end or midnight, so the next
change is found among those instants; the answer holds until then and is kept per set of zones.
"""

from __future__ import annotations

import datetime as dt
import functools
import zoneinfo

import phonenumbers
from phonenumbers import timezone as number_zones

from .config import CallingHours

UNKNOWN_ZONE = "Etc/Unknown"  # phonenumbers' answer for a number it cannot place
LOOKAHEADS_DAYS = (8, 64, 400)  # searched in turn for the next opening; a year of holidays fits
ZONES_CACHED = 65536  # numbers whose zones are kept (a lookup parses the number)


@functools.lru_cache(maxsize=ZONES_CACHED)
def number_zones_of(to: str) -> tuple[str, ...]:
    """The time zones a `to` (digits, or a SIP address) may be in; () when none is known."""
    if to.startswith("sip:"):
        return ()
    try:
        number = phonenumbers.parse("+" + to)
    except phonenumbers.NumberParseException:
        return ()
    zones = number_zones.time_zones_for_number(number)
    return tuple(sorted(zone for zone in zones if zone != UNKNOWN_ZONE))


class CallingWindow:
    """The calling hours of the config, answered per number and moment."""

    def __init__(self, hours: CallingHours):
        self.hours = hours
        self._default = (hours.default_timezone,)
        # Per set of zones: (from, until, open) - open or closed from `from` until `until`,
        # their next change (None: none ever).
        self._known: dict[tuple[str, ...], tuple[float, float | None, bool]] = {}

    def zones(self, to: str) -> tuple[str, ...]:
        return number_zones_of(to) or self._default

    def next_open(self, to: str, now: float, zone: str | None = None) -> float | None:
        """`now` if `to` may be called now, else the moment it may be (None: never); in `zone`,
        when the request gave the callee's, in place of the number's zones."""
        zones = (zone,) if zone else self.zones(to)
        known = self._known.get(zones)
        if known is None or not (known[0] <= now and (known[1] is None or now < known[1])):
            is_open = self._open_in_all(zones, now)
            known = (now, self._next_change(zones, now, is_open), is_open)
            self._known[zones] = known
        _since, until, is_open = known
        return now if is_open else until

    def _open_in_all(self, zones: tuple[str, ...], moment: float) -> bool:
        utc = dt.datetime.fromtimestamp(moment, dt.UTC)
        return all(self._open_at(utc.astimezone(_zone(zone))) for zone in zones)

    def _open_at(self, local: dt.datetime) -> bool:
        hours = self.hours
        if local.weekday() not in hours.days or local.date() in hours.holidays:
            return False
        time_of_day = local.time()
        if hours.start < hours.end:
            return hours.start <= time_of_day < hours.end
        return time_of_day >= hours.start or time_of_day < hours.end  # across midnight

    def _next_change(self, zones: tuple[str, ...], now: float, is_open: bool) -> float | None:
        """The first moment after `now` at which the zones are no longer `is_open`."""
        for days in LOOKAHEADS_DAYS:
            candidates, horizon = self._candidates(zones, now, days)
            for moment in candidates:
                if moment >= horizon:
                    break
                if self._open_in_all(zones, moment) != is_open:
                    return moment
        return None

    def _candidates(
        self, zones: tuple[str, ...], now: float, days: int
    ) -> tuple[list[float], float]:
        """The instants after `now` within `days` at which a zone's local start, end or
        midnight falls, in order; and the horizon before which that list is complete."""
        first = dt.datetime.fromtimestamp(now, dt.UTC).date() - dt.timedelta(days=2)
        marks = (self.hours.start, self.hours.end, dt.time(0))
        instants = set()
        for zone in zones:
            tz = _zone(zone)
            midnights = [
                dt.datetime.combine(first + dt.timedelta(days=offset), dt.time(0), tz)
                for offset in range(days + 3)
            ]
            for midnight in midnights:
                for mark in marks:
                    # fold 0 and 1: a mark in the hour a DST change repeats falls twice; one in
                    # the hour it skips falls on neither side, and the check decides.
                    local = dt.datetime.combine(midnight.date(), mark, tz)
                    instants.update((local.timestamp(), local.replace(fold=1).timestamp()))
            # Local time jumps at a DST change: the window may open or close right there.
            instants.update(_offset_changes(midnights))
        # Dates past the last one generated start a day or more after it in every zone.
        horizon = dt.datetime.combine(
            first + dt.timedelta(days=days + 1), dt.time(0), dt.UTC
        ).timestamp()
        return sorted(t for t in instants if t > now), horizon


def _offset_changes(midnights: list[dt.datetime]) -> list[float]:
    """The instants at which the zone's UTC offset changes, between consecutive midnights."""
    changes = []
    for before, after in zip(midnights, midnights[1:], strict=False):
        if before.utcoffset() == after.utcoffset():
            continue
        low, high = int(before.timestamp()), int(after.timestamp())
        tz, offset = before.tzinfo, before.utcoffset()
        while high - low > 1:  # the last second with the old offset, to the second
            middle = (low + high) // 2
            if dt.datetime.fromtimestamp(middle, tz).utcoffset() == offset:
                low = middle
            else:
                high = middle
        changes.append(float(high))
    return changes


@functools.cache
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)
