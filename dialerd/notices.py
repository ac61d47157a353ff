"""Cluster mode: the other daemons' changes, as they commit (LISTEN/NOTIFY). New work for an
agent wakes its lane here if this daemon holds it; an operator's control is noticed at once; a
lease given up is taken at once. Each has a bounded poll besides (a lane's idle read, the
controls' check, the lease rounds), so a lost connection loses nothing: once it is back, every
lane reads its queue again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg

from .config import ClusterConfig
from .ledger.dialect import CONTROL, LEASES, NOTICES, QUEUED
from .ledger.postgres import connect_async
from .logs import log

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0


class Notices:
    def __init__(
        self,
        cluster: ClusterConfig,
        queued: Callable[[list[str] | None], None],
        control: Callable[[], None],
        leases: Callable[[], None],
    ):
        """`queued(agents)`: new work for these agents (None: for any, after a reconnection);
        `control()`: an operator's change; `leases()`: a lease given up, or a daemon gone."""
        self._cluster = cluster
        self._queued = queued
        self._control = control
        self._leases = leases

    async def run(self) -> None:
        delay, said = RECONNECT_FIRST_S, False
        while True:
            try:
                conn = await connect_async(self._cluster)
                async with conn:
                    await conn.execute(f"LISTEN {NOTICES}")
                    if said:
                        log.info("notices from the other daemons again")
                    said, delay = False, RECONNECT_FIRST_S
                    self._queued(None)  # what was said while nobody listened
                    self._control()
                    async for notice in conn.notifies():
                        self._dispatch(notice.payload)
            except (OSError, psycopg.Error) as error:
                if not said:
                    log.warning(
                        "no notices from the other daemons; polling until they come back",
                        error=str(error),
                    )
                    said = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _dispatch(self, payload: str) -> None:
        if payload.startswith(QUEUED):
            self._queued([payload.removeprefix(QUEUED)])
        elif payload == CONTROL:
            self._control()
        elif payload == LEASES:
            self._leases()
