"""Months of history: the rate per agent and the mark latency with 0, 1M and 5M final requests in
the ledger, side by side in one run, while the status is read every 0.5 s; and the ledger's size
per million final requests, with and without retention.

The history is made by the daemon's own intake: `dialerd run` with 1,000,000 lines on stdin,
each with an expires_at long past, so each is taken (queued) and ends `expired` within a second,
sent to no one. The 5M ledger is a copy of that one (SQLite's backup) with the other 4,000,000
rows written by SQL (INSERT ... SELECT of the daemon's rows under new ids; outcome_counts
counted again as migration 4 does): through the intake it would take about 7 minutes more.

Then three daemons at once, one on each ledger, each with three agents at 5, 3 and 1 calls/s
on one simulator process (100-500 ms answers, a strict 1 s window per agent), each given
WORK_S seconds of work per agent in a spool file; for each, `/status` and `/metrics` are read
every 0.5 s on its admin listener and $NOTIFY_SOCKET (with a watchdog) is a socket of the
benchmark's. Figures: placed calls per second at the simulator over the span each agent had
work, divided by its rate; 429s; the p50 and p99 of `dialerd_mark_latency_seconds` (the upper
bound of the bucket holding it, the three agents' buckets summed), scraped at the end, and the
same from WARM_S after the work came on (the scrape then taken away): a ledger that the intake
left with many free pages has them given back (retention's incremental vacuum) in the first
seconds of the next start, and the marks wait for it.

Size: ledger.sqlite3 and its -wal, in bytes per million final requests: the 1M and 5M ledgers
(retention_s at its default of 30 days: nothing is old enough to go), and 1M through the
intake with `retention_s: 1`, once pruning has settled. A daemon that does not know the key
(exit 78) gets "retention: not available".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from dialerd.simulator import window_violations

from .harness import child_env, fidelity, free_port, read_arrivals, simulator_process

INTAKE_ROWS = 1_000_000
HISTORIES = (0, 1_000_000, 5_000_000)
RATES = (5, 3, 1)
WORK_S = 120  # of work per agent in the measured phase
POLL_S = 0.5
WATCHDOG_S = 10.0
LATENCY = "0.1-0.5"
RETENTION_S = 1
MARK_LATENCY = "dialerd_mark_latency_seconds"
SLOW_MARK_S = 0.005  # a bucket bound of MARK_LATENCY_BUCKETS
WARM_S = 10.0  # the first seconds of the work, apart: a daemon's start-up work is done by then
PAST = "2020-01-01T00:00:00Z"
FILL_DEADLINE_S = 600
READY_DEADLINE_S = 120
SETTLE_QUIET_S = 15.0  # pruning is taken as settled when the rows have not changed this long
SETTLE_DEADLINE_S = 300
EX_CONFIG = 78
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if k not in MANAGER_VARIABLES}
    return {**env, **extra}


def _label(history: int) -> str:
    return f"{history:,}"


def _agents(prefix: str) -> dict[str, int]:
    return {f"{prefix}-{rate}": rate for rate in RATES}


def _config(directory: Path, prefix: str, endpoint: str, state: Path, **top: object) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": {"eu": endpoint}},
        "agents": {a: {"region": "eu", "rate": rate} for a, rate in _agents(prefix).items()},
        "state_dir": str(state),
        "results": str(directory / "results.jsonl"),
        **top,
    }))  # fmt: skip
    return path


def _history_lines(path: Path, prefix: str, count: int) -> None:
    agents = list(_agents(prefix))
    with open(path, "w") as lines:
        lines.writelines(
            f'{{"id":"h{i}","to":"+4477{i:08d}","agent_id":"{agents[i % len(agents)]}",'
            f'"expires_at":"{PAST}"}}\n'
            for i in range(count)
        )


def _ledger_bytes(state: Path) -> int:
    return sum(
        (state / name).stat().st_size
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal")
        if (state / name).exists()
    )


def _read(state: Path, sql: str) -> tuple:
    uri = (state / "ledger.sqlite3").absolute().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        return conn.execute(sql).fetchone()
    finally:
        conn.close()


@dataclass
class Fill:
    seconds: float = 0.0  # from the start of the process to its exit (or to the settling)
    exit: int | None = None
    peak_bytes: int = 0
    end_bytes: int = 0
    rows: int = 0  # requests rows in the ledger at the end
    final: int = 0
    free_pages: int = 0
    page_size: int = 4096
    note: str = ""
    intake_s: float = 0.0  # retention's fill: from the start to "stdin ended"
    final_s: float = 0.0  # and to every request final
    remembered: int = 0  # ids of pruned requests remembered (pruned_ids)


def _measure_file(state: Path, fill: Fill) -> None:
    fill.end_bytes = _ledger_bytes(state)
    fill.rows, fill.final = _read(
        state, "SELECT count(*), coalesce(sum(state = 'final'), 0) FROM requests"
    )
    (fill.free_pages,) = _read(state, "PRAGMA freelist_count")
    try:
        (fill.remembered,) = _read(state, "SELECT count(*) FROM pruned_ids")
    except sqlite3.OperationalError:  # a daemon without retention: no such table
        fill.remembered = 0
    (fill.page_size,) = _read(state, "PRAGMA page_size")


def _fill_through_intake(directory: Path, lines: Path, prefix: str, endpoint: str) -> Fill:
    """`dialerd run` with `lines` on stdin, stdin its only source: it ends once all are final."""
    directory.mkdir()
    state = directory / "state"
    config = _config(directory, prefix, endpoint, state)
    fill = Fill()
    started = time.monotonic()
    with open(lines, "rb") as stdin, open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
        )
        while process.poll() is None:
            fill.peak_bytes = max(fill.peak_bytes, _ledger_bytes(state) if state.exists() else 0)
            if time.monotonic() - started > FILL_DEADLINE_S:
                process.kill()
                raise RuntimeError(f"the fill of {lines} took over {FILL_DEADLINE_S} s")
            time.sleep(0.5)
    fill.seconds = time.monotonic() - started
    fill.exit = process.returncode
    if fill.exit != 0:
        tail = (directory / "stderr.log").read_text()[-1000:]
        raise RuntimeError(f"the fill exited {fill.exit}: {tail}")
    _measure_file(state, fill)
    return fill


def _fill_with_retention(directory: Path, lines: Path, endpoint: str) -> Fill:
    """The same lines into a ledger with retention_s: RETENTION_S. A spool keeps the daemon
    running after stdin ends, until the rows stop changing: then it is stopped and measured."""
    directory.mkdir()
    state = directory / "state"
    config = _config(
        directory,
        "ret",
        endpoint,
        state,
        retention_s=RETENTION_S,
        stdin=True,
        spool={"dir": str(directory / "spool")},
    )
    fill = Fill()
    started = time.monotonic()
    stderr_path = directory / "stderr.log"
    with open(lines, "rb") as stdin, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
        )
        try:
            fill.exit = _settle(process, state, stderr_path, fill, started)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if fill.exit == EX_CONFIG:
        fill.note = "retention: not available (the daemon refuses retention_s: exit 78)"
        return fill
    if fill.exit != 0:
        raise RuntimeError(
            f"the retention fill exited {fill.exit}: {stderr_path.read_text()[-1000:]}"
        )
    _measure_file(state, fill)
    return fill


def _settle(
    process: subprocess.Popen, state: Path, stderr_path: Path, fill: Fill, started: float
) -> int:
    """Wait for stdin to be read and every request final, then for the ledger to stop changing
    (its requests, the ids remembered of those pruned, its free pages, its size); SIGTERM; the
    exit code (78 at once: the config was refused)."""
    last, changed_at = None, time.monotonic()
    while process.poll() is None:
        now = time.monotonic()
        if now - started > FILL_DEADLINE_S + SETTLE_DEADLINE_S:
            fill.note = "pruning had not settled by the deadline"
            break
        if (state / "ledger.sqlite3").exists():
            fill.peak_bytes = max(fill.peak_bytes, _ledger_bytes(state))
            if not fill.intake_s and '"stdin ended"' in stderr_path.read_text():
                fill.intake_s = now - started
            try:
                rows, open_rows = _read(
                    state, "SELECT count(*), coalesce(sum(state != 'final'), 0) FROM requests"
                )
                if open_rows == 0 and not fill.final_s and fill.intake_s:
                    fill.final_s = now - started
                (remembered,) = _read(state, "SELECT count(*) FROM pruned_ids")
                (free,) = _read(state, "PRAGMA freelist_count")
                snapshot = (rows, open_rows, remembered, free, _ledger_bytes(state))
            except sqlite3.OperationalError:  # being made, or busy
                snapshot = None
            if snapshot != last:
                last, changed_at = snapshot, now
            elif fill.final_s and now - changed_at >= SETTLE_QUIET_S:
                break
        time.sleep(0.5)
    if process.poll() is not None:
        return process.returncode
    fill.seconds = changed_at - started
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def _grow(source: Path, target: Path, prefix: str, total: int) -> float:
    """A copy of the ledger in `source` grown to `total` rows of history by SQL, its agents
    renamed to `prefix`'s; the seconds it took."""
    started = time.monotonic()
    target.mkdir(parents=True)
    uri = (source / "ledger.sqlite3").absolute().as_uri() + "?mode=ro"
    with sqlite3.connect(uri, uri=True) as original:
        copy = sqlite3.connect(target / "ledger.sqlite3", isolation_level=None)
        original.backup(copy)
    copy.execute("PRAGMA journal_mode=WAL")
    (count,) = copy.execute("SELECT count(*) FROM requests").fetchone()
    (last_seq,) = copy.execute("SELECT max(seq) FROM requests").fetchone()
    (old,) = copy.execute("SELECT agent_id FROM requests LIMIT 1").fetchone()
    old_prefix = old.rsplit("-", 1)[0]
    columns = [row[1] for row in copy.execute("PRAGMA table_info(requests)") if row[1] != "seq"]
    copy.execute("BEGIN IMMEDIATE")
    copy.execute(
        "UPDATE requests SET agent_id = ? || substr(agent_id, ?), body = replace(body, ?, ?)",
        (prefix, len(old_prefix) + 1, f'"agent_id":"{old_prefix}-', f'"agent_id":"{prefix}-'),
    )
    for copy_number in range(1, total // count):
        chosen = ", ".join(f"'k{copy_number}-' || id" if c == "id" else c for c in columns)
        copy.execute(
            f"INSERT INTO requests ({', '.join(columns)}) SELECT {chosen} FROM requests"
            " WHERE seq <= ?",
            (last_seq,),
        )
    # Counted again from the rows, as migration 4 does.
    copy.execute("DELETE FROM outcome_counts WHERE agent_id != ''")
    copy.execute(
        "INSERT INTO outcome_counts SELECT agent_id, outcome, count(*) FROM requests"
        " WHERE outcome IS NOT NULL GROUP BY agent_id, outcome"
    )
    copy.execute("COMMIT")
    copy.close()
    return time.monotonic() - started


# -- the measured phase ---------------------------------------------------------------------


class _Notify(threading.Thread):
    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def seen(self, key: str, value: str | None = None) -> list[float]:
        return [
            at
            for at, fields in list(self.messages)
            if key in fields and (value is None or fields[key] == value)
        ]

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.sock.close()


class _Poller(threading.Thread):
    """GET /status and /metrics every POLL_S: each answer's status and seconds; the last
    /metrics page."""

    PATHS = ("/status", "/metrics")

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.answers: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
        self.last: dict[str, bytes] = {}
        self.pages: list[tuple[float, bytes]] = []  # every /metrics page, with when it came
        self.done = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.done.is_set():
            for path in self.PATHS:
                started = time.monotonic()
                try:
                    with urllib.request.urlopen(self.base_url + path, timeout=10) as answer:
                        code, body = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    code, body = error.code, b""
                except OSError:
                    code, body = None, b""
                self.answers[path].append((code, time.monotonic() - started))
                if code == 200:
                    self.last[path] = body
                    if path == "/metrics":
                        self.pages.append((started, body))
            next_at += POLL_S
            self.done.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=15)


@dataclass
class Phase:
    history: int
    built: str
    prefix: str
    state: Path
    directory: Path = Path()
    process: subprocess.Popen | None = None
    notify: _Notify | None = None
    poller: _Poller | None = None
    started: float = 0.0
    ready_s: float = 0.0
    work_s: float = 0.0
    figures: dict = field(default_factory=dict)


def _start(phase: Phase, endpoint: str) -> None:
    phase.directory.mkdir()
    port = free_port()
    config = _config(
        phase.directory,
        phase.prefix,
        endpoint,
        phase.state,
        stdin=False,
        spool={"dir": str(phase.directory / "spool")},
        admin={"listen": f"127.0.0.1:{port}"},
    )
    phase.notify = _Notify(phase.directory / "notify.sock")
    phase.notify.start()
    phase.poller = _Poller(f"http://127.0.0.1:{port}")
    env = _env(NOTIFY_SOCKET=phase.notify.address, WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)))
    phase.started = time.monotonic()
    with open(phase.directory / "stderr.log", "wb") as stderr:
        phase.process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    phase.figures["config"] = config


def _wait(probe, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.1)
    return value


def _ready(phase: Phase) -> bool:
    if phase.process.poll() is not None:
        tail = (phase.directory / "stderr.log").read_text()[-1000:]
        raise RuntimeError(f"dialerd on the {_label(phase.history)} ledger exited: {tail}")
    ready = phase.notify.seen("READY", "1")
    if ready and not phase.ready_s:
        phase.ready_s = ready[0] - phase.started
    return bool(ready)


def _drop_work(phase: Phase) -> int:
    requests = [
        {"id": f"w-{agent}-{i}", "to": f"+4478{n:02d}{i:06d}", "agent_id": agent}
        for n, (agent, rate) in enumerate(_agents(phase.prefix).items())
        for i in range(rate * WORK_S)
    ]
    incoming = phase.directory / "spool" / "incoming"
    part = incoming / ".work.jsonl.part"
    part.write_text("".join(json.dumps(request) + "\n" for request in requests))
    os.chmod(part, 0o604)
    part.rename(incoming / "work.jsonl")
    return len(requests)


def _results(phase: Phase) -> int:
    path = phase.directory / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _status_cli_seconds(phase: Phase) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "dialerd", "status", "--json", "-c", str(phase.figures["config"])],
        capture_output=True,
        check=True,
        env=_env(),
    )
    return time.monotonic() - started


def _buckets(metrics: str, name: str, agents: list[str]) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, the agents' summed: (upper bound, observations)."""
    summed: dict[float, float] = defaultdict(float)
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("agent") in agents:
                summed[float(sample.labels["le"])] += sample.value
    return sorted(summed.items())


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    total = buckets[-1][1]
    return next(bound for bound, seen in buckets if seen >= q * total)


def _measure(workdir: Path, phases: list[Phase]) -> None:
    agents = {agent: rate for phase in phases for agent, rate in _agents(phase.prefix).items()}
    log = workdir / "arrivals.jsonl"
    with simulator_process(agents, log, LATENCY) as base_url:
        endpoint = f"{base_url}/eu/telephony/make-call"
        try:
            for phase in phases:
                _start(phase, endpoint)
            for phase in phases:
                _wait(lambda p=phase: _ready(p), READY_DEADLINE_S, "READY=1")
            for phase in phases:
                phase.poller.start()
            dropped_at = time.monotonic()
            for phase in phases:
                phase.figures["dropped_at"] = dropped_at
            expected = {phase.prefix: _drop_work(phase) for phase in phases}
            for phase in phases:
                _wait(
                    lambda p=phase: _results(p) >= expected[p.prefix],
                    WORK_S * 2 + 60,
                    f"the work's results on the {_label(phase.history)} ledger",
                )
                phase.work_s = time.monotonic() - dropped_at
            time.sleep(2 * POLL_S)
            for phase in phases:
                phase.poller.stop()
                phase.figures["status_cli_s"] = _status_cli_seconds(phase)
        finally:
            for phase in phases:
                if phase.poller is not None and phase.poller.is_alive():
                    phase.poller.stop()
                if phase.process is not None and phase.process.poll() is None:
                    phase.process.send_signal(signal.SIGTERM)
            for phase in phases:
                if phase.process is not None:
                    try:
                        phase.figures["exit"] = phase.process.wait(timeout=40)
                    except subprocess.TimeoutExpired:
                        phase.process.kill()
                        phase.figures["exit"] = "killed"
                if phase.notify is not None:
                    phase.notify.stop()
    arrivals = read_arrivals(log)
    for phase in phases:
        _figures(phase, arrivals)


def _figures(phase: Phase, arrivals: dict[str, list[dict]]) -> None:
    figures = phase.figures
    agents = _agents(phase.prefix)
    figures["fidelity"] = {
        rate: fidelity(arrivals.get(agent, []), rate) for agent, rate in agents.items()
    }
    figures["over_window"] = sum(
        window_violations([a["at"] for a in arrivals.get(agent, [])], rate)
        for agent, rate in agents.items()
    )
    metrics = phase.poller.last["/metrics"].decode()
    buckets = _buckets(metrics, MARK_LATENCY, list(agents))
    figures["marks"] = int(buckets[-1][1])
    figures["mark_p50"] = _bucket_quantile(buckets, 0.50)
    figures["mark_p99"] = _bucket_quantile(buckets, 0.99)
    # The same from WARM_S after the work was dropped on: the buckets then taken away.
    warm_at = figures["dropped_at"] + WARM_S
    page = next(body for at, body in phase.poller.pages if at >= warm_at)
    early = dict(_buckets(page.decode(), MARK_LATENCY, list(agents)))
    late = [(bound, seen - early.get(bound, 0.0)) for bound, seen in buckets]
    figures["late_marks"] = int(late[-1][1])
    figures["late_mark_p99"] = _bucket_quantile(late, 0.99)
    figures["slow_marks"] = int(buckets[-1][1] - dict(buckets)[SLOW_MARK_S])
    figures["late_slow_marks"] = int(late[-1][1] - dict(late)[SLOW_MARK_S])
    figures["polls"] = {}
    for path, answers in phase.poller.answers.items():
        seconds = sorted(s for _code, s in answers)
        failed = sum(1 for code, _s in answers if code != 200)
        figures["polls"][path] = (len(answers), failed, seconds)
    status = json.loads(phase.poller.last["/status"])
    figures["outcomes"] = status["outcomes"]
    figures["statuses"] = len(phase.notify.seen("STATUS"))
    pings = phase.notify.seen("WATCHDOG", "1")
    figures["watchdog_gap"] = max(
        (b - a for a, b in zip(pings, pings[1:], strict=False)), default=0
    )
    figures["pings"] = len(pings)


# -- the tables -----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _rate_table(phases: list[Phase]) -> list[str]:
    base = phases[0].figures

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(phase.figures) for phase in phases) + " |"

    lines = [
        "| figure | " + " | ".join(f"{phase.history:,} final" for phase in phases) + " |",
        "|---|" + "---:|" * len(phases),
        row("history built by", lambda f: f["built"]),
        row(
            "free pages in the ledger: at the start, at the end",
            lambda f: f"{f['free_at_start'] / 1e6:,.0f} MB, {f['free_at_end'] / 1e6:,.0f} MB",
        ),
        row("start to READY=1", lambda f: f"{f['ready_s']:.2f} s"),
    ]
    for rate in RATES:
        lines.append(
            row(
                f"{rate}/s agent: placed, achieved (× the empty ledger's)",
                lambda f, r=rate: (
                    f"{f['fidelity'][r].placed}, {f['fidelity'][r].achieved:.3f} "
                    f"(× {f['fidelity'][r].achieved / base['fidelity'][r].achieved:.3f})"
                ),
            )
        )
    lines += [
        row(
            "429s / over the rate in a 1 s window",
            lambda f: f"{sum(x.refused_429 for x in f['fidelity'].values())} / {f['over_window']}",
        ),
        row(
            "mark latency p50 / p99 (bucket bounds; sends)",
            lambda f: f"≤ {_ms(f['mark_p50'])} / ≤ {_ms(f['mark_p99'])} ({f['marks']})",
        ),
        row(
            "mark latency p99 × the empty ledger's",
            lambda f: f"{f['mark_p99'] / base['mark_p99']:.2f}",
        ),
        row(
            f"marks over {_ms(SLOW_MARK_S)}",
            lambda f: str(f["slow_marks"]),
        ),
        row(
            f"from {WARM_S:g} s on: mark p99 (sends); marks over {_ms(SLOW_MARK_S)}",
            lambda f: f"≤ {_ms(f['late_mark_p99'])} ({f['late_marks']}); {f['late_slow_marks']}",
        ),
    ]
    for path in _Poller.PATHS:
        lines.append(
            row(
                f"GET {path} every {POLL_S} s: answers (failed), p50 / p99 / max",
                lambda f, p=path: (
                    f"{f['polls'][p][0]} ({f['polls'][p][1]}), "
                    f"{_ms(statistics.median(f['polls'][p][2]))} / "
                    f"{_ms(_quantile(f['polls'][p][2], 0.99))} / {_ms(f['polls'][p][2][-1])}"
                ),
            )
        )
    lines += [
        row(
            "STATUS= lines; WATCHDOG=1 pings, longest gap",
            lambda f: f"{f['statuses']}; {f['pings']}, {f['watchdog_gap']:.1f} s",
        ),
        row("`dialerd status --json`, the whole process", lambda f: f"{f['status_cli_s']:.2f} s"),
        row("outcomes in /status at the end", lambda f: _outcomes(f["outcomes"])),
        row(
            "work dropped to its last result; exit code",
            lambda f: f"{f['work_s']:.1f} s; {f['exit']}",
        ),
    ]
    return lines


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items()))


def _size_row(label: str, taken: int, fill: Fill, built: str) -> str:
    if fill.note.startswith("retention: not available"):
        return f"| {label} | {taken:,} | {fill.note} | | | | | |"
    millions = taken / 1_000_000
    free = fill.free_pages * fill.page_size
    note = f" ({fill.note})" if fill.note else ""
    in_use = fill.end_bytes - free
    return (
        f"| {label} | {taken:,} | {fill.rows:,}; {fill.remembered:,} | "
        f"{fill.end_bytes / 1e6:,.1f} MB ({free / 1e6:,.1f} MB) | "
        f"{fill.peak_bytes / 1e6:,.0f} MB | "
        f"{fill.end_bytes / millions / 1e6:,.1f} MB | {in_use / millions / 1e6:,.1f} MB"
        f" | {built}{note} |"
    )


def _free_bytes(state: Path) -> int:
    """The ledger's free pages, in bytes (a new ledger: none)."""
    if not (state / "ledger.sqlite3").exists():
        return 0
    (free,) = _read(state, "PRAGMA freelist_count")
    (page_size,) = _read(state, "PRAGMA page_size")
    return free * page_size


def _settled(fill: Fill) -> str:
    return (
        f"the intake: stdin read in {fill.intake_s:.0f} s, all final at {fill.final_s:.0f} s, "
        f"the ledger unchanged from {fill.seconds:.0f} s"
    )


def _grown_by(seconds: float) -> str:
    return (
        f"the {INTAKE_ROWS:,} ledger + {HISTORIES[-1] - INTAKE_ROWS:,} rows by SQL, {seconds:.0f} s"
    )


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lines = workdir / "history.jsonl"
        written = time.monotonic()
        _history_lines(lines, "m1", INTAKE_ROWS)
        retention_lines = workdir / "history-retention.jsonl"
        _history_lines(retention_lines, "ret", INTAKE_ROWS)
        written = time.monotonic() - written
        nowhere = f"http://127.0.0.1:{free_port()}/eu/telephony/make-call"  # nothing is sent

        fill_1m = _fill_through_intake(workdir / "fill-1M", lines, "m1", nowhere)
        fill_retention = _fill_with_retention(workdir / "fill-retention", retention_lines, nowhere)
        grow_s = _grow(workdir / "fill-1M" / "state", workdir / "state-5M", "m5", HISTORIES[-1])
        fill_5m = Fill(seconds=grow_s)
        _measure_file(workdir / "state-5M", fill_5m)
        fill_5m.peak_bytes = fill_5m.end_bytes

        empty, intake, grown = HISTORIES
        phases = [
            Phase(empty, "nothing (a new ledger)", "e0", workdir / "state-0"),
            Phase(
                intake, f"the intake, {fill_1m.seconds:.0f} s", "m1", workdir / "fill-1M" / "state"
            ),
            Phase(grown, _grown_by(grow_s), "m5", workdir / "state-5M"),
        ]
        for phase in phases:
            phase.directory = workdir / f"measure-{phase.history}"
            phase.figures["built"] = phase.built
            phase.figures["free_at_start"] = _free_bytes(phase.state)
        _measure(workdir, phases)
        for phase in phases:
            phase.figures["free_at_end"] = _free_bytes(phase.state)
            phase.figures["ready_s"] = phase.ready_s
            phase.figures["work_s"] = phase.work_s

    intake_rate = INTAKE_ROWS / fill_1m.seconds
    return [
        f"Months of history: three daemons at once on one simulator (answers in {LATENCY} s), "
        f"one on each ledger, each with agents at {'/'.join(map(str, RATES))} calls/s and "
        f"{WORK_S} s of work per agent dropped into its spool; /status and /metrics read every "
        f"{POLL_S} s and $NOTIFY_SOCKET (WatchdogSec {WATCHDOG_S:g} s) a socket of the "
        "benchmark's. Achieved = placed calls/s at the simulator over the span the agent had "
        "work ÷ its rate; the mark latency is `dialerd_mark_latency_seconds`, the three "
        "agents' buckets summed, scraped at the end.",
        "",
        *_rate_table(phases),
        "",
        f"History made by the daemon's intake ({INTAKE_ROWS:,} lines on stdin, each with an "
        f"expires_at long past, so each ends `expired`, sent to no one): "
        f"{fill_1m.seconds:.1f} s, {intake_rate:,.0f} requests/s (the lines written in "
        f"{written:.1f} s, both files). Ledger size, ledger.sqlite3 + -wal after the daemon "
        "stopped:",
        "",
        "| ledger | final requests taken | rows left; pruned ids kept | file (of it free pages) "
        "| peak while filled | file per million taken | in use per million taken | built by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        _size_row("no retention (retention_s at its default, 30 days)", INTAKE_ROWS, fill_1m,
                  f"the intake, {fill_1m.seconds:.0f} s"),
        _size_row("no retention", HISTORIES[-1], fill_5m, _grown_by(grow_s)),
        _size_row(f"retention_s: {RETENTION_S}", INTAKE_ROWS, fill_retention,
                  _settled(fill_retention)),
    ]  # fmt: skip
