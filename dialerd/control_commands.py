"""The command line's control of what is queued: `cancel`, `pause` and `resume` (SPEC §2)."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable

from .config import Config
from .exits import EX_CANTCREAT, EX_DATAERR, EX_OK, EX_USAGE, Failure
from .request import CAMPAIGN

Load = Callable[[argparse.Namespace], Config]


def add_control_commands(commands: argparse._SubParsersAction, load: Load) -> None:
    cancel = commands.add_parser("cancel", help="end what is queued, and not sent yet, `cancelled`")
    cancel.add_argument("-c", "--config")
    cancel.add_argument("ids", nargs="*", metavar="ID", help="ids of requests")
    _add_scope(cancel)
    cancel.add_argument("--dry-run", action="store_true", help="say what it would cancel")
    cancel.set_defaults(load=load)
    for name, does in (("pause", "hold back"), ("resume", "send again")):
        parser = commands.add_parser(name, help=f"{does} a campaign's or an agent's requests")
        parser.add_argument("-c", "--config")
        _add_scope(parser)
        parser.set_defaults(load=load)


def _add_scope(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", metavar="C", help="every request of this campaign")
    parser.add_argument("--agent", metavar="A", help="every request for this agent")


def _selection(args: argparse.Namespace, ids_allowed: bool):
    from .ledger.control import Selection

    given = [bool(getattr(args, "ids", None)), args.campaign is not None, args.agent is not None]
    if sum(given) != 1:
        what = "ids, --campaign C or --agent A" if ids_allowed else "--campaign C or --agent A"
        raise Failure(f"{args.command}: give one of {what}", EX_USAGE)
    if args.campaign is not None and not CAMPAIGN.fullmatch(args.campaign):
        message = f"{args.command}: --campaign {args.campaign!r}: expected 1-64 of A-Za-z0-9._:-"
        raise Failure(message, EX_USAGE)
    return Selection(tuple(getattr(args, "ids", ()) or ()), args.campaign, args.agent)


def _say_unknown_agent(selection, config: Config) -> None:
    """An agent the config does not have may be a typo, or one removed with requests left."""
    if selection.agent is not None and selection.agent not in config.agents:
        print(f"dialerd: note: agent {selection.agent!r} is not in the config", file=sys.stderr)


def cmd_cancel(args: argparse.Namespace) -> int:
    from .ledger.control import cancel

    selection = _selection(args, ids_allowed=True)
    config = args.load(args)
    _say_unknown_agent(selection, config)
    try:
        done = cancel(config.state_dir, selection, args.dry_run, config.cluster)
    except (OSError, sqlite3.Error) as error:
        raise Failure(f"cannot cancel: {error}", EX_CANTCREAT) from None
    if done.unknown:
        listed = ", ".join(map(repr, done.unknown[:10]))
        more = f" and {len(done.unknown) - 10} more" if len(done.unknown) > 10 else ""
        raise Failure(
            f"cancel: no request has the id {listed}{more}: nothing cancelled", EX_DATAERR
        )
    states = ", ".join(f"{count} {state}" for state, count in done.by_state.most_common())
    verb = "would cancel" if args.dry_run else "cancelled"
    print(f"{verb} {done.count} request(s) of {selection}" + (f": {states}" if states else ""))
    if done.in_flight:
        print(f"{done.in_flight} sent and not final yet: not recalled; no retry or redial follows")
    if done.final_already:
        print(f"{done.final_already} of the ids given are final already")
    return EX_OK


def cmd_pause(args: argparse.Namespace) -> int:
    return _pause_or_resume(args, pausing=True)


def cmd_resume(args: argparse.Namespace) -> int:
    return _pause_or_resume(args, pausing=False)


def _pause_or_resume(args: argparse.Namespace, pausing: bool) -> int:
    from .ledger.control import pause, resume

    selection = _selection(args, ids_allowed=False)
    config = args.load(args)
    _say_unknown_agent(selection, config)
    try:
        changed, queued = (pause if pausing else resume)(
            config.state_dir, selection, config.cluster
        )
    except (OSError, sqlite3.Error) as error:
        raise Failure(f"cannot {args.command}: {error}", EX_CANTCREAT) from None
    if pausing:
        said = "paused" if changed else "already paused"
        print(f"{selection}: {said}; {queued} queued request(s) wait until it is resumed")
    else:
        said = "resumed" if changed else "was not paused"
        print(f"{selection}: {said}; {queued} queued request(s)")
    return EX_OK


CONTROL_COMMANDS = {"cancel": cmd_cancel, "pause": cmd_pause, "resume": cmd_resume}
