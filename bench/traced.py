"""`python -m bench.traced TRACE -- DIALERD-ARGS…`: a dialerd command, traced.

For the scale benchmark only; dialerd itself is unchanged. Each send's `departed` future is
watched: when the client stamps it, the stamp (the loop's clock) and time.monotonic() at that
very moment are kept with the agent, and so is the moment its bytes were handed to the socket.
uvloop's clock is read once per loop iteration, in whole milliseconds, so the first two differ
by how long the iteration has run; the last two by how long aiohttp took to write. A task wakes
every LAG_TICK_S and keeps how late it woke: the event loop's lag; and each garbage collection
of the oldest generation is timed. At exit, all of it is written to TRACE as JSON.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import gc
import json
import sys
import time

from aiohttp.http_writer import StreamWriter

from dialerd import cli, studio

LAG_TICK_S = 0.01

# Per send: (agent, to, the client's stamp, monotonic at the stamp, monotonic when its first
# bytes were handed to the socket); None where it never came.
departures: list[tuple[str, str, float | None, float | None, float | None]] = []
lags: list[float] = []
full_collections: list[float] = []  # seconds each collection of the oldest generation took
_sending: contextvars.ContextVar[_Watched | None] = contextvars.ContextVar("sending", default=None)


class _Watched(asyncio.Future):
    """Hands its result on to the dispatcher's future, noting the moment it came."""

    def __init__(self, target: asyncio.Future):
        super().__init__(loop=target.get_loop())
        self._target = target
        self.stamped_at: float | None = None
        self.written_at: float | None = None

    def set_result(self, result):
        self.stamped_at = time.monotonic()
        super().set_result(result)
        self._target.set_result(result)


def _noting_writes(write):
    """StreamWriter's write to the transport, noting when the send in this context first wrote
    (aiohttp writes a body from a task of its own, which inherits the context)."""

    def noted(self, data):
        watched = _sending.get()
        if watched is not None and watched.written_at is None:
            watched.written_at = time.monotonic()
        return write(self, data)

    return noted


_make_call = studio.StudioClient.make_call


async def _traced_make_call(self, region, body, departed, may_leave=None):
    watched = _Watched(departed)
    _sending.set(watched)
    try:
        return await _make_call(self, region, body, watched, may_leave)
    finally:
        stamp = watched.result() if watched.done() else None
        sent = (body.get("agent_id"), body["to"], stamp, watched.stamped_at, watched.written_at)
        departures.append(sent)


_run = asyncio.Runner.run


def _run_watched(self, coro, **kwargs):
    return _run(self, _watching_lag(coro), **kwargs)


async def _watching_lag(coro):
    watcher = asyncio.get_running_loop().create_task(_watch_lag())
    try:
        return await coro
    finally:
        watcher.cancel()


async def _watch_lag() -> None:
    while True:
        due = time.monotonic() + LAG_TICK_S
        await asyncio.sleep(LAG_TICK_S)
        lags.append(time.monotonic() - due)


_collecting_since = 0.0


def _time_collections(phase: str, info: dict) -> None:
    global _collecting_since
    if info["generation"] != 2:
        return
    if phase == "start":
        _collecting_since = time.perf_counter()
    else:
        full_collections.append(time.perf_counter() - _collecting_since)


def _dump(path: str) -> None:
    trace = {"departures": departures, "lags": lags, "full_collections": full_collections}
    with open(path, "w") as out:
        json.dump(trace, out)


def main() -> None:
    trace, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: python -m bench.traced TRACE -- DIALERD-ARGS…"
    studio.StudioClient.make_call = _traced_make_call
    StreamWriter._write = _noting_writes(StreamWriter._write)
    StreamWriter._writelines = _noting_writes(StreamWriter._writelines)
    asyncio.Runner.run = _run_watched
    gc.callbacks.append(_time_collections)
    atexit.register(_dump, trace)
    sys.exit(cli.main(args))


if __name__ == "__main__":
    main()
