"""The command line: run, submit, check, status, report, requeue, simulate (sysexits codes)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_PATH,
    Config,
    ConfigError,
    load_config,
    read_admin_token,
    read_api_key,
)
from .control_commands import CONTROL_COMMANDS, add_control_commands
from .exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Failure,
)
from .simulator_options import add_fault_arguments, add_simulator_arguments, faults_from


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2; sysexits says 64
        self.print_usage(sys.stderr)
        command = self.prog.partition(" ")[2]  # "dialerd run" -> "run"; main() adds "dialerd: "
        raise Failure(f"{command}: {message}" if command else message, EX_USAGE)


def _config_path(args) -> str:
    return args.config or os.environ.get("DIALERD_CONFIG") or DEFAULT_PATH


def load(args) -> Config:
    """The config the command names (-c, $DIALERD_CONFIG, the default), or Failure (78)."""
    try:
        return load_config(_config_path(args))
    except ConfigError as error:
        raise Failure(_config_message(error), EX_CONFIG) from None


def _config_message(error: ConfigError) -> str:
    return _listed("bad config", error.problems)


def _listed(what: str, problems: list[str]) -> str:
    """One problem on the line that says what is wrong; more on lines of their own below it."""
    if len(problems) == 1:
        return f"{what}: {problems[0]}"
    return f"{what}:\n" + "\n".join(f"  {p}" for p in problems)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dialerd", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument(
        "-c", "--config", help=f"config file (default $DIALERD_CONFIG, {DEFAULT_PATH})"
    )
    run.add_argument(
        "--simulate",
        action="store_true",
        help="place calls on the built-in simulator of the API, not the real one",
    )
    add_fault_arguments(run, latency="0.1-0.5")

    submit = commands.add_parser("submit", help="validate requests and drop them into the spool")
    submit.add_argument("-c", "--config")
    submit.add_argument(
        "files",
        nargs="*",
        default=["-"],
        metavar="FILE",
        help="JSON lines, JSON object or array, or CSV with a header ('-': stdin)",
    )
    submit.add_argument(
        "--skip-invalid",
        action="store_true",
        help="submit the valid requests even when some are invalid",
    )
    submit.add_argument(
        "--csv", action="store_true", help="read every input as CSV with a header row"
    )
    submit.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=FIELD",
        help="send a CSV column's cells to FIELD: a request field, session_parameters.NAME, "
        "or - for nowhere (repeatable; implies --csv); other columns go by their names",
    )
    submit.add_argument(
        "--delimiter",
        metavar="D",
        help="CSV's delimiter: , ; | or tab (default: Excel's sep= first line, else the one "
        "that gives the header the most columns)",
    )
    submit.add_argument(
        "--encoding",
        metavar="NAME",
        help="of every input, any Python codec, e.g. cp1252 (default: UTF-8, with or without BOM)",
    )
    submit.add_argument("--campaign", metavar="C", help="the campaign of every request")
    submit.add_argument(
        "--ids-out",
        metavar="FILE",
        type=Path,
        help="write a CSV of file, row and id for each request submitted",
    )

    check = commands.add_parser("check", help="validate the config")
    check.add_argument("-c", "--config")

    status = commands.add_parser("status", help="queues, in flight and outcomes, from the ledger")
    status.add_argument("-c", "--config")
    status.add_argument("--json", action="store_true", help="as one JSON object")

    report = commands.add_parser(
        "report", help="final outcomes by agent, callback status and hour, from the ledger"
    )
    report.add_argument("-c", "--config")
    report.add_argument("--json", action="store_true", help="as one JSON object")
    report.add_argument("--campaign", metavar="C", help="only the outcomes of this campaign")
    report.add_argument(
        "--since", metavar="ISO", help="only outcomes at or after this time (with a UTC offset)"
    )
    report.add_argument(
        "--results",
        nargs="+",
        metavar="FILE",
        help="count these files of result lines ('-': stdin) instead of the ledger",
    )

    requeue = commands.add_parser(
        "requeue", help="send in_doubt requests again: the operator's deliberate resend"
    )
    requeue.add_argument("-c", "--config")
    requeue.add_argument("ids", nargs="*", metavar="ID", help="ids of in_doubt requests")
    requeue.add_argument("--in-doubt", action="store_true", help="every in_doubt request")

    add_control_commands(commands, load)

    simulate = commands.add_parser("simulate", help="run the API simulator as its own server")
    add_simulator_arguments(simulate)
    return parser


# Full collections stop the event loop for tens of ms under load, late for every lane's grid
# (and for the simulator's stamping of arrivals); both keep few long-lived objects and make many
# short-lived ones per request, so most of them free nothing. Python's defaults: (700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def cmd_run(args) -> int:
    from .daemon import Daemon
    from .ledger import LedgerLocked
    from .logs import log

    config = _load_runnable(args, needs_key=not args.simulate)
    faults = faults_from(args) if args.simulate else None
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        with asyncio.Runner(loop_factory=_fastest_loop()) as runner:
            runner.run(Daemon(config, simulate=faults).run())
    except LedgerLocked as error:
        raise Failure(str(error), EX_TEMPFAIL) from None
    except ConfigError as error:  # a key or token file changed since it was checked above
        raise Failure(_config_message(error), EX_CONFIG) from None
    except OSError as error:
        raise Failure(f"cannot run: {error}", EX_CANTCREAT) from None
    except ExceptionGroup as group:
        log.exception("a task of the daemon failed", exc_info=group)
        raise Failure(f"stopped by a fault: {_first_cause(group)}", EX_SOFTWARE) from None
    return EX_OK


def _fastest_loop():
    """uvloop's event loop when it is installed (less CPU per send), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def cmd_submit(args) -> int:
    from .submit import drop_into_spool, summary, write_ids

    options = _input_options(args)
    _refuse_overwriting_an_input(args.ids_out, args.files)
    config = load(args)
    if config.spool_dir is None:
        raise Failure("bad config: spool.dir: required to submit", EX_CONFIG)
    submissions = _submissions(args.files, config, options)
    for submission in submissions:
        for line in submission.report_lines():
            print(line, file=sys.stderr)
    header_faults = [fault for submission in submissions for fault in submission.header_faults]
    if header_faults:  # not bad rows: --skip-invalid cannot tell which cells are what
        raise Failure(_listed("bad CSV header, nothing submitted", header_faults), EX_DATAERR)
    rows = [row for submission in submissions for row in submission.rows]
    errors = [error for submission in submissions for error in submission.errors]
    if errors and not args.skip_invalid:
        raise Failure(
            f"{len(errors)} invalid request(s); nothing submitted "
            "(--skip-invalid submits the valid ones)",
            EX_DATAERR,
        )
    if not rows:
        raise Failure("no valid request to submit", EX_DATAERR)
    foreseen = _foreseen(config, [row.request for row in rows])
    if args.ids_out is not None:  # before the drop: no request submitted without its id told
        # The ids the daemon records (a repeat after dedupe_window_s gets one of its own).
        ids = [row.request.id for row in rows] if foreseen is None else [i for i, _ in foreseen]
        try:
            write_ids(args.ids_out, submissions, ids)
        except OSError as error:
            raise Failure(
                f"cannot write --ids-out {args.ids_out}: {error.strerror or error}", EX_CANTCREAT
            ) from None
    try:
        paths = drop_into_spool(config.spool_dir, [row.spool_line for row in rows])
    except OSError as error:
        if args.ids_out is not None:  # it names requests that were not submitted
            args.ids_out.unlink(missing_ok=True)
        raise Failure(f"cannot write to the spool: {error}", EX_CANTCREAT) from None
    print(summary(paths, len(rows), len(errors), foreseen), file=sys.stderr)
    return EX_OK


def _foreseen(config: Config, requests: list) -> list[tuple[str, bool]] | None:
    """Each request's id in the ledger-to-be and whether it repeats one taken already; None,
    said on stderr, when the ledger cannot tell (a submitter may not read it)."""
    from .ledger import foresee_intake

    try:
        return foresee_intake(config.state_dir, requests, config.dedupe_window_s, config.cluster)
    except (OSError, sqlite3.Error) as error:
        print(f"cannot tell which requests were taken already: {error}", file=sys.stderr)
        return None


def _refuse_overwriting_an_input(ids_out: Path | None, names: list[str]) -> None:
    if ids_out is None or not ids_out.exists():
        return
    for name in names:
        if name != "-" and os.path.exists(name) and os.path.samefile(ids_out, name):
            raise Failure(f"submit: --ids-out {ids_out} is one of the inputs", EX_USAGE)


def _input_options(args):
    """How `submit`'s options say to read its inputs; a usage error names the option."""
    from .submit import (
        InputOptions,
        parse_campaign,
        parse_delimiter,
        parse_encoding,
        parse_mapping,
    )

    try:
        return InputOptions(
            as_csv=args.csv,
            mapping=parse_mapping(args.map),
            delimiter=parse_delimiter(args.delimiter),
            encoding=parse_encoding(args.encoding),
            campaign=parse_campaign(args.campaign),
        )
    except ValueError as error:
        raise Failure(f"submit: {error}", EX_USAGE) from None


def _submissions(names: list[str], config: Config, options) -> list:
    """Each input read and validated; a --map naming a column one of them lacks is a usage
    error."""
    from .submit import MapMismatch, input_name, read_input

    submissions = []
    for name in names:
        data = _read_input_file(name)
        try:
            submissions.append(read_input(data, input_name(name), config, options))
        except MapMismatch as error:
            raise Failure(f"submit: {error}", EX_USAGE) from None
    return submissions


def _read_input_file(name: str) -> bytes:
    try:
        if name == "-":
            return sys.stdin.buffer.read()
        return Path(name).read_bytes()
    except OSError as error:
        raise Failure(f"cannot read {name}: {error.strerror}", 66) from None


def _load_runnable(args, needs_key: bool) -> Config:
    """The config, refused unless the daemon can run with it as it is."""
    from .preflight import preflight

    config = load(args)
    try:
        if needs_key:
            read_api_key(config.api)
        read_admin_token(config.admin)
        preflight(config)
    except ConfigError as error:
        raise Failure(_config_message(error), EX_CONFIG) from None
    return config


def cmd_check(args) -> int:
    from .preflight import ledger_problem

    config = _load_runnable(args, needs_key=True)
    if (problem := ledger_problem(config)) is not None:
        raise Failure(f"ledger: {problem}", EX_UNAVAILABLE)
    agents = ", ".join(f"{a.id} ({a.region}, {a.rate}/s)" for a in config.agents.values())
    print(f"{_config_path(args)}: OK; agents: {agents}")
    return EX_OK


def cmd_status(args) -> int:
    from .ledger import read_status
    from .status_text import status_text

    config = load(args)
    report = _read_ledger(config, lambda state_dir: read_status(state_dir, config.cluster))
    if report is None:  # no ledger yet: the report of an empty one
        report = {
            "agents": {},
            "outcomes": {},
            "results_unwritten": 0,
            "paused": [],
            "campaigns": {},
            **({"daemons": {}} if config.cluster else {}),
        }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(status_text(report, config))
    return EX_OK


def cmd_report(args) -> int:
    from .report import parse_moment, report_text, summarise

    try:
        since = None if args.since is None else parse_moment(args.since)
    except ValueError as error:
        raise Failure(f"report: --since: {error}", EX_USAGE) from None
    if args.results:
        tally, source = _results_tally(args.results, since, args.campaign), "results"
    else:
        tally, source = _ledger_tally(load(args), since, args.campaign), "ledger"
    report = summarise(tally, source, since, args.campaign)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return EX_OK


def _results_tally(names: list[str], since: float | None, campaign: str | None):
    from .report import read_results

    try:
        tally = read_results(names, since, campaign)
    except OSError as error:
        raise Failure(f"cannot read {error.filename or 'stdin'}: {error.strerror}", 66) from None
    for problem in tally.problems:
        print(problem, file=sys.stderr)
    return tally


def _ledger_tally(config: Config, since: float | None, campaign: str | None):
    from .report import Tally, read_ledger

    tally = _read_ledger(
        config, lambda state_dir: read_ledger(state_dir, since, campaign, config.cluster)
    )
    if tally is None:
        print(f"dialerd: no ledger in {config.state_dir}: nothing recorded yet", file=sys.stderr)
        return Tally()
    return tally


def _read_ledger(config: Config, read: Callable[[Path], Any]) -> Any:
    """read(state_dir), a ledger that cannot be read said in one sentence: 66 when it cannot be
    opened, 65 when it is not a ledger this dialerd reads (not SQLite, or of a newer schema: the
    input, not this command, is what an operator must look at)."""
    from .ledger import LedgerTooNew

    path = config.state_dir / "ledger.sqlite3"
    try:
        return read(config.state_dir)
    except LedgerTooNew as error:
        raise Failure(f"cannot read: {error}", EX_DATAERR) from None
    except OSError as error:  # cluster mode: the database does not answer
        raise Failure(f"cannot read: {error}", 66) from None
    except sqlite3.OperationalError as error:  # not readable: permissions, a vanished directory
        raise Failure(f"cannot read the ledger {path}: {error}", 66) from None
    except sqlite3.DatabaseError as error:  # readable, but not a ledger
        raise Failure(f"cannot read the ledger {path}: {error}", EX_DATAERR) from None


def cmd_requeue(args) -> int:
    from .ledger import requeue

    if bool(args.ids) == args.in_doubt:
        raise Failure("requeue: name the ids of in_doubt requests, or give --in-doubt", EX_USAGE)
    config = load(args)
    try:
        requeued, refused = requeue(
            config.state_dir, None if args.in_doubt else args.ids, config.cluster
        )
    except (OSError, sqlite3.Error) as error:
        raise Failure(f"cannot requeue: {error}", EX_CANTCREAT) from None
    for request_id, reason in refused.items():
        print(f"{request_id}: not requeued: {reason}", file=sys.stderr)
    print(f"requeued {len(requeued)} request(s)")
    return EX_DATAERR if refused else EX_OK


def cmd_simulate(args) -> int:
    from .simulator import serve

    gc.set_threshold(*GC_THRESHOLDS)  # its window judges arrivals when its loop gets to them
    asyncio.run(serve(args, faults_from(args)))
    return EX_OK


COMMANDS = {
    "report": cmd_report,
    "requeue": cmd_requeue,
    "run": cmd_run,
    "submit": cmd_submit,
    "check": cmd_check,
    "status": cmd_status,
    "simulate": cmd_simulate,
    **CONTROL_COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    from .logs import configure, stderr_is_journal

    try:
        args = build_parser().parse_args(argv)
        configure(args.log_level)
        return COMMANDS[args.command](args)
    except Failure as failure:
        prefix = "<3>" if stderr_is_journal() else ""  # journald files it as an error
        for line in f"dialerd: {failure}".splitlines():
            print(f"{prefix}{line}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
