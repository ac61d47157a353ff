"""A stand-in for the Vonage AI Studio make-call API, for trials, demos and tests.

It answers ``POST /{region}/telephony/make-call`` the way SPEC section 1 describes the real API:
it checks the key and the body, refuses unknown agents for good, enforces each agent's approved
rate over a strict sliding 1 s window (429, no call placed), and can inject the faults a client
must survive: 503s, connections dropped after the call was placed, requests that never get an
answer, and slow answers. Every request is recorded as an ``Arrival`` so that tests can check
what the API would have seen.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import aiohttp
from aiohttp import web

WINDOW_S = 1.0
# Long enough for a quick stop, short enough never to hold a test run.
SHUTDOWN_TIMEOUT_S = 0.5
ALLOWED_FIELDS = frozenset(
    {"agent_id", "from", "to", "status_url", "hangup_on_answer_machine", "session_parameters"}
)
CALLBACK_STATUSES = ("cancelled", "rejected", "busy", "timeout", "failed")
DIGITS = re.compile(r"[0-9]+")
SIP_ADDRESS = re.compile(r"sip:[^@\s]+@[^@\s]+")


@dataclass(frozen=True)
class Faults:
    """Probabilities (summing to at most 1) of each fault, drawn per admitted request."""

    error_5xx: float = 0.0  # answer 503; no call placed
    reset: float = 0.0  # drop the connection without an answer; the call IS placed
    hang: float = 0.0  # never answer; the call IS placed
    latency: tuple[float, float] = (0.0, 0.0)  # uniform delay of every answer, in seconds
    jitter: float = 0.0  # network jitter: a uniform delay, up to this, before a request "arrives"
    # For placed calls that carry a status_url: (status, probability) of a callback saying the
    # callee was not reached, as the real API sends; and its delay after the answer.
    unreached: tuple[tuple[str, float], ...] = ()
    callback_delay: tuple[float, float] = (0.0, 0.0)
    # Refusals that concern no request, for the first SECONDS after the simulator starts: the
    # key's (STATUS, 401 or 403), and agents' (AGENT, FORM, SECONDS), FORM one of AGENT_REFUSALS.
    refuse_key: tuple[int, float] | None = None
    refuse_agents: tuple[tuple[str, str, float], ...] = ()
    only_key: str | None = None  # every other key is refused with 401

    def __post_init__(self) -> None:
        probabilities = (self.error_5xx, self.reset, self.hang)
        if any(not 0.0 <= p <= 1.0 for p in probabilities) or sum(probabilities) > 1.0:
            raise ValueError("fault probabilities must each be in [0, 1] and sum to at most 1")
        if not self.jitter >= 0.0:  # NaN too
            raise ValueError("jitter must be 0 or more seconds")
        for low, high in (self.latency, self.callback_delay):
            if not 0.0 <= low <= high:
                raise ValueError("a delay must be a range MIN-MAX with 0 <= MIN <= MAX")
        chances = [p for _status, p in self.unreached]
        if any(not 0.0 <= p <= 1.0 for p in chances) or sum(chances) > 1.0:
            raise ValueError("callback probabilities must each be in [0, 1] and sum to at most 1")
        unknown = {status for status, _p in self.unreached} - set(CALLBACK_STATUSES)
        if unknown:
            raise ValueError(f"unknown callback status {', '.join(sorted(unknown))}")
        if self.refuse_key is not None and self.refuse_key[0] not in (401, 403):
            raise ValueError("a key is refused with 401 or 403")
        forms = {form for _agent, form, _s in self.refuse_agents} - set(AGENT_REFUSALS)
        if forms:
            raise ValueError(f"an agent is refused as one of {', '.join(AGENT_REFUSALS)}")


# How the API refuses an agent it does not know, or not yet (SPEC §1): a status and a message.
AGENT_REFUSALS = {
    "404": (404, "Not Found"),
    "unknown": (400, "ID {agent} is not an ID to any agent or published version"),
    "unpublished": (400, "published version for Agent {agent} was not found"),
    "phone": (400, "Phone {sender} is not attached to any agent or published version"),
}


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request as the API saw it."""

    agent_id: str | None  # the agent it was counted for (`from` resolved through `numbers`)
    sender: str | None  # the `from` field, if given
    to: str  # "" when the body had no string `to`
    region: str
    at: float  # time.monotonic() when the request was judged
    wall: float  # time.time() at the same moment
    http_status: int  # 0 when the connection was dropped or held instead of answered
    placed: bool
    conversation_uuid: str | None
    body: dict


ARRIVAL_FIELDS = tuple(field.name for field in dataclasses.fields(Arrival))


class _Action(enum.Enum):
    ANSWER = "answer"
    RESET = "reset"
    HANG = "hang"


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    payload: dict | None = None
    action: _Action = _Action.ANSWER

    @property
    def placed(self) -> bool:
        return self.action is not _Action.ANSWER or 200 <= self.status < 300


_RESET = _Reply(0, action=_Action.RESET)
_HANG = _Reply(0, action=_Action.HANG)


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, {"error": message})


_TOO_MANY = _error(429, "Too Many Requests")


class Simulator:
    def __init__(
        self,
        agents: Mapping[str, int] | None = None,
        *,
        numbers: Mapping[str, str] | None = None,
        default_rate: int | None = None,
        faults: Faults = Faults(),  # noqa: B008 - frozen, so sharing the default is safe
        seed: int | None = None,
        log_path: str | os.PathLike | None = None,
        keep_arrivals: bool = True,
    ) -> None:
        self._default_rate = default_rate
        self.set_agents(agents or {}, numbers or {})
        self.faults = faults
        self._started = time.monotonic()  # the refusals for a time count from here
        self._rng = random.Random(seed)
        # Kept open until stop(): one line is appended per arrival.
        self._log: IO[str] | None = (
            None if log_path is None else open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        )
        # Per agent, the times of its placed calls still inside the window, oldest first.
        self._recent_calls: defaultdict[str, deque[float]] = defaultdict(deque)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url = ""
        # In memory for callers in the same process that read them (tests); a long-running one
        # (its own server, or the daemon's --simulate) has only its log, or it would grow
        # without end, and so would the garbage collector's pauses.
        self._keep_arrivals = keep_arrivals
        self.arrivals: list[Arrival] = []
        self.callbacks_sent: list[dict] = []  # each callback body, with "http_status" of its POST
        self._callback_tasks: set[asyncio.Task] = set()
        self._http: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{region}/telephony/make-call", self._make_call)

    def set_agents(self, agents: Mapping[str, int], numbers: Mapping[str, str]) -> None:
        """The agents it knows, their rates and published numbers (again, after a reload)."""
        given_rates = [
            *agents.values(),
            *([] if self._default_rate is None else [self._default_rate]),
        ]
        for rate in given_rates:
            if not isinstance(rate, int) or rate < 1:
                raise ValueError(f"an agent's rate must be a positive integer, not {rate!r}")
        self._rates = dict(agents)
        self._agent_of_number = dict(numbers)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: any free port) and return the base URL."""
        self._runner = web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self._stopping.clear()
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        self._base_url = f"http://{bound_host}:{bound_port}"
        return self._base_url

    async def stop(self) -> None:
        # Release the hanging requests first, or shutdown would wait for them.
        self._stopping.set()
        for task in self._callback_tasks:
            task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def endpoint(self, region: str) -> str:
        return f"{self._base_url}/{region}/telephony/make-call"

    def placed(self) -> list[Arrival]:
        return [arrival for arrival in self.arrivals if arrival.placed]

    def count_429(self) -> int:
        return sum(1 for arrival in self.arrivals if arrival.http_status == 429)

    async def _make_call(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            raise web.HTTPNotFound()
        body = await _read_json_object(request)
        if self.faults.jitter:
            await asyncio.sleep(self._rng.uniform(0.0, self.faults.jitter))
        # From here to _deliver nothing awaits, so judging and counting a request is atomic
        # and the recorded times are in arrival order.
        at, wall = time.monotonic(), time.time()
        agent_id = self._agent_of(body or {})
        reply = self._refusal(request, body, agent_id) or self._admit(agent_id, at)
        self._record(request, body or {}, agent_id, at, wall, reply)
        return await self._deliver(request, reply, body or {})

    def _agent_of(self, body: dict) -> str | None:
        """The agent a request is counted for: `from` wins when it is an agent's number."""
        sender, agent_id = body.get("from"), body.get("agent_id")
        if isinstance(sender, str) and sender in self._agent_of_number:
            return self._agent_of_number[sender]
        if isinstance(agent_id, str):
            return agent_id
        return sender if isinstance(sender, str) else None

    def _refusal(
        self, request: web.Request, body: dict | None, agent_id: str | None
    ) -> _Reply | None:
        if not request.headers.get("X-Vgai-Key", "").strip():
            return _error(401, "missing or empty X-Vgai-Key header")
        if request.content_type != "application/json":
            return _error(400, "Content-Type must be application/json")
        if body is None:
            return _error(400, "the body must be a JSON object")
        problem = _body_problem(body)
        if problem:
            return _error(400, problem)
        refused = self._refused_whatever_the_request(request, body, agent_id)
        if refused is not None:
            return refused
        if agent_id not in self._rates and self._default_rate is None:
            return _error(400, f"ID {agent_id} is not an ID to any agent or published version")
        return None

    def _refused_whatever_the_request(
        self, request: web.Request, body: dict, agent_id: str | None
    ) -> _Reply | None:
        """The key's and the agents' refusals the faults ask for."""
        only_key = self.faults.only_key
        if only_key is not None and request.headers.get("X-Vgai-Key") != only_key:
            return _error(401, "Invalid API key")
        since = time.monotonic() - self._started
        if self.faults.refuse_key is not None and since < self.faults.refuse_key[1]:
            return _error(self.faults.refuse_key[0], "Invalid API key")
        for agent, form, seconds in self.faults.refuse_agents:
            if agent == agent_id and since < seconds:
                status, message = AGENT_REFUSALS[form]
                return _error(status, message.format(agent=agent, sender=body.get("from")))
        return None

    def _admit(self, agent_id: str, at: float) -> _Reply:
        """Apply the agent's rate, then draw a fault; count the call if one is placed."""
        recent = self._recent_calls[agent_id]
        while recent and recent[0] <= at - WINDOW_S:
            recent.popleft()
        if len(recent) >= self._rates.get(agent_id, self._default_rate):
            return _TOO_MANY
        reply = self._draw_fault()
        if reply.placed:
            recent.append(at)
        return reply

    def _draw_fault(self) -> _Reply:
        draw = self._rng.random()
        for probability, reply in (
            (self.faults.error_5xx, _error(503, "Service Unavailable")),
            (self.faults.reset, _RESET),
            (self.faults.hang, _HANG),
        ):
            if draw < probability:
                return reply
            draw -= probability
        return _Reply(200, {"conversation_uuid": f"CON-{uuid.uuid4()}", "status": "started"})

    def _record(
        self,
        request: web.Request,
        body: dict,
        agent_id: str | None,
        at: float,
        wall: float,
        reply: _Reply,
    ) -> None:
        to, sender = body.get("to"), body.get("from")
        arrival = Arrival(
            agent_id=agent_id,
            sender=sender if isinstance(sender, str) else None,
            to=to if isinstance(to, str) else "",
            region=request.match_info["region"],
            at=at,
            wall=wall,
            http_status=reply.status,
            placed=reply.placed,
            conversation_uuid=(reply.payload or {}).get("conversation_uuid"),
            body=body,
        )
        if self._keep_arrivals:
            self.arrivals.append(arrival)
        if self._log is not None:
            # Flushed per line: another process may be reading the log while we run.
            # Field by field: asdict() deep-copies the body, which json.dumps reads as it is.
            line = {name: getattr(arrival, name) for name in ARRIVAL_FIELDS}
            self._log.write(json.dumps(line) + "\n")
            self._log.flush()

    async def _deliver(self, request: web.Request, reply: _Reply, body: dict) -> web.StreamResponse:
        if reply.action is _Action.HANG:
            await self._stopping.wait()
            return _drop_connection(request)
        await asyncio.sleep(self._rng.uniform(*self.faults.latency))
        if reply.action is _Action.RESET:
            return _drop_connection(request)
        headers = {"Retry-After": "1"} if reply.status == 429 else None
        response = web.json_response(reply.payload, status=reply.status, headers=headers)
        if reply.status == 200 and isinstance(body.get("status_url"), str):
            self._maybe_call_back(body, reply.payload["conversation_uuid"])
        return response

    def _maybe_call_back(self, body: dict, conversation_uuid: str) -> None:
        """Draw whether the callee goes unreached; if so, POST the callback after its delay."""
        draw = self._rng.random()
        for status, probability in self.faults.unreached:
            if draw < probability:
                delay = self._rng.uniform(*self.faults.callback_delay)
                payload = {
                    "agent_id": self._agent_of(body),  # a call made `from` is its agent's
                    "to": body["to"],
                    "conversation_uuid": conversation_uuid,
                    "status": status,
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                task = asyncio.create_task(self._call_back(body["status_url"], payload, delay))
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)
                return
            draw -= probability

    async def _call_back(self, url: str, payload: dict, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._http.post(url, json=payload) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0  # the listener was down: the real API does not retry either
        self.callbacks_sent.append({**payload, "http_status": status})


async def _read_json_object(request: web.Request) -> dict | None:
    """The body as a JSON object, or None when it is anything else."""
    try:
        body = json.loads(await request.read())
    except ValueError:  # covers both bad JSON and bytes that are not text
        return None
    return body if isinstance(body, dict) else None


def _body_problem(body: dict) -> str | None:
    """What is wrong with a make-call body, or None when it is well-formed."""
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
        return f"unknown fields: {', '.join(unknown)}"
    to = body.get("to")
    if not isinstance(to, str) or not (DIGITS.fullmatch(to) or SIP_ADDRESS.fullmatch(to)):
        return "to must be digits only with the country code (no +), or a sip: address"
    if body.get("agent_id") is None and body.get("from") is None:
        return "agent_id or from is required"
    for name in ("agent_id", "from", "status_url"):
        if name in body and not (isinstance(body[name], str) and body[name]):
            return f"{name} must be a non-empty string"
    if not isinstance(body.get("hangup_on_answer_machine", False), bool):
        return "hangup_on_answer_machine must be a boolean"
    if not _is_parameter_list(body.get("session_parameters", [])):
        return 'session_parameters must be a list of {"name": ..., "value": ...} objects'
    return None


def _is_parameter_list(parameters: object) -> bool:
    return isinstance(parameters, list) and all(
        isinstance(item, dict) and set(item) == {"name", "value"} and isinstance(item["name"], str)
        for item in parameters
    )


def _drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection with no answer, as a crashed or cut-off server would."""
    if request.transport is not None:
        request.transport.abort()
    # aiohttp needs a response to return; writing it fails on the closed transport, which
    # aiohttp takes for a client gone away. 444 is nginx's "closed without a response", so the
    # access log says what happened.
    return web.Response(status=444)


def window_violations(times: Sequence[float], rate: int, window: float = WINDOW_S) -> int:
    """How many arrivals found `rate` or more earlier arrivals in the preceding `window` seconds
    (i.e. would be over the limit). An arrival exactly `window` earlier no longer counts."""
    if window <= 0:
        raise ValueError("window must be positive")
    ordered = sorted(times)
    oldest_in_window = 0
    violations = 0
    for index, at in enumerate(ordered):
        while ordered[oldest_in_window] <= at - window:
            oldest_in_window += 1
        if index - oldest_in_window >= rate:
            violations += 1
    return violations


async def serve(args: argparse.Namespace, faults: Faults) -> None:
    """Run the simulator until cancelled, SIGINT or SIGTERM (`dialerd simulate`)."""
    simulator = Simulator(
        dict(args.agent),
        default_rate=args.default_rate,
        faults=faults,
        seed=args.seed,
        log_path=args.log,
        keep_arrivals=False,
    )
    url = await simulator.start(args.host, args.port)
    print(f"simulator listening on {url}", file=sys.stderr, flush=True)
    try:
        await _until_signalled(signal.SIGINT, signal.SIGTERM)
    finally:
        await simulator.stop()


async def _until_signalled(*signals: signal.Signals) -> None:
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    for signum in signals:
        loop.add_signal_handler(signum, received.set)
    try:
        await received.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
