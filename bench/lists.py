"""Lists as operators have them: stdin intake and `dialerd submit`, side by side in one run.

- Intake: 100,000 lines on stdin (`run --simulate`, one agent; `bench.memory`'s measure), each
  with its own id and an E.164 number; with no id (ids made from the content and judged by
  dedupe_window_s); and with no id and national numbers (default_country GB).
- `dialerd submit`: its whole process (reading, validating, the ledger's check of what it has
  taken already, the spool file) for 100,000 CSV rows with no ledger yet; for the same rows
  with a ledger that holds every one of them; and for the same requests as JSON lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .harness import child_env
from .memory import ingest, state_dir

ROWS = 100_000


def e164(index: int) -> str:
    return f"+4477{index:08d}"


def content(index: int) -> dict:
    """A request as a list gives it: a number and a name for the agent to say, no id."""
    return {"to": e164(index), "session_parameters": {"Name": f"Row {index}"}}


def with_id(index: int) -> dict:
    return {"id": f"r{index}", **content(index)}


def national(index: int) -> dict:
    return {**content(index), "to": f"077{index:08d}"}


def intake_rows(workdir: Path) -> list[str]:
    variants = [
        ("own id, E.164", with_id, {}),
        ("no id: made from the content, deduplicated", content, {}),
        ("no id, national numbers (default_country GB)", national, {"default_country": "GB"}),
    ]
    rows, baseline = [], None
    for label, request, top in variants:
        directory = workdir / f"intake-{len(rows)}"
        directory.mkdir()
        seconds, peak_mb = ingest(directory, ROWS, request, **top)
        baseline = baseline or seconds
        rows.append(
            f"| {label} | {ROWS / seconds:,.0f} | {baseline / seconds:.2f} | {peak_mb:.0f} MB |"
        )
    return rows


def submit_seconds(directory: Path, state: Path, data: bytes, name: str) -> float:
    """Seconds `dialerd submit` takes for `data` as file `name`, its state in `state`."""
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump({
        "api": {"key_env": "VGAI_KEY"},
        "agents": {"a": {"region": "eu", "rate": 5}},
        "state_dir": str(state),
        "spool": {"dir": str(directory / "spool")},
    }))  # fmt: skip
    path = directory / name
    path.write_bytes(data)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dialerd", "submit", "-c", str(config), str(path)],
        capture_output=True,
        env=child_env(),
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"submit failed: {done.stderr.decode()[-500:]}")
    return seconds


def submit_rows(workdir: Path) -> list[str]:
    csv = "to,Name\n" + "".join(f"{e164(i)},Row {i}\n" for i in range(ROWS))
    lines = "".join(json.dumps(content(i)) + "\n" for i in range(ROWS))
    # The ledger of the content-id intake above holds every one of these requests.
    taken = state_dir(workdir / "intake-1", ROWS)
    variants = [
        ("CSV, no ledger yet", workdir / "empty-state", csv, "rows.csv"),
        ("CSV, every row taken already", taken, csv, "rows.csv"),
        ("JSON lines, no ledger yet", workdir / "empty-state", lines, "rows.jsonl"),
    ]
    rows, baseline = [], None
    for label, state, data, name in variants:
        directory = workdir / f"submit-{len(rows)}"
        directory.mkdir()
        seconds = submit_seconds(directory, state, data.encode(), name)
        baseline = baseline or seconds
        rows.append(f"| {label} | {ROWS / seconds:,.0f} | {baseline / seconds:.2f} |")
    return rows


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        intake = intake_rows(workdir)
        submitted = submit_rows(workdir)
    return [
        f"Intake of {ROWS:,} lines on stdin (`run --simulate`, one agent), in one run:",
        "",
        "| lines | lines/s | × the first | peak RSS |",
        "|---|---:|---:|---:|",
        *intake,
        "",
        f"`dialerd submit` of {ROWS:,} requests, the whole process, in the same run:",
        "",
        "| input | rows/s | × the first |",
        "|---|---:|---:|",
        *submitted,
    ]
