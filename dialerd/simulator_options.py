"""The simulator's command-line options, shared by `dialerd simulate` and `run --simulate`:
its agents, latency and faults, each parsed and checked by argparse (usage errors, exit 64)."""

from __future__ import annotations

import argparse

from .config import CALLBACK_STATUSES


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any)")
    parser.add_argument(
        "--agent",
        type=_agent_rate,
        action="append",
        default=[],
        metavar="ID=RATE",
        help="an agent and its approved calls per second (repeatable)",
    )
    parser.add_argument(
        "--default-rate",
        type=_positive_int,
        metavar="N",
        help="accept unknown agents at this rate (default: refuse them)",
    )
    add_fault_arguments(parser, latency="0")
    parser.add_argument("--seed", type=int, help="seed for the fault and latency draws")
    parser.add_argument("--log", metavar="FILE", help="append every arrival to FILE as a JSON line")


def add_fault_arguments(parser: argparse.ArgumentParser, latency: str) -> None:
    """The simulated latency and faults; shared by `simulate` and `run --simulate`."""
    parser.add_argument(
        "--latency",
        type=_latency_range,
        default=_latency_range(latency),
        metavar="MIN-MAX",
        help=f"answer delay range in seconds (default {latency})",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="S",
        help="network jitter: each request arrives up to S seconds late, at random (default 0)",
    )
    parser.add_argument(
        "--error-rate", type=_probability, default=0.0, metavar="P", help="chance to answer 503"
    )
    parser.add_argument(
        "--reset-rate", type=_probability, default=0.0, metavar="P", help="chance to drop the line"
    )
    parser.add_argument(
        "--hang-rate", type=_probability, default=0.0, metavar="P", help="chance to never answer"
    )

    parser.add_argument(
        "--unreached",
        type=_status_chance,
        action="append",
        default=[],
        metavar="STATUS=P",
        help="chance of a callback with this status for a placed call with a status_url "
        f"(repeatable; STATUS one of {', '.join(CALLBACK_STATUSES)})",
    )
    parser.add_argument(
        "--refuse-key",
        type=_key_refusal,
        metavar="STATUS:SECONDS",
        help="refuse the key with 401 or 403 for the first SECONDS (default: never)",
    )
    parser.add_argument(
        "--only-key", metavar="KEY", help="refuse every other key with 401 (default: take any)"
    )
    parser.add_argument(
        "--refuse-agent",
        type=_agent_refusal,
        action="append",
        default=[],
        metavar="AGENT:FORM:SECONDS",
        help="refuse an agent for the first SECONDS, as FORM: 404, unknown, unpublished or "
        "phone (repeatable)",
    )
    parser.add_argument(
        "--callback-delay",
        type=_latency_range,
        default=(1.0, 3.0),
        metavar="MIN-MAX",
        help="delay of those callbacks in seconds (default 1-3)",
    )


def faults_from(args: argparse.Namespace):
    """The simulator's faults from its options (imported here: aiohttp is slow to import)."""
    from .simulator import Faults

    return Faults(
        error_5xx=args.error_rate,
        reset=args.reset_rate,
        hang=args.hang_rate,
        latency=args.latency,
        jitter=args.jitter,
        unreached=tuple(args.unreached),
        callback_delay=args.callback_delay,
        refuse_key=args.refuse_key,
        refuse_agents=tuple(args.refuse_agent),
        only_key=args.only_key,
    )


def _key_refusal(text: str) -> tuple[int, float]:
    status, separator, seconds = text.partition(":")
    if not separator or status not in ("401", "403"):
        raise argparse.ArgumentTypeError(f"expected 401:SECONDS or 403:SECONDS, got {text!r}")
    return int(status), _seconds(seconds)


def _agent_refusal(text: str) -> tuple[str, str, float]:
    from .simulator import AGENT_REFUSALS

    agent, form, seconds = (text.split(":") + ["", ""])[:3]
    if not agent or form not in AGENT_REFUSALS or text.count(":") != 2:
        raise argparse.ArgumentTypeError(
            f"expected AGENT:FORM:SECONDS with FORM one of {', '.join(AGENT_REFUSALS)}, "
            f"got {text!r}"
        )
    return agent, form, _seconds(seconds)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}")
    return value


def _status_chance(text: str) -> tuple[str, float]:
    status, separator, chance = text.partition("=")
    if not separator or status not in CALLBACK_STATUSES:
        raise argparse.ArgumentTypeError(
            f"expected STATUS=P with STATUS one of {', '.join(CALLBACK_STATUSES)}, got {text!r}"
        )
    return status, _probability(chance)


def _agent_rate(text: str) -> tuple[str, int]:
    agent_id, separator, rate = text.rpartition("=")
    if not separator or not agent_id:
        raise argparse.ArgumentTypeError(f"expected ID=RATE, got {text!r}")
    return agent_id, _positive_int(rate)


def _positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def _latency_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        latency = (float(low), float(high or low))
        if not 0.0 <= latency[0] <= latency[1]:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN-MAX seconds with 0 <= MIN <= MAX, got {text!r}"
        ) from None
    return latency
