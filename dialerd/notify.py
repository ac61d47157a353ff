"""systemd's notify protocol: one datagram per state change to $NOTIFY_SOCKET, no dependency.

READY=1 once the ledger is open and the listeners are bound; STATUS= with queue depth and rates;
RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a reload; STOPPING=1 at the drain; and
WATCHDOG=1 every WatchdogSec/2, but only while the event loop runs (a blocked loop sends nothing)
and no stage (a lane of the dispatcher, the spool, stdin) has been stuck in a step of its work for
longer than WatchdogSec.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from .logs import log

STATUS_EVERY_S = 5.0


class Notifier:
    """Sends to the service manager; does nothing when not run under one."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract-namespace socket is written with a leading "@".
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = _watchdog_seconds(environ)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *assignments: str) -> None:
        if not self._address:
            return
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as error:  # the manager went away: nothing here depends on it
            log.warning("cannot notify the service manager", error=str(error))

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def report_status(self, status: Callable[[], Awaitable[str]]) -> None:
        """STATUS= every few seconds, while the daemon runs."""
        while True:
            self.send(f"STATUS={await status()}")
            await asyncio.sleep(STATUS_EVERY_S)

    async def keep_watchdog(self, stalled: Callable[[], tuple[str, float]]) -> None:
        """WATCHDOG=1 every half period while nothing is stuck; silence lets systemd act.

        `stalled`: the stage stuck longest in one step of its work, and for how many seconds.
        """
        while True:
            await asyncio.sleep(self.watchdog_s / 2)
            stage, seconds = stalled()
            if seconds < self.watchdog_s:
                self.send("WATCHDOG=1")
            else:
                log.error(
                    "a stage is stuck; no watchdog ping", stage=stage, stalled_s=round(seconds, 1)
                )


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WatchdogSec from $WATCHDOG_USEC, when it is meant for this process."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
