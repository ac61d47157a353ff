"""The admin listener: /healthz, /metrics (Prometheus) and /status (JSON), GET only; with a
token, only for requests that carry it as `Authorization: Bearer TOKEN`."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from dialerd.config import Listen
from dialerd.listener import CappedSite
from dialerd.logs import log
from dialerd.metrics import Metrics

# Requests in flight at stop() only wait on a status report, so a short grace is enough.
SHUTDOWN_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 32  # scrapers and operators: a few at a time

StatusReport = Callable[[], Awaitable[dict]]


@web.middleware
async def _not_found_for_other_methods(request: web.Request, handler) -> web.StreamResponse:
    """Answer a wrong method with 404, as for a wrong path: the listener offers nothing else."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        raise web.HTTPNotFound() from None


class AdminListener:
    def __init__(
        self,
        listen: Listen,
        metrics: Metrics,
        status: StatusReport,
        unhealthy: Callable[[], str | None],
        token: str | None = None,
    ) -> None:
        """`unhealthy`: why /healthz answers 503 (draining, a stage stuck), or None."""
        self._listen = listen
        self._metrics = metrics
        self._status = status
        self._unhealthy = unhealthy
        self.use_token(token)
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._authorized, _not_found_for_other_methods])
        self.app.router.add_get("/healthz", self._healthz, allow_head=False)
        self.app.router.add_get("/metrics", self._metrics_page, allow_head=False)
        self.app.router.add_get("/status", self._status_page, allow_head=False)

    def use_token(self, token: str | None) -> None:
        """The token every request must carry from now on (None: none needed); a reload may
        rotate it."""
        self._expected = None if token is None else f"Bearer {token}".encode()

    async def start(self) -> str:
        """Serve on listen.host:listen.port (0: any free port); the base URL of the first
        address bound (`urls` has them all)."""
        # No access log: the site's connections (listener.py) are built without one, as it would
        # write request headers (User-Agent, Referer, Authorization).
        self._runner = web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await CappedSite(self._runner, self._listen, max_connections=MAX_CONNECTIONS).start()
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """Each address bound, as bound: 0.0.0.0 is every address, never named 127.0.0.1."""
        return [_base_url(*address[:2]) for address in self._runner.addresses]

    @property
    def exposed(self) -> list[str]:
        """The URLs of the addresses bound that are not loopback: other hosts may reach them.
        Judged on what was bound, so a host name counts by the addresses it resolved to."""
        return [
            _base_url(host, port)
            for host, port, *_ in self._runner.addresses
            if not ipaddress.ip_address(host).is_loopback
        ]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authorized(self, request: web.Request, handler) -> web.StreamResponse:
        if self._expected is not None and not _bearer_matches(request, self._expected):
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    async def _healthz(self, _request: web.Request) -> web.Response:
        reason = self._unhealthy()
        if reason is None:
            return web.json_response({"status": "running"})
        status = "draining" if reason == "draining" else "stalled"
        return web.json_response({"status": status, "reason": reason}, status=503)

    async def _metrics_page(self, _request: web.Request) -> web.Response:
        try:
            report = await self._status()
            # Queue gauges are read at scrape time, so they are never older than the scrape.
            self._metrics.set_queues(report["agents"])
        except Exception:
            return _unavailable()
        body, content_type = self._metrics.render()
        # Set as a header: aiohttp refuses a charset inside content_type=.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _status_page(self, _request: web.Request) -> web.Response:
        try:
            report = await self._status()
        except Exception:
            return _unavailable()
        return web.json_response(report)


def _unavailable() -> web.Response:
    """503 for a status report that failed: the traceback goes to the log, never to the client."""
    log.exception("admin: status report failed")
    return web.json_response({"error": "status unavailable"}, status=503)


def _bearer_matches(request: web.Request, expected: bytes) -> bool:
    """Whether the request's Authorization is `Bearer TOKEN` with the token expected, compared
    in constant time (the scheme's case, as RFC 7235 has it, aside)."""
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    normalised = f"Bearer {credentials}" if scheme.lower() == "bearer" else given
    return hmac.compare_digest(normalised.encode("utf-8", "surrogateescape"), expected)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
