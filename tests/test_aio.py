"""The daemon's small asyncio helpers."""

from __future__ import annotations

import asyncio

import pytest

from dialerd.aio import wait_event


async def test_a_wait_cancelled_in_the_step_its_event_is_set_ends_cancelled():
    """A task cancelled at a stop while its event is being set (the results writer, woken by
    the last outcome) must end, not go on as if woken: the daemon waits for it to exit."""
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(event, 5.0))
    await asyncio.sleep(0)  # it waits
    event.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_wait_tells_whether_its_event_was_set():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, None) is True
