"""Steps of the wall clock (set by hand, or by NTP at boot): the ledger schedules by the wall
clock, which must survive a restart, so a step is noticed and what is scheduled follows it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

LOOK_EVERY_S = 1.0
STEP_MIN_S = 1.0  # a smaller change is drift, which NTP slews away


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
