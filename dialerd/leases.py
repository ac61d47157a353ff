"""Cluster mode: which agents this daemon sends for. Each agent's lease is renewed every
lease_s / 3; the agents are shared evenly among the live daemons; a lease that has run out by
the database's clock is taken under a new epoch, which fences its old holder off at its next
mark. The records are the ledger's (ledger/leases.py); the decisions are made here.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

from .aio import wait_event
from .config import ClusterConfig, Config
from .dispatcher import Dispatcher
from .lane import Fence
from .ledger import Ledger
from .ledger.leases import InstanceRunning, Round
from .logs import log
from .metrics import Metrics
from .notices import Notices

EARLIEST_WAKE_S = 0.02  # a lease running out is taken this soon after, at the earliest
# A lane given up has its sends answered first, for lease_s / 2 at most: the agent waits for
# that, and no agent may stall longer than lease_s; an answer later than that is in_doubt.
GIVE_UP_WAIT_SHARE = 0.5


def share(agents: int, live: list[int], run: int) -> int:
    """This run's share of the agents: as many as every other live run's, or one more for the
    first `agents % len(live)` of them in the order they started, so that the shares add up."""
    base, extra = divmod(agents, len(live))
    return base + (1 if live.index(run) < extra else 0)


def plan(held: set[str], free: list[str], fair: int, run: int) -> tuple[list[str], list[str]]:
    """The agents to take (free ones, while this run has fewer than its share) and to give up
    (while it has more): an agent moves only from a holder with more than its share. The free
    ones in an order of this run's own, so that daemons taking at once mostly ask for
    different agents."""
    if len(held) < fair:
        ordered = sorted(free, key=lambda agent: zlib.crc32(f"{run}/{agent}".encode()))
        return ordered[: fair - len(held)], []
    return [], sorted(held)[fair:]


async def join_cluster(ledger: Ledger, cluster: ClusterConfig) -> None:
    """Join under this instance's name. A run of that name still alive by its heartbeat is
    waited for until it runs out (a restart just after a crash); one that goes on renewing
    is another daemon with this name, and this one does not start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cluster.lease_s * 2
    while (left := await ledger.join()) is not None:
        if loop.time() + left > deadline:
            raise InstanceRunning(
                f"another daemon named {cluster.instance!r} is running on this ledger: give"
                " each daemon its own instance"
            )
        log.warning(
            "an earlier run of this instance is alive by its heartbeat: waiting for it",
            instance=cluster.instance,
            wait_s=round(left, 3),
        )
        await asyncio.sleep(left + 0.05)
    log.info("joined the cluster", instance=cluster.instance, run=ledger.run)


class Leases:
    def __init__(
        self,
        ledger: Ledger,
        dispatcher: Dispatcher,
        config: Callable[[], Config],
        metrics: Metrics,
    ):
        self._ledger = ledger
        self._dispatcher = dispatcher
        self._config = config
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._fences: dict[str, Fence] = {}  # the leases held, by agent
        self._giving_up: set[str] = set()  # lanes stopping before their leases are released
        self._tasks: set[asyncio.Task] = set()
        self._woken = asyncio.Event()  # a lease given up elsewhere: a round now
        self._raced = False  # a take lost a race: the next round soon (others may be free)
        self._rounds: asyncio.Task | None = None
        self._frozen = False  # the daemon is stopping: renew what it holds, take and give none

    @property
    def held(self) -> list[str]:
        return sorted(self._fences)

    def freeze(self) -> None:
        """The daemon's stop has begun: the leases it holds are renewed while its lanes drain
        (an answer awaited past lease_s would else be another daemon's in_doubt), and no lease
        is taken or given up any more."""
        self._frozen = True

    def wake(self) -> None:
        """Another daemon gave up leases, or left: a round at once, to take them."""
        self._woken.set()

    def start(self, group: asyncio.TaskGroup, on_control: Callable[[], None]) -> list:
        """The lease rounds, and the other daemons' notices: new work wakes the lanes of the
        agents this daemon holds, a control calls `on_control`, a lease given up a round."""
        self._rounds = group.create_task(self.run(), name="leases")
        notices = Notices(self._config().cluster, self._work_queued, on_control, self.wake)
        return [self._rounds, group.create_task(notices.run(), name="notices")]

    def _work_queued(self, agent_ids: list[str] | None) -> None:
        """Another daemon queued work (a request, a redial) for these agents (None: any)."""
        if agent_ids is None:
            self._dispatcher.reread_queues()
        else:
            self._dispatcher.wake(agent_ids, reread=True)

    async def run(self) -> None:
        """Renew, take and give up leases until cancelled (the daemon's stop, which then
        releases them all with leave())."""
        lease_s = self._config().cluster.lease_s
        while True:
            began = self._loop.time()
            self._woken.clear()  # a notice from here on makes the next round come at once
            try:
                async with asyncio.timeout(lease_s / 3):
                    round_ = await self._ledger.lease_round(sorted(self._config().agents))
            except TimeoutError:
                self._lose_all("the ledger's database does not answer")
                await asyncio.sleep(lease_s / 3 - (self._loop.time() - began))
                continue
            self._raced = False
            await self._apply(round_, began + lease_s)
            wake = began + lease_s / 3
            if self._raced:  # soon, not at once: a row locked for long must not make a spin
                wake = self._loop.time() + EARLIEST_WAKE_S
            if round_.next_expiry_s is not None:  # another daemon's lease may be free then
                wake = min(wake, self._loop.time() + round_.next_expiry_s + EARLIEST_WAKE_S)
            await wait_event(self._woken, max(EARLIEST_WAKE_S, wake - self._loop.time()))

    async def _apply(self, round_: Round, valid_until: float) -> None:
        lost = [
            agent
            for agent, fence in self._fences.items()
            if round_.held.get(agent) != fence.epoch and agent not in self._giving_up
        ]
        if lost:
            self._lose(lost, "taken by another daemon")
        for agent, epoch in round_.held.items():
            if agent in self._giving_up:
                continue  # renewed until released, but nothing more is sent under it
            fence = self._fences.get(agent)
            if fence is not None and fence.epoch == epoch:
                fence.valid_until = valid_until
            # Every lease held has a lane sending: one is missing after a take whose answer was
            # lost, or after a mark refused as the lease had run out (a pause) and no other
            # daemon took it meanwhile.
            if not self._dispatcher.sends_for(agent) and not self._frozen:
                self._open({agent: epoch}, valid_until)
        if self._frozen:
            return
        fair = share(len(self._config().agents), round_.live, self._ledger.run)
        holding = set(self._fences) - self._giving_up
        take, give_up = plan(holding, round_.free, fair, self._ledger.run)
        if take:
            taken, parked = await self._ledger.take_leases(take)
            self._raced = len(taken) < len(take)  # another daemon took some at this moment
            if taken:
                self._open(taken, valid_until)
                log.info("leases taken", agents=sorted(taken), share=fair, daemons=len(round_.live))
            if parked:
                log.warning("sends in flight of the holders before are in_doubt", count=parked)
        if give_up:
            self._give_up(give_up)
            log.info("leases given up to share them", agents=give_up, share=fair)

    def _open(self, taken: dict[str, int], valid_until: float) -> None:
        agents = self._config().agents
        fences = {agent: Fence(epoch, valid_until) for agent, epoch in taken.items()}
        self._fences.update(fences)
        self._dispatcher.open_lanes([agents[agent] for agent in taken if agent in agents], fences)
        self._metrics.leases(len(self._fences), "taken", len(taken))

    def _lose(self, agents: list[str], why: str) -> None:
        """Leases this run has no more: their lanes stop at once (a mark would be refused)."""
        for agent in agents:
            self._fences.pop(agent, None)
        self._dispatcher.retire(agents)
        self._metrics.leases(len(self._fences), "lost", len(agents))
        log.warning("leases lost: not sending for these agents", agents=sorted(agents), why=why)

    def _lose_all(self, why: str) -> None:
        if self._fences:
            self._lose(list(self._fences), why)

    def _give_up(self, agents: list[str]) -> None:
        """Stop the lanes, let their sends finish, then release the leases for another daemon
        to take at once (in the background: renewals go on meanwhile)."""
        self._giving_up.update(agents)
        lanes = self._dispatcher.retire(agents)
        task = asyncio.create_task(self._release_when_settled(agents, lanes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_when_settled(self, agents: list[str], lanes: list) -> None:
        try:
            config = self._config()
            timeout = min(config.api.timeout_s, config.cluster.lease_s * GIVE_UP_WAIT_SHARE)
            settled = await self._dispatcher.settled(lanes, timeout)
            await self._after_last_sends(lanes, settled)
            await self._ledger.release_leases(agents)
            for agent in agents:
                self._fences.pop(agent, None)
            self._metrics.leases(len(self._fences), "given_up", len(agents))
        finally:
            self._giving_up.difference_update(agents)

    async def _after_last_sends(self, lanes: list, settled: bool) -> None:
        """Nothing more leaves under the leases given up, and they are released an interval
        after the last send that did at the earliest: the next holder spaces its first send
        from that send's mark, and it may have left long after (a slow connection). Lanes not
        settled may have a send leaving at this moment, its departure not yet noted."""
        now = self._loop.time()
        quiet_at = 0.0
        for lane in lanes:
            if lane.fence is not None:
                lane.fence.end()
            if not settled:
                quiet_at = max(quiet_at, now + lane.interval)
            elif lane.left_at is not None:
                quiet_at = max(quiet_at, lane.left_at + lane.interval)
        await asyncio.sleep(max(0.0, quiet_at - now))

    async def leave(self, timeout: float) -> None:
        """The daemon stops (its lanes drained): every lease is released, and this run counts
        as alive no more, so that the others take its agents at once."""
        if self._rounds is not None:
            self._rounds.cancel()
        for task in self._tasks:
            task.cancel()
        try:
            async with asyncio.timeout(timeout):
                await self._ledger.leave()
        except TimeoutError:
            log.warning("the leases could not be released: they run out in lease_s")
