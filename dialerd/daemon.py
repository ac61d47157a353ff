"""The daemon: start-up, one TaskGroup supervising every task, and a drain in a fixed order.

Shutdown order: stop intake (sources commit what they read) → stop the lanes and let sends in
flight finish or park them (in_doubt at the next start) → write the last results → close the
session → close the ledger. Signal handlers only set state; the supervisor acts on it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
from collections.abc import Mapping

from . import clock, studio
from .admin import AdminListener
from .aio import wait_event
from .callbacks import CallbackListener, StatusUrls, load_secret
from .config import (
    Config,
    ConfigError,
    load_config,
    read_admin_token,
    read_api_key,
    restart_needed,
)
from .dispatcher import Dispatcher
from .dnc import DoNotCall
from .holds import Hold
from .hours import CallingWindow
from .lane import Wiring
from .leases import Leases, join_cluster
from .ledger import Ledger, empty_agent_status
from .logs import log
from .metrics import Metrics
from .notify import Notifier
from .progress import PROGRESS_EVERY_S, progress_fields, summary_fields
from .results import ResultsWriter
from .simulator import Faults, Simulator
from .sources import Intake, StdinSource, stdin_is_data
from .spool import SpoolSource
from .upkeep import Upkeep

SIMULATED_KEY = "simulated-key"
DRAIN_GRACE_S = 1.0  # beyond api.timeout_s, for sends to record their answer
LEDGER_CLOSE_S = 1.0  # for the ledger's last commit, kept of shutdown_timeout_s
SOURCES_STOP_S = 5.0  # for the sources to record what they read; a blocked read is left behind
STALL_LIMIT_S = 60.0  # without a watchdog: a step longer than this (and api.timeout_s) is a stall
EXIT_FORCED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
CONTROL_CHECK_S = 0.5  # a requeue, cancel, pause or resume is obeyed within a second
# Cluster mode: work another daemon took in for an agent wakes its lane by a notice; without
# notices (their connection lost) an idle lane reads its queue again this often.
CLUSTER_IDLE_POLL_S = 5.0


class Daemon:
    def __init__(self, config: Config, simulate: Faults | None = None):
        self.config = config
        self._simulate = simulate
        self._stop = asyncio.Event()
        self._final = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._notifier = Notifier()
        self._dnc = DoNotCall()
        self._key_hold = Hold("the key")  # held, no lane sends: /healthz says so
        self._window = _calling_window(config)
        self._stdin: StdinSource | None = None
        self._spool: SpoolSource | None = None
        self._simulator: Simulator | None = None
        self._listeners: list[CallbackListener | AdminListener] = []
        self._admin: AdminListener | None = None
        self.ledger = Ledger(config.state_dir, config.cluster)
        self._leases: Leases | None = None  # cluster mode
        self._controls_changed = asyncio.Event()  # a notice of another process's control
        self._upkeep = Upkeep(self.ledger, lambda: self.config, self._notify_final)
        self._started_at = 0.0  # loop time the tasks started, for the summary
        self._stdin_done = False  # the run ends because stdin did: it gets a summary

    # -- signals -----------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("stopping", reason=reason)
        self._stop.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def _interrupt(self) -> None:
        if not self._stop.is_set():
            self.request_stop("SIGINT")
            return
        # The operator insists: no drain. The ledger is crash-safe; sends in flight become
        # in_doubt at the next start, as after a crash.
        log.warning("second SIGINT: exiting now")
        os._exit(EXIT_FORCED)

    def _notify_final(self) -> None:
        self._final.set()
        self._results.wake()

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped (or until stdin, the only source, is done); raise on a fault."""
        await asyncio.to_thread(self.ledger.open)
        try:
            await self._run_with_ledger()
        finally:
            await asyncio.to_thread(self.ledger.close, self._ledger_close_s())

    async def _run_with_ledger(self) -> None:
        if self.config.cluster is not None:
            await join_cluster(self.ledger, self.config.cluster)
        else:  # in cluster mode, each agent's when its lease is taken (leases.take)
            parked = await self.ledger.recover_in_flight()
            if parked:
                log.warning("sends in flight at the last stop are in_doubt", count=parked)
        await self.ledger.release_held(clock.now())
        stdin_source = self.config.stdin is True or (
            self.config.stdin == "auto" and stdin_is_data()
        )
        self.metrics = Metrics()
        self.metrics.by_campaign = bool(self.config.admin and self.config.admin.campaign_metrics)
        self._results = ResultsWriter(
            self.ledger, self.config.results_target(stdin_source), self.metrics
        )
        try:
            key, endpoints = await self._api()
            http = studio.session(self.config.api.timeout_s)
            async with http:
                client = studio.StudioClient(http, key, endpoints)
                self._install_signals()
                await self._supervise(client, stdin_source)
        finally:
            if self._simulator is not None:
                await self._simulator.stop()
            self._results.close()

    async def _api(self) -> tuple[str, Mapping[str, str]]:
        """The key and endpoints: the configured API, or the built-in simulator."""
        if self._simulate is not None:
            self._simulator = Simulator(faults=self._simulate, keep_arrivals=False)
            self._simulate_agents(self.config)
            await self._simulator.start()
            log.info("simulating the API", url=self._simulator.endpoint("{region}"))
        return self._api_of(self.config)

    def _simulate_agents(self, config: Config) -> None:
        agents = {a.id: a.rate for a in config.agents.values()}
        numbers = {a.number: a.id for a in config.agents.values() if a.number}
        self._simulator.set_agents(agents, numbers)

    def _api_of(self, config: Config) -> tuple[str, Mapping[str, str]]:
        if self._simulator is None:
            return read_api_key(config.api), config.api.endpoints
        regions = config.api.endpoints
        return SIMULATED_KEY, {region: self._simulator.endpoint(region) for region in regions}

    # -- reload ------------------------------------------------------------------------------

    async def _reload_on_hangup(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self._notifier.reloading()
            await self._reload()
            self._notifier.ready()  # with the new config, or with the old one kept

    async def _reload(self) -> None:
        """Read the config again and apply it; a bad one is refused and the running one kept."""
        try:
            new = await asyncio.to_thread(load_config, self.config.path)
            problems = restart_needed(self.config, new)
            key, endpoints = self._api_of(new)
            admin_token = read_admin_token(new.admin)
            if not problems:
                await asyncio.to_thread(self._dnc.use, new.dnc_file, new.default_country)
        except ConfigError as error:
            problems = error.problems
        except OSError as error:
            problems = [f"dnc_file: cannot read it: {error}"]
        if problems:
            log.error("reload refused; the running config is kept", problems=problems)
            return
        self._client.configure(key, endpoints)
        if self._admin is not None:
            self._admin.use_token(admin_token)
        if self._simulator is not None:
            self._simulate_agents(new)
        self.config = new
        self.metrics.by_campaign = bool(new.admin and new.admin.campaign_metrics)
        self._window = _calling_window(new)
        self._dispatcher.update(new.agents, open_new=new.cluster is None)
        self._dispatcher.release_holds()  # a new key or agent id may be what the API wanted
        if await self.ledger.release_held(clock.now()):
            self._dispatcher.wake(self._dispatcher.lanes)
        log.info("reloaded", agents=len(new.agents))
        await self._say_unserved()

    async def _say_unserved(self) -> None:
        """Requests queued for an agent the config no longer has would wait unseen: said once
        at the start and after each reload."""
        report = await self._report()
        for agent_id, entry in (report or {"agents": {}})["agents"].items():
            if agent_id not in self.config.agents and entry.get("queued"):
                log.warning(
                    "requests wait for an agent that is not in the config: they are sent if it"
                    " comes back, and end expired after max_queue_s",
                    agent=agent_id,
                    queued=entry["queued"],
                )

    async def _callback_secret(self) -> bytes:
        """The key of the status_urls' tokens: every daemon of a cluster checks the others'."""
        if self.config.cluster is None:
            return load_secret(self.config.state_dir)
        return await self.ledger.shared_secret("callbacks", secrets.token_bytes(32))

    async def _wiring(self, client: studio.StudioClient) -> Wiring:
        """What the lanes share; with callbacks on, a status_url per send."""
        callbacks = self.config.callbacks
        self._status_urls = None
        if callbacks is not None:
            secret = await self._callback_secret()
            self._status_urls = StatusUrls(callbacks.public_url or "http://localhost", secret)
        return Wiring(
            ledger=self.ledger,
            client=client,
            on_final=self._notify_final,
            metrics=self.metrics,
            status_urls=self._status_urls if callbacks and callbacks.public_url else None,
            callback_wait_s=lambda: self.config.callbacks.wait_s if self.config.callbacks else 0.0,
            redial=lambda: self.config.redial,
            blocked=self._dnc.reason,
            calling_window=lambda: self._window,
            number_cap=lambda: self.config.max_calls_per_number,
            key_hold=self._key_hold,
            idle_poll_s=None if self.config.cluster is None else CLUSTER_IDLE_POLL_S,
        )

    async def _start_listeners(self) -> None:
        if self.config.callbacks is not None:
            listener = CallbackListener(
                self.config.callbacks.listen,
                self._status_urls,
                self.ledger,
                lambda: self.config.redial,
                self._on_callback,
                self.metrics,
                max_connections=self.config.callbacks.max_connections,
            )
            self._listeners.append(listener)
            log.info("callback listener", url=await listener.start())
        if self.config.admin is not None:
            self._admin = AdminListener(
                self.config.admin.listen,
                self.metrics,
                self.live_status,
                self._unhealthy,
                token=read_admin_token(self.config.admin),
            )
            self._listeners.append(self._admin)
            await self._admin.start()
            log.info("admin listener", urls=self._admin.urls)
            if self._admin.exposed:
                log.warning(
                    "the admin listener is not on loopback: other hosts can reach it",
                    urls=self._admin.exposed,
                    token_required=self.config.admin.token_file is not None,
                )

    async def _stop_listeners(self) -> None:
        while self._listeners:
            await self._listeners.pop().stop()

    def _stalled(self) -> tuple[str, float]:
        """The stage stuck longest in one step of its work (lanes, spool, stdin), and for how
        long: a stage waiting for work is not stuck, one that makes no progress with work is."""
        now = asyncio.get_running_loop().time()
        stages = [("dispatcher", self._dispatcher.stalled_for())]
        for name, source in (("spool", self._spool), ("stdin", self._stdin)):
            if source is not None:
                stages.append((name, source.progress.stalled_for(now)))
        return max(stages, key=lambda stage: stage[1])

    def _unhealthy(self) -> str | None:
        """Why /healthz answers 503, or None."""
        if self._stop.is_set():
            return "draining"
        if self._key_hold.held:
            return f"the API refuses the key: {self._key_hold.reason}"
        stage, seconds = self._stalled()
        limit = self._notifier.watchdog_s or max(STALL_LIMIT_S, self.config.api.timeout_s)
        if seconds >= limit:
            return f"the {stage} has made no progress for {seconds:.0f} s"
        return None

    def _on_callback(self, effect: str, agent_id: str | None) -> None:
        if effect == "redial" and agent_id is not None:
            self._dispatcher.wake([agent_id], reread=True)
        elif effect in ("unanswered", "cancelled"):
            self._notify_final()

    async def live_status(self) -> dict:
        """What `dialerd status` shows, with each lane's rate and spacing, live."""
        report = await self.ledger.status()
        for agent_id, lane in self._dispatcher.lanes.items():
            entry = report["agents"].setdefault(agent_id, empty_agent_status())
            entry.update(rate=lane.agent.rate, interval_s=round(lane.interval, 4))
        report["state"] = "draining" if self._stop.is_set() else "running"
        return report

    async def _notice_controls(self) -> None:
        """Requeues, cancels, pauses and resumes come from another process (the command line):
        paused campaigns are left out of the index of due requests (resumed ones put back), the
        lanes read their queues again, and the results of a cancel are written. Checked every
        CONTROL_CHECK_S, and at once on a notice of one (cluster mode), which is acted on
        whatever the latest control's seq: one that commits after a later one leaves it."""
        seen, told = None, False  # at the start too: left out or put back while no daemon ran
        while True:
            latest = await self.ledger.last_control()
            if latest != seen or told:
                seen = latest
                await self._upkeep.sync_pauses()
                self._dispatcher.reread_queues()
                self._notify_final()
            told = await wait_event(self._controls_changed, CONTROL_CHECK_S)
            self._controls_changed.clear()

    async def _report(self) -> dict | None:
        """The status report for the daemon's own lines; None, said, when it cannot be read:
        a report is never worth stopping the daemon for."""
        try:
            return await self.ledger.status()
        except (sqlite3.Error, OSError) as error:  # OSError: the database does not answer
            log.warning("the ledger's status cannot be read", error=str(error))
            return None

    async def _status_line(self) -> str:
        """The one line `systemctl status` shows: queue, in flight, agents and their rates."""
        report = await self._report()
        if report is None:
            return "status unavailable: see the log"
        queued = sum(entry["queued"] for entry in report["agents"].values())
        in_flight = sum(entry["in_flight"] for entry in report["agents"].values())
        rates = sum(lane.agent.rate for lane in self._dispatcher.lanes.values())
        agents = len(self._dispatcher.lanes)
        return f"{queued} queued, {in_flight} in flight; {agents} agents, {rates} calls/s in all"

    async def _clock_stepped(self, step: float, stepped_at: float) -> None:
        if self.config.cluster is not None:
            # The ledger's moments are the database's clock's (see clock): nothing moves. A
            # round now reads it again: a suspended host's monotonic clock did not count on.
            log.warning(
                "the wall clock was stepped; the database's clock is followed",
                step_s=round(step, 3),
            )
            self._leases.wake()
            return
        moved = await self.ledger.follow_clock_step(step, stepped_at)
        log.warning(
            "the wall clock was stepped; waits keep their length",
            step_s=round(step, 3),
            requests_moved=moved,
        )
        self._dispatcher.wake(self._dispatcher.lanes)

    async def _supervise(self, client: studio.StudioClient, stdin_source: bool) -> None:
        intake = Intake(self.ledger, lambda: self.config, self._on_queued, self._notify_final)
        try:
            await asyncio.to_thread(
                self._dnc.use, self.config.dnc_file, self.config.default_country
            )
        except OSError as error:  # gone since `run` checked it: still the config's own fault
            raise ConfigError([f"dnc_file: cannot read it: {error}"]) from None
        self._client = client
        self._dispatcher = Dispatcher(await self._wiring(client))
        try:
            await self._start_listeners()
            await self._run_tasks(intake, stdin_source)
        finally:
            await self._stop_listeners()

    async def _run_tasks(self, intake: Intake, stdin_source: bool) -> None:
        if self.config.spool_dir is not None:
            self._spool = SpoolSource(self.config.spool_dir, intake, self.ledger)
            await self._spool.prepare()  # before READY: a file dropped then is intake's
        self._started_at = asyncio.get_running_loop().time()
        async with asyncio.TaskGroup() as group:
            background = [group.create_task(self._results.run(), name="results")]
            if self.config.callbacks is not None:
                background.append(group.create_task(self._upkeep.settle_placed(), name="settle"))
            if self.config.cluster is None:
                self._dispatcher.start(self.config.agents.values(), group)
            else:  # the leases open the lanes of the agents this daemon holds
                self._dispatcher.start([], group)
                self._leases = Leases(
                    self.ledger, self._dispatcher, lambda: self.config, self.metrics
                )
                background += self._leases.start(group, self._controls_changed.set)
            background.append(group.create_task(self._reload_on_hangup(), name="reload"))
            background.append(group.create_task(self._notice_controls(), name="controls"))
            background.append(group.create_task(self._upkeep.sweep(), name="sweep"))
            steps = clock.follow_steps(self._clock_stepped)
            background.append(group.create_task(steps, name="clock"))
            background.append(group.create_task(self._upkeep.prune(), name="retention"))
            background.append(group.create_task(self._dnc.watch(), name="do-not-call"))
            background.append(group.create_task(self._report_progress(), name="progress"))
            if self._notifier.enabled:
                report = self._notifier.report_status(self._status_line)
                background.append(group.create_task(report, name="status"))
            if self._notifier.watchdog_s:
                watchdog = self._notifier.keep_watchdog(self._stalled)
                background.append(group.create_task(watchdog, name="watchdog"))
            sources = []
            if stdin_source:
                self._stdin = StdinSource(intake)
                sources.append(group.create_task(self._stdin.run(), name="stdin"))
            if self._spool is not None:
                sources.append(group.create_task(self._spool.run(), name="spool"))
            if not sources:
                log.warning("no source: neither stdin nor a spool is configured")
            log.info(
                "running",
                agents=len(self.config.agents),
                stdin=stdin_source,
                spool=str(self.config.spool_dir) if self._spool else None,
            )
            watchers = []
            if self._spool is None and self._stdin is not None:
                watchers.append(group.create_task(self._stop_when_stdin_done(sources[0])))
            self._notifier.ready()
            await self._say_unserved()
            await self._stop.wait()
            for watcher in watchers:
                watcher.cancel()
            await self._drain(sources)
            for task in background:
                task.cancel()

    def _on_queued(self, agent_ids: frozenset[str]) -> None:
        self._dispatcher.wake(agent_ids, reread=True)  # what came may go before what it holds

    async def _stop_when_stdin_done(self, stdin_task: asyncio.Task) -> None:
        """stdin as the only source: the run ends once all it gave, and all it found open from
        an earlier run, has a final result (with no other source, that is every request)."""
        await asyncio.wait({stdin_task})
        while await self.ledger.open_requests():
            self._final.clear()
            await wait_event(self._final, 1.0)
        self._stdin_done = True
        self.request_stop("stdin done, every request from it final")

    async def _report_progress(self) -> None:
        """A line every PROGRESS_EVERY_S while there is work: sent, placed, queued, achieved
        rate, per agent."""
        loop = asyncio.get_running_loop()
        before, since = self._dispatcher.counts(), loop.time()
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            counts, now = self._dispatcher.counts(), loop.time()
            report = await self._report()
            fields = {} if report is None else progress_fields(report, counts, before, now - since)
            if fields:
                log.info("progress", agents=fields)
            before, since = counts, now

    def _ledger_close_s(self) -> float:
        return min(LEDGER_CLOSE_S, self.config.shutdown_timeout_s / 4)

    async def _drain(self, sources: list[asyncio.Task]) -> None:
        self._notifier.stopping()
        loop = asyncio.get_running_loop()
        # The ledger's close comes after the drain, inside shutdown_timeout_s too.
        deadline = loop.time() + self.config.shutdown_timeout_s - self._ledger_close_s()
        for source in (self._stdin, self._spool):
            if source is not None:
                source.stop()
        if sources:
            # A source stuck in a read (a hung file system) is left behind: its thread is a
            # daemon's, and what it read but did not record stays in the spool or on stdin.
            bound = min(SOURCES_STOP_S, self.config.shutdown_timeout_s / 4)
            _done, stuck_sources = await asyncio.wait(sources, timeout=bound)
            for task in stuck_sources:
                log.warning("a source did not stop in time; leaving it", source=task.get_name())
                task.cancel()
        if self._leases is not None:  # no lane opens from here on; what is held is renewed
            self._leases.freeze()
        self._dispatcher.stop()
        grace = min(self.config.api.timeout_s + DRAIN_GRACE_S, max(0.0, deadline - loop.time()))
        stuck = await self._dispatcher.drain(grace)
        if stuck:
            log.warning("sends without an answer at shutdown: in_doubt", count=stuck)
        if self._leases is not None:
            await self._leases.leave(max(0.0, deadline - loop.time()))
        await self._stop_listeners()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await self._results.flush()
        except TimeoutError:  # the ledger cannot record what was written: a full disk
            log.warning("result lines not written in the stop's time wait in the ledger")
        if self._stdin_done:
            seconds = loop.time() - self._started_at
            log.info(
                "summary",
                **summary_fields(self._results.written, self._dispatcher.counts(), seconds),
            )
        log.info("stopped")


def _calling_window(config: Config) -> CallingWindow | None:
    return None if config.calling_hours is None else CallingWindow(config.calling_hours)
