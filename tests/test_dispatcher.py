"""The dispatcher's lanes with a real ledger, against the simulator or a scripted API on 127.0.0.1.

Each test queues requests in a ledger in tmp_path, runs the lanes in the test's event loop until
every request is final, and judges the results (the outbox lines) and what the API saw (SPEC 6, 8).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import random
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from test_studio import SlowToResolve

from dialerd import lane as lane_module
from dialerd import studio
from dialerd.config import Config, build_config
from dialerd.dispatcher import Dispatcher
from dialerd.lane import Lane, Wiring
from dialerd.ledger import Ledger
from dialerd.metrics import Metrics
from dialerd.request import build_request
from dialerd.simulator import Faults, Simulator, window_violations

KEY = "dispatcher-test-key"


# -- the bench -------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path):
    ledger = Ledger(tmp_path / "state")
    ledger.open()
    yield ledger
    ledger.close()


def make_config(
    tmp_path: Path,
    endpoints: Mapping[str, str],
    agents: Mapping[str, tuple[str, int]],
    timeout_s: float = 5,
) -> Config:
    """A config with the given agents ({id: (region, rate)}) sending to the given endpoints."""
    return build_config(
        {
            "api": {"key_env": "VGAI_KEY", "endpoints": dict(endpoints), "timeout_s": timeout_s},
            "agents": {a: {"region": region, "rate": rate} for a, (region, rate) in agents.items()},
            "state_dir": str(tmp_path / "state"),
        }
    )


def number(index: int, block: int = 0) -> str:
    """A distinct possible UK mobile number per (block, index)."""
    return f"4477009{block:02d}{index:03d}"


def requests_for(agent_id: str, count: int, block: int = 0, **fields) -> list[dict]:
    return [
        {
            "id": f"{agent_id}-{i}",
            "to": number(i, block),
            "agent_id": agent_id,
            "meta": {"row": i},
            **fields,
        }
        for i in range(count)
    ]


def at(seconds_from_now: float) -> str:
    return dt.datetime.fromtimestamp(time.time() + seconds_from_now, dt.UTC).isoformat()


class Run:
    """What a dispatch did: the results by id, the dispatcher, and how many finals were told."""

    def __init__(self, results: dict[str, dict], dispatcher: Dispatcher, finals: int):
        self.results = results
        self.dispatcher = dispatcher
        self.finals = finals

    def lane(self, agent_id: str):
        return self.dispatcher.lanes[agent_id]


async def dispatch(
    config: Config,
    ledger: Ledger,
    fields: list[dict],
    *,
    limit: float = 30.0,
    linger: float = 0.0,
    connector: aiohttp.BaseConnector | None = None,
) -> Run:
    """Queue the requests, run a lane per agent until all are final (then `linger` more), and
    return the results; the whole run is bounded by `limit` seconds."""
    requests = [build_request(f, config, f"test:{i}") for i, f in enumerate(fields)]
    intake = await ledger.add(requests, [], None, 0)
    assert intake.accepted == len(requests)
    final = asyncio.Event()
    finals = 0

    def on_final() -> None:
        nonlocal finals
        finals += 1
        final.set()

    http = studio.session(config.api.timeout_s, connector)
    async with asyncio.timeout(limit), http:
        client = studio.StudioClient(http, KEY, config.api.endpoints)
        dispatcher = Dispatcher(Wiring(ledger, client, on_final, Metrics()))
        async with asyncio.TaskGroup() as group:
            dispatcher.start(config.agents.values(), group)
            while await ledger.open_requests():
                final.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(final.wait(), 0.2)
            await asyncio.sleep(linger)
            dispatcher.stop()
        assert await dispatcher.drain(1.0) == 0
    lines = [json.loads(line) for _seq, line, *_ in await ledger.outbox(10_000)]
    results = {line["id"]: line for line in lines}
    assert len(results) == len(lines) == len(fields), "exactly one result per request"
    return Run(results, dispatcher, finals)


def fresh_interval(config: Config, agent_id: str, ledger: Ledger) -> float:
    """The interval of a new lane of the agent, before any 429 widened it."""
    return Lane(config.agents[agent_id], Wiring(ledger, None, lambda: None, Metrics())).interval


def achieved_rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


def assert_all_dialed_once(run: Run, simulator: Simulator, agent_id: str, count: int) -> None:
    """Every request of the agent was placed exactly once and its result says so."""
    placed = [a for a in simulator.placed() if a.agent_id == agent_id]
    by_number = collections.Counter(a.to for a in placed)
    assert sorted(by_number) == sorted(number_of(run, agent_id))
    assert set(by_number.values()) == {1}, "a request was placed more than once"
    assert len(placed) == count
    uuid_of = {a.to: a.conversation_uuid for a in placed}
    for result in run.results.values():
        if result["agent_id"] != agent_id:
            continue
        assert result["outcome"] == "dialed", result
        assert result["attempts"] == 1
        assert result["http_status"] == 200
        assert result["error"] is None
        assert result["conversation_uuid"] == uuid_of[result["to"]]
        assert result["meta"] == {"row": int(result["id"].rsplit("-", 1)[1])}


def number_of(run: Run, agent_id: str) -> list[str]:
    return [r["to"] for r in run.results.values() if r["agent_id"] == agent_id]


def assert_paced(simulator: Simulator, agent_id: str, rate: int) -> None:
    """SPEC 8.1: never over the rate in any 1 s window, and at least 95 % of it."""
    times = [a.at for a in simulator.placed() if a.agent_id == agent_id]
    assert window_violations(times, rate) == 0
    assert achieved_rate(times) >= 0.95 * rate, (agent_id, achieved_rate(times))


class ScriptedApi:
    """A make-call endpoint that gives the scripted answers in order (status, headers), then
    200s; it records when each request arrived and what it was."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]):
        self.answers = list(answers)
        self.arrivals: list[tuple[float, int, dict]] = []  # (monotonic time, status, body)
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{region}/telephony/make-call", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    def endpoints(self) -> dict[str, str]:
        return {region: f"{self.base}/{region}/telephony/make-call" for region in ("eu", "us")}

    def times(self, status: int | None = None) -> list[float]:
        return [t for t, s, _ in self.arrivals if status is None or s == status]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        self.arrivals.append((time.monotonic(), status, body))
        if 200 <= status < 300:
            payload = {"conversation_uuid": f"CON-{len(self.arrivals)}"}
        else:
            payload = {"error": f"scripted {status}"}
        return web.json_response(payload, status=status, headers=headers)


@pytest.fixture
async def scripted_api():
    started: list[ScriptedApi] = []

    async def start(answers: list[tuple[int, dict[str, str]]]) -> ScriptedApi:
        api = ScriptedApi(answers)
        await api.start()
        started.append(api)
        return api

    yield start
    for api in started:
        await api.stop()


def endpoints_of(simulator: Simulator) -> dict[str, str]:
    return {"eu": simulator.endpoint("eu"), "us": simulator.endpoint("us")}


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(lane_module, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def fast_retries(monkeypatch, fast_backoff):
    monkeypatch.setattr(lane_module, "MAX_RETRIES", 2)


# -- rate --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "count"), [(1, 8), (3, 20), (5, 50)])
async def test_a_lane_keeps_its_rate_exactly_under_slow_answers(
    tmp_path, ledger, simulator_factory, rate, count
):
    simulator = await simulator_factory({"agent-a": rate}, Faults(latency=(0.1, 0.5)))
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", rate)})

    run = await dispatch(config, ledger, requests_for("agent-a", count))

    assert_all_dialed_once(run, simulator, "agent-a", count)
    assert simulator.count_429() == 0
    assert_paced(simulator, "agent-a", rate)
    assert run.finals == count


async def test_three_agents_in_two_regions_keep_their_own_rates_at_once(
    tmp_path, ledger, simulator_factory
):
    agents = {"eu-five": ("eu", 5), "eu-three": ("eu", 3), "us-one": ("us", 1)}
    counts = {"eu-five": 20, "eu-three": 12, "us-one": 5}
    simulator = await simulator_factory(
        {a: rate for a, (_, rate) in agents.items()}, Faults(latency=(0.1, 0.5))
    )
    config = make_config(tmp_path, endpoints_of(simulator), agents)
    fields = [
        request
        for block, agent_id in enumerate(agents)
        for request in requests_for(agent_id, counts[agent_id], block)
    ]

    run = await dispatch(config, ledger, fields)

    assert simulator.count_429() == 0
    for agent_id, (region, rate) in agents.items():
        assert_all_dialed_once(run, simulator, agent_id, counts[agent_id])
        assert {a.region for a in simulator.arrivals if a.agent_id == agent_id} == {region}
        assert_paced(simulator, agent_id, rate)


class SlowResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, each new connection after a random delay: a cold
    connection that holds its request back."""

    def __init__(self, delays: random.Random, most: float):
        self._delays = delays
        self._most = most

    async def resolve(self, host, port=0, family=socket.AF_INET):
        await asyncio.sleep(self._delays.uniform(0, self._most))
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def test_sends_are_spaced_from_when_they_leave_not_when_they_were_started(
    tmp_path, ledger, simulator_factory
):
    """Some connections take up to 1.5 intervals to open: the send after a slow one must still
    leave a full interval after it, never catch up with it."""
    simulator = await simulator_factory({"agent-a": 5}, Faults(latency=(0.1, 0.5)))
    port = simulator.endpoint("eu").split(":")[2].split("/")[0]
    endpoints = {"eu": f"http://studio-api.test:{port}/eu/telephony/make-call"}
    config = make_config(tmp_path, endpoints, {"agent-a": ("eu", 5)})
    connector = aiohttp.TCPConnector(
        limit=0, use_dns_cache=False, resolver=SlowResolver(random.Random(7), 0.3)
    )

    run = await dispatch(config, ledger, requests_for("agent-a", 15), connector=connector)

    assert_all_dialed_once(run, simulator, "agent-a", 15)
    assert simulator.count_429() == 0
    times = sorted(a.at for a in simulator.placed())
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    lane = run.lane("agent-a")
    # No two leave closer than the lane allows ((1 - tolerance) intervals), less arrival jitter.
    assert min(gaps) >= (1 - lane.tolerance) * lane.interval - 0.01, gaps
    interval = lane.interval
    assert max(gaps) > 1.2 * interval, "no connection was slow: the test proves nothing"
    assert window_violations(times, 5) == 0


# -- refusals and retries ----------------------------------------------------------------------


async def test_over_the_limit_at_the_api_the_lane_slows_and_every_request_is_dialed(
    tmp_path, ledger, simulator_factory
):
    """The API allows 1/s but the config says 3/s: 429s, which are retried after Retry-After,
    widen the margin and are not attempts; nothing is placed twice or over the API's limit."""
    simulator = await simulator_factory({"agent-a": 1})
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 3)})

    run = await dispatch(config, ledger, requests_for("agent-a", 3))

    assert simulator.count_429() >= 1
    placed = simulator.placed()
    assert len(placed) == 3
    assert collections.Counter(a.to for a in placed).most_common(1)[0][1] == 1
    assert window_violations([a.at for a in placed], 1) == 0
    for result in run.results.values():
        assert (result["outcome"], result["attempts"], result["http_status"]) == ("dialed", 1, 200)
        assert result["error"] is None
    # The margin was widened.
    assert run.lane("agent-a").interval > fresh_interval(config, "agent-a", ledger)


async def test_each_hold_is_said_once_and_an_agents_refusal_clears_the_key(
    tmp_path, ledger, scripted_api, capsys
):
    """A 401, then 404s: the API took the key when it judged the agent, so the key's hold
    clears as the agent's begins; the agent's second refusal, with another text, says nothing
    new. Nothing fails, and the request is sent once the API takes it."""
    api = await scripted_api([(401, {}), (404, {}), (404, {})])
    config = make_config(tmp_path, api.endpoints(), {"agent-a": ("eu", 5)})

    run = await dispatch(config, ledger, requests_for("agent-a", 1))

    result = run.results["agent-a-0"]
    assert (result["outcome"], result["attempts"]) == ("dialed", 1)
    assert [status for _t, status, _body in api.arrivals] == [401, 404, 404, 200]
    gaps = [b - a for a, b in zip(api.times(), api.times()[1:], strict=False)]
    assert gaps[0] >= 0.95 and gaps[1] >= 0.95 and gaps[2] >= 1.95, gaps  # 1 s, then 1, 2 s
    logged = capsys.readouterr()
    said = [line for line in (logged.out + logged.err).splitlines() if "the API " in line]
    expected = [
        "the API refuses the key",
        "the API accepts the key again",
        "the API refuses the agent",
        "the API accepts the agent again",
    ]
    assert len(said) == len(expected), said
    assert all(text in line for text, line in zip(expected, said, strict=True)), said


async def test_a_rate_above_the_approved_one_is_said_once_not_per_429(
    tmp_path, ledger, simulator_factory, capsys
):
    """The config says 5/s, the agent is approved for 1/s: the 429s go on at the widest margin.
    One warning says the margin widens, one that the rate may be above the approved one."""
    simulator = await simulator_factory({"agent-a": 1})
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)})

    await dispatch(config, ledger, requests_for("agent-a", 6))

    assert simulator.count_429() >= 4
    logged = capsys.readouterr()
    logged = logged.out + logged.err
    assert logged.count("rate limited by the API: widening the margin") == 1, logged
    assert logged.count("the configured rate may be above the one the agent is approved") == 1


@pytest.mark.parametrize(("retry_after", "delay"), [({}, 1.0), ({"Retry-After": "0.5"}, 0.5)])
async def test_a_429_is_retried_after_its_delay_and_holds_the_whole_lane(
    tmp_path, ledger, scripted_api, retry_after, delay
):
    api = await scripted_api([(429, retry_after)])
    config = make_config(tmp_path, api.endpoints(), {"agent-a": ("eu", 5)})

    run = await dispatch(config, ledger, requests_for("agent-a", 3))

    first = run.results["agent-a-0"]
    assert (first["outcome"], first["attempts"], first["http_status"]) == ("dialed", 1, 200)
    assert first["error"] is None
    assert all(r["outcome"] == "dialed" and r["attempts"] == 1 for r in run.results.values())
    [refused_at] = api.times(429)
    later = api.times(200)
    assert len(later) == 3
    # No send of the agent left before the API's delay was over, not only the refused one.
    assert min(later) >= refused_at + delay - 0.02
    resent = [t for t, s, body in api.arrivals if s == 200 and body["to"] == number(0)]
    assert len(resent) == 1
    assert run.lane("agent-a").interval > fresh_interval(config, "agent-a", ledger)


async def test_a_503_is_retried_and_then_dialed_as_one_attempt(
    tmp_path, ledger, scripted_api, fast_backoff
):
    api = await scripted_api([(503, {}), (502, {}), (504, {})])
    config = make_config(tmp_path, api.endpoints(), {"agent-a": ("eu", 5)})

    run = await dispatch(config, ledger, requests_for("agent-a", 1))

    result = run.results["agent-a-0"]
    assert (result["outcome"], result["attempts"], result["http_status"]) == ("dialed", 1, 200)
    assert result["error"] is None
    assert result["conversation_uuid"] == "CON-4"
    assert [s for _, s, _ in api.arrivals] == [503, 502, 504, 200]


async def test_503_forever_fails_after_the_retry_bound(
    tmp_path, ledger, simulator_factory, fast_retries
):
    simulator = await simulator_factory({"agent-a": 5}, Faults(error_5xx=1.0))
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)})

    run = await dispatch(config, ledger, requests_for("agent-a", 2))

    for result in run.results.values():
        assert result["outcome"] == "failed"
        assert result["attempts"] == 0
        assert result["http_status"] == 503
        assert result["error"] == "gave up after 3 refused sends: Service Unavailable"
    assert len(simulator.arrivals) == 2 * 3
    assert simulator.placed() == []


async def test_an_api_out_of_reach_is_waited_out_without_spending_retries(
    tmp_path, ledger, fast_retries
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoints = {"eu": f"http://127.0.0.1:{port}/eu/telephony/make-call"}
    config = make_config(tmp_path, endpoints, {"agent-a": ("eu", 5)})
    simulator = Simulator({"agent-a": 5})

    async def come_back_later() -> None:
        await asyncio.sleep(1.5)  # longer than MAX_RETRIES backoffs at the test's fast pace
        await simulator.start(port=port)

    comeback = asyncio.create_task(come_back_later())
    try:
        run = await dispatch(config, ledger, requests_for("agent-a", 1))
    finally:
        await comeback
        await simulator.stop()
    result = run.results["agent-a-0"]
    assert (result["outcome"], result["attempts"], result["http_status"]) == ("dialed", 1, 200)
    assert len(simulator.placed()) == 1


# -- unknown answers: at most once -----------------------------------------------------------


async def test_a_reset_after_sending_is_in_doubt_and_never_sent_again(
    tmp_path, ledger, simulator_factory
):
    simulator = await simulator_factory({"agent-a": 5}, Faults(reset=1.0))
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)})

    run = await dispatch(config, ledger, requests_for("agent-a", 3), linger=0.5)

    for result in run.results.values():
        assert (result["outcome"], result["attempts"], result["http_status"]) == (
            "in_doubt",
            0,
            None,
        )
        assert result["error"].startswith("no answer after sending: ")
    assert sorted(a.to for a in simulator.arrivals) == [number(i) for i in range(3)]


async def test_no_answer_within_the_timeout_is_in_doubt(tmp_path, ledger, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5}, Faults(hang=1.0))
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)}, timeout_s=0.5)
    started = time.monotonic()

    run = await dispatch(config, ledger, requests_for("agent-a", 2), linger=0.3)

    assert time.monotonic() - started < 5
    for result in run.results.values():
        assert result["outcome"] == "in_doubt"
        assert result["error"] == "no answer after sending: timed out"
    assert len(simulator.arrivals) == 2


# -- refused for good, and never sent ----------------------------------------------------------


async def test_an_agent_not_published_yet_is_held_and_others_go_on(
    tmp_path, ledger, simulator_factory
):
    """Right after publishing an agent, Vonage asks to wait about five minutes: the API does not
    know it yet. Its requests wait (none fails), the other agent's go out, and it goes on by
    itself once the API knows it."""
    simulator = await simulator_factory({"agent-a": 5})
    config = make_config(
        tmp_path, endpoints_of(simulator), {"ghost": ("us", 5), "agent-a": ("eu", 5)}
    )

    async def publish_once_the_others_are_placed() -> None:
        while sum(a.placed for a in simulator.arrivals if a.agent_id == "agent-a") < 2:
            await asyncio.sleep(0.05)
        simulator.set_agents({"agent-a": 5, "ghost": 5}, {})

    published = asyncio.create_task(publish_once_the_others_are_placed())
    run = await dispatch(
        config, ledger, requests_for("ghost", 2) + requests_for("agent-a", 2, block=1)
    )
    await published

    for i in range(2):
        ghost = run.results[f"ghost-{i}"]
        assert (ghost["outcome"], ghost["attempts"], ghost["http_status"]) == ("dialed", 1, 200)
        assert run.results[f"agent-a-{i}"]["outcome"] == "dialed"
    ghost_answers = [a.http_status for a in simulator.arrivals if a.agent_id == "ghost"]
    assert ghost_answers[-2:] == [200, 200] and set(ghost_answers[:-2]) == {400}
    assert len(ghost_answers) < 8  # tried again with backoff, not at the agent's rate


async def test_a_request_past_its_expiry_is_expired_and_never_sent(
    tmp_path, ledger, simulator_factory
):
    simulator = await simulator_factory({"agent-a": 5})
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)})
    fields = requests_for("agent-a", 3)
    fields[1]["expires_at"] = at(-60)
    fields[2]["expires_at"] = at(3600)

    run = await dispatch(config, ledger, fields)

    expired = run.results["agent-a-1"]
    assert (expired["outcome"], expired["attempts"], expired["http_status"]) == ("expired", 0, None)
    assert expired["error"]
    assert run.results["agent-a-0"]["outcome"] == "dialed"
    assert run.results["agent-a-2"]["outcome"] == "dialed"
    assert sorted(a.to for a in simulator.arrivals) == [number(0), number(2)]


async def test_a_request_that_expires_while_waiting_for_its_turn_is_not_sent(
    tmp_path, ledger, simulator_factory
):
    """SPEC 3 and 6: expires_at is checked right before each send. At 1/s the third request
    would leave about 2 s in; it expires at 1.5 s, while the lane paces it."""
    simulator = await simulator_factory({"agent-a": 1})
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 1)})
    fields = requests_for("agent-a", 3)
    fields[2]["expires_at"] = at(1.5)

    run = await dispatch(config, ledger, fields)

    assert [run.results[f"agent-a-{i}"]["outcome"] for i in range(2)] == ["dialed", "dialed"]
    late = run.results["agent-a-2"]
    assert late["outcome"] == "expired", [(a.to, a.wall) for a in simulator.arrivals]
    assert number(2) not in [a.to for a in simulator.arrivals]


# -- a fault of the client itself --------------------------------------------------------------


async def test_a_send_that_raises_in_the_client_holds_the_lane_and_goes_once_it_is_fixed(
    tmp_path, ledger, simulator_factory, fast_backoff, capsys
):
    """aiohttp refuses a header value with a line break (ValueError, before any byte is
    written): the request is not left `sending` nor its task's exception unretrieved; the lane
    holds as for an API out of reach, the fault is logged once, and a good key sends it once."""
    simulator = await simulator_factory({"agent-a": 5})
    config = make_config(tmp_path, endpoints_of(simulator), {"agent-a": ("eu", 5)})
    requests = [build_request(f, config, "test") for f in requests_for("agent-a", 2)]
    await ledger.add(requests, [], None, 0)
    metrics = Metrics()
    finals = asyncio.Event()

    def sends_without_answer() -> float:
        labels = {"agent": "agent-a", "http_status": "none"}
        return metrics.registry.get_sample_value("dialerd_sends_total", labels) or 0

    async with asyncio.timeout(20), studio.session(5) as http:
        client = studio.StudioClient(http, "two-line\nkey", config.api.endpoints)
        dispatcher = Dispatcher(Wiring(ledger, client, finals.set, metrics))
        async with asyncio.TaskGroup() as group:
            dispatcher.start(config.agents.values(), group)
            while sends_without_answer() < 4:
                await asyncio.sleep(0.02)
            agent = (await ledger.status())["agents"]["agent-a"]
            assert (agent["queued"], agent["in_flight"]) == (2, 0), agent
            assert simulator.arrivals == []

            client.configure(KEY, config.api.endpoints)  # as a reload with a good key does
            dispatcher.wake(["agent-a"])
            while await ledger.open_requests():
                finals.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finals.wait(), 0.2)
            dispatcher.stop()
        assert await dispatcher.drain(1.0) == 0

    lines = [json.loads(line) for _seq, line, *_ in await ledger.outbox(100)]
    assert sorted((r["id"], r["outcome"], r["attempts"]) for r in lines) == [
        ("agent-a-0", "dialed", 1), ("agent-a-1", "dialed", 1),
    ]  # fmt: skip
    assert sorted(a.to for a in simulator.placed()) == [number(0), number(1)]
    logged = capsys.readouterr()
    logged = logged.out + logged.err
    assert logged.count("sends fail in the client") == 1, logged
    assert logged.count("sends no longer fail in the client") == 1, logged
    assert "Forbidden control character" in logged
    assert "two-line" not in logged


async def test_no_lane_opens_once_the_dispatcher_is_stopped(tmp_path, ledger):
    """A lease taken as the stop began (the round's answer came during the drain): its lane
    would never be stopped, and the daemon would wait for it for ever."""
    config = make_config(tmp_path, {"eu": "http://127.0.0.1:9/eu"}, {"late": ("eu", 1)})
    dispatcher = Dispatcher(Wiring(ledger, None, lambda: None, Metrics()))
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        dispatcher.start([], group)
        dispatcher.stop()
        dispatcher.open_lanes([config.agents["late"]], {})
    assert dispatcher.lanes == {}


async def test_a_send_still_connecting_when_the_stop_begins_is_queued_again_not_sent(
    tmp_path, ledger, simulator_factory
):
    """No send starts once the stop has begun: one whose connection is still being made is
    withheld before its first byte, and waits in the ledger for the next run."""
    simulator = await simulator_factory({"agent-a": 5})
    endpoints = {r: simulator.endpoint(r).replace("127.0.0.1", "api.test") for r in ("eu", "us")}
    config = make_config(tmp_path, endpoints, {"agent-a": ("eu", 5)})
    [request] = [build_request(f, config, "test:0") for f in requests_for("agent-a", 1)]
    await ledger.add([request], [], None, 0)
    resolver = SlowToResolve(0.3, on_ask=lambda: dispatcher.stop())
    connector = aiohttp.TCPConnector(resolver=resolver, force_close=True)
    async with studio.session(5, connector) as http, asyncio.timeout(10):
        client = studio.StudioClient(http, KEY, config.api.endpoints)
        dispatcher = Dispatcher(Wiring(ledger, client, lambda: None, Metrics()))
        async with asyncio.TaskGroup() as group:
            dispatcher.start(config.agents.values(), group)
        assert await dispatcher.drain(5.0) == 0
    assert resolver.asked == 1 and simulator.arrivals == []
    assert await ledger.open_requests() == 1
    [(state,)] = await ledger.call(lambda c: c.execute("SELECT state FROM requests").fetchall())
    assert state == "queued"
