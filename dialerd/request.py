"""A request: one JSON object, validated per the contract into what the API is sent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from .config import Config, zone_name
from .numbers import NotANumber, normalise

MAX_LINE_BYTES = 64 * 1024
FIELDS = frozenset(
    {
        "to",
        "agent_id",
        "from",
        "id",
        "session_parameters",
        "hangup_on_answer_machine",
        "not_before",
        "expires_at",
        "meta",
        "campaign",
        "priority",
        "timezone",
    }
)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CAMPAIGN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CONTENT_ID_PREFIX = "c-"  # an id made from a request's content (see content_id)
CONTENT_ID_DIGEST_BYTES = 12
# Ids that start so are made from content only: one given could take a content's id from it.
CONTENT_ID = re.compile(rf"{CONTENT_ID_PREFIX}[0-9a-f]{{{2 * CONTENT_ID_DIGEST_BYTES}}}")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class InvalidRequest(ValueError):
    """The request cannot be sent; the message says what is wrong and in which field."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        # What could be read of the request, so its `invalid` result still says id, to and meta.
        self.partial = partial or {}


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    to: str
    agent_id: str
    sender: str | None  # the `from` number, sent instead of agent_id when the request used it
    session_parameters: tuple[tuple[str, Any], ...]
    hangup_on_answer_machine: bool | None
    not_before: float | None  # epoch seconds
    expires_at: float | None
    meta: Any
    source: str
    campaign: str | None = None
    priority: int = 0  # 0-9: among an agent's due requests, higher first
    timezone: str | None = None  # the callee's zone for calling_hours, given by the submitter
    id_from_content: bool = False  # no `id` given: `id` is content_id(), deduplicated in a window

    def __post_init__(self) -> None:
        if self.id_from_content and not self.id:  # made here, once: replace() costs a third
            object.__setattr__(self, "id", content_id(self))  # of building a request

    def api_body(self) -> dict[str, Any]:
        """The make-call body, without status_url (that belongs to each attempt)."""
        body: dict[str, Any] = {"to": self.to}
        if self.sender:
            body["from"] = self.sender
        else:
            body["agent_id"] = self.agent_id
        if self.session_parameters:
            body["session_parameters"] = [
                {"name": name, "value": value} for name, value in self.session_parameters
            ]
        if self.hangup_on_answer_machine is not None:
            body["hangup_on_answer_machine"] = self.hangup_on_answer_machine
        return body


def callback_matches(
    body: dict[str, Any], to: str, agent_id: str, conversation_uuid: str | None
) -> bool:
    """Whether a callback body is about the attempt its status_url was made for: the callee and
    agent recorded for it (`to` compared as requests are normalised), and the conversation_uuid
    of the API's answer, when the answer is recorded and gave one. A genuine token with another
    call's body must not redial or end this one."""
    try:
        # The API's own digits, so no default_country: that could read them as a national number.
        same_callee = normalise(body["to"]) == to
    except NotANumber:
        same_callee = False
    return (
        same_callee
        and body["agent_id"] == agent_id
        and (conversation_uuid is None or body["conversation_uuid"] == conversation_uuid)
    )


def _session_parameters(raw: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = []
        for item in raw:
            if not isinstance(item, dict) or set(item) != {"name", "value"}:
                raise ValueError('a list must hold only {"name": ..., "value": ...} objects')
            pairs.append((item["name"], item["value"]))
    else:
        raise ValueError('must be {"NAME": "value", ...} or a list of {"name", "value"}')
    for name, value in pairs:
        if not isinstance(name, str) or not name:
            raise ValueError(f"parameter names must be non-empty strings, not {name!r}")
        if isinstance(value, dict | list) or value is None:
            raise ValueError(f"{name}: a value must be a string, number or boolean")
    return tuple(pairs)


def parse_moment(raw: Any) -> float:
    """An ISO 8601 time with a UTC offset, as epoch seconds; ValueError says what is wrong."""
    if not isinstance(raw, str):
        raise ValueError(f"must be an ISO 8601 time with a UTC offset, not {raw!r}")
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{raw!r} has no UTC offset (add Z or +HH:MM)")
    try:
        moment.astimezone(dt.UTC)
        timestamp = moment.timestamp()
        # As epoch seconds it must still be a moment: 9999-12-31T23:59:59.999999Z rounds to
        # the year 10000, which exact_moment() could not write.
        dt.datetime.fromtimestamp(timestamp, dt.UTC)
    except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00:00+14:00 is in the year 0 in UTC
        raise ValueError(f"{raw!r} is out of range (years 1 to 9999 in UTC)") from None
    return timestamp


def _agent(fields: dict, config: Config) -> tuple[str, str | None]:
    """The agent that calls, and the `from` number when the request named the agent by it."""
    if "agent_id" in fields and "from" in fields:
        raise InvalidRequest("agent_id, from: give one of them, not both")
    if "from" in fields:
        try:
            number = normalise(fields["from"], config.default_country)
        except NotANumber as error:
            raise InvalidRequest(f"from: {error}") from None
        agent = config.agent_by_number(number)
        if agent is None:
            raise InvalidRequest(f"from: {number} is not the number of any configured agent")
        return agent.id, number
    agent_id = fields.get("agent_id", config.default_agent)
    if agent_id is None:
        raise InvalidRequest("agent_id: required, since the config has no default_agent")
    if not isinstance(agent_id, str) or agent_id not in config.agents:
        raise InvalidRequest(f"agent_id: {agent_id!r} is not an agent in the config")
    return agent_id, None


def _optional(fields: dict, name: str, convert) -> Any:
    if name not in fields:
        return None
    try:
        return convert(fields[name])
    except ValueError as error:
        raise InvalidRequest(f"{name}: {error}") from None


def _request_id(raw: Any) -> str:
    if not isinstance(raw, str) or not REQUEST_ID.fullmatch(raw):
        raise InvalidRequest(f"id: {raw!r} is not 1-128 of A-Za-z0-9._:-")
    if CONTENT_ID.match(raw):
        raise InvalidRequest(
            f"id: {raw!r} starts as an id made from a request's content does: give another, or none"
        )
    return raw


def _campaign(raw: Any) -> str:
    if not isinstance(raw, str) or not CAMPAIGN.fullmatch(raw):
        raise ValueError(f"{raw!r} is not 1-64 of A-Za-z0-9._:-")
    return raw


def _priority(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 9:
        raise ValueError(f"must be a whole number from 0 to 9, not {raw!r}")
    return raw


def content_id(request: Request) -> str:
    """The id of a request given none: made from what decides the call (the callee, the agent,
    what the agent is told, when, and the campaign), so the same request fed again has the same
    id, whatever its source, meta or expiry."""
    content = [
        request.to,
        request.agent_id,
        sorted(request.session_parameters, key=itemgetter(0)),
        request.hangup_on_answer_machine,
        None if request.not_before is None else exact_moment(request.not_before),
        request.campaign,
    ]
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(canonical.encode(), digest_size=CONTENT_ID_DIGEST_BYTES)
    return CONTENT_ID_PREFIX + digest.hexdigest()


def with_campaign(request: Request, campaign: str) -> Request:
    """The request with its campaign set (`submit --campaign`), its id made again when it was
    made from the content."""
    made_again = {"id": ""} if request.id_from_content else {}
    return dataclasses.replace(request, campaign=_campaign(campaign), **made_again)


def exact_moment(moment: float) -> str:
    """Epoch seconds as ISO 8601 in UTC, to the microsecond: what a spool line of `submit` says,
    and what reading it back gives again."""
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat().replace("+00:00", "Z")


def _boolean(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"must be true or false, not {raw!r}")
    return raw


def _object(raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object")
    return raw


def build_request(fields: Any, config: Config, source: str) -> Request:
    """Validate one decoded JSON value as a request; InvalidRequest says what is wrong."""
    if not isinstance(fields, dict):
        raise InvalidRequest(f"a request is a JSON object, not {type(fields).__name__}")
    partial = {k: fields[k] for k in ("id", "to", "agent_id", "meta") if k in fields}
    try:
        unknown = sorted(set(fields) - FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field {', '.join(map(repr, unknown))}")
        if "to" not in fields:
            raise InvalidRequest("to: required")
        to = _optional(fields, "to", lambda raw: normalise(raw, config.default_country))
        agent_id, sender = _agent(fields, config)
        partial["agent_id"] = agent_id
        not_before = _optional(fields, "not_before", parse_moment)
        expires_at = _optional(fields, "expires_at", parse_moment)
        if not_before is not None and expires_at is not None and expires_at <= not_before:
            raise InvalidRequest("expires_at: is not after not_before")
        return Request(
            id=_request_id(fields["id"]) if "id" in fields else "",
            to=to,
            agent_id=agent_id,
            sender=sender,
            session_parameters=_optional(fields, "session_parameters", _session_parameters) or (),
            hangup_on_answer_machine=_optional(fields, "hangup_on_answer_machine", _boolean),
            not_before=not_before,
            expires_at=expires_at,
            meta=_optional(fields, "meta", _object),
            source=source,
            campaign=_optional(fields, "campaign", _campaign),
            priority=_optional(fields, "priority", _priority) or 0,
            timezone=_optional(fields, "timezone", zone_name),
            id_from_content="id" not in fields,
        )
    except InvalidRequest as error:
        raise InvalidRequest(str(error), partial) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def loads(text: str) -> Any:
    """Strict JSON: no NaN or Infinity, no lone surrogate escapes; ValueError says why."""
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if SURROGATE_ESCAPE.search(text):  # rare: see that each one is half of a pair
        check_surrogates(value)
    return value


def check_surrogates(value: Any) -> None:
    """ValueError if a string of a parsed JSON value holds half a surrogate pair."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a \\u escape holds half a surrogate pair, not a character") from None


def utf8_text(data: bytes) -> str:
    """Input bytes as text; ValueError when they are not UTF-8 or hold a NUL byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 (byte {error.start + 1})") from None
    if "\x00" in text:
        raise ValueError("holds a NUL byte")
    return text


def decode_line(line: bytes) -> Any:
    """One line of input as JSON; InvalidRequest when it is too long, not UTF-8 or not JSON."""
    if len(line) > MAX_LINE_BYTES:
        raise InvalidRequest(f"line longer than {MAX_LINE_BYTES // 1024} KiB")
    try:
        text = utf8_text(line)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    try:
        return loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"not JSON: {error.msg} at column {error.colno}") from None
    except ValueError as error:  # NaN, 1e999, a lone surrogate, an integer of 4300+ digits
        raise InvalidRequest(f"not JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("not JSON: nested too deeply") from None
