"""The admin listener: /healthz, /metrics (Prometheus) and /status (JSON), GET only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from dialerd.config import Listen
from dialerd.listener import CappedSite
from dialerd.logs import log
from dialerd.metrics import Metrics

# Requests in flight at stop() only wait on a status report, so a short grace is enough.
SHUTDOWN_TIMEOUT_S = 1.0
# A listener bound to every address is reached, from this host, through loopback.
LOOPBACK_OF_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}
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
        healthy: Callable[[], bool],
    ) -> None:
        self._listen = listen
        self._metrics = metrics
        self._status = status
        self._healthy = healthy
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[_not_found_for_other_methods])
        self.app.router.add_get("/healthz", self._healthz, allow_head=False)
        self.app.router.add_get("/metrics", self._metrics_page, allow_head=False)
        self.app.router.add_get("/status", self._status_page, allow_head=False)

    async def start(self) -> str:
        """Serve on listen.host:listen.port (0: any free port) and return the base URL."""
        # access_log=None: aiohttp's access log would write request headers (User-Agent, Referer).
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await CappedSite(self._runner, self._listen, max_connections=MAX_CONNECTIONS).start()
        return _base_url(*self._runner.addresses[0][:2])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        if self._healthy():
            return web.json_response({"status": "running"})
        return web.json_response({"status": "draining"}, status=503)

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


def _base_url(host: str, port: int) -> str:
    host = LOOPBACK_OF_WILDCARD.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
