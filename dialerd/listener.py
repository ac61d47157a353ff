"""The listeners' site: a connection cap, and no client holding a connection for long (SPEC 7).

aiohttp's TCPSite serves through loop.create_server, which accepts every connection the kernel
hands it: a client opening connections without end takes the daemon's file descriptors, and the
ledger, the spool and the sends fail for want of one. aiohttp closes a connection that has not sent
a whole request only after its keep-alive timeout, and has no limit on a body sent slowly.

CappedSite accepts only while fewer than `max_connections` of its connections are open; past it,
new ones wait in the kernel's backlog (and beyond the backlog the kernel drops their SYNs, which
clients retry), so a flood costs the daemon no descriptor and no CPU. A connection is closed when
its first request's headers are not all in within HEADERS_TIMEOUT_S, when a request's body is not
all in within BODY_TIMEOUT_S after its headers, and when it is idle KEEPALIVE_TIMEOUT_S between
requests (aiohttp's keepalive_timeout, which also bounds the headers of the requests after the
first).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.streams import StreamReader

from .config import Listen
from .logs import log

HEADERS_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
KEEPALIVE_TIMEOUT_S = 15.0
BACKLOG = 128  # the kernel's queue of connections not yet accepted, as TCPSite's default
ACCEPT_BACKOFF_FIRST_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0


class _Connection(web.RequestHandler):
    """aiohttp's handler of one connection, holding a slot of its site while it is open and
    closed when the headers or the body of a request come too slowly."""

    def __init__(
        self,
        manager: web.Server,
        release: Callable[[], None],
        *,
        loop: asyncio.AbstractEventLoop,
    ):
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            # An unread body (a 404, a 413) is read and dropped for at most this long.
            lingering_time=BODY_TIMEOUT_S,
            access_log=None,  # aiohttp's access log would write request headers
        )
        self._timers = loop
        self._release: Callable[[], None] | None = release
        self._clock: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._clock = self._timers.call_later(HEADERS_TIMEOUT_S, self.force_close)

    def headers_in(self, payload: StreamReader) -> None:
        """A request's headers are in: its body has BODY_TIMEOUT_S more."""
        if self._clock is not None:
            self._clock.cancel()
        self._clock = self._timers.call_later(BODY_TIMEOUT_S, self._body_due, payload)

    def _body_due(self, payload: StreamReader) -> None:
        if not payload.is_eof():
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._clock is not None:
            self._clock.cancel()
        super().connection_lost(exc)
        self.release()

    def release(self) -> None:
        """Give the slot back, once."""
        release, self._release = self._release, None
        if release is not None:
            release()


class _Listening:
    """What aiohttp reads of a site's server: its sockets (runner.addresses), and close()."""

    def __init__(self, sock: socket.socket):
        self.sockets = (sock,)

    def close(self) -> None:
        self.sockets[0].close()


class CappedSite(web.BaseSite):
    """A TCP site, as aiohttp's TCPSite, holding at most `max_connections` connections."""

    def __init__(self, runner: web.BaseRunner, listen: Listen, *, max_connections: int):
        super().__init__(runner, backlog=BACKLOG)
        self._listen = listen
        self._free = asyncio.Semaphore(max_connections)
        self._accepting: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return f"http://{self._listen.host}:{self._listen.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner not set up
        # Called once a request's headers are parsed, before the application sees it.
        make_request = server.request_factory

        def timed_request(message, payload, protocol, writer, task):
            protocol.headers_in(payload)
            return make_request(message, payload, protocol, writer, task)

        server.request_factory = timed_request
        sock = _listening_socket(self._listen, self._backlog)
        self._server = _Listening(sock)  # type: ignore[assignment]
        self._accepting = asyncio.create_task(
            self._accept(server, sock), name=f"accept {self.name}"
        )

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        await super().stop()  # closes the listening socket

    async def _accept(self, server: web.Server, listening: socket.socket) -> None:
        """Accept while a slot is free; back off while the process is out of descriptors."""
        loop = asyncio.get_running_loop()
        backoff = ACCEPT_BACKOFF_FIRST_S
        failing = False
        while True:
            await self._free.acquire()
            try:
                sock, _address = await loop.sock_accept(listening)
            except ConnectionAbortedError:  # the client left before it was accepted
                self._free.release()
                continue
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: the next one may pass
                self._free.release()
                if not failing:
                    log.error(
                        "listener: cannot accept; backing off", site=self.name, error=str(error)
                    )
                    failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            if failing:
                log.warning("listener: accepting again", site=self.name)
                failing, backoff = False, ACCEPT_BACKOFF_FIRST_S
            connection = _Connection(server, self._free.release, loop=loop)
            try:
                await loop.connect_accepted_socket(lambda c=connection: c, sock)
            except OSError:  # the client is already gone
                sock.close()
                connection.release()


def _listening_socket(listen: Listen, backlog: int) -> socket.socket:
    """A non-blocking socket listening on host:port (the first address the host resolves to)."""
    address = (listen.host, listen.port)
    family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server(address, family=family, backlog=backlog)
    sock.setblocking(False)
    return sock
