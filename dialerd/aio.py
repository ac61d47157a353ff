"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds (None: no limit); True if it was set.

    asyncio.timeout(), not wait_for(): on Python 3.11, a wait_for() cancelled in the step its
    event is set returns as if set and the cancellation is lost, so that a task cancelled at a
    stop (the results writer, woken by the last outcome) went on for ever and the daemon never
    exited."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


class Progress:
    """How long a stage has been in one step of its work. A wait by design (for work, for a
    send's moment) is no stall, however long it lasts; a step that does not end is one."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._busy_since: float | None = clock()  # None while waiting by design
        self._ended = False

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self._busy_since = None
        try:
            yield
        finally:
            self._busy_since = self._clock()

    def advanced(self) -> None:
        """A step of work has ended: the next one starts now."""
        if self._busy_since is not None:
            self._busy_since = self._clock()

    def ended(self) -> None:
        """The stage has no more work, for good (stdin at its end): never a stall again."""
        self._ended = True

    def stalled_for(self, now: float) -> float:
        if self._ended or self._busy_since is None:
            return 0.0
        return now - self._busy_since


class Worker:
    """A daemon thread running blocking calls in turn.

    asyncio.to_thread's threads are joined when the loop closes, so one call stuck in the
    kernel (a file on a hung mount) would keep the process from ever exiting; a daemon thread
    does not, and a caller that stops waiting simply drops the call's result.
    """

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._calls.put((fn, args, future))
        return await future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) after the calls before it, without waiting for it."""
        self._calls.put((fn, args, None))

    def close(self) -> None:
        """The thread ends after the call it is in, if any; nothing waits for it."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future = call
            try:
                outcome = (True, fn(*args))
            except Exception as error:  # handed to the caller, who decides
                outcome = (False, error)
            if future is None:
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                future.get_loop().call_soon_threadsafe(settle, future, outcome)


def settle(future: asyncio.Future, outcome: tuple[bool, Any]) -> None:
    """Hand a thread's (ok, value) to the future a caller awaits, unless it stopped waiting."""
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
