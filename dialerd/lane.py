"""One agent's lane: its due requests read from the ledger, marked, and sent evenly spaced at
the agent's rate; what each answer means for the request and for the lane.

A lane's aiolimiter limiter (capacity 1, one grant per interval) sets the cadence; no send then
leaves less than one interval after the previous one actually left (a cold connection or TLS
handshake delays a departure, and the next must not catch up with it). Each send runs as its own
task once it has left, so a slow answer never holds the next send back.

The interval is (1 + margin) / rate. Timers wake late (epoll counts in whole milliseconds); a
limiter of capacity exactly 1 forgets that lateness and its cadence drifts wider with each send.
So the limiter holds a little more than 1 (`tolerance`, half the margin): a late grant is made
up by the next one, the cadence stays on its grid and the rate is kept, while no two sends come
closer than (1 - tolerance) intervals and no `rate + 1` sends fit in a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiolimiter import AsyncLimiter

from . import clock
from .aio import Progress, wait_event
from .callbacks import StatusUrls, report_mismatch
from .config import AgentConfig, NumberCap, RedialPolicy
from .holds import Hold
from .hours import CallingWindow
from .ledger import EXPIRED_ERROR, LeaseLost, Ledger, Pending
from .logs import log
from .metrics import Metrics
from .results import Outcome
from .studio import SendResult, StudioClient, Verdict

PREFETCH = 32  # due requests a lane reads from the ledger at a time
MAX_RETRIES = 8  # refused sends (429, 502-504) before a request ends `failed`
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
# Margin added per 429, for WIDEN_FOR_S after the last one; at most 2 % more, so the lane still
# keeps 95 % of its rate at the default margin.
WIDEN_STEP = 0.01
WIDEN_MAX = 0.02
WIDEN_FOR_S = 60.0
MARK_LEAD_S = 0.05  # the longest a send is marked in the ledger before it leaves


@dataclass
class Fence:
    """Cluster mode: the lease a lane sends under. `valid_until` (loop time) is when the lease
    runs out unless renewed, counted from before the renewal began, so never later than the
    database counts it."""

    epoch: int
    valid_until: float

    def lets_send(self, now: float, interval: float) -> bool:
        """Whether a send may leave now: while the lease has one interval left at least, so
        that whoever takes it once it has run out sends an interval after this send or later
        (a send that left long after its mark is spaced from, too)."""
        return now + interval < self.valid_until

    def running_low(self, now: float, interval: float) -> bool:
        """Still held, with less than an interval left: its renewal is due any moment."""
        return now < self.valid_until <= now + interval

    def end(self) -> None:
        """The lease is being given up: nothing more leaves under it."""
        self.valid_until = -math.inf


@dataclass(frozen=True)
class Wiring:
    """What every lane shares."""

    ledger: Ledger
    client: StudioClient
    on_final: Callable[[], None]
    metrics: Metrics
    status_urls: StatusUrls | None = None  # callbacks on: a fresh status_url for each send
    callback_wait_s: Callable[[], float] = float  # () -> 0.0 without callbacks
    redial: Callable[[], Mapping[str, RedialPolicy]] = dict
    blocked: Callable[[str], str | None] = lambda _to: None  # noqa: E731 - why `to` is barred
    calling_window: Callable[[], CallingWindow | None] = lambda: None  # noqa: E731
    number_cap: Callable[[], NumberCap | None] = lambda: None  # noqa: E731
    key_hold: Hold = field(default_factory=lambda: Hold("the key"))
    endpoint_holds: dict[str, Hold] = field(default_factory=dict)  # by region, as they happen
    # Cluster mode: another daemon may queue work for a lane's agent, so an idle lane reads
    # its queue again this often (a bounded poll of one indexed range).
    idle_poll_s: float | None = None

    def endpoint_hold(self, region: str) -> Hold:
        """The hold of a region's endpoint, when the API cannot be reached there."""
        if region not in self.endpoint_holds:
            self.endpoint_holds[region] = Hold("connections to its endpoint", region=region)
        return self.endpoint_holds[region]


def _can_wait(pending: Pending, until: float | None) -> bool:
    """Whether the request can wait until `until` (None: never) without expiring first."""
    return until is not None and (pending.expires_at is None or pending.expires_at > until)


def _utc(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def backoff(retries: int) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retries))


class Lane:
    """Everything one agent sends goes through its lane."""

    def __init__(self, agent: AgentConfig, wiring: Wiring, fence: Fence | None = None):
        self.agent = agent
        self.fence = fence
        self._wiring = wiring
        self._ledger = wiring.ledger
        self._loop = asyncio.get_running_loop()
        self._extra_margin = 0.0
        self._widened_until = 0.0
        self._over_rate_said = False  # the warning that 429s go on at the widest margin
        self._limiter = self._new_limiter()
        self._not_before = 0.0  # loop time before which the next send may not leave
        self.left_at: float | None = None  # loop time the last send left, in this run
        self._agent_hold = Hold("the agent", agent=agent.id)
        self.sent = 0  # sends that left, in this run
        self.placed = 0  # calls the API placed of them
        self.progress = Progress(self._loop.time)
        self._due: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self.in_flight: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None  # its run(), once started
        for hold in self._holds():
            hold.watch(self)

    @property
    def done(self) -> bool:
        """Ended, with no send of it in flight."""
        return self.task is not None and self.task.done() and not self.in_flight

    @property
    def interval(self) -> float:
        return (1.0 + self.agent.margin + self._extra_margin) / self.agent.rate

    @property
    def tolerance(self) -> float:
        """The part of an interval by which one send may come early to keep the cadence."""
        return self.agent.margin / 2

    def _new_limiter(self) -> AsyncLimiter:
        # Leaks one send per interval; holds 1 + tolerance, so a late grant is made up.
        capacity = 1.0 + self.tolerance
        return AsyncLimiter(capacity, capacity * self.interval)

    def wake(self) -> None:
        self._wake.set()

    def reread(self) -> None:
        """Read the queue again before the next send (what it holds may be paused now)."""
        self._due.clear()
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def release_holds(self) -> None:
        """A reload: what the API refused is tried again at once."""
        for hold in self._holds():
            hold.release()
        self._wake.set()

    def _holds(self) -> tuple[Hold, ...]:
        wiring = self._wiring
        return wiring.key_hold, self._agent_hold, wiring.endpoint_hold(self.agent.region)

    async def _wait_for_holds(self) -> bool:
        """Until no hold of this lane's makes it wait, or the lane stops; whether it waited.
        When it need not, the send that follows is the try of each hold still on (the holds
        wake the lane as they change)."""
        waited = False
        while not self._stopping:
            holds, now = self._holds(), self._loop.time()
            remaining = max(hold.wait_s(now) for hold in holds)
            if remaining <= 0:
                if not waited:
                    for hold in holds:
                        hold.take_try(now)
                return waited
            waited = True
            self._wake.clear()
            with self.progress.waiting():
                await wait_event(self._wake, remaining)
        return waited

    def reconfigure(self, agent: AgentConfig) -> None:
        """A new rate or margin takes effect from the next send."""
        self.agent = agent
        self._limiter = self._new_limiter()

    async def run(self, start_delay: float) -> None:
        """Send due requests until stopped; what is not yet sent stays queued in the ledger."""
        await self._continue_cadence()
        await self._sleep_until(self._loop.time() + start_delay)
        while not self._stopping:
            pending = await self._next_due()
            if pending is None or await self._held_back(pending):
                continue
            # Checked again once its moment has come: the list may change, expires_at pass and
            # the calling hours end while it waits for its turn. The cap is checked by the mark.
            outgoing = await self._pace_and_mark(pending)
            if outgoing is not None and not await self._held_back(pending):
                await self._send(pending, *outgoing)

    async def _held_back(self, pending: Pending) -> bool:
        """The campaign rules, in their order: the do-not-call list, expires_at, the calling
        hours. True if the request may not go now: it has ended, or waits in the ledger."""
        reason = self._wiring.blocked(pending.body["to"])
        if reason is not None:
            await self._finish(pending, Outcome.BLOCKED, error=reason)
            return True
        if pending.expires_at is not None and pending.expires_at <= clock.now():
            await self._finish(pending, Outcome.EXPIRED, error=EXPIRED_ERROR)
            return True
        return await self._outside_hours(pending)

    async def _outside_hours(self, pending: Pending) -> bool:
        return not await self._inside_hours([pending])

    async def _inside_hours(self, batch: list[Pending]) -> list[Pending]:
        """The requests of `batch` that the calling hours allow now; the others wait in the
        ledger for their opening (held in one call), or end `expired` if they cannot."""
        window = self._wiring.calling_window()
        if window is None:
            return batch
        now = clock.now()
        inside, holds = [], []
        for pending in batch:
            opens_at = window.next_open(pending.body["to"], now, pending.timezone)
            if opens_at == now:
                inside.append(pending)
            elif _can_wait(pending, opens_at):
                holds.append((pending.seq, opens_at))
            elif opens_at is None:
                error = "the calling hours never open in all of the number's time zones at once"
                await self._finish(pending, Outcome.EXPIRED, error=error)
            else:
                error = f"outside the calling hours until {_utc(opens_at)}, after its expires_at"
                await self._finish(pending, Outcome.EXPIRED, error=error)
        if holds:
            await self._ledger.hold(holds, "calling_hours")
            log.debug("held for the calling hours", agent=self.agent.id, count=len(holds))
        return inside

    async def _continue_cadence(self) -> None:
        """Space the first send from the agent's last one, sent maybe by a run just before this
        one (a restart, a crash): the API's window does not start again with the daemon."""
        since = await self._ledger.since_last_send(self.agent.id)
        if since is None:
            return
        if since < 0:  # the clock was stepped back since: a moment not yet reached is now
            log.warning(
                "the last send recorded is ahead of the clock; spacing from now",
                agent=self.agent.id,
                ahead_s=round(-since, 3),
            )
            since = 0.0
        # The last send is stamped at its mark, which it leaves MARK_LEAD_S after, or later on
        # a cold connection (another daemon's too, in cluster mode): spaced from then at the
        # earliest.
        since = max(0.0, since - MARK_LEAD_S)
        self._not_before = self._loop.time() - since + (1.0 - self.tolerance) * self.interval

    async def _next_due(self) -> Pending | None:
        if not self._due:
            self._wake.clear()
            due, next_due = await self._ledger.due(self.agent.id, clock.now(), PREFETCH)
            # A batch outside the calling hours is held at once, not one commit per request.
            self._due.extend(await self._inside_hours(due))
            if not due:
                wait = None if next_due is None else max(0.0, next_due - clock.now())
                poll = self._wiring.idle_poll_s
                if poll is not None:
                    wait = poll if wait is None else min(wait, poll)
                with self.progress.waiting():
                    await wait_event(self._wake, wait)
                return None
        return self._due.popleft() if self._due else None  # None: all of it was held back

    async def _sleep_until(self, deadline: float) -> None:
        """Sleep until a loop time, or until the lane is stopped."""
        while not self._stopping and (remaining := deadline - self._loop.time()) > 0:
            self._wake.clear()
            with self.progress.waiting():
                await wait_event(self._wake, remaining)

    async def _pace_and_mark(self, pending: Pending) -> tuple[dict, str | None] | None:
        """Wait for the send's moment, marking it in the ledger just before; None if stopped,
        if a hold made the lane wait (it is read again), or if the per-number cap holds it back
        (it then waits in the ledger, or has ended).

        Returns the body to send and its status_url's token (None without callbacks).

        The mark is committed while the previous send's interval runs out, so its commit never
        widens the spacing; it comes at most MARK_LEAD_S before the POST, so a crash in between
        leaves few requests in_doubt that were never sent.
        """
        self._restore_margin()
        waiting_since = self._loop.time()
        if await self._wait_for_holds():
            # Still queued in the ledger: read again, so that the queue goes on in its order
            # (the request refused first, the try's, is due before this one).
            self._due.clear()
            return None
        await self._sleep_until(self._not_before - MARK_LEAD_S)
        if self.fence is not None and self.fence.running_low(self._loop.time(), self.interval):
            # Too little of the lease is left to send in: not marked until it is renewed. The
            # request goes first again, in its place. (One that has run out by this daemon's
            # count, as after a pause, is marked: the database says whether it is still ours.)
            self._due.appendleft(pending)
            await self._sleep_until(self._loop.time() + self.interval)
            return None
        with self.progress.waiting():
            await self._limiter.acquire()
        if self._stopping:
            return None
        body, token = self._outgoing(pending)
        cap = self._wiring.number_cap()
        marking_since = self._loop.time()
        epoch = None if self.fence is None else self.fence.epoch
        try:
            marked, allowed_at = await self._ledger.mark_sending(
                pending.seq, token, pending.attempts + 1, cap, epoch
            )
        except LeaseLost:
            self._wiring.metrics.fenced(self.agent.id)
            log.warning(
                "the agent's lease is not this daemon's now (taken, or run out): not sending",
                agent=self.agent.id,
            )
            self.stop()
            return None
        self._wiring.metrics.marked(self.agent.id, self._loop.time() - marking_since)
        if not marked:
            if allowed_at is None:  # no longer queued, or paused: what is held may be too
                self._due.clear()
            elif _can_wait(pending, allowed_at):
                await self._ledger.hold([(pending.seq, allowed_at)], "cap")
            else:
                error = (
                    f"over max_calls_per_number ({cap.count} per {cap.per_s:g} s) until "
                    f"{_utc(allowed_at)}, after its expires_at"
                )
                await self._finish(pending, Outcome.BLOCKED, error=error)
            return None
        # Marked: it goes out at its moment, unless a stop began meanwhile (the mark may have
        # waited long on a slow or full disk): it is then queued again as it was, not sent.
        await asyncio.sleep(max(0.0, self._not_before - self._loop.time()))
        # A lease that ran out meanwhile (the process was stopped, the renewals failed): the
        # send may be another daemon's to make now.
        if self._stopping or not self._lease_lets_send():
            await self._ledger.unmark(pending.seq)
            return None
        self._wiring.metrics.paced(self.agent.id, self._loop.time() - waiting_since)
        return body, token

    def _lease_lets_send(self) -> bool:
        """Cluster mode: checked before the mark, after it, and again as the request's bytes
        are about to leave (a connection may be slow to make, the process paused in between)."""
        return self.fence is None or self.fence.lets_send(self._loop.time(), self.interval)

    def _may_leave(self) -> bool:
        """Asked as a send's first byte is about to be written: not once a stop has begun,
        nor once the lease has too little left."""
        return not self._stopping and self._lease_lets_send()

    def _outgoing(self, pending: Pending) -> tuple[dict, str | None]:
        """The body as sent, with a status_url of its own when callbacks are on."""
        if self._wiring.status_urls is None:
            return pending.body, None
        token, url = self._wiring.status_urls.new()
        return {**pending.body, "status_url": url}, token

    async def _send(self, pending: Pending, body: dict, token: str | None) -> None:
        """Start the send, and wait only until the request has left."""
        departed = self._loop.create_future()
        task = asyncio.create_task(self._complete(pending, body, token, departed))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        await asyncio.wait((departed, task), return_when=asyncio.FIRST_COMPLETED)
        if departed.done():
            self.left_at = left_at = departed.result()
        else:  # not sent (refused at once, withheld): spaced from now all the same
            left_at = self._loop.time()
        self._not_before = max(self._not_before, left_at + (1.0 - self.tolerance) * self.interval)

    async def _complete(
        self, pending: Pending, body: dict, token: str | None, departed: asyncio.Future
    ) -> None:
        started = self._loop.time()
        result = await self._wiring.client.make_call(
            self.agent.region, body, departed, self._may_leave
        )
        if result.verdict is Verdict.WITHHELD:  # not sent: queued again, as it was
            why = "the stop had begun" if self._stopping else "the agent's lease was running out"
            log.warning("a send was withheld as it was to leave", agent=self.agent.id, why=why)
            await self._ledger.unmark(pending.seq)
            return
        latency = self._loop.time() - started
        self.sent += 1
        self.placed += result.verdict is Verdict.PLACED
        self._wiring.metrics.send(self.agent.id, result.http_status, latency)
        log.info(
            "send",
            agent=self.agent.id,
            id=pending.id,
            attempt=pending.attempts + 1,
            verdict=result.verdict.value,
            http_status=result.http_status,
            latency_ms=round(latency * 1000, 1),
            error=result.error,
        )
        await self._record(pending, result, token)

    async def _record(self, pending: Pending, result: SendResult, token: str | None) -> None:
        key, agent, endpoint = self._holds()
        status = result.http_status
        if status is not None:
            endpoint.accepted()  # it answered
        if result.verdict is Verdict.KEY_REFUSED:
            await self._held(pending, result, key)
            return
        if status is not None and status < 500:  # it judged the request: the key is good
            key.accepted()
        if result.verdict is Verdict.AGENT_REFUSED:
            await self._held(pending, result, agent)
            return
        if status is not None and status < 500:  # and it knows the agent
            agent.accepted()
        if status is None and result.verdict is Verdict.RETRY:
            await self._held(pending, result, endpoint)
            return
        if result.verdict is Verdict.PLACED:
            await self._placed(pending, result, token)
        elif result.verdict is Verdict.RETRY and pending.retries < MAX_RETRIES:
            await self._retry_later(pending, result)
        elif result.verdict is Verdict.RETRY:
            await self._finish(
                pending,
                Outcome.FAILED,
                http_status=result.http_status,
                response=result.response,
                error=f"gave up after {pending.retries + 1} refused sends: {result.error}",
            )
        else:
            await self._finish(
                pending,
                Outcome(result.verdict.value),
                http_status=result.http_status,
                response=result.response,
                error=result.error,
            )

    async def _placed(self, pending: Pending, result: SendResult, token: str | None) -> None:
        """`dialed` at once without callbacks; else wait for one, or for callback_wait_s."""
        fields = {
            "attempts": pending.attempts + 1,
            "http_status": result.http_status,
            "conversation_uuid": result.conversation_uuid,
            "response": result.response,
            "error": result.error,
        }
        if token is None:
            await self._finish(pending, Outcome.DIALED, **fields)
            return
        wait_until = clock.now() + self._wiring.callback_wait_s()
        effect, mismatched = await self._ledger.placed(
            pending.seq, token, wait_until, self._wiring.redial(), **fields
        )
        for status in mismatched:
            report_mismatch(self._wiring.metrics, status, self.agent.id)
        if effect == "redial":
            self.reread()
        elif effect in ("unanswered", "cancelled"):
            self._wiring.on_final()

    async def _held(self, pending: Pending, result: SendResult, hold: Hold) -> None:
        """The API refused the key or the agent, or could not be reached: not the request's
        fault. It is queued again in its place, keeping its retries (they are for its own
        refusals), and the hold makes its lane wait for the next try."""
        hold.refused(result.error or f"HTTP {result.http_status}", self._loop.time())
        await self._ledger.retry_later(pending.seq, None, False, result.error)
        self._due.clear()  # read again from the ledger, in queue order, this one first
        self.wake()

    async def _retry_later(self, pending: Pending, result: SendResult) -> None:
        self._wiring.metrics.retry(self.agent.id)
        if result.http_status == 429:
            self._wiring.metrics.rate_limited(self.agent.id)
            delay = result.retry_after if result.retry_after is not None else 1.0
            self._widen_margin()
            # The whole agent is over its limit at the API: hold every send back, not just this one.
            self._not_before = max(self._not_before, self._loop.time() + delay)
        else:
            delay = backoff(pending.retries)
        await self._ledger.retry_later(pending.seq, clock.now() + delay, True, result.error)
        self._loop.call_later(delay, self._wake.set)

    async def _finish(self, pending: Pending, outcome: Outcome, **fields) -> None:
        await self._ledger.finish(pending.seq, outcome, **fields)
        self._wiring.on_final()

    def _widen_margin(self) -> None:
        """Said once as the margin widens, and once more if 429s go on at its widest: then
        the rate itself is likely above what the agent is approved for."""
        widened_from = self._extra_margin
        self._extra_margin = min(widened_from + WIDEN_STEP, WIDEN_MAX)
        self._widened_until = self._loop.time() + WIDEN_FOR_S
        if self._extra_margin != widened_from:
            self._limiter = self._new_limiter()
        if not widened_from:
            log.warning(
                "rate limited by the API: widening the margin",
                agent=self.agent.id,
                margin=round(self.agent.margin + self._extra_margin, 3),
            )
        elif self._extra_margin == widened_from and not self._over_rate_said:
            self._over_rate_said = True
            log.warning(
                "rate limited by the API at the widest margin: the configured rate may be above "
                "the one the agent is approved for (1, 3 or 5 calls/s)",
                agent=self.agent.id,
                rate=self.agent.rate,
            )

    def _restore_margin(self) -> None:
        if self._extra_margin and self._loop.time() >= self._widened_until:
            self._extra_margin = 0.0
            self._over_rate_said = False
            self._limiter = self._new_limiter()
