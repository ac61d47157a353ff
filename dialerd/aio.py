"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds (None: no limit); True if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()
