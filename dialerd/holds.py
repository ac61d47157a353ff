"""Holds: a scope of sends the API refuses whatever the request (the key: every lane; an agent:
its lane; an endpoint it cannot be reached at: the lanes of its region) waits, and is tried again
with backoff, until the API accepts it again or a reload releases it (SPEC §8.7). Its requests
stay queued; none ends `failed` for it. An operator hears of it once as it begins (error) and
once as it clears (warning), never once per send."""

from __future__ import annotations

import weakref
from typing import Protocol

from .logs import log

HOLD_FIRST_S = 1.0
HOLD_MAX_S = 60.0
TRY_LEASE_S = 10.0  # a try's answer is awaited this long before another lane may try


class Waiter(Protocol):
    def wake(self) -> None: ...


class Hold:
    def __init__(self, scope: str, **names: str):
        self.scope = scope  # what the API refuses, as the log says it: "the key", "the agent"
        self._names = names  # which one, for the log: agent="...", region="..."
        self.reason: str | None = None  # the API's answer while it is held
        self.until = 0.0  # loop time of the next try
        self._refusals = 0  # in a row
        self._try_until = 0.0  # while a try is out: when another lane may make one
        self._waiters: weakref.WeakSet[Waiter] = weakref.WeakSet()  # lanes, woken by a change

    @property
    def held(self) -> bool:
        return self.reason is not None

    def watch(self, waiter: Waiter) -> None:
        """Wake `waiter` whenever the hold changes (begins, clears, is tried again)."""
        self._waiters.add(waiter)

    def wait_s(self, now: float) -> float:
        """How long a send of the scope must wait from `now`; 0 or less: it may go."""
        if not self.held:
            return 0.0
        return max(self.until, self._try_until) - now

    def take_try(self, now: float) -> None:
        """A send of the held scope goes out as its try: one send per try, whatever the lanes
        that wait; the others wait for its answer (or TRY_LEASE_S, should it never come)."""
        if self.held:
            self._try_until = now + TRY_LEASE_S

    def _changed(self) -> None:
        self._try_until = 0.0
        for waiter in list(self._waiters):
            waiter.wake()

    def refused(self, reason: str, now: float) -> None:
        """The API refused the scope again: the next try waits twice as long, up to a minute.
        A refusal while the hold waits is of a send that left before it began: no new try.
        Said once as the hold begins, whatever texts its refusals carry (they may vary)."""
        if self.held and now < self.until:
            return
        if not self.held:
            log.error(
                f"the API refuses {self.scope}: its sends are held and tried again until it "
                "accepts them, or a reload",
                scope=self.scope,
                reason=reason,
                **self._names,
            )
        self.reason = reason
        delay = min(HOLD_MAX_S, HOLD_FIRST_S * 2**self._refusals)
        self._refusals += 1
        self.until = max(self.until, now + delay)
        self._changed()

    def accepted(self) -> None:
        """The API took a send of the scope: it goes on, every lane of it at once."""
        if self.reason is None:
            return
        log.warning(f"the API accepts {self.scope} again", scope=self.scope, **self._names)
        self.reason = None
        self._refusals = 0
        self.until = 0.0
        self._changed()

    def release(self) -> None:
        """A reload (a new key, a fixed agent id): try again at once, from the first delay."""
        self._refusals = 0
        self.until = 0.0
        self._changed()
