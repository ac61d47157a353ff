"""The Studio client: what each answer of the make-call API means for the request (SPEC 1, 8.2).

Answers are mocked with aioresponses (which fires no trace hooks, so a test that needs the
request to count as written sets the `departed` future itself), served by the simulator, or
written byte for byte by a bare HTTP server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import socket
from dataclasses import astuple
from types import SimpleNamespace

import aiohttp
import aioresponses as aioresponses_module
import pytest
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import StreamWriter
from yarl import URL

from dialerd import studio
from dialerd.config import DEFAULT_ENDPOINTS
from dialerd.simulator import Faults
from dialerd.studio import SendResult, StudioClient, Verdict

KEY = "vgai-key-7f3a9c-SECRET"
EU = DEFAULT_ENDPOINTS["eu"]
BODY = {"agent_id": "agent-a", "to": "447700900123"}
FULL_BODY = {
    "agent_id": "agent-a",
    "to": "447700900123",
    "status_url": "https://dialer.example.com/cb/tok-1",
    "hangup_on_answer_machine": True,
    "session_parameters": [{"name": "CALLER_NAME", "value": "Diane Miller"}],
}
UNKNOWN_AGENT = "ID agent-x is not an ID to any agent or published version"


class MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the `stream_writer` aiohttp 3.14 requires."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


class aioresponses(aioresponses_module.aioresponses):
    """aioresponses, answering with MockedResponse unless told otherwise."""

    def add(self, url, method="GET", *args, **kwargs):
        kwargs.setdefault("response_class", MockedResponse)
        super().add(url, method, *args, **kwargs)


@pytest.fixture
async def http():
    """The daemon's own kind of session, with the departure trace."""
    async with studio.session(5) as session:
        yield session


def new_departed() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


async def send(client: StudioClient, body: dict = BODY, region: str = "eu"):
    departed = new_departed()
    async with asyncio.timeout(10):
        result = await client.make_call(region, body, departed)
    return result, departed


def assert_no_key(result: SendResult) -> None:
    for value in astuple(result):
        assert KEY not in str(value), result


def mark_written(_url, **_kwargs) -> None:
    """An aioresponses callback: the request counts as written, as the session's request class
    would say once it hands the bytes to the socket (a mocked request never gets that far)."""
    sending = studio._sending.get()
    sending.written = True
    studio._stamp(sending.departed)


# -- answers, mocked ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202])
async def test_2xx_is_placed_with_the_conversation_uuid_and_the_body(http, status):
    answer = {"conversation_uuid": "CON-1234", "status": "started"}
    with aioresponses() as mock:
        mock.post(EU, status=status, payload=answer)
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.PLACED
    assert result.http_status == status
    assert result.conversation_uuid == "CON-1234"
    assert json.loads(result.response) == answer
    assert result.error is None
    assert result.retry_after is None


@pytest.mark.parametrize(
    "body",
    ["OK", "", "<html>accepted</html>", "[1, 2]", '{"conversation_uuid": 5}', '{"uuid": "x"}'],
)
async def test_2xx_without_a_conversation_uuid_is_still_placed(http, body):
    with aioresponses() as mock:
        mock.post(EU, status=200, body=body, content_type="text/plain")
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.PLACED
    assert result.http_status == 200
    assert result.conversation_uuid is None
    assert result.response == body


@pytest.mark.parametrize(("header", "seconds"), [("2", 2.0), ("0.5", 0.5), ("0", 0.0)])
async def test_429_with_retry_after_seconds_is_retried_after_them(http, header, seconds):
    with aioresponses() as mock:
        mock.post(
            EU, status=429, payload={"error": "Too Many Requests"}, headers={"Retry-After": header}
        )
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.RETRY
    assert result.http_status == 429
    assert result.retry_after == seconds
    assert result.error == "Too Many Requests"


async def test_429_with_an_http_date_retry_after_is_retried_at_that_time(http):
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    with aioresponses() as mock:
        mock.post(
            EU,
            status=429,
            headers={"Retry-After": email.utils.format_datetime(moment, usegmt=True)},
        )
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.RETRY
    assert result.http_status == 429
    # The date has whole seconds: up to one second less than the 30 asked for.
    assert 28.5 <= result.retry_after <= 30.5


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("-3", 0.0), ("soon", None), ("", None)],
)
async def test_429_with_a_past_or_unreadable_retry_after(http, header, seconds):
    with aioresponses() as mock:
        mock.post(EU, status=429, headers={"Retry-After": header})
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.RETRY
    assert result.retry_after == seconds


async def test_429_without_retry_after_has_none(http):
    with aioresponses() as mock:
        mock.post(EU, status=429, body="slow down", content_type="text/plain")
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.RETRY
    assert result.http_status == 429
    assert result.retry_after is None
    assert result.error == "slow down"


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_are_retried(http, status):
    with aioresponses() as mock:
        # A Retry-After on anything but a 429 is not taken.
        mock.post(
            EU,
            status=status,
            payload={"message": "upstream unavailable"},
            headers={"Retry-After": "7"},
        )
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.RETRY
    assert result.http_status == status
    assert result.error == "upstream unavailable"
    assert result.retry_after is None


@pytest.mark.parametrize(
    ("status", "answer", "message", "verdict"),
    [
        # The agent's scope: 404, or the API's texts of an agent it does not know (yet).
        (400, {"error": UNKNOWN_AGENT}, UNKNOWN_AGENT, Verdict.AGENT_REFUSED),
        (
            404,
            {"message": "published version for Agent agent-x was not found"},
            "published version for Agent agent-x was not found",
            Verdict.AGENT_REFUSED,
        ),
        (
            400,
            {"error": "Phone 447700900000 is not attached to any agent or published version"},
            "Phone 447700900000 is not attached to any agent or published version",
            Verdict.AGENT_REFUSED,
        ),
        (404, {"error": "Not Found"}, "Not Found", Verdict.AGENT_REFUSED),
        (400, UNKNOWN_AGENT + "\n", UNKNOWN_AGENT, Verdict.AGENT_REFUSED),
        # The key's: 401 and 403.
        (401, {"detail": "invalid credentials"}, "invalid credentials", Verdict.KEY_REFUSED),
        (403, {"detail": "forbidden"}, "forbidden", Verdict.KEY_REFUSED),
        # The request's: every other refusal.
        (
            500,
            {"error": "Internal Server Error", "code": 17},
            "Internal Server Error",
            Verdict.FAILED,
        ),  # fmt: skip
        (422, {"errors": ["to is invalid"]}, '{"errors": ["to is invalid"]}', Verdict.FAILED),
        (400, {"error": "to is invalid"}, "to is invalid", Verdict.FAILED),
    ],
)
async def test_an_error_is_judged_by_its_scope_with_the_apis_message(
    http, status, answer, message, verdict
):
    with aioresponses() as mock:
        if isinstance(answer, str):
            mock.post(EU, status=status, body=answer, content_type="text/plain")
        else:
            mock.post(EU, status=status, payload=answer)
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is verdict
    assert result.http_status == status
    assert result.error == message
    assert result.retry_after is None
    assert result.response is not None


async def test_an_error_without_a_body_is_named_by_its_reason_or_status(http):
    with aioresponses() as mock:
        mock.post(EU, status=403, body="", reason="Forbidden")
        mock.post(EU, status=400, body="", reason="")
        client = StudioClient(http, KEY, DEFAULT_ENDPOINTS)
        with_reason, _ = await send(client)
        without, _ = await send(client)

    assert (with_reason.verdict, with_reason.error) == (Verdict.KEY_REFUSED, "Forbidden")
    assert (without.verdict, without.error) == (Verdict.FAILED, "HTTP 400")


async def test_a_long_error_text_is_cut(http):
    with aioresponses() as mock:
        mock.post(EU, status=400, body="x" * 5000, content_type="text/plain")
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.FAILED
    assert result.error == "x" * studio.ERROR_TEXT_KEPT


# -- failures without an answer, mocked -----------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
)
async def test_a_connection_lost_after_writing_is_in_doubt(http, error):
    with aioresponses() as mock:
        mock.post(EU, callback=mark_written, exception=error)
        result, departed = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert departed.done()
    assert result.verdict is Verdict.IN_DOUBT
    assert result.http_status is None
    assert result.error.startswith("no answer after sending: ")


async def test_a_timeout_after_writing_is_in_doubt(http):
    with aioresponses() as mock:
        mock.post(EU, callback=mark_written, exception=TimeoutError())
        result, _ = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is Verdict.IN_DOUBT
    assert result.error == "no answer after sending: timed out"


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),  # e.g. the connect timed out
        aiohttp.ClientConnectionError("Connection refused"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
async def test_a_failure_before_writing_is_retried(http, error):
    with aioresponses() as mock:
        mock.post(EU, exception=error)
        result, departed = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert not departed.done()
    assert result.verdict is Verdict.RETRY
    assert result.http_status is None
    assert result.error.startswith("not sent: ")


@pytest.mark.parametrize(("written", "verdict"), [(False, Verdict.RETRY), (True, Verdict.IN_DOUBT)])
async def test_an_exception_of_the_client_itself_is_judged_by_whether_it_was_written(
    http, written, verdict
):
    """Not one of the network's errors (a bug, a library refusing a value): still a verdict,
    never an exception out of make_call, and at most once where bytes may have gone."""
    with aioresponses() as mock:
        callback = mark_written if written else None
        mock.post(EU, callback=callback, exception=RuntimeError("unforeseen"))
        result, departed = await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS))

    assert result.verdict is verdict
    assert departed.done() is written
    assert result.http_status is None
    assert result.error.endswith("RuntimeError: unforeseen")


async def test_a_header_value_aiohttp_refuses_is_not_sent_and_retried(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5})
    client = StudioClient(http, "two\nlines", {"eu": simulator.endpoint("eu")})

    result, departed = await send(client)

    assert result.verdict is Verdict.RETRY
    assert result.error.startswith("not sent: ValueError: ")
    assert not departed.done()
    assert simulator.arrivals == []
    assert "lines" not in result.error


async def test_the_request_is_the_body_given_with_the_key_and_json_content_type(http):
    with aioresponses() as mock:
        mock.post(DEFAULT_ENDPOINTS["us"], status=200, payload={})
        await send(StudioClient(http, KEY, DEFAULT_ENDPOINTS), FULL_BODY, region="us")
        [call] = mock.requests[("POST", URL(DEFAULT_ENDPOINTS["us"]))]

    assert call.kwargs["headers"]["X-Vgai-Key"] == KEY
    assert call.kwargs["headers"]["Content-Type"] == "application/json"
    assert json.loads(call.kwargs["data"]) == FULL_BODY


# -- against real servers on 127.0.0.1 ------------------------------------------------------


class BareServer:
    """A bare HTTP/1.1 server: records each request as it came off the wire (request line,
    headers, body) and answers with the given bytes, then closes the connection."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.requests: list[tuple[str, list[tuple[str, str]], bytes]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/telephony/make-call"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines if line]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            self.requests.append((request_line, headers, await reader.readexactly(length)))
            writer.write(self.answer)
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def bare_server():
    started: list[BareServer] = []

    async def start(answer: bytes) -> tuple[BareServer, str]:
        server = BareServer(answer)
        url = await server.start()
        started.append(server)
        return server, url

    yield start
    for server in started:
        await server.stop()


async def test_on_the_wire_the_request_has_the_key_json_type_and_exactly_the_body(
    http, bare_server
):
    answer = b'{"conversation_uuid": "CON-wire"}'
    server, url = await bare_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
    )
    result, departed = await send(StudioClient(http, KEY, {"eu": url}), FULL_BODY)

    assert result.verdict is Verdict.PLACED
    assert result.conversation_uuid == "CON-wire"
    assert departed.done()
    [(request_line, headers, body)] = server.requests
    assert request_line == "POST /telephony/make-call HTTP/1.1"
    assert [v for k, v in headers if k.lower() == "x-vgai-key"] == [KEY]
    assert [v for k, v in headers if k.lower() == "content-type"] == ["application/json"]
    assert json.loads(body) == FULL_BODY
    assert_no_key(result)


async def test_a_2xx_whose_body_is_cut_off_is_still_placed(http, bare_server):
    _, url = await bare_server(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"conv'
    )
    result, _ = await send(StudioClient(http, KEY, {"eu": url}))

    assert result.verdict is Verdict.PLACED
    assert result.http_status == 200
    assert result.conversation_uuid is None
    assert result.error.startswith("answer body lost: ")


async def test_connection_refused_is_retried_and_never_departed(http):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    client = StudioClient(http, KEY, {"eu": f"http://127.0.0.1:{port}/eu/telephony/make-call"})
    result, departed = await send(client)

    assert result.verdict is Verdict.RETRY
    assert result.http_status is None
    assert result.error.startswith("not sent: ")
    assert not departed.done()
    assert_no_key(result)


class SlowToResolve(aiohttp.abc.AbstractResolver):
    """127.0.0.1 for every name, `delay_s` after it is asked: a connection slow to make;
    `on_ask()` is called as it is asked."""

    def __init__(self, delay_s: float, on_ask=lambda: None):
        self._delay_s = delay_s
        self._on_ask = on_ask
        self.asked = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked += 1
        self._on_ask()
        await asyncio.sleep(self._delay_s)
        return [
            {"hostname": host, "host": "127.0.0.1", "port": port, "family": family}
            | {"proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


async def test_a_send_withheld_as_it_was_to_leave_never_reaches_the_api(simulator_factory):
    """`may_leave` is asked once the connection is made, as the first byte is to be written
    (a lease may run out while a connection is slow to make): a no sends nothing, stamps no
    departure, and the session goes on."""
    simulator = await simulator_factory({"agent-a": 5})
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(resolver=SlowToResolve(0.3), force_close=True)
    async with studio.session(5, connector) as http:
        client = StudioClient(
            http, KEY, {"eu": simulator.endpoint("eu").replace("127.0.0.1", "api.test")}
        )
        until = loop.time() + 0.15  # still true as the send begins, no more once it connects
        departed = new_departed()
        withheld = await client.make_call("eu", BODY, departed, lambda: loop.time() < until)
        assert withheld.verdict is Verdict.WITHHELD and not departed.done()
        assert simulator.arrivals == []
        placed = await client.make_call("eu", BODY, new_departed(), lambda: True)
    assert placed.verdict is Verdict.PLACED
    assert len(simulator.arrivals) == 1


async def test_a_send_withheld_on_a_kept_connection_leaves_nothing_behind_on_it(
    http, simulator_factory
):
    """On a connection kept from the send before, the request line and headers of a withheld
    send wait in its writer's buffer: the connection is closed with them, never reused."""
    simulator = await simulator_factory({"agent-a": 5})
    client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
    first = await client.make_call("eu", BODY, new_departed())
    withheld = await client.make_call("eu", BODY, new_departed(), lambda: False)
    third = await client.make_call("eu", BODY, new_departed())
    assert withheld.verdict is Verdict.WITHHELD
    assert first.verdict is third.verdict is Verdict.PLACED
    assert len(simulator.arrivals) == 2


async def test_simulator_placed_call(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5})
    client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
    loop = asyncio.get_running_loop()
    before = loop.time()
    result, departed = await send(client, FULL_BODY)

    [arrival] = simulator.arrivals
    assert arrival.placed
    assert arrival.body == FULL_BODY
    assert arrival.region == "eu"
    assert result.verdict is Verdict.PLACED
    assert result.http_status == 200
    assert result.conversation_uuid == arrival.conversation_uuid
    assert json.loads(result.response)["conversation_uuid"] == arrival.conversation_uuid
    assert departed.done()
    assert before <= departed.result() <= loop.time()
    assert_no_key(result)


async def test_the_session_tells_departures_without_any_trace(simulator_factory):
    """session() times departures by its request class: no trace config, whose signals would
    cost on every request."""
    simulator = await simulator_factory({"agent-a": 5, "agent-b": 5})
    async with studio.session(5) as http:
        assert http.trace_configs == []
        client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
        sends = [send(client, {**BODY, "agent_id": agent}) for agent in ("agent-a", "agent-b")]
        (first, first_departed), (second, second_departed) = await asyncio.gather(*sends)

    assert first.verdict is second.verdict is Verdict.PLACED
    # Side by side in one loop, each send's departure went to its own future.
    assert first_departed.done() and second_departed.done()
    assert first_departed is not second_departed


async def test_a_departure_is_stamped_in_the_step_that_writes_it(simulator_factory, monkeypatch):
    """aiohttp writes a request from a task of its own, a loop step or more after the request
    is ready: a stamp taken before that step would let the agent's next send follow too
    closely. A task counting the loop's steps tells the two apart without timing anything."""
    simulator = await simulator_factory({"agent-a": 5})
    steps = 0

    async def count_steps() -> None:
        nonlocal steps
        while True:
            steps += 1
            await asyncio.sleep(0)

    class Noting(asyncio.Future):
        def set_result(self, result) -> None:
            self.step = steps
            super().set_result(result)

    written_in = []
    write = StreamWriter._writelines

    def noted(self, chunks):
        if isinstance(self._protocol, ResponseHandler):  # the client's, not the simulator's
            written_in.append(steps)
        return write(self, chunks)

    monkeypatch.setattr(StreamWriter, "_writelines", noted)
    async with studio.session(5) as http:
        client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
        counter = asyncio.create_task(count_steps())
        departed = Noting()
        result = await client.make_call("eu", BODY, departed)
        counter.cancel()

    assert result.verdict is Verdict.PLACED
    assert written_in == [departed.step]


async def test_simulator_unknown_agent_is_refused_with_its_message(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5})
    client = StudioClient(http, KEY, {"us": simulator.endpoint("us")})
    result, _ = await send(client, {"agent_id": "agent-x", "to": "447700900123"}, region="us")

    assert result.verdict is Verdict.AGENT_REFUSED
    assert result.http_status == 400
    assert result.error == UNKNOWN_AGENT
    assert_no_key(result)


async def test_simulator_over_the_limit_is_retried_after_its_retry_after(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 1})
    client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
    first, _ = await send(client)
    second, _ = await send(client)

    assert first.verdict is Verdict.PLACED
    assert second.verdict is Verdict.RETRY
    assert second.http_status == 429
    assert second.retry_after == 1.0
    assert second.error == "Too Many Requests"
    assert simulator.count_429() == 1
    assert_no_key(second)


async def test_simulator_reset_after_sending_is_in_doubt(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5}, Faults(reset=1.0))
    client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
    result, departed = await send(client)

    assert departed.done()
    assert result.verdict is Verdict.IN_DOUBT
    assert result.http_status is None
    assert result.error.startswith("no answer after sending: ")
    assert len(simulator.placed()) == 1  # the API did place the call
    assert_no_key(result)


async def test_simulator_hang_with_a_short_timeout_is_in_doubt(simulator_factory):
    simulator = await simulator_factory({"agent-a": 5}, Faults(hang=1.0))
    loop = asyncio.get_running_loop()
    async with studio.session(0.5) as http:
        client = StudioClient(http, KEY, {"eu": simulator.endpoint("eu")})
        started = loop.time()
        result, departed = await send(client)

    assert 0.4 <= loop.time() - started < 3
    assert departed.done()
    assert result.verdict is Verdict.IN_DOUBT
    assert result.error == "no answer after sending: timed out"
    assert len(simulator.placed()) == 1
    assert_no_key(result)


async def test_simulator_refuses_a_blank_key(http, simulator_factory):
    simulator = await simulator_factory({"agent-a": 5})
    result, _ = await send(StudioClient(http, " ", {"eu": simulator.endpoint("eu")}))

    assert result.verdict is Verdict.KEY_REFUSED
    assert result.http_status == 401


# -- the key ---------------------------------------------------------------------------------


async def test_the_key_is_in_no_result_of_any_kind(http):
    with aioresponses() as mock:
        mock.post(EU, status=200, payload={"conversation_uuid": "CON-1"})
        mock.post(EU, status=429, headers={"Retry-After": "1"})
        mock.post(EU, status=503, body="")
        mock.post(EU, status=400, payload={"error": UNKNOWN_AGENT})
        mock.post(EU, callback=mark_written, exception=aiohttp.ServerDisconnectedError())
        mock.post(EU, exception=aiohttp.ClientConnectionError("refused"))
        client = StudioClient(http, KEY, DEFAULT_ENDPOINTS)
        results = [(await send(client))[0] for _ in range(6)]

    assert [r.verdict for r in results] == [
        Verdict.PLACED,
        Verdict.RETRY,
        Verdict.RETRY,
        Verdict.AGENT_REFUSED,
        Verdict.IN_DOUBT,
        Verdict.RETRY,
    ]
    for result in results:
        assert_no_key(result)


async def test_the_key_is_not_kept_even_when_the_api_echoes_it(http):
    """SPEC 3: the key is never in results; a gateway that quotes the key it refused must not
    carry it into the error or the recorded answer."""
    with aioresponses() as mock:
        mock.post(EU, status=401, payload={"error": f"invalid X-Vgai-Key {KEY}"})
        mock.post(EU, status=200, body=f"placed for key {KEY}", content_type="text/plain")
        client = StudioClient(http, KEY, DEFAULT_ENDPOINTS)
        refused, _ = await send(client)
        placed, _ = await send(client)

    assert refused.verdict is Verdict.KEY_REFUSED
    assert placed.verdict is Verdict.PLACED
    assert_no_key(refused)
    assert_no_key(placed)
