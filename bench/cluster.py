"""Cluster mode: one daemon on SQLite, and one, two and three daemons sharing one PostgreSQL
ledger, side by side in one run, each with the same 12 agents (rates 5, 3 and 1 in turn: 36
calls/s in all) and the same work, against one `dialerd simulate` process (100-500 ms answers, a
strict 1 s window per agent); then the failover when one of three daemons is killed (-9).

Each configuration runs alone (the machine has two cores), in rounds of A B C D then D C B A, so
that the shared machine's noise falls on all of them alike; each ratio is the median over the
rounds of the ratio to the first column's figure in the same round. Each configuration on
PostgreSQL has a schema of its own (dropped after it, also on failure); each daemon its own
state_dir, spool, results and admin listener. The daemons are started one after another, and the
work (WORK_S seconds per agent at its rate) is dropped once the leases are shared evenly, as
spool files, each agent's requests dealt round-robin over the daemons' spools: most of what a
daemon takes in is dialed by another.

Figures: placed calls per second at the simulator over the span each agent had work, divided by
its rate (min and median over the agents); 429s; CPU seconds per 1,000 sends of the dialerd
processes (/proc/PID/stat, all of them summed) and of the PostgreSQL backends serving them (the
server's processes whose application_name is "dialerd <instance>" or "dialerd <instance>
notices", their pids read from pg_stat_activity every second, their CPU from /proc/PID/schedstat)
from the drop of the work to its last result, and the same with the server's own processes
(every backend_type but client backends: WAL writer, checkpointer...), whose work the server's
other clients share; `dialerd_mark_latency_seconds` p50 and p99 (the upper bound of the bucket
holding it, the buckets summed over agents and daemons), scraped at the end of the work. Each
429 is shown with the arrivals before it; the daemons' warnings and errors are listed.

Failover: three daemons with lease_s of each of FAILOVER_LEASES; once every agent is sending,
the last daemon started is killed with SIGKILL; the agents it held (its log's "leases taken",
less those given up or lost) are orphaned; for each, the seconds from the kill to the survivor's
"leases taken" line that names it and to the agent's next arrival at the simulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dialerd.simulator import window_violations

from .harness import child_env, fidelity, free_port, read_arrivals, simulator_process

DSN = "postgresql://postgres@127.0.0.1:5432/test"
AGENTS = 12
RATES = (5, 3, 1)  # in turn over the agents
WORK_S = 40  # of work per agent at its rate
LATENCY = "0.1-0.5"
LEASE_S = 10.0  # the default, for the measured configurations
CONFIGS = (  # letter, ledger on PostgreSQL, daemons
    ("A", False, 1),
    ("B", True, 1),
    ("C", True, 2),
    ("D", True, 3),
)
ROUNDS = 2  # A B C D, then D C B A
FAILOVER_LEASES = (2.0, 10.0)
FAILOVER_WORK_S = 40  # more than enough: the run ends once every orphan is dialed again
FAILOVER_SETTLE_S = 2.0  # from every agent sending to the kill
CORES_ON_PAPER = (1, 2, 16)
MARK_LATENCY = "dialerd_mark_latency_seconds"
POLL_S = 0.2
SAMPLE_S = 1.0  # pg_stat_activity and the backends' CPU
IDLE_S = 5.0  # with the leases shared and no work, before the work is dropped
RUNNING_DEADLINE_S = 30
SHARE_DEADLINE_S = 60
STOP_TIMEOUT_S = 40
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
LOG_LEVELS_REPORTED = ("warning", "error", "critical", "exception")


def _agents(tag: str) -> dict[str, int]:
    return {f"{tag}-{n:02d}": RATES[n % len(RATES)] for n in range(AGENTS)}


def _ledger_url(schema: str) -> str:
    return f"{DSN}?options=-csearch_path%3D{schema}"


# -- CPU from /proc ---------------------------------------------------------------------------


def _process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def _schedstat_cpu(pid: int) -> float | None:
    """A single-threaded process's time on the CPU, in seconds, in nanoseconds' precision."""
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return None


class _Span:
    """CPU over a span of processes that may come and go: for each, its CPU at the start (0 for
    one born within the span) and at its last sighting."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.begun = False

    def see(self, pid: int, cpu: float | None) -> None:
        if cpu is None:
            return
        self.first.setdefault(pid, cpu if not self.begun else 0.0)
        self.last[pid] = cpu

    def seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


class _Backends(threading.Thread):
    """Every SAMPLE_S: the pids of the backends whose application_name is one of `names`, and
    of the server's own processes (WAL writer, checkpointer, background writer, autovacuum:
    every backend_type but client backends), with their CPU."""

    def __init__(self, names: list[str]):
        super().__init__(daemon=True)
        self.names = names
        self.conn = psycopg.connect(DSN, autocommit=True, application_name="bench cluster")
        self.serving = _Span()
        self.server = _Span()
        self.pids: set[int] = set()
        self.background: set[int] = set()
        self.others = 0  # the most client backends of anyone else seen at once
        self.done = threading.Event()
        self.lock = threading.Lock()

    def sample(self) -> None:
        with self.lock:
            rows = self.conn.execute(
                "SELECT pid, application_name = ANY(%s) FROM pg_stat_activity"
                " WHERE application_name = ANY(%s) OR backend_type != 'client backend'",
                (self.names, self.names),
            ).fetchall()
            for pid, serving in rows:
                (self.pids if serving else self.background).add(pid)
            (others,) = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND NOT coalesce(application_name = ANY(%s), false)"
                " AND pid != pg_backend_pid()",
                (self.names,),
            ).fetchone()
            self.others = max(self.others, others)
            for pid in self.pids:
                self.serving.see(pid, _schedstat_cpu(pid))
            for pid in self.background:
                self.server.see(pid, _schedstat_cpu(pid))

    def begin(self) -> None:
        self.sample()
        self.serving.begun = self.server.begun = True
        self.start()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def end(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.sample()

    def close(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(timeout=10)
        self.conn.close()


# -- the daemons ------------------------------------------------------------------------------


@dataclass
class _Daemon:
    instance: str
    home: Path
    port: int
    process: subprocess.Popen | None = None
    exit: int | str | None = None

    @property
    def stderr_path(self) -> Path:
        return self.home / "stderr.log"

    @property
    def application_names(self) -> list[str]:
        return [f"dialerd {self.instance}", f"dialerd {self.instance} notices"]

    def log(self) -> list[dict]:
        lines = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(line))
        return lines

    def lease_lines(self) -> list[dict]:
        return [line for line in self.log() if line.get("event", "").startswith("leases")]

    def held(self) -> set[str]:
        """As in tests/test_cluster.py: taken, less those given up or lost."""
        agents: set[str] = set()
        for line in self.lease_lines():
            if line["event"] == "leases taken":
                agents |= set(line["agents"])
            else:
                agents -= set(line["agents"])
        return agents

    def running(self) -> bool:
        if self.process.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"dialerd {self.instance} exited {self.process.returncode}: {tail}")
        return '"event": "running"' in self.stderr_path.read_text(errors="replace")

    def results(self) -> list[dict]:
        path = self.home / "results.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def result_count(self) -> int:
        path = self.home / "results.jsonl"
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as page:
            return page.read().decode()

    def stop(self) -> None:
        if self.process is None or self.exit is not None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            self.exit = "killed after SIGTERM"

    def noteworthy(self) -> Counter:
        """The log's warnings and errors by (level, event), and lines that are not JSON."""
        seen: Counter = Counter()
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                seen["stderr", "a line that is not JSON"] += 1
                continue
            if entry.get("level") in LOG_LEVELS_REPORTED:
                said = entry.get("event", "?")
                detail = entry.get("error") or entry.get("agent") or entry.get("agents")
                if detail:
                    said += f" ({' '.join(str(detail).split())[:90]})"
                seen[entry["level"], said] += 1
        return seen


def _start(daemon: _Daemon, endpoint: str, agents: dict[str, int], cluster: dict) -> None:
    daemon.home.mkdir(parents=True)
    config = {
        "api": {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": {"eu": endpoint}},
        "agents": {agent: {"region": "eu", "rate": rate} for agent, rate in agents.items()},
        "state_dir": str(daemon.home / "state"),
        "spool": {"dir": str(daemon.home / "spool")},
        "results": str(daemon.home / "results.jsonl"),
        "stdin": False,
        "admin": {"listen": f"127.0.0.1:{daemon.port}"},
        **cluster,
    }
    path = daemon.home / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(daemon.stderr_path, "wb") as stderr:
        daemon.process = subprocess.Popen(
            [sys.executable, "-m", "dialerd", "run", "-c", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=child_env(),
        )


def _wait(probe, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(POLL_S)
    return value


def _shared(daemons: list[_Daemon], agents: dict[str, int]) -> bool:
    """Every agent held by one daemon, each daemon holding its share."""
    holding = [daemon.held() for daemon in daemons]
    for daemon in daemons:
        daemon.running()  # raises if it exited
    fair = len(agents) // len(daemons)
    return (
        sum(len(held) for held in holding) == len(agents)
        and set().union(*holding) == set(agents)
        and all(fair <= len(held) <= fair + 1 for held in holding)
    )


def _drop(daemon: _Daemon, name: str, requests: list[dict]) -> None:
    incoming = daemon.home / "spool" / "incoming"
    part = incoming / f".{name}.part"
    part.write_text("".join(json.dumps(request) + "\n" for request in requests))
    os.chmod(part, 0o604)
    part.rename(incoming / name)


def _work(agents: dict[str, int], seconds: int) -> list[list[dict]]:
    """Each agent's requests, `seconds` of them at its rate, to numbers of its own."""
    return [
        [
            {"id": f"{agent}-{i}", "to": f"+4478{n:02d}{i:06d}", "agent_id": agent}
            for i in range(rate * seconds)
        ]
        for n, (agent, rate) in enumerate(agents.items())
    ]


def _deal(work: list[list[dict]], hands: int) -> list[list[dict]]:
    """Each agent's requests dealt round-robin into `hands` files."""
    dealt: list[list[dict]] = [[] for _ in range(hands)]
    for requests in work:
        for index, request in enumerate(requests):
            dealt[index % hands].append(request)
    return dealt


class _Schemas:
    """The run's schemas on the shared server: each made for one configuration and dropped
    after it; any left (a failure in between) dropped at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.made: list[str] = []

    def make(self) -> str:
        self.count += 1
        schema = f"bench_cluster_{os.getpid()}_{self.count}"
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.made.append(schema)
        return schema

    def drop(self, schema: str, application_names: list[str]) -> None:
        with psycopg.connect(DSN, autocommit=True) as conn:
            # A backend of a killed daemon, or one left behind, would make the DROP wait.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = ANY(%s)",
                (application_names,),
            )
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.made.remove(schema)

    def drop_all(self) -> None:
        for schema in list(self.made):
            with contextlib.suppress(psycopg.Error):
                self.drop(schema, [])


# -- one configuration ------------------------------------------------------------------------


@dataclass
class _Run:
    letter: str
    round: int
    on_postgres: bool
    count: int
    tag: str
    agents: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    work_s: float = 0.0
    share_s: float = 0.0
    dialerd_cpu_s: float = 0.0
    backends_cpu_s: float = 0.0
    backends: int = 0
    server_cpu_s: float = 0.0
    metrics: list[str] = field(default_factory=list)
    lease_lines_in_work: int = 0
    outcomes: Counter = field(default_factory=Counter)
    noteworthy: dict[str, Counter] = field(default_factory=dict)
    exits: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    holders: dict[str, str] = field(default_factory=dict)  # agent -> daemon, as the work began
    refusals: list[str] = field(default_factory=list)
    others: int = 0  # other clients' backends on the server, the most at once
    idle_s: float = 0.0
    idle_dialerd_cpu_s: float = 0.0
    idle_backends_cpu_s: float = 0.0
    load: float = 0.0  # the host's 1-minute load average as the work ended

    @property
    def name(self) -> str:
        return f"{self.letter}{self.round}"


def _measure(run: _Run, workdir: Path, endpoint: str, schemas: _Schemas) -> None:
    run.agents = _agents(run.tag)
    schema = schemas.make() if run.on_postgres else None
    daemons = [
        _Daemon(f"b{os.getpid()}-{run.tag}-d{n}", workdir / run.tag / f"d{n}", free_port())
        for n in range(run.count)
    ]
    names = [name for daemon in daemons for name in daemon.application_names]
    cluster = {"ledger": _ledger_url(schema), "lease_s": LEASE_S} if schema is not None else {}
    backends = None
    try:
        started = time.monotonic()
        for daemon in daemons:
            daemon_cluster = {**cluster, "instance": daemon.instance} if cluster else {}
            _start(daemon, endpoint, run.agents, daemon_cluster)
            _wait(daemon.running, RUNNING_DEADLINE_S, f"dialerd {daemon.instance} to run")
        if schema is not None:
            _wait(lambda: _shared(daemons, run.agents), SHARE_DEADLINE_S, "the leases shared")
        run.share_s = time.monotonic() - started
        for daemon in daemons:
            held = daemon.held() if schema is not None else set(run.agents)
            run.holders |= dict.fromkeys(held, daemon.instance.rsplit("-", 1)[1])
        hands = _deal(_work(run.agents, WORK_S), len(daemons))
        run.requests = sum(len(hand) for hand in hands)
        lease_lines = [len(daemon.lease_lines()) for daemon in daemons]
        backends = _Backends(names)
        backends.begin()
        idle_from = time.monotonic()
        cpu = [_process_cpu(daemon.process.pid) for daemon in daemons]
        time.sleep(IDLE_S)  # the leases held, no work yet: what the cluster costs at rest
        backends.sample()
        idle_cpu = [_process_cpu(daemon.process.pid) for daemon in daemons]
        run.idle_s = time.monotonic() - idle_from
        run.idle_dialerd_cpu_s = sum(
            after - before for after, before in zip(idle_cpu, cpu, strict=True)
        )
        idle_backends, idle_server = backends.serving.seconds(), backends.server.seconds()
        run.idle_backends_cpu_s = idle_backends
        dropped = time.monotonic()
        for daemon, hand in zip(daemons, hands, strict=True):
            _drop(daemon, "work.jsonl", hand)
        _wait(
            lambda: sum(daemon.result_count() for daemon in daemons) >= run.requests,
            WORK_S * 3 + 60,
            f"the results of {run.name}",
        )
        run.work_s = time.monotonic() - dropped
        run.dialerd_cpu_s = sum(
            _process_cpu(daemon.process.pid) - before
            for daemon, before in zip(daemons, idle_cpu, strict=True)
        )
        backends.end()
        run.backends_cpu_s = backends.serving.seconds() - idle_backends
        run.backends = len(backends.serving.last)
        run.server_cpu_s = run.backends_cpu_s + backends.server.seconds() - idle_server
        run.others = backends.others
        run.load = float(Path("/proc/loadavg").read_text().split()[0])
        run.metrics = [daemon.metrics() for daemon in daemons]
        run.lease_lines_in_work = sum(
            len(daemon.lease_lines()) - before
            for daemon, before in zip(daemons, lease_lines, strict=True)
        )
    finally:
        if backends is not None:
            backends.close()
        for daemon in daemons:
            daemon.stop()
        if schema is not None:
            schemas.drop(schema, names)
    run.exits = [daemon.exit for daemon in daemons]
    for daemon in daemons:
        run.outcomes.update(result["outcome"] for result in daemon.results())
        run.noteworthy[daemon.instance] = daemon.noteworthy()


def _buckets(pages: list[str], agents: dict[str, int]) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, summed over agents and daemons: (bound, count)."""
    summed: dict[float, float] = defaultdict(float)
    for page in pages:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == f"{MARK_LATENCY}_bucket" and sample.labels.get("agent") in agents:
                    summed[float(sample.labels["le"])] += sample.value
    return sorted(summed.items())


def _counter(pages: list[str], name: str) -> float:
    total = 0.0
    for page in pages:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
    return total


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    total = buckets[-1][1]
    return next(bound for bound, seen in buckets if seen >= q * total)


def _refusals(run: _Run, arrivals: dict[str, list[dict]]) -> list[str]:
    """Each 429: the placed calls in the 1 s before it at the simulator, the span from the
    oldest of them to it, and the smallest gap between their stamps."""
    rows = []
    for agent, rate in run.agents.items():
        placed: list[float] = []
        for arrival in sorted(arrivals.get(agent, []), key=lambda a: a["at"]):
            if arrival["http_status"] == 429:
                window = [at for at in placed if arrival["at"] - at < 1.0] + [arrival["at"]]
                gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
                rows.append(
                    f"| {run.name} | {agent} | {rate} | {run.holders.get(agent, '?')} "
                    f"| {len(window) - 1} | {window[-1] - window[0]:.3f} s "
                    f"| {min(gaps, default=0.0) * 1000:.0f} ms "
                    f"| {1.05 / rate * 1000:.0f} ms |"
                )
            if arrival["placed"]:
                placed.append(arrival["at"])
    return rows


def _figures(run: _Run, arrivals: dict[str, list[dict]]) -> None:
    run.refusals = _refusals(run, arrivals)
    mine = {agent: arrivals.get(agent, []) for agent in run.agents}
    per_agent = [fidelity(mine[agent], rate) for agent, rate in run.agents.items()]
    achieved = sorted(figure.achieved for figure in per_agent)
    sends = sum(len(seen) for seen in mine.values())
    placed_to = Counter(a["to"] for seen in mine.values() for a in seen if a["placed"])
    buckets = _buckets(run.metrics, run.agents)
    run.figures = {
        "achieved_min": achieved[0],
        "achieved_median": statistics.median(achieved),
        "placed": sum(figure.placed for figure in per_agent),
        "sends": sends,
        "429": sum(figure.refused_429 for figure in per_agent),
        "over_window": sum(
            window_violations([a["at"] for a in mine[agent] if a["placed"]], rate)
            for agent, rate in run.agents.items()
        ),
        "twice": sum(1 for count in placed_to.values() if count > 1),
        "work_s": run.work_s,
        "dialerd_cpu": run.dialerd_cpu_s / sends * 1000,
        "backends_cpu": run.backends_cpu_s / sends * 1000,
        "server_cpu": run.server_cpu_s / sends * 1000,
        "total_cpu": (run.dialerd_cpu_s + run.backends_cpu_s) / sends * 1000,
        "idle_dialerd": run.idle_dialerd_cpu_s / run.idle_s * 1000,
        "idle_backends": run.idle_backends_cpu_s / run.idle_s * 1000,
        # Net of what the backends took at rest over as long a time: the cost a send adds.
        "net_backends_cpu": (run.backends_cpu_s - run.idle_backends_cpu_s / run.idle_s * run.work_s)
        / sends
        * 1000,
        "marks": int(buckets[-1][1]),
        "mark_p50": _bucket_quantile(buckets, 0.5),
        "mark_p99": _bucket_quantile(buckets, 0.99),
        "fenced": _counter(run.metrics, "dialerd_fenced_marks_total"),
    }


# -- failover ---------------------------------------------------------------------------------


class _Tail:
    """The simulator's arrival log, read on from where the last read ended."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.arrivals: list[dict] = []

    def read(self) -> list[dict]:
        with open(self.path, encoding="utf-8") as log:
            log.seek(self.offset)
            text = log.read()
            self.offset = log.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        self.arrivals += [json.loads(line) for line in lines if line]
        return self.arrivals


def _wall(line: dict) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


@dataclass
class _Failover:
    lease_s: float
    tag: str
    agents: dict[str, int] = field(default_factory=dict)
    orphans: dict[str, int] = field(default_factory=dict)  # agent -> rate
    to_take: dict[str, float] = field(default_factory=dict)
    taker: dict[str, str] = field(default_factory=dict)
    to_arrival: dict[str, float] = field(default_factory=dict)
    gap: dict[str, float] = field(default_factory=dict)  # last arrival before the kill to next
    in_flight: int = 0  # orphans' arrivals between the kill and the take: the victim's
    refused_429: int = 0
    over_window: int = 0
    twice: int = 0
    outcomes: Counter = field(default_factory=Counter)
    noteworthy: dict[str, Counter] = field(default_factory=dict)
    exits: list = field(default_factory=list)
    sending_s: float = 0.0


def _failover(
    failover: _Failover, workdir: Path, endpoint: str, log: Path, schemas: _Schemas
) -> None:
    failover.agents = agents = _agents(failover.tag)
    schema = schemas.make()
    daemons = [
        _Daemon(
            f"b{os.getpid()}-{failover.tag}-d{n}", workdir / failover.tag / f"d{n}", free_port()
        )
        for n in range(3)
    ]
    names = [name for daemon in daemons for name in daemon.application_names]
    tail = _Tail(log)
    tail.read()
    try:
        for daemon in daemons:
            cluster = {
                "ledger": _ledger_url(schema),
                "instance": daemon.instance,
                "lease_s": failover.lease_s,
            }
            _start(daemon, endpoint, agents, cluster)
            _wait(daemon.running, RUNNING_DEADLINE_S, f"dialerd {daemon.instance} to run")
        _wait(lambda: _shared(daemons, agents), SHARE_DEADLINE_S, "the leases shared")
        survivors, victim = daemons[:-1], daemons[-1]
        # Nothing in the victim's spool: what it took in would be its own results, lost with it.
        hands = _deal(_work(agents, FAILOVER_WORK_S), len(survivors))
        for daemon, hand in zip(survivors, hands, strict=True):
            _drop(daemon, "work.jsonl", hand)
        dropped = time.monotonic()

        def all_sending() -> bool:
            return set(agents) <= {a["agent_id"] for a in tail.read() if a["placed"]}

        _wait(all_sending, 30, "every agent sending")
        failover.sending_s = time.monotonic() - dropped
        time.sleep(FAILOVER_SETTLE_S)
        held = victim.held()
        victim.process.kill()
        killed_at = time.time()
        victim.process.wait(timeout=10)
        victim.exit = "SIGKILL"
        failover.orphans = {agent: agents[agent] for agent in sorted(held)}

        def redialed() -> bool:
            after = {a["agent_id"] for a in tail.read() if a["wall"] > killed_at}
            return set(failover.orphans) <= after

        _wait(redialed, failover.lease_s + 30, "every orphaned agent dialed again")
        time.sleep(1.0)
        takes: dict[str, float] = {}
        for daemon in survivors:
            for line in daemon.lease_lines():
                if line["event"] == "leases taken" and _wall(line) > killed_at:
                    for agent in line["agents"]:
                        if agent not in takes or _wall(line) < takes[agent]:
                            takes[agent] = _wall(line)
                            failover.taker[agent] = daemon.instance.rsplit("-", 1)[1]
    finally:
        for daemon in daemons:
            daemon.stop()
        schemas.drop(schema, names)
    seen = defaultdict(list)
    for arrival in tail.read():
        if arrival["agent_id"] in agents:
            seen[arrival["agent_id"]].append(arrival)
    for agent, rate in failover.orphans.items():
        walls = sorted(a["wall"] for a in seen[agent])
        taken = takes.get(agent)
        before = [w for w in walls if w <= killed_at]
        after = [w for w in walls if w > killed_at and (taken is None or w >= taken)]
        failover.in_flight += sum(1 for w in walls if killed_at < w < (taken or killed_at))
        if taken is not None:
            failover.to_take[agent] = taken - killed_at
        if after:
            failover.to_arrival[agent] = after[0] - killed_at
            if before:
                failover.gap[agent] = after[0] - before[-1]
        failover.refused_429 += sum(1 for a in seen[agent] if a["http_status"] == 429)
        failover.over_window += window_violations(
            sorted(a["at"] for a in seen[agent] if a["placed"]), rate
        )
    placed_to = Counter(a["to"] for arrivals in seen.values() for a in arrivals if a["placed"])
    failover.twice = sum(1 for count in placed_to.values() if count > 1)
    failover.exits = [daemon.exit for daemon in daemons]
    for daemon in daemons:
        failover.outcomes.update(result["outcome"] for result in daemon.results())
        failover.noteworthy[daemon.instance] = daemon.noteworthy()


# -- the tables -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


def _configuration_table(runs: list[_Run]) -> list[str]:
    letters = [letter for letter, _pg, _count in CONFIGS]
    by_letter = {letter: [run for run in runs if run.letter == letter] for letter in letters}
    base_letter = letters[0]

    def median(letter: str, figure: str) -> float:
        return statistics.median(run.figures[figure] for run in by_letter[letter])

    def ratio(letter: str, figure: str, base: str = base_letter) -> str:
        pairs = zip(by_letter[letter], by_letter[base], strict=True)
        ratios = [
            mine.figures[figure] / theirs.figures[figure]
            for mine, theirs in pairs
            if theirs.figures[figure]
        ]
        if not ratios:
            return ""
        return f" (× {statistics.median(ratios):.2f})"

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(letter) for letter in letters) + " |"

    def describe(letter: str) -> str:
        run = by_letter[letter][0]
        ledger = "PostgreSQL" if run.on_postgres else "SQLite"
        return f"{letter}: {run.count} daemon{'s' if run.count > 1 else ''}, {ledger}"

    first_pg = next(letter for letter, pg, _count in CONFIGS if pg)
    return [
        "| figure (median over the rounds; × the first column's, round by round) | "
        + " | ".join(describe(letter) for letter in letters)
        + " |",
        "|---|" + "---:|" * len(letters),
        row(
            "achieved rate per agent: min",
            lambda x: f"{median(x, 'achieved_min'):.3f}{ratio(x, 'achieved_min')}",
        ),
        row(
            "achieved rate per agent: median",
            lambda x: f"{median(x, 'achieved_median'):.3f}{ratio(x, 'achieved_median')}",
        ),
        row(
            "sends at the simulator, all rounds (placed)",
            lambda x: (
                f"{sum(r.figures['sends'] for r in by_letter[x]):,}"
                f" ({sum(r.figures['placed'] for r in by_letter[x]):,})"
            ),
        ),
        row(
            "429s / over the rate in a 1 s window / placed twice, all rounds",
            lambda x: " / ".join(
                str(sum(r.figures[f] for r in by_letter[x]))
                for f in ("429", "over_window", "twice")
            ),
        ),
        row(
            "work dropped to its last result",
            lambda x: f"{median(x, 'work_s'):.1f} s{ratio(x, 'work_s')}",
        ),
        row(
            "dialerd CPU s per 1,000 sends (all daemons)",
            lambda x: f"{median(x, 'dialerd_cpu'):.2f}{ratio(x, 'dialerd_cpu')}",
        ),
        row(
            f"PostgreSQL backends' CPU s per 1,000 sends (× {first_pg}'s)",
            lambda x: (
                "—"
                if not by_letter[x][0].on_postgres
                else f"{median(x, 'backends_cpu'):.3f}{ratio(x, 'backends_cpu', first_pg)}"
                f" ({by_letter[x][0].backends} backends)"
            ),
        ),
        row(
            "the same, net of the backends' CPU at rest over as long",
            lambda x: (
                "—"
                if not by_letter[x][0].on_postgres
                else f"{median(x, 'net_backends_cpu'):.3f}{ratio(x, 'net_backends_cpu', first_pg)}"
            ),
        ),
        row(
            f"at rest ({IDLE_S:g} s, leases held, no work): dialerd / backends CPU ms per s",
            lambda x: f"{median(x, 'idle_dialerd'):.0f} / {median(x, 'idle_backends'):.0f}",
        ),
        row(
            "dialerd + backends, CPU s per 1,000 sends",
            lambda x: f"{median(x, 'total_cpu'):.2f}{ratio(x, 'total_cpu')}",
        ),
        row(
            "backends + the server's own processes (WAL writer, checkpointer...: shared with"
            " its other clients), CPU s per 1,000 sends",
            lambda x: f"{median(x, 'server_cpu'):.3f}",
        ),
        row(
            "mark latency p50 / p99 (bucket bounds)",
            lambda x: (
                f"≤ {_ms(median(x, 'mark_p50'))} / ≤ {_ms(median(x, 'mark_p99'))}"
                f"{ratio(x, 'mark_p99')}"
            ),
        ),
        row(
            "marks counted (all rounds); fenced marks",
            lambda x: (
                f"{sum(r.figures['marks'] for r in by_letter[x]):,};"
                f" {sum(r.figures['fenced'] for r in by_letter[x]):.0f}"
            ),
        ),
        row(
            "start to leases shared (median)",
            lambda x: f"{statistics.median(r.share_s for r in by_letter[x]):.1f} s",
        ),
        row(
            "lease log lines during the work (all rounds)",
            lambda x: str(sum(r.lease_lines_in_work for r in by_letter[x])),
        ),
        row(
            "outcomes (all rounds)",
            lambda x: _outcomes(sum((r.outcomes for r in by_letter[x]), Counter())),
        ),
        row(
            "exit codes",
            lambda x: ", ".join(str(e) for r in by_letter[x] for e in r.exits),
        ),
    ]


def _rounds_table(runs: list[_Run]) -> list[str]:
    lines = [
        "| run (in order) | achieved min / median | work s | dialerd CPU s / 1,000 "
        "| backends CPU s / 1,000 | mark p99 | 429s | others' backends on the server, most "
        "| load average at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        f = run.figures
        backends = f"{f['backends_cpu']:.3f}" if run.on_postgres else "—"
        lines.append(
            f"| {run.name} | {f['achieved_min']:.3f} / {f['achieved_median']:.3f} "
            f"| {f['work_s']:.1f} | {f['dialerd_cpu']:.2f} | {backends} "
            f"| ≤ {_ms(f['mark_p99'])} | {f['429']} | {run.others} | {run.load:.2f} |"
        )
    return lines


def _outcomes(outcomes: Counter) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items())) or "none"


def _failover_table(failovers: list[_Failover]) -> list[str]:
    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(f) for f in failovers) + " |"

    return [
        "| figure (min / median / max over the orphaned agents) | "
        + " | ".join(f"lease_s {f.lease_s:g}" for f in failovers)
        + " |",
        "|---|" + "---:|" * len(failovers),
        row(
            "orphaned agents (their rates)",
            lambda f: f"{len(f.orphans)} ({', '.join(map(str, f.orphans.values()))})",
        ),
        row("kill to the survivor's `leases taken`", lambda f: _spread(list(f.to_take.values()))),
        row(
            "kill to the agent's next arrival (failover time)",
            lambda f: _spread(list(f.to_arrival.values())),
        ),
        row(
            "the agent's last arrival before the kill to its next",
            lambda f: _spread(list(f.gap.values())),
        ),
        row(
            "orphans' arrivals between the kill and the take (the victim's in flight)",
            lambda f: str(f.in_flight),
        ),
        row(
            "orphans' 429s / over the rate in a 1 s window; any agent placed twice",
            lambda f: f"{f.refused_429} / {f.over_window}; {f.twice}",
        ),
        row("work dropped to every agent sending", lambda f: f"{f.sending_s:.1f} s"),
        row("survivors' outcomes at their stop", lambda f: _outcomes(f.outcomes)),
        row("exit codes", lambda f: ", ".join(str(e) for e in f.exits)),
    ]


def _refusals_table(runs: list[_Run]) -> list[str]:
    rows = [row for run in runs for row in run.refusals]
    if not rows:
        return ["No 429s in the measured runs."]
    return [
        "Each 429 of the measured runs, as the simulator stamped the arrivals:",
        "",
        "| run | agent | rate | held by | placed in the 1 s before | oldest of them to the 429 "
        "| smallest gap among them | the lane's interval |",
        "|---|---|---:|---|---:|---:|---:|---:|",
        *rows,
    ]


def _orphans_table(failovers: list[_Failover]) -> list[str]:
    lines = [
        "| lease_s | orphaned agent | rate | taken by | kill to taken | kill to next arrival "
        "| last arrival before the kill to the next |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for f in failovers:
        for agent, rate in sorted(f.orphans.items(), key=lambda item: f.to_take.get(item[0], 0)):

            def seconds(figures: dict[str, float], agent: str = agent) -> str:
                return f"{figures[agent]:.2f} s" if agent in figures else "—"

            lines.append(
                f"| {f.lease_s:g} | {agent} | {rate} | {f.taker.get(agent, '—')} "
                f"| {seconds(f.to_take)} | {seconds(f.to_arrival)} | {seconds(f.gap)} |"
            )
    return lines


def _noteworthy_table(named: list[tuple[str, dict[str, Counter]]]) -> list[str]:
    lines = []
    for run_name, by_daemon in named:
        for instance, seen in by_daemon.items():
            for (level, event), count in sorted(seen.items()):
                daemon = instance.rsplit("-", 1)[1]
                lines.append(f"| {run_name} | {daemon} | {level} | {event} | {count} |")
    if not lines:
        return ["No warnings or errors in any daemon's stderr."]
    return [
        "Warnings and errors in the daemons' stderr:",
        "",
        "| run | daemon | level | event | lines |",
        "|---|---|---|---|---:|",
        *lines,
    ]


def _on_paper(runs: list[_Run]) -> list[str]:
    postgres = [run for run in runs if run.on_postgres]
    gross = statistics.median(run.figures["backends_cpu"] for run in postgres) / 1000
    net = statistics.median(run.figures["net_backends_cpu"] for run in postgres) / 1000
    server = statistics.median(run.figures["server_cpu"] for run in postgres) / 1000
    rest = statistics.median(run.figures["idle_backends"] for run in postgres) / 1000
    top = RATES[0]

    def agents(cores: int, per_send: float) -> str:
        return f"{cores / per_send:,.0f} sends/s = {cores / per_send / top:,.0f} agents at {top}/s"

    return [
        f"On paper: the backends took {gross * 1000:.2f} ms of CPU per send (median over the "
        f"PostgreSQL runs; {server * 1000:.2f} ms with the server's own processes, whose work "
        f"other clients share), {net * 1000:.2f} ms net of what they take at rest "
        f"({rest * 1000:.0f} ms of CPU per second with {AGENTS} agents and no work: lease "
        "rounds, the controls' polls, idle lanes' reads: costs that do not scale with the "
        "sends). At 36 sends/s those fixed costs weigh on each send; the "
        "two figures bound what a send costs at scale. One primary would carry, per core: "
        f"{agents(1, gross)} (gross) to {agents(1, net)} (net); "
        + "; ".join(
            f"{cores} cores: {cores / gross / top:,.0f}-{cores / net / top:,.0f} agents"
            for cores in CORES_ON_PAPER[1:]
        )
        + " — at 100 % busy on CPU alone; the commit's WAL flush (synchronous_commit, one per "
        "group commit) and the row locks are wall time this does not count, so plan at about "
        "half.",
        "Past that, shard by agent: each shard a database (its own primary) with its own "
        "daemons, whose configs list only that shard's agents, and work routed by agent to a "
        "daemon of its shard. An agent never spans shards, so no lease, mark or rate crosses "
        "one; what does not shard by itself is what is kept per number rather than per agent "
        "(`max_calls_per_number` counts calls to a number across all agents: per shard it "
        "would be counted in each shard apart) and each shard's status, reports, results owed "
        "and callbacks (a status_url names a daemon of the shard that sent it).",
    ]


def _interpretation(runs: list[_Run], failovers: list[_Failover]) -> list[str]:
    by_letter = defaultdict(list)
    for each in runs:
        by_letter[each.letter].append(each)
    letters = [letter for letter, _pg, _count in CONFIGS]
    base, pg_one, *clusters = letters

    def ratios(letter: str, figure: str, to: str = base) -> list[float]:
        return [
            mine.figures[figure] / theirs.figures[figure]
            for mine, theirs in zip(by_letter[letter], by_letter[to], strict=True)
        ]

    achieved = [each.figures["achieved_median"] for each in runs]
    worst = min(runs, key=lambda each: each.figures["achieved_min"])
    dialerd = [r for letter in letters[1:] for r in ratios(letter, "dialerd_cpu")]
    total = [r for letter in letters[1:] for r in ratios(letter, "total_cpu")]
    spread = [r for letter in clusters for r in ratios(letter, "total_cpu", pg_one)]
    p99 = {
        letter: statistics.median(each.figures["mark_p99"] for each in by_letter[letter])
        for letter in letters
    }
    lines = [
        f"The rate: every run kept its agents at {min(achieved):.3f}-{max(achieved):.3f} of "
        f"their rate at the median; the worst agent of any run was at "
        f"{worst.figures['achieved_min']:.3f} ({worst.name}, "
        f"{worst.figures['429']} 429s in that run).",
        f"CPU: a daemon on PostgreSQL spends {min(dialerd):.2f}-{max(dialerd):.2f}× the CPU per "
        f"send of one on SQLite, and with its backends {min(total):.2f}-{max(total):.2f}×; "
        f"spreading the agents over {' or '.join(str(by_letter[x][0].count) for x in clusters)} "
        f"daemons costs {min(spread):.2f}-{max(spread):.2f}× one daemon's on PostgreSQL "
        "(daemons plus backends, round by round).",
        "The mark's p99 (bucket bounds) goes "
        + " → ".join(f"{_ms(p99[letter])} ({letter})" for letter in letters)
        + " (noisy: see each run's).",
    ]
    for f in failovers:
        if f.to_arrival:
            late = max(f.to_take.values(), default=0.0)
            lines.append(
                f"Failover at lease_s {f.lease_s:g}: the orphans were dialed again "
                f"{_spread(list(f.to_arrival.values()))} (min / median / max) after the kill; "
                f"the last take came {late:.2f} s after it"
                + (
                    f", past lease_s by {late - f.lease_s:.2f} s"
                    if late > f.lease_s
                    else f", within lease_s ({f.lease_s:g} s)"
                )
                + f"; takers: {_takes(f)}{_contended(f)}."
            )
    return lines


def _contended(f: _Failover) -> str:
    """Said when the survivors' takes came one lease round (lease_s / 3) apart."""
    firsts = sorted(
        {min(f.to_take[a] for a in f.taker if f.taker[a] == t) for t in f.taker.values()}
    )
    if len(firsts) == 2 and 0.8 <= (firsts[1] - firsts[0]) / (f.lease_s / 3) <= 1.2:
        return (
            " — one lease round (lease_s / 3) apart: both survivors woke as the leases ran out "
            "and asked for the same free agents first (the head of the sorted list); the one "
            "that lost the race took none and waited for its next round"
        )
    return ""


def _takes(f: _Failover) -> str:
    """Each survivor's take after the kill: when, and how many agents."""
    times: dict[str, list[float]] = defaultdict(list)
    for agent, taker in f.taker.items():
        times[taker].append(f.to_take[agent])
    return ", ".join(
        f"{taker} {len(taken)} at {min(taken):.2f} s" for taker, taken in sorted(times.items())
    )


def run() -> list[str]:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed too, it cleans up
    began = time.monotonic()
    order = []
    for index in range(ROUNDS):
        configs = CONFIGS if index % 2 == 0 else tuple(reversed(CONFIGS))
        order += [(index + 1, letter, pg, count) for letter, pg, count in configs]
    runs = [_Run(letter, n, pg, count, f"r{n}{letter.lower()}") for n, letter, pg, count in order]
    failovers = [_Failover(lease_s, f"f{int(lease_s)}") for lease_s in FAILOVER_LEASES]
    agents = {a: r for each in runs for a, r in _agents(each.tag).items()}
    agents |= {a: r for each in failovers for a, r in _agents(each.tag).items()}
    with psycopg.connect(DSN, autocommit=True) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        synchronous_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
    schemas = _Schemas()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        log = workdir / "arrivals.jsonl"
        try:
            with simulator_process(agents, log, LATENCY) as base_url:
                endpoint = f"{base_url}/eu/telephony/make-call"
                for each in runs:
                    _measure(each, workdir, endpoint, schemas)
                for each in failovers:
                    _failover(each, workdir, endpoint, log, schemas)
        finally:
            schemas.drop_all()
        arrivals = read_arrivals(log)
    for each in runs:
        _figures(each, arrivals)
    took = time.monotonic() - began
    total_rate = sum(_agents("x").values())
    return [
        f"Cluster mode: {AGENTS} agents at {'/'.join(map(str, RATES))} calls/s in turn "
        f"({total_rate} calls/s in all), {WORK_S} s of work per agent at its rate "
        f"({total_rate * WORK_S:,} requests per configuration) dealt round-robin over the "
        f"daemons' spools, against one `dialerd simulate` ({LATENCY} s answers, strict 1 s "
        f"windows); lease_s {LEASE_S:g}. {ROUNDS} rounds ("
        + ", ".join(each.name for each in runs)
        + f"). {version}, synchronous_commit={synchronous_commit}; {os.cpu_count()} CPUs shared "
        "by the simulator, the daemons and PostgreSQL.",
        "",
        *_configuration_table(runs),
        "",
        "Each run:",
        "",
        *_rounds_table(runs),
        "",
        *_refusals_table(runs),
        "",
        f"Failover: three daemons on PostgreSQL, {AGENTS} agents, work in the first two's "
        f"spools; {FAILOVER_SETTLE_S:g} s after every agent was sending, the third is killed "
        "(SIGKILL) and its agents are orphaned.",
        "",
        *_failover_table(failovers),
        "",
        *_orphans_table(failovers),
        "",
        *_noteworthy_table(
            [(each.name, each.noteworthy) for each in runs]
            + [(f"failover {each.lease_s:g}", each.noteworthy) for each in failovers]
        ),
        "",
        *_interpretation(runs, failovers),
        "",
        *_on_paper(runs),
        "",
        f"The benchmark took {took:.0f} s.",
    ]
