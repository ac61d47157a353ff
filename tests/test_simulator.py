"""The API simulator, exercised through a real server on 127.0.0.1."""

import argparse
import asyncio
import dataclasses
import json
import time

import aiohttp
import aiohttp.web
import pytest

from dialerd.simulator import Arrival, Faults, Simulator, serve, window_violations
from dialerd.simulator_options import add_simulator_arguments, faults_from

KEY = {"X-Vgai-Key": "test-key"}
NUMBER_OF_A = "447700900000"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def start():
    """Start simulators on a free port; all are stopped after the test."""
    started = []

    async def start_simulator(agents=None, **options):
        simulator = Simulator({"a": 1, "b": 1, "five": 5} if agents is None else agents, **options)
        await simulator.start()
        started.append(simulator)
        return simulator

    yield start_simulator
    for simulator in started:
        await simulator.stop()


async def call(http, simulator, body, *, region="eu", headers=KEY, **options):
    """POST a make-call request; return (status, headers, JSON body)."""
    async with http.post(simulator.endpoint(region), json=body, headers=headers, **options) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_success_answers_200_with_a_conversation_and_records_it(http, start):
    simulator = await start()

    status, _, answer = await call(http, simulator, {"agent_id": "a", "to": "447700900123"})

    assert status == 200
    assert answer["conversation_uuid"].startswith("CON-")
    assert answer["status"] == "started"
    [arrival] = simulator.arrivals
    assert arrival.agent_id == "a"
    assert arrival.to == "447700900123"
    assert arrival.region == "eu"
    assert arrival.http_status == 200
    assert arrival.placed
    assert arrival.conversation_uuid == answer["conversation_uuid"]
    assert simulator.placed() == [arrival]


async def test_start_returns_the_base_of_the_endpoints(start):
    simulator = await start()
    base = simulator.endpoint("us").removesuffix("/us/telephony/make-call")
    assert base.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("rate", [1, 3, 5])
async def test_a_burst_places_exactly_rate_calls_and_answers_429_to_the_rest(http, start, rate):
    simulator = await start({"agent": rate})
    body = {"agent_id": "agent", "to": "447700900123"}

    answers = await asyncio.gather(*(call(http, simulator, body) for _ in range(rate + 1)))

    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * rate + [429]
    [(_, headers, answer)] = [a for a in answers if a[0] == 429]
    assert headers["Retry-After"] == "1"
    assert answer == {"error": "Too Many Requests"}
    assert simulator.count_429() == 1
    assert len(simulator.placed()) == rate
    assert window_violations([a.at for a in simulator.placed()], rate) == 0


async def test_the_window_frees_one_second_after_the_calls(http, start):
    simulator = await start()
    body = {"agent_id": "five", "to": "447700900123"}
    await asyncio.gather(*(call(http, simulator, body) for _ in range(5)))

    still_full, _, _ = await call(http, simulator, body)
    first_placed = simulator.placed()[0].at
    await asyncio.sleep(first_placed + 1.0 - time.monotonic() + 0.05)
    answers = await asyncio.gather(*(call(http, simulator, body) for _ in range(5)))

    assert still_full == 429
    assert [status for status, _, _ in answers] == [200] * 5


async def test_agents_have_separate_windows(http, start):
    simulator = await start()
    statuses = [
        (await call(http, simulator, {"agent_id": agent, "to": "447700900123"}))[0]
        for agent in ("a", "b", "a")
    ]
    assert statuses == [200, 200, 429]


async def test_the_rate_is_counted_on_arrival_not_on_answer(http, start):
    simulator = await start(faults=Faults(latency=(0.3, 0.3)))
    body = {"agent_id": "a", "to": "447700900123"}

    first = asyncio.create_task(call(http, simulator, body))
    await asyncio.sleep(0.1)  # the first call is placed but not yet answered
    second_status, _, _ = await call(http, simulator, body)

    assert second_status == 429
    assert (await first)[0] == 200


async def test_an_unknown_agent_is_refused_for_good(http, start):
    simulator = await start()

    status, _, answer = await call(http, simulator, {"agent_id": "nobody", "to": "447700900123"})

    assert status == 400
    assert answer == {"error": "ID nobody is not an ID to any agent or published version"}
    assert not simulator.arrivals[0].placed


async def test_a_default_rate_accepts_unknown_agents_at_that_rate(http, start):
    simulator = await start({}, default_rate=1)
    body = {"agent_id": "anyone", "to": "447700900123"}
    statuses = [(await call(http, simulator, body))[0] for _ in range(2)]
    assert statuses == [200, 429]


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Vgai-Key": ""}, {"X-Vgai-Key": "  "}],
    ids=["missing", "empty", "blank"],
)
async def test_a_request_without_a_key_is_unauthorized(http, start, headers):
    simulator = await start()
    status, _, answer = await call(
        http, simulator, {"agent_id": "a", "to": "447700900123"}, headers=headers
    )
    assert status == 401
    assert answer["error"]
    assert simulator.placed() == []


@pytest.mark.parametrize(
    ("data", "content_type", "message_part"),
    [
        ('{"agent_id": "a", "to": "447700900123"}', "text/plain", "Content-Type"),
        ('{"agent_id": "a", "to": ', "application/json", "JSON object"),
        ('[{"agent_id": "a", "to": "447700900123"}]', "application/json", "JSON object"),
    ],
    ids=["content-type", "broken-json", "array"],
)
async def test_a_body_that_is_not_a_json_object_is_refused(
    http, start, data, content_type, message_part
):
    simulator = await start()
    headers = {**KEY, "Content-Type": content_type}
    async with http.post(simulator.endpoint("eu"), data=data, headers=headers) as resp:
        assert resp.status == 400
        assert message_part in (await resp.json())["error"]
    assert simulator.placed() == []


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ({"agent_id": "a", "to": "+447700900123"}, "to must be"),
        ({"agent_id": "a", "to": "44 7700 900123"}, "to must be"),
        ({"agent_id": "a", "to": "sip:nobody"}, "to must be"),
        ({"agent_id": "a", "to": 447700900123}, "to must be"),
        ({"agent_id": "a"}, "to must be"),
        ({"to": "447700900123"}, "agent_id or from"),
        ({"agent_id": "a", "to": "447700900123", "meta": {}}, "unknown fields: meta"),
        ({"agent_id": "a", "to": "447700900123", "hangup_on_answer_machine": "yes"}, "boolean"),
        ({"agent_id": "a", "to": "447700900123", "session_parameters": {"N": "v"}}, "list"),
    ],
    ids=[
        "plus",
        "spaces",
        "sip-without-host",
        "number-not-string",
        "no-to",
        "no-agent",
        "unknown-field",
        "amd-not-boolean",
        "parameters-not-list",
    ],
)
async def test_a_malformed_body_is_refused_with_a_message(http, start, body, message_part):
    simulator = await start()
    status, _, answer = await call(http, simulator, body)
    assert status == 400
    assert message_part in answer["error"]
    assert simulator.placed() == []


async def test_a_sip_address_and_the_optional_fields_are_accepted(http, start):
    simulator = await start()
    body = {
        "agent_id": "a",
        "to": "sip:alice@example.com",
        "status_url": "https://dialer.example.com/cb/token",
        "hangup_on_answer_machine": True,
        "session_parameters": [{"name": "CALLER_NAME", "value": "Diane Miller"}],
    }
    status, _, _ = await call(http, simulator, body)
    assert status == 200
    assert simulator.arrivals[0].body == body


async def test_from_wins_and_counts_for_the_agent_whose_number_it_is(http, start):
    simulator = await start(numbers={NUMBER_OF_A: "a"})

    by_number, _, _ = await call(
        http, simulator, {"from": NUMBER_OF_A, "agent_id": "b", "to": "447700900123"}
    )
    a_again, _, _ = await call(http, simulator, {"agent_id": "a", "to": "447700900123"})
    b_free, _, _ = await call(http, simulator, {"agent_id": "b", "to": "447700900123"})

    assert (by_number, a_again, b_free) == (200, 429, 200)
    assert simulator.arrivals[0].agent_id == "a"
    assert simulator.arrivals[0].sender == NUMBER_OF_A


async def test_an_error_fault_answers_503_and_places_nothing(http, start):
    simulator = await start(faults=Faults(error_5xx=1.0))
    body = {"agent_id": "a", "to": "447700900123"}
    # Two in a row at rate 1: a second 503, not a 429, shows the first was not counted.
    statuses = [(await call(http, simulator, body))[0] for _ in range(2)]
    assert statuses == [503, 503]
    assert simulator.placed() == []


async def test_a_reset_fault_drops_the_connection_yet_places_the_call(http, start):
    simulator = await start(faults=Faults(reset=1.0))
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, simulator, {"agent_id": "a", "to": "447700900123"})
    [arrival] = simulator.placed()
    assert arrival.http_status == 0


async def test_a_hang_fault_never_answers_yet_places_the_call(http, start):
    simulator = await start(faults=Faults(hang=1.0))
    with pytest.raises(asyncio.TimeoutError):
        await call(
            http,
            simulator,
            {"agent_id": "a", "to": "447700900123"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    [arrival] = simulator.placed()
    assert arrival.http_status == 0


async def test_stop_is_quick_and_drops_hanging_requests(http, start):
    simulator = await start(faults=Faults(hang=1.0))
    hanging = asyncio.create_task(call(http, simulator, {"agent_id": "a", "to": "447700900123"}))
    for _ in range(100):
        if simulator.arrivals:
            break
        await asyncio.sleep(0.01)

    began = time.monotonic()
    await simulator.stop()

    assert time.monotonic() - began < 1.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await hanging


async def test_latency_delays_the_answer(http, start):
    simulator = await start(faults=Faults(latency=(0.2, 0.25)))
    began = time.monotonic()
    status, _, _ = await call(http, simulator, {"agent_id": "a", "to": "447700900123"})
    assert status == 200
    assert 0.2 <= time.monotonic() - began < 1.0


async def test_the_same_seed_draws_the_same_faults(http, start):
    body = {"agent_id": "any", "to": "447700900123"}
    runs = []
    for _ in range(2):
        simulator = await start({"any": 1000}, faults=Faults(error_5xx=0.5), seed=7)
        runs.append([(await call(http, simulator, body))[0] for _ in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


async def test_other_paths_and_methods_are_not_found(http, start):
    simulator = await start()
    base = simulator.endpoint("eu").removesuffix("/eu/telephony/make-call")
    async with http.post(f"{base}/eu/telephony/other", json={}, headers=KEY) as resp:
        assert resp.status == 404
    async with http.get(simulator.endpoint("eu"), headers=KEY) as resp:
        assert resp.status == 404
    assert simulator.arrivals == []


async def test_the_log_gets_one_json_line_per_arrival_at_once(http, start, tmp_path):
    log = tmp_path / "arrivals.jsonl"
    simulator = await start(log_path=log)
    body = {"agent_id": "a", "to": "447700900123"}
    for _ in range(2):
        await call(http, simulator, body)

    # Read while the simulator still runs, as another process would.
    lines = [json.loads(line) for line in log.read_text().splitlines()]

    assert [line["http_status"] for line in lines] == [200, 429]
    assert lines == [dataclasses.asdict(arrival) for arrival in simulator.arrivals]
    assert set(lines[0]) == {field.name for field in dataclasses.fields(Arrival)}


async def test_a_server_of_its_own_logs_arrivals_but_keeps_none(http, start, tmp_path):
    log = tmp_path / "arrivals.jsonl"
    simulator = await start(log_path=log, keep_arrivals=False)
    for _ in range(2):
        await call(http, simulator, {"agent_id": "a", "to": "447700900123"})

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["http_status"] for line in lines] == [200, 429]  # the window still counts
    assert simulator.arrivals == []


@pytest.mark.parametrize(
    ("times", "rate", "violations"),
    [
        ([], 1, 0),
        ([0.0, 1.0, 2.0], 1, 0),  # exactly one window apart is allowed
        ([0.0, 0.5, 1.0], 1, 2),
        ([0.0, 0.1, 0.2, 0.3, 0.4], 5, 0),
        ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 5, 1),
        ([0.5, 0.0, 0.4, 0.1, 0.3, 0.2], 5, 1),  # order does not matter
        ([0.0, 0.0, 0.0, 0.0], 3, 1),
        ([0.0, 0.9, 1.8, 2.7], 1, 3),
        ([0.0, 0.1, 1.5, 1.6], 1, 2),  # two leave the window at once
    ],
)
def test_window_violations(times, rate, violations):
    assert window_violations(times, rate) == violations


def test_window_violations_with_a_wider_window():
    assert window_violations([0.0, 1.5, 3.0], 1, window=2.0) == 2


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_are_parsed_into_their_values():
    args = parse(
        *("--agent", "a=5", "--agent", "b=1", "--latency", "0.1-0.5"),
        *("--error-rate", "0.1", "--reset-rate", "0.2", "--hang-rate", "0.05", "--seed", "3"),
    )
    assert args.agent == [("a", 5), ("b", 1)]
    assert args.latency == (0.1, 0.5)
    assert (args.error_rate, args.reset_rate, args.hang_rate) == (0.1, 0.2, 0.05)
    assert (args.host, args.port, args.default_rate, args.seed) == ("127.0.0.1", 8000, None, 3)


@pytest.mark.parametrize(
    "argv",
    [
        ("--agent", "a"),
        ("--agent", "a=0"),
        ("--latency", "0.5-0.1"),
        ("--error-rate", "1.5"),
        ("--default-rate", "x"),
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse(*argv)


async def test_serve_listens_until_cancelled(http, capsys):
    args = parse("--port", "0", "--agent", "a=1")
    server = asyncio.create_task(serve(args, faults_from(args)))
    url = None
    for _ in range(200):
        await asyncio.sleep(0.01)
        url = next(
            (
                line.removeprefix("simulator listening on ")
                for line in capsys.readouterr().err.splitlines()
                if line.startswith("simulator listening on ")
            ),
            url,
        )
        if url:
            break
    assert url

    async with http.post(
        f"{url}/eu/telephony/make-call", json={"agent_id": "a", "to": "447700900123"}, headers=KEY
    ) as resp:
        assert resp.status == 200

    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server


async def receiver():
    """A callback listener on 127.0.0.1 that keeps what it is sent."""
    received = []

    async def keep(request):
        received.append(await request.json())
        return aiohttp.web.Response(status=204)

    app = aiohttp.web.Application()
    app.router.add_post("/cb/{token}", keep)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/cb", received


async def test_an_unreached_callee_is_reported_to_the_status_url(http, start):
    runner, url, received = await receiver()
    try:
        faults = Faults(unreached=(("busy", 1.0),), callback_delay=(0.0, 0.05))
        simulator = await start(faults=faults)
        body = {"agent_id": "a", "to": "447700900123", "status_url": f"{url}/t1"}
        status, _, answer = await call(http, simulator, body)
        assert status == 200
        async with asyncio.timeout(5):
            while not received:
                await asyncio.sleep(0.01)
        assert received == [
            {
                "agent_id": "a",
                "to": "447700900123",
                "conversation_uuid": answer["conversation_uuid"],
                "status": "busy",
                "timestamp": received[0]["timestamp"],
            }
        ]
        assert simulator.callbacks_sent[0]["http_status"] == 204
    finally:
        await runner.cleanup()


async def test_the_callback_of_a_call_made_from_an_agents_number_names_the_agent(http, start):
    """As the API knows the agent behind its published number: the daemon ties a callback to
    its call by agent_id, whichever way the request named the agent."""
    runner, url, received = await receiver()
    try:
        faults = Faults(unreached=(("busy", 1.0),), callback_delay=(0.0, 0.0))
        simulator = await start(numbers={"447700900000": "a"}, faults=faults)
        body = {"from": "447700900000", "to": "447700900123", "status_url": f"{url}/t1"}
        assert (await call(http, simulator, body))[0] == 200
        async with asyncio.timeout(5):
            while not received:
                await asyncio.sleep(0.01)
        assert received[0]["agent_id"] == "a"
    finally:
        await runner.cleanup()


async def test_no_callback_without_a_status_url_or_when_the_callee_is_reached(http, start):
    runner, url, received = await receiver()
    try:
        reached = await start(faults=Faults(callback_delay=(0.0, 0.0)))
        unreached = await start(faults=Faults(unreached=(("timeout", 1.0),)))
        await call(http, reached, {"agent_id": "a", "to": "447700900123", "status_url": url + "/x"})
        await call(http, unreached, {"agent_id": "a", "to": "447700900123"})
        await asyncio.sleep(0.2)
        assert received == []
        assert reached.callbacks_sent == unreached.callbacks_sent == []
    finally:
        await runner.cleanup()


def test_callback_arguments_are_parsed():
    args = parse("--unreached", "busy=0.3", "--unreached", "timeout=0.1", "--callback-delay", "0-1")
    assert args.unreached == [("busy", 0.3), ("timeout", 0.1)]
    assert args.callback_delay == (0.0, 1.0)
    with pytest.raises(SystemExit):
        parse("--unreached", "answered=0.5")
    with pytest.raises(ValueError):
        Faults(unreached=(("busy", 0.7), ("timeout", 0.7)))


async def test_jitter_delays_each_arrival_by_up_to_its_bound(http, start):
    simulator = await start(faults=Faults(jitter=0.1), seed=3)
    delays = []
    for _ in range(10):
        sent = time.monotonic()
        await call(http, simulator, {"agent_id": "five", "to": "447700900123"})
        delays.append(simulator.arrivals[-1].at - sent)
        await asyncio.sleep(0.25)  # stay under the agent's rate
    assert all(0 <= delay < 0.1 + 0.05 for delay in delays), delays
    assert max(delays) - min(delays) > 0.02, "the delays vary"
    with pytest.raises(ValueError):
        Faults(jitter=-1)
