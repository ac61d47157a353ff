"""The wall clock the ledger's moments are in, and its steps (set by hand, or by NTP at boot):
the ledger schedules by the wall clock, which must survive a restart, so a step is noticed and
what is scheduled follows it.

In cluster mode the moments are the whole cluster's, so the clock is the database's: read with
each lease round and carried between two readings by the monotonic clock, so that a step of
this host's clock, or its skew from the others', moves nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

LOOK_EVERY_S = 1.0
STEP_MIN_S = 1.0  # a smaller change is drift, which NTP slews away

_database: tuple[float, float] | None = None  # (the database's wall clock, monotonic) at once


def now() -> float:
    """The wall clock now (seconds since the epoch): this host's, or the database's once
    follow_database() has been told it."""
    if _database is None:
        return time.time()
    wall, monotonic = _database
    return wall + (time.monotonic() - monotonic)


def follow_database(wall: float, monotonic: float) -> None:
    """The database's clock read `wall` when the monotonic clock read `monotonic`."""
    global _database
    _database = (wall, monotonic)


async def follow_steps(on_step: Callable[[float, float], Awaitable[None]]) -> None:
    """Call on_step(step, stepped_at) whenever the wall clock moves against the monotonic one
    by STEP_MIN_S or more between two looks, LOOK_EVERY_S apart; `stepped_at` is what the wall
    clock would read now without the step."""
    offset = time.time() - time.monotonic()
    while True:
        await asyncio.sleep(LOOK_EVERY_S)
        now = time.time()
        step = (now - time.monotonic()) - offset
        offset += step
        if abs(step) >= STEP_MIN_S:
            await on_step(step, now - step)
