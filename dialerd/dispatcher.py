"""The dispatcher: a lane per agent (lane.py), opened, reconfigured, retired and drained
together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from .config import AgentConfig
from .lane import Fence, Lane, Wiring


class Dispatcher:
    """The lanes of every configured agent."""

    def __init__(self, wiring: Wiring):
        self._wiring = wiring
        self.lanes: dict[str, Lane] = {}
        self._retired: list[Lane] = []  # lanes stopped by a reload or a lease given up
        self._retired_counts: dict[str, tuple[int, int]] = {}  # of those done with, per agent
        self._lane_tasks: list[asyncio.Task] = []
        self._group: asyncio.TaskGroup | None = None
        self._stopped = False

    def start(self, agents: Iterable[AgentConfig], group: asyncio.TaskGroup) -> None:
        """Lanes for `agents`; in cluster mode none yet (the leases open them)."""
        self._group = group
        self._add_lanes(list(agents))

    def _add_lanes(self, agents: list[AgentConfig], fences: Mapping[str, Fence] = {}) -> None:
        """Start a lane per agent, staggered over one second so agents never send in step;
        none once stopped (a lease taken as the stop began: its lane would never be stopped,
        and the daemon's task group would wait for it for ever)."""
        if self._stopped:
            return
        for index, agent in enumerate(agents):
            lane = Lane(agent, self._wiring, fences.get(agent.id))
            if agent.id in self.lanes:  # one that stopped by itself: it ends as retired ones do
                self._retired.append(self.lanes[agent.id])
            self.lanes[agent.id] = lane
            task = self._group.create_task(
                lane.run(start_delay=index / len(agents)), name=f"lane:{agent.id}"
            )
            self._lane_tasks.append(task)
            lane.task = task
            task.add_done_callback(self._lane_ended)

    def _lane_ended(self, task: asyncio.Task) -> None:
        if task in self._lane_tasks:
            self._lane_tasks.remove(task)

    def sends_for(self, agent_id: str) -> bool:
        """Whether the agent has a lane that has not stopped."""
        lane = self.lanes.get(agent_id)
        return lane is not None and not lane.stopping

    def open_lanes(self, agents: list[AgentConfig], fences: Mapping[str, Fence]) -> None:
        """Cluster mode: lanes for agents whose leases this daemon has taken."""
        self._add_lanes(agents, fences)

    def retire(self, agent_ids: Iterable[str]) -> list[Lane]:
        """Stop these agents' lanes (their requests wait in the ledger); the lanes, whose sends
        in flight may still be awaited (see settled())."""
        self._forget_retired()
        retired = []
        for agent_id in agent_ids:
            lane = self.lanes.pop(agent_id, None)
            if lane is not None:
                lane.stop()
                self._retired.append(lane)
                retired.append(lane)
        return retired

    def _forget_retired(self) -> None:
        """Retired lanes that are done (ended, nothing in flight) leave only their counts: a
        daemon whose leases move for months keeps no lane it no longer has."""
        for lane in [lane for lane in self._retired if lane.done]:
            self._retired.remove(lane)
            sent, placed = self._retired_counts.get(lane.agent.id, (0, 0))
            self._retired_counts[lane.agent.id] = (sent + lane.sent, placed + lane.placed)

    async def settled(self, lanes: list[Lane], timeout: float) -> bool:
        """Wait until the lanes have ended and their sends have their answers recorded, for
        `timeout` at most; whether they did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(lane.done for lane in lanes):
            waiting = [lane.task for lane in lanes if lane.task and not lane.task.done()]
            waiting += [task for lane in lanes for task in lane.in_flight]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(waiting, timeout=remaining)
        return True

    def update(self, agents: Mapping[str, AgentConfig], open_new: bool = True) -> None:
        """Agents after a reload: new ones get a lane (not in cluster mode: `open_new` False,
        the leases open them), removed ones' lanes stop (their requests wait in the ledger),
        changed ones take their new rate; unchanged ones keep their timing.
        """
        self.retire(self.lanes.keys() - agents.keys())
        for agent_id, agent in agents.items():
            if agent_id in self.lanes and self.lanes[agent_id].agent != agent:
                self.lanes[agent_id].reconfigure(agent)
        if open_new:
            new = [agent for agent_id, agent in agents.items() if agent_id not in self.lanes]
            self._add_lanes(new)

    def wake(self, agent_ids: Iterable[str], reread: bool = False) -> None:
        """Wake the agents' lanes; `reread`: new work is queued, which may go before what each
        holds in memory (a higher priority)."""
        for agent_id in agent_ids:
            lane = self.lanes.get(agent_id)
            if lane is not None:
                if reread:
                    lane.reread()
                else:
                    lane.wake()

    def reread_queues(self) -> None:
        """An operator changed what is queued (cancel, pause, resume, requeue): every lane
        reads its queue again (each send's mark checks once more, whatever a lane holds)."""
        for lane in self.lanes.values():
            lane.reread()

    def stop(self) -> None:
        self._stopped = True
        for lane in self.lanes.values():
            lane.stop()

    def release_holds(self) -> None:
        for lane in self.lanes.values():
            lane.release_holds()

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per agent, the sends that left in this run and the calls placed of them."""
        counts = dict(self._retired_counts)
        for lane in [*self._retired, *self.lanes.values()]:
            sent, placed = counts.get(lane.agent.id, (0, 0))
            counts[lane.agent.id] = (sent + lane.sent, placed + lane.placed)
        return counts

    def stalled_for(self) -> float:
        """The longest any lane has been stuck in one step (a ledger call, a departure)."""
        now = asyncio.get_running_loop().time()
        return max((lane.progress.stalled_for(now) for lane in self.lanes.values()), default=0.0)

    def in_flight(self) -> set[asyncio.Task]:
        lanes = [*self.lanes.values(), *self._retired]
        return set().union(*(lane.in_flight for lane in lanes))

    async def drain(self, timeout: float) -> int:
        """Let the stopped lanes end and the sends in flight finish; after `timeout`, cancel
        what is left: a lane still waiting on the ledger (a full disk) ends there, and a send
        without an answer becomes in_doubt. How many sends were cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A stopped lane may still be starting a send it marked before the stop: wait for the
        # lanes to end, so that every send that goes out is among those waited for.
        if self._lane_tasks:
            _ended, waiting = await asyncio.wait(self._lane_tasks, timeout=timeout)
            for task in waiting:
                task.cancel()
            if waiting:
                await asyncio.wait(waiting)
        timeout = max(0.0, deadline - loop.time())
        tasks = self.in_flight()
        if not tasks:
            return 0
        _done, stuck = await asyncio.wait(tasks, timeout=timeout)
        for task in stuck:
            task.cancel()
        return len(stuck)
