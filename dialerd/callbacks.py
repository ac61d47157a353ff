"""Callbacks: a status_url per send, and the listener the API POSTs to when a callee is unreached.

A status_url ends in a token: 16 random bytes and their HMAC-SHA256 under a secret generated once
and kept in the state_dir (mode 0600). The token says nothing about the request; a forged one is
refused by its HMAC before the ledger is asked, and the ledger maps a genuine one to its send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from .config import CALLBACK_STATUSES, Listen, RedialPolicy
from .ledger import Ledger
from .listener import CappedSite
from .logs import log
from .metrics import Metrics

MAX_BODY = 64 * 1024
NONCE_BYTES = 16
MAC_BYTES = 16
CALLBACK_FIELDS = ("agent_id", "to", "conversation_uuid", "status", "timestamp")


def load_secret(state_dir: Path) -> bytes:
    """The callback secret of this state_dir, created (0600) on first use."""
    path = state_dir / "callback.secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as file:
        file.write(secret)
        file.flush()
        os.fsync(file.fileno())
    return secret


class StatusUrls:
    """Makes a fresh status_url for each send and tells genuine tokens from forged ones."""

    def __init__(self, public_url: str, secret: bytes):
        self.prefix = urlsplit(public_url).path.rstrip("/") + "/callbacks/"
        self._base = public_url.rstrip("/") + "/callbacks/"
        self._secret = secret

    def new(self) -> tuple[str, str]:
        """A new (token, status_url)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        token = _encode(nonce + self._mac(nonce))
        return token, self._base + token

    def genuine(self, token: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            return False
        nonce, mac = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        return len(raw) == NONCE_BYTES + MAC_BYTES and hmac.compare_digest(mac, self._mac(nonce))

    def _mac(self, nonce: bytes) -> bytes:
        return hmac.new(self._secret, nonce, hashlib.sha256).digest()[:MAC_BYTES]


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def callback_problem(body: object) -> str | None:
    """What is wrong with a callback body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    missing = [name for name in CALLBACK_FIELDS if name not in body]
    if missing:
        return f"missing {', '.join(missing)}"
    if body["status"] not in CALLBACK_STATUSES:
        return f"status must be one of {', '.join(CALLBACK_STATUSES)}"
    return None


def report_mismatch(metrics: Metrics, status: str, agent_id: str | None) -> None:
    """Count and log a callback found not to be about its call (its token is never logged)."""
    metrics.callback(status, "mismatch")
    log.warning(
        "callback not about the call its status_url was made for: changes nothing",
        status=status,
        agent=agent_id,
    )


class CallbackListener:
    """The embedded listener for the API's callbacks; only genuine token paths are served."""

    def __init__(
        self,
        listen: Listen,
        urls: StatusUrls,
        ledger: Ledger,
        redial: Callable[[], Mapping[str, RedialPolicy]],
        on_applied: Callable[[str, str | None], None],
        metrics: Metrics,
        *,
        max_connections: int,
    ):
        self._listen = listen
        self._max_connections = max_connections
        self._urls = urls
        self._ledger = ledger
        self._redial = redial
        self._on_applied = on_applied
        self._metrics = metrics
        self._app = web.Application(client_max_size=MAX_BODY)
        self._app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        self._runner = web.AppRunner(self._app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = CappedSite(self._runner, self._listen, max_connections=self._max_connections)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.path.removeprefix(self._urls.prefix)
        if (
            request.method != "POST"
            or not request.path.startswith(self._urls.prefix)
            or not self._urls.genuine(token)
        ):
            return _answer(404, "not found")
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, f"a callback body is at most {MAX_BODY // 1024} KiB")
        except web.RequestPayloadError:  # a Content-Encoding the body is not in
            return _answer(400, "the body cannot be decoded")
        except ConnectionError:  # closed before the body was all in: too slow, or gone
            return _answer(400, "the body did not come")
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            return _answer(400, "the body is not JSON")
        problem = callback_problem(body)
        if problem:
            return _answer(400, problem)
        applied = await self._ledger.apply_callback(token, body, self._redial())
        if applied is None:
            return _answer(404, "not found")  # a genuine token no send of this ledger carried
        effect, agent_id = applied
        if effect == "mismatch":
            report_mismatch(self._metrics, body["status"], agent_id)
        else:
            self._metrics.callback(body["status"], effect)
            log.info("callback", status=body["status"], effect=effect, agent=agent_id)
        self._on_applied(effect, agent_id)
        return _answer(200, effect)


def _answer(status: int, text: str) -> web.Response:
    key = "result" if status == 200 else "error"
    return web.json_response({key: text}, status=status)
