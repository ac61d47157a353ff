"""`dialerd submit`: validate requests and drop them atomically into the spool."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .request import FIELDS, InvalidRequest, build_request
from .sources import Rejected, parse_spool_file

CSV_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


@dataclass
class Submission:
    documents: list[dict] = field(default_factory=list)  # valid requests, as submitted
    errors: list[str] = field(default_factory=list)  # "NAME:LINE: what is wrong"


def read_input(data: bytes, name: str, config: Config) -> Submission:
    """Requests from JSON lines, a JSON object or array, or CSV with a header row."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM, as spreadsheets and editors write it
    if _looks_like_csv(data):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            return Submission(errors=[f"{name}: not UTF-8 (byte {error.start + 1})"])
        try:
            documents = _csv_documents(text, name)
        except csv.Error as error:
            return Submission(errors=[f"{name}: not readable as CSV: {error}"])
        return _from_documents(documents, config)
    try:
        batch = parse_spool_file(data, name, config)
    except Rejected as error:
        return Submission(errors=[f"{name}: {error}"])
    submission = Submission(errors=[line.removeprefix("spool:") for line in batch.errors])
    submission.documents = [_document(request) for request in batch.requests]
    return submission


def _looks_like_csv(data: bytes) -> bool:
    first = data.lstrip(b"\xef\xbb\xbf").lstrip()[:1]
    return first not in (b"{", b"[", b"")


def _csv_documents(text: str, name: str) -> list[tuple[str, Any]]:
    """Each CSV row as a request object: known columns as fields, the rest session_parameters."""
    rows = csv.DictReader(io.StringIO(text, newline=""))
    documents = []
    for row in rows:
        document: dict[str, Any] = {}
        parameters = {}
        for column, value in row.items():
            if column is None or value is None or value == "":
                continue
            column = column.strip()
            if column == "hangup_on_answer_machine":
                document[column] = CSV_BOOLEANS.get(value.strip().lower(), value)
            elif column in FIELDS:
                document[column] = value.strip()
            else:
                parameters[column] = value
        if parameters:
            document["session_parameters"] = parameters
        documents.append((f"{name}:{rows.line_num}", document))
    return documents


def _from_documents(documents: list[tuple[str, Any]], config: Config) -> Submission:
    submission = Submission()
    for where, document in documents:
        try:
            submission.documents.append(_document(build_request(document, config, where)))
        except InvalidRequest as error:
            submission.errors.append(f"{where}: {error}")
    return submission


def _document(request) -> dict:
    """The request as a spool line: normalised, with every field it was given."""
    document: dict[str, Any] = {"id": request.id, "to": request.to}
    if request.sender:
        document["from"] = request.sender
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
            exact = dt.datetime.fromtimestamp(moment, dt.UTC).isoformat()  # to the microsecond
            document[name] = exact.replace("+00:00", "Z")
    if request.meta is not None:
        document["meta"] = request.meta
    return document


def drop_into_spool(spool_dir: Path, documents: list[dict]) -> Path:
    """Write aside, sync, and rename into incoming/: the daemon sees the whole file or none."""
    incoming = spool_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".submit-", suffix=".tmp", dir=incoming)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp gives 0600: the daemon may be another user
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            for document in documents:
                file.write(json.dumps(document, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        final = (
            incoming / f"submit-{time.strftime('%Y%m%dT%H%M%S')}-{Path(temporary).stem[8:]}.jsonl"
        )
        os.rename(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return final
