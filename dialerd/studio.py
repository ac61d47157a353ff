"""The Studio client: one make-call POST, and what its answer means for the request."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import email.utils
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import clock
from .logs import log

RETRIED_STATUSES = frozenset({429, 502, 503, 504})
KEY_STATUSES = frozenset({401, 403})  # the key is refused: no agent can call (SPEC §1)
AGENT_STATUS = 404  # the agent is: it does not exist, or is not published (yet)
# What the API says of an agent it does not know, or not yet (Vonage asks to wait about five
# minutes after publishing), whatever the status it says it with.
AGENT_REFUSALS = re.compile(
    r"is not an ID to any agent or published version"
    r"|published version for Agent .* was not found"
    r"|is not attached to any agent or published version",
    re.IGNORECASE,
)
# An answer is read this far at most: the API's own are a few hundred bytes, and a proxy's error
# page or a runaway body must not fill the memory (or, kept, the ledger).
ANSWER_READ_MAX = 64 * 1024
ERROR_TEXT_KEPT = 500


class Verdict(enum.Enum):
    WITHHELD = "withheld"  # not sent: as its bytes were to leave, the caller said no more
    PLACED = "placed"  # 2xx: the API placed the call
    RETRY = "retry"  # refused before any call was placed: send again later
    FAILED = "failed"  # refused for good
    KEY_REFUSED = "key_refused"  # the key is refused: every lane waits, the request too
    AGENT_REFUSED = "agent_refused"  # the agent is refused: its lane waits, the request too
    IN_DOUBT = "in_doubt"  # written, but the answer was lost: never sent again


@dataclass(frozen=True, slots=True)
class SendResult:
    verdict: Verdict
    http_status: int | None = None
    conversation_uuid: str | None = None
    response: str | None = None  # the API's answer body, as text
    error: str | None = None
    retry_after: float | None = None  # seconds, from a 429's Retry-After


class _Sending:
    """The send in progress in a task: its `departed` future, whether it may still leave
    (asked as its first byte is to be written), and whether its bytes may have gone out (from
    then on, a failure counts as written: at most once)."""

    __slots__ = ("departed", "may_leave", "written")

    def __init__(self, departed: asyncio.Future, may_leave: Callable[[], bool] | None):
        self.departed = departed
        self.may_leave = may_leave
        self.written = False


class _Withheld(Exception):
    """The send was stopped before its first byte: what make_call() says is WITHHELD."""


_sending: contextvars.ContextVar[_Sending | None] = contextvars.ContextVar("sending", default=None)


class _TimedRequest(aiohttp.ClientRequest):
    """A request that stamps its send's `departed` future once its bytes are handed to the
    socket. aiohttp writes them from a task of its own, which runs a loop iteration or more
    after the request is ready (a busy loop or a garbage collection makes that tens of ms):
    neither send() returning nor the headers-sent trace signal is the moment the request left,
    and stamping early lets the agent's next send follow too closely.

    aiohttp's tracing could tell the headers-sent moment, but a session with any trace config
    pays for every one of its signals on every request."""

    async def write_bytes(
        self,
        writer: aiohttp.abc.AbstractStreamWriter,
        conn: aiohttp.connector.Connection,
        content_length: int | None = None,
    ) -> None:
        sending = _sending.get()
        if sending is not None and sending.may_leave is not None and not sending.may_leave():
            # The request line and headers wait in the writer's buffer for the body: nothing
            # has gone out, and the answer's read raises this at once.
            conn.protocol.set_exception(_Withheld())
            return
        transport = conn.transport
        # Counted as written before the write (a failure in it may follow bytes that went),
        # unless the connection is already closing and no byte can go; stamped after it (a
        # thread switch or a garbage collection may come in between, and the next send must
        # be spaced from no earlier than this one left).
        if sending is not None and transport is not None and not transport.is_closing():
            sending.written = True
        try:
            await super().write_bytes(writer, conn, content_length)
        finally:
            if sending is not None and sending.written:
                _stamp(sending.departed)


def _stamp(departed: asyncio.Future | None) -> None:
    if departed is not None and not departed.done():
        departed.set_result(departed.get_loop().time())


def session(
    timeout_s: float, connector: aiohttp.BaseConnector | None = None
) -> aiohttp.ClientSession:
    """The one session of the process; its pool has no cap, so it never limits the rate. Its
    request class tells each send's `departed` future when the request left."""
    if connector is None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
        )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        request_class=_TimedRequest,
        raise_for_status=False,
    )


class StudioClient:
    def __init__(self, http: aiohttp.ClientSession, key: str, endpoints: Mapping[str, str]):
        self._http = http
        self._client_fault: str | None = None  # the last fault of this client's own, logged
        self.configure(key, endpoints)

    def configure(self, key: str, endpoints: Mapping[str, str]) -> None:
        """The key and endpoints for the next sends (a reload may change both)."""
        self._key = key
        self._headers = {"X-Vgai-Key": key, "Content-Type": "application/json"}
        self._endpoints = endpoints

    async def make_call(
        self,
        region: str,
        body: dict[str, Any],
        departed: asyncio.Future,
        may_leave: Callable[[], bool] | None = None,
    ) -> SendResult:
        """POST one call; `departed` gets the loop time at which the request left. When
        `may_leave` says no as the request is about to leave, it does not (WITHHELD)."""
        sending = _Sending(departed, may_leave)
        current = _sending.set(sending)
        try:
            async with self._http.post(
                self._endpoints[region],
                data=json.dumps(body, separators=(",", ":")).encode(),
                headers=self._headers,
            ) as response:
                result = await _judge(response)
        except _Withheld:
            if sending.written:  # asked again for a redirect's new request: the first went
                return SendResult(Verdict.IN_DOUBT, error="withheld after a redirect")
            return SendResult(Verdict.WITHHELD, error="not sent: withheld as it was to leave")
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            result = _judge_failure(error, written=sending.written)
        except Exception as error:
            # Anything else is a fault on this side (aiohttp refusing a header value, say):
            # judged the same way, so that it never escapes the send's task and never leaves
            # the request `sending`.
            result = _redacted(_judge_failure(error, written=sending.written), self._key)
            self._note_client_fault(result.error)
            return result
        finally:
            _sending.reset(current)
        self._note_client_fault(None)
        return _redacted(result, self._key)

    def _note_client_fault(self, fault: str | None) -> None:
        """Log a fault of the client's own once as it starts or changes, and once as it clears:
        every send repeats it, and the lane's backoff already paces them."""
        if fault == self._client_fault:
            return
        if fault is not None:
            log.error("sends fail in the client, before the API has them", error=fault)
        else:
            log.warning("sends no longer fail in the client")
        self._client_fault = fault


def _redacted(result: SendResult, key: str) -> SendResult:
    """The result with any copy of the key the API echoed blanked out: it is never kept."""
    fields = {
        name: value.replace(key, "[redacted]")
        for name in ("conversation_uuid", "response", "error")
        if (value := getattr(result, name)) is not None and key in value
    }
    return dataclasses.replace(result, **fields) if fields else result


async def _judge(response: aiohttp.ClientResponse) -> SendResult:
    status = response.status
    try:
        text = await _read_answer(response)
    except (aiohttp.ClientError, TimeoutError) as error:
        if 200 <= status < 300:
            return SendResult(Verdict.PLACED, status, error=f"answer body lost: {_describe(error)}")
        text = ""
    if 200 <= status < 300:
        return SendResult(Verdict.PLACED, status, _conversation_uuid(text), text)
    message = _api_message(text) or response.reason or f"HTTP {status}"
    if status in KEY_STATUSES:
        return SendResult(Verdict.KEY_REFUSED, status, response=text, error=message)
    if status == AGENT_STATUS or AGENT_REFUSALS.search(text) or AGENT_REFUSALS.search(message):
        return SendResult(Verdict.AGENT_REFUSED, status, response=text, error=message)
    if status in RETRIED_STATUSES:
        retry_after = _retry_after(response.headers.get("Retry-After")) if status == 429 else None
        return SendResult(
            Verdict.RETRY, status, response=text, error=message, retry_after=retry_after
        )
    return SendResult(Verdict.FAILED, status, response=text, error=message)


async def _read_answer(response: aiohttp.ClientResponse) -> str:
    """The answer's body as text, its first ANSWER_READ_MAX bytes at most (the connection of a
    longer one is closed, not drained)."""
    body = bytearray()
    while len(body) < ANSWER_READ_MAX:
        chunk = await response.content.read(ANSWER_READ_MAX - len(body))
        if not chunk:
            break
        body += chunk
    if not response.content.at_eof():
        response.close()
    try:
        return body.decode(response.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def _judge_failure(error: BaseException, written: bool) -> SendResult:
    described = _describe(error)
    if written:
        # The API may have the request: at most once means it is never sent again.
        return SendResult(Verdict.IN_DOUBT, error=f"no answer after sending: {described}")
    return SendResult(Verdict.RETRY, error=f"not sent: {described}")


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}".rstrip(": ")


def _conversation_uuid(text: str) -> str | None:
    try:
        document = json.loads(text)
    except ValueError:
        return None
    value = document.get("conversation_uuid") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


def _api_message(text: str) -> str | None:
    """The error message of an API answer: a JSON field where there is one, else the text."""
    try:
        document = json.loads(text)
    except ValueError:
        return text.strip()[:ERROR_TEXT_KEPT] or None
    if isinstance(document, dict):
        for key in ("error", "message", "detail", "title"):
            if isinstance(document.get(key), str):
                return document[key][:ERROR_TEXT_KEPT]
    return text.strip()[:ERROR_TEXT_KEPT] or None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - clock.now())
