"""`dialerd submit`: validate requests and drop them atomically into the spool."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .numbers import written
from .request import (
    CAMPAIGN,
    MAX_LINE_BYTES,
    InvalidRequest,
    Request,
    build_request,
    exact_moment,
    with_campaign,
)
from .sources import SOURCE_MAX, SUBMITTED, Rejected, parse_spool_file
from .spooldir import MAX_SPOOL_FILE

CSV_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
# The request fields a CSV cell can hold, each the column of its name; a column of any other name
# is a session parameter. The --map choices and the header's checks all derive from this tuple.
CSV_FIELDS = (
    "to",
    "agent_id",
    "from",
    "id",
    "not_before",
    "expires_at",
    "hangup_on_answer_machine",
    "campaign",
    "priority",
    "timezone",
)
PARAMETER = "session_parameters."  # a column's destination: PARAMETER + the parameter's name
IGNORED = "-"  # a column's destination: nowhere
DELIMITERS = (",", ";", "\t", "|")  # a CSV's delimiter is one of these; a sniffed tie: the first
DELIMITER_NAMES = {**{delimiter: delimiter for delimiter in DELIMITERS}, "tab": "\t", "\\t": "\t"}
# Excel's first line naming the delimiter: a line of its own, before the header.
SEPARATOR_LINE = re.compile(f"sep=([{re.escape(''.join(DELIMITERS))}])(?:\r\n|\r|\n|\\Z)")
SNIFFED_CHARS = 64 * 1024  # the start of a CSV that holds its header, to sniff the delimiter in
NAME_NOISE = re.compile(r"[\s_-]+")  # what a column's name may differ from a field's by, and case
NAME_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # "PhoneNumber": "Phone", "Number"
# How a phone column's name may start a word ("Mobile", "TelNo"), the likeliest first.
PHONE_STEMS = ("msisdn", "mobil", "cell", "phone", "tel", "number")
HALF_SURROGATE = re.compile("[\ud800-\udfff]")
SPOOL_FILE_MODE = 0o604  # see drop_into_spool
PROGRESS_MIN_ROWS = 5000  # fewer rows are validated before a bar would be worth drawing
LABEL_MAX = SOURCE_MAX - 100  # characters of an input's name in a source, room for its line


class MapMismatch(Exception):
    """A --map names a column that an input's header lacks: a usage error, not bad data."""


@dataclass(frozen=True)
class InputOptions:
    """How `submit`'s options say to read every input."""

    as_csv: bool = False  # as CSV, whatever it looks like
    mapping: Mapping[str, str] = field(default_factory=dict)  # --map: {column: destination}
    delimiter: str | None = None  # None: Excel's sep= line, else sniffed from the header
    encoding: str | None = None  # None: UTF-8, with or without BOM
    campaign: str | None = None  # --campaign: every request's


@dataclass(frozen=True, slots=True)
class Row:
    """A valid request of an input."""

    line: int  # the input's line where it starts
    request: Request
    spool_line: bytes  # as the spool file holds it, newline included


@dataclass
class Submission:
    name: str = ""  # the input's, as input_name() gives it
    rows: list[Row] = field(default_factory=list)  # valid requests, in input order
    errors: list[str] = field(default_factory=list)  # "NAME:LINE: what is wrong", per bad row
    # "NAME:LINE: what is wrong" with a CSV header: it says no row's meaning, so none is read
    header_faults: list[str] = field(default_factory=list)
    column_report: str | None = None  # for CSV: "NAME: columns: COLUMN → DESTINATION, ..."

    def report_lines(self) -> list[str]:
        """What to tell on stderr before the summary: where the columns go, then each bad row."""
        return ([self.column_report] if self.column_report else []) + self.errors

    def add(self, name: str, line: int, request: Request, campaign: str | None) -> None:
        """A valid request, of `--campaign` when one is given: one of another is a bad row, as
        is one too long for the daemon to read from the spool."""
        if campaign is not None and request.campaign != campaign:
            if request.campaign is not None:
                error = f"campaign: {request.campaign!r}, but --campaign says {campaign!r}"
                self.errors.append(f"{name}:{line}: {error}")
                return
            request = with_campaign(request, campaign)
        spool_line = json.dumps(spool_document(request), ensure_ascii=False).encode() + b"\n"
        if len(spool_line) > MAX_LINE_BYTES:
            self.errors.append(
                f"{name}:{line}: {len(spool_line):,} bytes as a spool line, over the "
                f"{MAX_LINE_BYTES // 1024} KiB the daemon reads"
            )
            return
        self.rows.append(Row(line, request, spool_line))


def parse_mapping(options: list[str]) -> dict[str, str]:
    """`--map COLUMN=FIELD` options as {column: destination}; ValueError says which is wrong."""
    mapping: dict[str, str] = {}
    for option in options:
        column, separator, destination = (part.strip() for part in option.partition("="))
        if not separator or not column:
            raise ValueError(f"--map {option!r}: expected COLUMN=FIELD")
        if not _is_destination(destination):
            raise ValueError(
                f"--map {option!r}: FIELD must be one of {', '.join(CSV_FIELDS)}, "
                f"{PARAMETER}NAME or {IGNORED}"
            )
        if column in mapping:
            raise ValueError(f"--map names column {column!r} twice")
        mapping[column] = destination
    return mapping


def _is_destination(text: str) -> bool:
    if text.startswith(PARAMETER):
        return text != PARAMETER  # a parameter needs a name
    return text in CSV_FIELDS or text == IGNORED


def parse_delimiter(text: str | None) -> str | None:
    """`--delimiter` as its character (tab written `tab` or `\\t`); ValueError if not one."""
    if text is None:
        return None
    try:
        return DELIMITER_NAMES[text.lower()]
    except KeyError:
        raise ValueError(f"--delimiter {text!r}: expected , ; | or tab") from None


def parse_campaign(text: str | None) -> str | None:
    """`--campaign` as given; ValueError unless it is a campaign's name."""
    if text is not None and not CAMPAIGN.fullmatch(text):
        raise ValueError(f"--campaign {text!r}: expected 1-64 of A-Za-z0-9._:-")
    return text


def parse_encoding(name: str | None) -> str | None:
    """`--encoding` as given; ValueError unless Python decodes text with it."""
    if name is not None:
        try:
            io.TextIOWrapper(io.BytesIO(), encoding=name)  # refuses bytes-to-bytes codecs too
        except LookupError:
            raise ValueError(
                f"--encoding {name!r}: not a text encoding Python knows "
                "(such as utf-8, cp1252, latin-1)"
            ) from None
    return name


def read_input(
    data: bytes, name: str, config: Config, options: InputOptions | None = None
) -> Submission:
    """Requests from JSON lines, a JSON object or array, or CSV with a header row.

    `options.as_csv`, or a mapping of CSV columns, reads it as CSV whatever it looks like;
    MapMismatch when the mapping names a column its header lacks.
    """
    options = options or InputOptions()
    try:
        text = _decoded(data, options.encoding)
    except ValueError as error:
        submission = Submission(errors=[f"{name}: {error}"])
    else:
        if options.as_csv or options.mapping or _looks_like_csv(text):
            submission = _read_csv(text, name, config, options)
        else:
            submission = _read_json(text.encode("utf-8"), name, config, options.campaign)
    submission.name = name
    return submission


def input_name(name: str) -> str:
    """An input as errors and --ids-out name it: its path as given, or stdin for '-'."""
    return "stdin" if name == "-" else name


def source_label(name: str) -> str:
    """What the sources of an input's requests start with: `submit:` and the input file's name
    (SPEC §6), each character that is not printable as '?', so that the daemon takes it."""
    base = "".join(c if c.isprintable() else "?" for c in Path(name).name)
    return f"{SUBMITTED}{base[:LABEL_MAX]}"


def _decoded(data: bytes, encoding: str | None) -> str:
    """The input as text, less a BOM (as spreadsheets and editors write it); ValueError names
    where it is not text of that encoding."""
    codec = encoding or "utf-8"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as error:
        line = data[: error.start].decode(codec, "replace").count("\n") + 1
        raise ValueError(_not_text(encoding, f"at byte {error.start + 1}, line {line}")) from None
    if half := HALF_SURROGATE.search(text):  # some codecs (UTF-7) decode to one: no character
        line = text.count("\n", 0, half.start()) + 1
        raise ValueError(_not_text(encoding, f"at line {line}"))
    return text.removeprefix("\ufeff")


def _not_text(encoding: str | None, where: str) -> str:
    if encoding is None:
        return f"not UTF-8 {where}: pass its encoding, e.g. --encoding cp1252 for an Excel export"
    return f"not {encoding} {where}: pass its own encoding with --encoding"


def _looks_like_csv(text: str) -> bool:
    return text.lstrip()[:1] not in ("{", "[", "")


def _read_json(data: bytes, name: str, config: Config, campaign: str | None) -> Submission:
    label = source_label(name)
    try:
        batch = parse_spool_file(data, label, config)
    except Rejected as error:
        return Submission(errors=[f"{name}: {error}"])
    submission = Submission(errors=[name + error.removeprefix(label) for error in batch.errors])
    for request in batch.requests:
        submission.add(name, int(request.source.rpartition(":")[2]), request, campaign)
    return submission


class _Records:
    """Non-blank CSV records, each with the line it starts on: a quoted cell may hold newlines,
    so a record may span several lines, and its first is the one to report."""

    def __init__(self, text: str, delimiter: str, first_line: int = 1):
        self._reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        self._first_line = first_line  # of the file, where `text` starts
        self.line = first_line  # where the record being read starts

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        for cells in self._reader:
            if any(cell.strip() for cell in cells):  # a row of empty cells is a blank line
                yield self.line, cells
            self.line = self._first_line + self._reader.line_num


def _read_csv(text: str, name: str, config: Config, options: InputOptions) -> Submission:
    text, first_line, said = _without_separator_line(text)
    records = _Records(text, options.delimiter or said or _sniffed_delimiter(text), first_line)
    try:
        rows = list(records)
    except csv.Error as error:
        return Submission(errors=[f"{name}:{records.line}: not readable as CSV: {error}"])
    if not rows:
        return Submission(errors=[f"{name}: no header row"])
    (header_line, header), *rows = rows
    columns = [cell.strip() for cell in header]
    destinations = _destinations(columns, options.mapping, name)
    faults = _header_faults(columns, destinations, options.mapping)
    if faults:
        return Submission(header_faults=[f"{name}:{header_line}: {fault}" for fault in faults])
    submission = _validated(rows, destinations, name, config, options.campaign)
    submission.column_report = f"{name}: columns: " + ", ".join(map(_route, columns, destinations))
    return submission


def _without_separator_line(text: str) -> tuple[str, int, str | None]:
    """The text less Excel's `sep=X` first line, the file's line it then starts on, and X."""
    said = SEPARATOR_LINE.match(text)
    if said is None:
        return text, 1, None
    return text[said.end() :], 2, said[1]


def _sniffed_delimiter(text: str) -> str:
    """The delimiter that gives the header the most columns, read as CSV (a quoted cell may hold
    the others); a tie goes to the first of DELIMITERS, so a one-column header's is ','.

    Not csv.Sniffer: even held to DELIMITERS, it gives up on a one-column header, and it goes
    by its own preferences before the count of columns ('a,b;c;d' is ',' to it).
    """
    start = text[:SNIFFED_CHARS]
    return max(DELIMITERS, key=lambda delimiter: len(_first_record(start, delimiter)))


def _first_record(text: str, delimiter: str) -> list[str]:
    try:
        return next(iter(_Records(text, delimiter)), (0, []))[1]
    except csv.Error:  # not CSV with this delimiter: it gives no columns
        return []


def _validated(
    rows: list[tuple[int, list[str]]],
    destinations: list[str],
    name: str,
    config: Config,
    campaign: str | None,
) -> Submission:
    submission = Submission()
    label = source_label(name)
    for line, cells in _with_progress(rows, name):
        try:
            document = _csv_document(destinations, cells)
            request = build_request(document, config, f"{label}:{line}")
        except InvalidRequest as error:
            submission.errors.append(f"{name}:{line}: {error}")
        else:
            submission.add(name, line, request, campaign)
    return submission


def _destinations(columns: list[str], mapping: Mapping[str, str], name: str) -> list[str]:
    """Where each column's cells go: where --map sends it, else where its name says."""
    for column in mapping:
        if column not in columns:
            raise MapMismatch(f"--map names column {column!r}, which the header of {name} lacks")
    return [mapping.get(column) or _destination_by_name(column) for column in columns]


def _destination_by_name(column: str) -> str:
    if not column:
        return IGNORED  # a column without a name cannot say what its cells are (an export's index)
    return column if column in CSV_FIELDS else PARAMETER + column


def _route(column: str, destination: str) -> str:
    """A column and where it goes, for the report of a CSV's columns."""
    route = f"{column or '(no name)'} → {destination}"
    return f"{route} (ignored)" if destination == IGNORED else route


def _header_faults(
    columns: list[str], destinations: list[str], mapping: Mapping[str, str]
) -> list[str]:
    """What makes the header unfit to read rows by, each with its fix: no column for `to`
    (unless a column looks like `to`: its own fault says so), a column that looks like a field
    but would quietly be a session parameter, and two columns for one field."""
    lookalikes = {
        column: resembled
        for column in columns
        if column not in mapping and (resembled := _field_resembled(column))
    }
    faults = []
    if "to" not in destinations and "to" not in lookalikes.values():
        faults.append(_missing_to(columns, mapping))
    faults += [_lookalike(column, resembled) for column, resembled in lookalikes.items()]
    return faults + _duplicates(columns, destinations)


def _field_resembled(column: str) -> str | None:
    """The field a column's name resembles without being it: the same but for case, spaces,
    '-', '_' and camelCase ("agentId", "Agent ID"), or a field's first words ("expires")."""
    if column in CSV_FIELDS:
        return None
    spelling = _bare(column)
    for name in CSV_FIELDS:
        words = name.split("_")
        if spelling in ("".join(words[:count]) for count in range(1, len(words) + 1)):
            return name
    return None


def _bare(name: str) -> str:
    """A name without case, spaces, '-' and '_': "Agent ID" is "agentid"."""
    return NAME_NOISE.sub("", name).lower()


def _lookalike(column: str, resembled: str) -> str:
    return (
        f"column {column!r} looks like {resembled} but would be a session parameter: "
        f"{_map_option(column, resembled)} makes it {resembled}, "
        f"{_map_option(column, PARAMETER + column)} keeps it a parameter, or rename it"
    )


def _missing_to(columns: list[str], mapping: Mapping[str, str]) -> str:
    phone = _likeliest_phone_column([column for column in columns if column not in mapping])
    if phone is None:
        fix = "name the column of numbers to, or add --map COLUMN=to"
    else:
        fix = f"{_map_option(phone, 'to')} takes the numbers from {phone!r}"
    return f"no column for to (the header has {', '.join(map(repr, columns))}): {fix}"


def _likeliest_phone_column(columns: list[str]) -> str | None:
    """The column whose name most looks like a phone number's ("Mobile" before "Number")."""
    phone_like = [column for column in columns if _phone_rank(column) is not None]
    return min(phone_like, key=_phone_rank, default=None)  # a tie: the first in the header


def _phone_rank(column: str) -> int | None:
    """Where the likeliest of PHONE_STEMS that starts a word of the name stands among them."""
    words = [word.lower() for word in NAME_WORD.findall(column)]
    return next(
        (rank for rank, stem in enumerate(PHONE_STEMS) if any(w.startswith(stem) for w in words)),
        None,
    )


def _duplicates(columns: list[str], destinations: list[str]) -> list[str]:
    column_of: dict[str, str] = {}
    faults = []
    for column, destination in zip(columns, destinations, strict=True):
        if destination in column_of:
            faults.append(
                f"columns {column_of[destination]!r} and {column!r} both give {destination}: "
                "remove or rename one, or --map it elsewhere"
            )
        elif destination != IGNORED:
            column_of[destination] = column
    return faults


def _map_option(column: str, destination: str) -> str:
    """The --map option sending a column there, quoted for a shell as need be."""
    return "--map " + shlex.quote(f"{column}={destination}")


def _csv_document(destinations: list[str], cells: list[str]) -> dict[str, Any]:
    """A row as a request object. A blank cell gives nothing: its field or parameter is absent."""
    extra = [cell for cell in cells[len(destinations) :] if cell.strip()]
    if extra:
        raise InvalidRequest(f"{len(cells)} cells, but the header has {len(destinations)} columns")
    document: dict[str, Any] = {}
    parameters = {}
    for destination, cell in zip(destinations, cells, strict=False):  # short rows: cells absent
        if destination == IGNORED or not cell.strip():
            continue
        if destination.startswith(PARAMETER):
            parameters[destination.removeprefix(PARAMETER)] = cell  # kept as written
        elif destination == "hangup_on_answer_machine":
            document[destination] = CSV_BOOLEANS.get(cell.strip().lower(), cell.strip())
        elif destination == "priority":  # a whole number, as JSON gives it; else refused by name
            text = cell.strip()
            whole = text.isascii() and text.isdigit() and len(text) <= 3
            document[destination] = int(text) if whole else text
        else:
            document[destination] = cell.strip()
    if parameters:
        document["session_parameters"] = parameters
    return document


def _with_progress(rows: list, name: str) -> Iterable:
    """The rows, drawing a progress bar on stderr while they are validated, when stderr is a
    terminal and they are many; a log or a pipe gets no bar."""
    if len(rows) < PROGRESS_MIN_ROWS or not sys.stderr.isatty():
        return rows
    from tqdm import tqdm  # here: only a terminal needs it, and `dialerd --help` stays fast

    return tqdm(rows, desc=Path(name).name, unit=" rows", file=sys.stderr)


def spool_document(request: Request) -> dict:
    """The request as a spool line: with every field it was given, as the daemon reads it again
    (numbers with their +, whatever its default_country), and where it came from. An id made
    from the content is left out: the daemon makes the same one, and judges it by
    dedupe_window_s."""
    document: dict[str, Any] = {} if request.id_from_content else {"id": request.id}
    document["to"] = written(request.to)
    if request.sender:
        document["from"] = written(request.sender)
    else:
        document["agent_id"] = request.agent_id
    if request.session_parameters:
        pairs = request.session_parameters
        if len({name for name, _value in pairs}) == len(pairs):
            document["session_parameters"] = dict(pairs)
        else:  # a name given twice: only the API's own list keeps every one
            document["session_parameters"] = [{"name": n, "value": v} for n, v in pairs]
    if request.hangup_on_answer_machine is not None:
        document["hangup_on_answer_machine"] = request.hangup_on_answer_machine
    for name in ("not_before", "expires_at"):
        moment = getattr(request, name)
        if moment is not None:
            document[name] = exact_moment(moment)
    if request.campaign is not None:
        document["campaign"] = request.campaign
    if request.priority:
        document["priority"] = request.priority
    if request.timezone is not None:
        document["timezone"] = request.timezone
    if request.meta is not None:
        document["meta"] = request.meta
    document["source"] = request.source
    return document


def write_ids(path: Path, submissions: list[Submission], ids: list[str]) -> None:
    """`--ids-out`: a CSV of each submitted request's input, the line its row starts on, and
    its id (`ids`, a row's each), so that its result can be joined back to the row. A path
    that is not UTF-8 is written as its own bytes."""
    places = [(s.name, row.line) for s in submissions for row in s.rows]
    with path.open("w", encoding="utf-8", errors="surrogateescape", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("file", "row", "id"))
        writer.writerows((*place, id) for place, id in zip(places, ids, strict=True))


def summary(
    spool_files: list[Path], count: int, skipped: int, foreseen: list[tuple[str, bool]] | None
) -> str:
    """submit's last line: what it dropped, what it skipped, and how many are duplicates."""
    said = f"submitted {count} request(s) as {', '.join(path.name for path in spool_files)}"
    if skipped:
        said += f"; skipped {skipped} invalid"
    if foreseen is not None:
        duplicates = sum(repeated for _id, repeated in foreseen)
        said += f"; {duplicates} taken already or given twice: duplicates, not dialed again"
    return said


def drop_into_spool(
    spool_dir: Path, lines: list[bytes], max_file_bytes: int = MAX_SPOOL_FILE
) -> list[Path]:
    """The spool lines as files in incoming/, each no larger than the daemon takes: each
    written as .NAME.part and synced, then all renamed to their NAMEs, so that the daemon sees
    each whole or not at all (it ignores names starting with '.'), and a failed write (a full
    disk) leaves none behind.

    A file is for the daemon alone: in incoming/'s group (the submitters'), mode 0604, so
    that other submitters, of that group, get its group's permissions (none), while the daemon,
    of neither its user nor its group, reads it as "other" (and incoming/, 1730, lets no one
    else in). Its name is unguessable as well, and incoming/ cannot be listed by submitters.
    """
    incoming = spool_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)  # the daemon makes it too, with its modes
    partials: list[Path] = []
    try:
        for chunk in _file_chunks(lines, max_file_bytes):
            name = f"submit-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(16)}.jsonl"
            partials.append(incoming / f".{name}.part")
            _write_synced(partials[-1], chunk, incoming.stat().st_gid)
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    finals = [partial.with_name(partial.name[1 : -len(".part")]) for partial in partials]
    for partial, final in zip(partials, finals, strict=True):
        os.rename(partial, final)
    return finals


def _file_chunks(lines: list[bytes], max_file_bytes: int) -> Iterator[list[bytes]]:
    """The lines in runs of at most max_file_bytes (each line is far smaller)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > max_file_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


def _write_synced(path: Path, lines: list[bytes], group: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        with contextlib.suppress(PermissionError):  # not of its group: the daemon's own user
            os.fchown(fd, -1, group)
        os.fchmod(fd, SPOOL_FILE_MODE)
        file.writelines(lines)
        file.flush()
        os.fsync(fd)
