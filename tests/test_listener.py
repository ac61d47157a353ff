"""The listeners' site in-process, under asyncio's loop and uvloop's (the daemon runs on uvloop
when it is installed): the connection cap, and the header, body and keep-alive timeouts (SPEC 7).

The clients are raw sockets in the test's loop, so that a test says exactly what is sent and when.
The timeouts are patched small; the real ones are shown through the daemon in test_slowloris.py.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time

import pytest
import uvloop
from aiohttp import web

from dialerd import listener
from dialerd.config import Listen
from dialerd.listener import CappedSite

GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
CLOSED_WITHIN_S = 2.0  # a timeout of 0.3 s closes the connection well before this
EARLY_S = 0.01  # how much earlier than asked a timer may fire (uvloop's count whole milliseconds)
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Site:
    """A CappedSite on 127.0.0.1 serving GET / and POST /read (which reads the whole body)."""

    def __init__(self, max_connections: int = 256):
        self.max_connections = max_connections
        self.most_open = 0
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_post("/read", self._read)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)

    async def start(self) -> None:
        await self.runner.setup()
        site = CappedSite(self.runner, Listen("127.0.0.1", 0), max_connections=self.max_connections)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def open_now(self) -> int:
        """Connections open at the server now (aiohttp's own count)."""
        count = len(self.runner.server.connections)
        self.most_open = max(self.most_open, count)
        return count

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def _hello(self, _request: web.Request) -> web.Response:
        self.open_now()
        return web.Response(text="hello")

    async def _read(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"read {len(body)}")


@pytest.fixture(params=sorted(LOOPS))
def serve(request):
    """serve(scenario, **options): run `scenario(site)` against a started Site, in the loop."""

    async def serving(scenario, options) -> None:
        site = Site(**options)
        await site.start()
        try:
            await scenario(site)
        finally:
            await site.runner.cleanup()

    def run(scenario, **options) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(serving(scenario, options))

    return run


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One response, read up to its body of 'hello' or 'read N'."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def stamped(awaitable) -> tuple:
    """What `awaitable` gives, and when it gave it."""
    return await awaitable, time.monotonic()


async def closed_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from `started` until the server closed the connection (all it sent is dropped)."""
    async with asyncio.timeout(CLOSED_WITHIN_S + 1):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def wait_until(probe, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- the cap ------------------------------------------------------------------------------------


def test_a_connection_past_the_cap_is_accepted_only_once_one_closes(serve):
    async def scenario(served: Site) -> None:
        held = [await served.connect() for _ in range(3)]
        await wait_until(lambda: served.open_now() == 3)
        # The kernel completes the fourth handshake (the backlog); the site does not accept it.
        reader, writer = await served.connect()
        writer.write(GET)
        waiting = asyncio.ensure_future(stamped(answer(reader)))
        await asyncio.sleep(0.3)  # time enough for a site without a cap to answer
        assert served.open_now() == 3

        held[0][1].close()
        closed_at = time.monotonic()
        response, answered_at = await waiting

        assert answered_at >= closed_at
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello")
        assert served.most_open == 3
        for _reader, other in [*held[1:], (reader, writer)]:
            other.close()

    serve(scenario, max_connections=3)


def test_many_connections_past_the_cap_are_all_served_in_turn(serve):
    async def scenario(served: Site) -> None:
        clients = [await served.connect() for _ in range(40)]
        for _reader, writer in clients:
            writer.write(GET)
        # Each is answered and closed by its client in turn, freeing a slot for the next.

        async def one(reader, writer) -> bytes:
            response = await asyncio.wait_for(answer(reader), 10)
            writer.close()
            return response

        responses = await asyncio.gather(*(one(r, w) for r, w in clients))

        assert all(r.endswith(b"hello") for r in responses)
        assert served.most_open <= 4

    serve(scenario, max_connections=4)


# -- the timeouts ---------------------------------------------------------------------------------


def test_headers_sent_slowly_are_cut_off_after_the_header_timeout(serve, monkeypatch):
    monkeypatch.setattr(listener, "HEADERS_TIMEOUT_S", 0.3)

    async def scenario(served: Site) -> None:
        started = time.monotonic()  # the clock starts as the connection is accepted
        reader, writer = await served.connect()
        writer.write(b"GET / HTTP/1.1\r\n")

        async def trickle() -> None:
            for n in range(100):  # one header line every 0.05 s, never the blank line
                writer.write(b"X-Slow-%d: y\r\n" % n)
                await asyncio.sleep(0.05)

        trickling = asyncio.ensure_future(trickle())
        elapsed = await closed_after(reader, started)
        trickling.cancel()

        assert 0.3 - EARLY_S <= elapsed < CLOSED_WITHIN_S
        await wait_until(lambda: served.open_now() == 0)

    serve(scenario)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(serve, monkeypatch):
    monkeypatch.setattr(listener, "HEADERS_TIMEOUT_S", 0.3)

    async def scenario(served: Site) -> None:
        started = time.monotonic()
        reader, _writer = await served.connect()

        assert 0.3 - EARLY_S <= await closed_after(reader, started) < CLOSED_WITHIN_S
        # Its slot is free again.
        reader, writer = await served.connect()
        writer.write(GET)
        assert (await answer(reader)).endswith(b"hello")

    serve(scenario, max_connections=1)


def test_a_body_sent_slowly_is_cut_off_after_the_body_timeout(serve, monkeypatch):
    monkeypatch.setattr(listener, "BODY_TIMEOUT_S", 0.3)

    async def scenario(served: Site) -> None:
        reader, writer = await served.connect()
        writer.write(b"POST /read HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            for _ in range(100):
                writer.write(b"x")
                await asyncio.sleep(0.05)

        trickling = asyncio.ensure_future(trickle())
        elapsed = await closed_after(reader, started)
        trickling.cancel()

        assert 0.3 - EARLY_S <= elapsed < CLOSED_WITHIN_S
        # A body sent at once is read and answered.
        reader, writer = await served.connect()
        writer.write(b"POST /read HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello")
        assert (await answer(reader)).endswith(b"read 5")

    serve(scenario)


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(serve, monkeypatch):
    monkeypatch.setattr(listener, "KEEPALIVE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(listener, "HEADERS_TIMEOUT_S", 0.2)

    async def scenario(served: Site) -> None:
        reader, writer = await served.connect()
        # Requests one after another on the one connection, each within the keep-alive timeout and
        # together well past the header timeout: that one is for the first request's headers only.
        for pause in (0.1, 0.1, 0.1, 0.0):
            writer.write(GET)
            assert (await answer(reader)).endswith(b"hello")
            started = time.monotonic()  # the server's idle clock started just before
            await asyncio.sleep(pause)
        assert served.most_open == 1

        assert 0.5 - EARLY_S <= await closed_after(reader, started) < CLOSED_WITHIN_S

    serve(scenario)


# -- out of descriptors ---------------------------------------------------------------------------


class Recorder:
    """Stands in for the site's log: what it logged, by level."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def error(self, event: str, **_fields) -> None:
        self.lines.append(("error", event))

    def warning(self, event: str, **_fields) -> None:
        self.lines.append(("warning", event))


def test_out_of_descriptors_the_site_backs_off_logs_once_and_accepts_again(serve, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(listener, "log", recorder)

    async def scenario(served: Site) -> None:
        clients = [socket.socket() for _ in range(3)]  # made while descriptors are free
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        # No descriptor is free below the limit: every accept() fails with EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            for client in clients:
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", served.port))  # the kernel completes it
            cpu = time.process_time()
            await asyncio.sleep(0.5)  # the site tries, fails, and waits before it tries again
            spent = time.process_time() - cpu
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        assert spent < 0.25, f"{spent:.2f} s of CPU in 0.5 s: accept() is spinning"
        assert recorder.lines == [("error", "listener: cannot accept; backing off")]
        for client in clients:
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(GET)
            assert (await answer(reader)).endswith(b"hello")
            writer.close()
        assert recorder.lines[1:] == [("warning", "listener: accepting again")]

    serve(scenario)
