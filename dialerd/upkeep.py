"""The ledger's upkeep while the daemon runs: placed calls settled, expiry swept, retention
applied, paused campaigns kept out of the index of due requests; each a loop of small ledger
calls, so that none holds up a send's mark."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import clock
from .config import Config
from .ledger import Ledger

SETTLE_EVERY_S = 1.0  # the longest a placed call waits past wait_s to end `dialed`
SWEEP_EVERY_S = 1.0  # the longest a queued request outlives its expires_at
FORGET_EVERY_S = 3600.0
PRUNE_EVERY_S = 60.0  # how often retention_s is applied once the ledger is pruned up to now
# (or every retention_s, when that is shorter: nothing stays much past it)
PRUNE_PAUSE_S = 0.05  # between batches while there is more: the ledger's other calls go first
NUMBER_CALLS_KEPT_S = 7 * 86400  # placed calls remembered beyond the cap's window, so that a
# cap set later still counts the week before it


class Upkeep:
    def __init__(self, ledger: Ledger, config: Callable[[], Config], on_final: Callable[[], None]):
        self._ledger = ledger
        self._config = config  # the config in force (a reload may change it)
        self._on_final = on_final  # results became final: write them

    async def settle_placed(self) -> None:
        """Placed calls that no callback reported unreached within wait_s end `dialed`."""
        while True:
            settled, next_end = await self._ledger.settle_placed(clock.now())
            if settled:
                self._on_final()
            wait = SETTLE_EVERY_S if next_end is None else next_end - clock.now()
            await asyncio.sleep(min(SETTLE_EVERY_S, max(0.0, wait)))

    async def sweep(self) -> None:
        """Queued requests whose expires_at passes while they wait end `expired` then, not only
        when their turn comes; placed calls older than any cap looks back are forgotten."""
        forgotten_at = 0.0
        while True:
            now = clock.now()
            if await self._ledger.expire_due(now, self._config().max_queue_s):
                self._on_final()
            if self._config().cluster is not None and await self._ledger.park_orphans():
                self._on_final()
            if now - forgotten_at >= FORGET_EVERY_S:
                cap = self._config().max_calls_per_number
                kept_s = max(NUMBER_CALLS_KEPT_S, cap.per_s if cap else 0.0)
                await self._ledger.forget_number_calls(now - kept_s)
                forgotten_at = now
            await asyncio.sleep(SWEEP_EVERY_S)

    async def prune(self) -> None:
        """What retention_s lets go is pruned a batch at a time, then the pages it held are
        given back; never in one long transaction that would hold up a send's mark."""
        while True:
            retention_s = self._config().retention_s
            more = await self._ledger.prune(clock.now(), retention_s)
            more |= await self._ledger.vacuum()  # beside pruning, not after it: a burst is long
            await asyncio.sleep(PRUNE_PAUSE_S if more else min(PRUNE_EVERY_S, retention_s))

    async def sync_pauses(self) -> None:
        """Paused campaigns' queued requests left out of the index of due requests, resumed
        ones put back: a batch at a time, the ledger's other calls between, as pruning does."""
        to_leave_out, to_put_back = await self._ledger.pause_targets()
        changes = [(c, True) for c in to_leave_out] + [(c, False) for c in to_put_back]
        for campaign, paused in changes:
            more = True
            while more:
                more = await self._ledger.set_paused(campaign, paused)
                await asyncio.sleep(PRUNE_PAUSE_S if more else 0)
