"""The mark transaction on PostgreSQL by driver: asyncpg, psycopg 3 async, and psycopg 3 sync in
dialerd's own ledger writer thread, with its group commits, side by side in one run.

The mark is the transaction before each outbound call: the lease check (FOR SHARE), the request's
number, the per-number cap's window, the move to `sending` unless paused, and a row each in
number_calls, agent_sends and calls. It runs in a schema of the run's own (dropped at the end),
filled with as many queued requests as the run marks, over 10 agents whose leases the bench
holds. Two loads: one mark at a time, back to back (what a lane waits for), and 50 in flight
(200 agents' lanes). Figures per way and load: marks/s; the latency from the call to its result
on the event loop; the CPU per 1,000 marks of this process and of the PostgreSQL backends
serving the way's connections (from /proc: the server must run on this host). The ways take
turns in rounds, in a rotating order, so that the shared machine's noise falls on all of them
alike; each ratio to asyncpg is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict

from dialerd.ledger import postgres
from dialerd.ledger.writer import Writer

DSN = "postgresql://postgres@127.0.0.1:5432/test"
AGENTS = 10
MARKS = 7500  # per way and load, over all the rounds: about a minute in all
ROUNDS = 15
CONCURRENCY = 50
CONNECTIONS = 4  # of each async way under concurrency
WARMUP = 100  # marks per way and load before the rounds: statements prepared, caches filled
CAP_WINDOW_S = 3600.0
CAP_COUNT = 10  # never reached: every mark does all its work
HOLDER, EPOCH = f"bench-{os.getpid()}", 1
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

LEASE = (
    "SELECT 1 FROM leases WHERE agent_id = $1 AND holder = $2 AND epoch = $3"
    " AND expires_at > clock_timestamp() FOR SHARE"
)
NUMBER = "SELECT to_number FROM requests WHERE seq = $1 AND state = 'queued'"
WINDOW = "SELECT at FROM number_calls WHERE to_number = $1 AND at > $2 ORDER BY at"
SEND = (
    "UPDATE requests SET state = 'sending', sent_at = $2, token = $3"
    " WHERE seq = $1 AND state IN ('queued') AND NOT EXISTS (SELECT 1 FROM pauses"
    " WHERE (kind = 'agent' AND name = requests.agent_id)"
    " OR (kind = 'campaign' AND name = requests.campaign))"
)
NUMBER_CALL = "INSERT INTO number_calls (seq, to_number, at, placed) VALUES ($1, $2, $3, false)"
AGENT_SENT = (
    "INSERT INTO agent_sends (agent_id, last_sent_at)"
    " VALUES ($1, extract(epoch from clock_timestamp()))"
    " ON CONFLICT (agent_id) DO UPDATE SET last_sent_at = excluded.last_sent_at"
)
CALL = "INSERT INTO calls (token, seq, attempt, sent_at) VALUES ($1, $2, 1, $3)"

SCHEMA = """
CREATE TABLE requests (
    seq bigserial PRIMARY KEY, id text NOT NULL UNIQUE, agent_id text NOT NULL,
    to_number text NOT NULL, campaign text, state text NOT NULL, sent_at double precision,
    token text, due_at double precision NOT NULL);
CREATE INDEX requests_queued ON requests (agent_id, due_at) WHERE state = 'queued';
CREATE TABLE number_calls (
    seq bigint NOT NULL, to_number text NOT NULL, at double precision NOT NULL,
    placed boolean NOT NULL);
CREATE INDEX number_calls_window ON number_calls (to_number, at);
CREATE TABLE leases (
    agent_id text PRIMARY KEY, holder text NOT NULL, epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL);
CREATE TABLE agent_sends (agent_id text PRIMARY KEY, last_sent_at double precision NOT NULL);
CREATE TABLE calls (
    token text PRIMARY KEY, seq bigint NOT NULL, attempt integer NOT NULL,
    sent_at double precision NOT NULL);
CREATE TABLE pauses (kind text, name text, PRIMARY KEY (kind, name));
-- Paused ones no request of the bench belongs to: the check runs, and passes.
INSERT INTO pauses VALUES ('agent', 'agent-paused'), ('campaign', 'paused');
"""
FILL = (
    "INSERT INTO requests (id, agent_id, to_number, campaign, state, due_at)"
    " SELECT 'r' || g, 'agent-' || g %% %(agents)s,"
    " '+4477' || lpad((g %% (%(n)s / 2))::text, 7, '0'),"  # each number called twice at most
    " 'c' || g %% 3, 'queued', extract(epoch from now()) FROM generate_series(1, %(n)s) g",
    # A call of every number before the window: a table as large as the requests when the
    # statements are planned. A generic plan made while it is nearly empty is a seq scan, kept
    # (and ever slower, a row more each mark) until autoanalyze happens to invalidate it.
    "INSERT INTO number_calls (seq, to_number, at, placed)"
    " SELECT seq, to_number, due_at - 2 * %(window)s, true FROM requests",
    "INSERT INTO leases SELECT 'agent-' || a, %(holder)s, %(epoch)s, now() + interval '1 hour'"
    " FROM generate_series(0, %(agents)s - 1) a",
)

Mark = Callable[[int, str, float], Awaitable[bool]]  # (seq, agent, now) -> marked


async def _mark_asyncpg(conn: asyncpg.Connection, seq: int, agent: str, now: float) -> bool:
    token = f"t{seq}"
    async with conn.transaction():
        if await conn.fetchval(LEASE, agent, HOLDER, EPOCH) is None:
            return False
        to = await conn.fetchval(NUMBER, seq)
        if to is None or len(await conn.fetch(WINDOW, to, now - CAP_WINDOW_S)) >= CAP_COUNT:
            return False
        if await conn.execute(SEND, seq, now, token) != "UPDATE 1":
            return False
        await conn.execute(NUMBER_CALL, seq, to, now)
        await conn.execute(AGENT_SENT, agent)
        await conn.execute(CALL, token, seq, now)
    return True


async def _mark_psycopg_async(
    conn: psycopg.AsyncConnection, seq: int, agent: str, now: float
) -> bool:
    token = f"t{seq}"
    async with conn.transaction():
        cursor = conn.cursor()
        if await (await cursor.execute(LEASE, (agent, HOLDER, EPOCH))).fetchone() is None:
            return False
        row = await (await cursor.execute(NUMBER, (seq,))).fetchone()
        if row is None:
            return False
        to = row[0]
        window = await (await cursor.execute(WINDOW, (to, now - CAP_WINDOW_S))).fetchall()
        if len(window) >= CAP_COUNT:
            return False
        if (await cursor.execute(SEND, (seq, now, token))).rowcount != 1:
            return False
        await cursor.execute(NUMBER_CALL, (seq, to, now))
        await cursor.execute(AGENT_SENT, (agent,))
        await cursor.execute(CALL, (token, seq, now))
    return True


def _mark_psycopg_sync(conn: psycopg.Connection, seq: int, agent: str, now: float) -> bool:
    """The mark without its transaction: the group commit's, under a savepoint."""
    token = f"t{seq}"
    cursor = conn.cursor()
    if cursor.execute(LEASE, (agent, HOLDER, EPOCH)).fetchone() is None:
        return False
    row = cursor.execute(NUMBER, (seq,)).fetchone()
    if row is None:
        return False
    to = row[0]
    if len(cursor.execute(WINDOW, (to, now - CAP_WINDOW_S)).fetchall()) >= CAP_COUNT:
        return False
    if cursor.execute(SEND, (seq, now, token)).rowcount != 1:
        return False
    cursor.execute(NUMBER_CALL, (seq, to, now))
    cursor.execute(AGENT_SENT, (agent,))
    cursor.execute(CALL, (token, seq, now))
    return True


async def _pooled_asyncpg(pool: asyncpg.Pool, seq: int, agent: str, now: float) -> bool:
    async with pool.acquire() as conn:
        return await _mark_asyncpg(conn, seq, agent, now)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's default reset is one more round trip per release (RESET ALL, UNLISTEN *...),
    which the psycopg connections, handed out by hand, do not pay; ours keep no session state."""


class HandedOut:
    """A few psycopg async connections, each serving one mark at a time, handed to the marks in
    the order they came (psycopg_pool is not installed). An asyncio.Queue would not do: a mark
    that puts a connection back takes it again at once for its lane's next, ahead of those
    waiting, and the latencies would measure that unfairness rather than the driver."""

    def __init__(self, conns: list[psycopg.AsyncConnection]):
        self._idle = list(conns)
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    async def mark(self, seq: int, agent: str, now: float) -> bool:
        if self._idle:
            conn = self._idle.pop()
        else:
            self._waiting.append(asyncio.get_running_loop().create_future())
            conn = await self._waiting[-1]
        try:
            return await _mark_psycopg_async(conn, seq, agent, now)
        finally:
            while self._waiting and self._waiting[0].cancelled():
                self._waiting.popleft()
            if self._waiting:
                self._waiting.popleft().set_result(conn)
            else:
                self._idle.append(conn)


class Counted:
    """The sync connection as dialerd's ledger writer uses it, its commits counted."""

    def __init__(self, conn: psycopg.Connection):
        self.raw = conn
        self.commits = 0

    def execute(self, sql: str, params: tuple | None = None) -> psycopg.Cursor:
        self.commits += sql == "COMMIT"
        return self.raw.execute(sql, params)

    def cursor(self) -> psycopg.Cursor:
        return self.raw.cursor()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.broken

    def close(self) -> None:
        self.raw.close()


@dataclass
class Way:
    name: str
    serving: dict[str, tuple[Mark, list[int]]]  # load -> (mark, its connections' backend pids)
    commits: Callable[[], int] | None = None  # None: one commit per mark


@dataclass
class Sample:
    marks: int
    wall_s: float
    python_cpu_s: float
    postgres_cpu_s: float
    commits: int
    latencies: list[float]


def _backend_cpu(pids: list[int]) -> float:
    """CPU seconds of these PostgreSQL backends so far: the time utime + stime of /proc/PID/stat
    add up to, from /proc/PID/schedstat in nanoseconds rather than in 10 ms ticks, so that one
    round's figure is not a few dozen ticks."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            total += int(schedstat.read().split()[0])
    return total / 1e9


async def _measure(way: Way, load: str, in_flight: int, work: list[tuple[int, str]]) -> Sample:
    mark, pids = way.serving[load]
    pending = iter(work)
    latencies: list[float] = []

    async def lane() -> None:
        for seq, agent in pending:
            started = time.perf_counter()
            if not await mark(seq, agent, time.time()):
                raise RuntimeError(f"{way.name}: request {seq} was not marked")
            latencies.append(time.perf_counter() - started)

    commits = way.commits() if way.commits else 0
    python_cpu, postgres_cpu = time.process_time(), _backend_cpu(pids)
    started = time.perf_counter()
    async with asyncio.TaskGroup() as lanes:  # one failing mark stops them all
        for _ in range(in_flight):
            lanes.create_task(lane())
    wall_s = time.perf_counter() - started
    return Sample(
        marks=len(work),
        wall_s=wall_s,
        python_cpu_s=time.process_time() - python_cpu,
        postgres_cpu_s=_backend_cpu(pids) - postgres_cpu,
        commits=way.commits() - commits if way.commits else len(work),
        latencies=latencies,
    )


async def _open_ways(stack: contextlib.AsyncExitStack, dsn: str, schema: str) -> list[Way]:
    settings = {"search_path": schema}
    single = await asyncpg.connect(dsn, server_settings=settings)
    stack.push_async_callback(single.close)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=CONNECTIONS,
        max_size=CONNECTIONS,
        reset=_no_reset,
        max_queries=2**62,  # a connection replaced mid-run would leave the CPU count
        server_settings=settings,
    )
    stack.push_async_callback(pool.close)
    held = [await pool.acquire() for _ in range(CONNECTIONS)]
    pool_pids = [conn.get_server_pid() for conn in held]
    for conn in held:
        await pool.release(conn)

    # Raw cursors take PostgreSQL's own $n placeholders: the same statements for both drivers.
    options = {"autocommit": True, "options": f"-c search_path={schema}"}
    handed = []
    for _ in range(CONNECTIONS):
        conn = await psycopg.AsyncConnection.connect(
            dsn, cursor_factory=psycopg.AsyncRawCursor, **options
        )
        stack.push_async_callback(conn.close)
        handed.append(conn)
    sync = psycopg.connect(dsn, cursor_factory=psycopg.RawCursor, **options)
    stack.callback(sync.close)
    # dialerd's own writer thread, as the daemon runs it on PostgreSQL (group commits of at most
    # postgres.BATCH_CALLS, a savepoint per call, the commit's outcome asked for once lost).
    counted = Counted(sync)
    writer = Writer(counted, postgres.engine("bench", reconnect=None))
    stack.callback(writer.stop)

    async def group_mark(seq: int, agent: str, now: float) -> bool:
        return await writer.call(_mark_psycopg_sync, seq, agent, now)

    group_serving = (group_mark, [sync.info.backend_pid])
    return [
        Way(
            "asyncpg",
            {
                "sequential": (partial(_mark_asyncpg, single), [single.get_server_pid()]),
                "concurrent": (partial(_pooled_asyncpg, pool), pool_pids),
            },
        ),
        Way(
            "psycopg async",
            {
                "sequential": (
                    partial(_mark_psycopg_async, handed[0]),
                    [handed[0].info.backend_pid],
                ),
                "concurrent": (HandedOut(handed).mark, [conn.info.backend_pid for conn in handed]),
            },
        ),
        Way(
            "psycopg sync thread, group commit",
            {"sequential": group_serving, "concurrent": group_serving},
            lambda: counted.commits,
        ),
    ]


async def _compare(
    dsn: str,
    schema: str,
    work: list[tuple[int, str]],
    loads: dict[str, int],
    marks: int,
    rounds: int,
) -> tuple[list[Way], dict[str, dict[str, list[Sample]]]]:
    """Every way's samples per load, round by round."""
    async with contextlib.AsyncExitStack() as stack:
        ways = await _open_ways(stack, dsn, schema)
        pending = iter(work)

        def take(count: int) -> list[tuple[int, str]]:
            return [next(pending) for _ in range(count)]

        for way in ways:
            for load, in_flight in loads.items():
                await _measure(way, load, in_flight, take(WARMUP))
        samples = {load: {way.name: [] for way in ways} for load in loads}
        for index in range(rounds):
            order = ways[index % len(ways) :] + ways[: index % len(ways)]
            for load, in_flight in loads.items():
                for way in order:
                    sample = await _measure(way, load, in_flight, take(marks // rounds))
                    samples[load][way.name].append(sample)
        return ways, samples


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _figures(samples: list[Sample]) -> dict[str, float]:
    marks = sum(sample.marks for sample in samples)
    latencies = sorted(latency for sample in samples for latency in sample.latencies)
    return {
        "marks/s": marks / sum(sample.wall_s for sample in samples),
        "latency p50, ms": _quantile(latencies, 0.5) * 1000,
        "latency p99, ms": _quantile(latencies, 0.99) * 1000,
        "Python CPU s / 1,000 marks": sum(s.python_cpu_s for s in samples) / marks * 1000,
        "PostgreSQL CPU s / 1,000 marks": sum(s.postgres_cpu_s for s in samples) / marks * 1000,
        "marks per commit": marks / sum(sample.commits for sample in samples),
        "CPUs busy, Python + backends": sum(s.python_cpu_s + s.postgres_cpu_s for s in samples)
        / sum(s.wall_s for s in samples),
    }


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}"


def _report(
    ways: list[Way], samples: dict, loads: dict[str, int], header: str, took_s: float
) -> list[str]:
    names = [way.name for way in ways]
    base = names[0]
    figures = {load: {name: _figures(samples[load][name]) for name in names} for load in loads}
    # Ratios are taken round by round, to the baseline's figure of the same round, so that a
    # burst of load on the machine moves both sides of each; their median is shown.
    rounds = {
        load: {name: [_figures([sample]) for sample in samples[load][name]] for name in names}
        for load in loads
    }

    def ratios(load: str, name: str, figure: str) -> list[float]:
        return [
            mine[figure] / theirs[figure] if theirs[figure] else math.inf
            for mine, theirs in zip(rounds[load][name], rounds[load][base], strict=True)
        ]

    rows = [
        header,
        "",
        f"| load | figure | {' | '.join(names)} |",
        "|---|---|" + "---:|" * len(names),
    ]
    for load, in_flight in loads.items():
        label = "one at a time" if in_flight == 1 else f"{in_flight} in flight"
        for index, figure in enumerate(figures[load][base]):
            cells = [_number(figures[load][base][figure])] + [
                f"{_number(figures[load][name][figure])}"
                f" ({statistics.median(ratios(load, name, figure)):.2f})"
                for name in names[1:]
            ]
            rows.append(f"| {label if index == 0 else ''} | {figure} | {' | '.join(cells)} |")
        spread = [ratios(load, name, "marks/s") for name in names[1:]]
        rows.append(
            "| | marks/s ratio, min-max of rounds | | "
            + " | ".join(f"{min(each):.2f}-{max(each):.2f}" for each in spread)
            + " |"
        )

    one, many = (figures[load] for load in loads)
    group = names[-1]
    rows += [
        "",
        f"One at a time (latency-bound), a mark takes {one[base]['latency p50, ms']:.2f} ms at p50"
        f" with asyncpg, {one[names[1]]['latency p50, ms']:.2f} with psycopg async and"
        f" {one[group]['latency p50, ms']:.2f} through the group-commit thread, whose batch of one"
        " adds a savepoint, its release and two thread hops.",
        f"With {loads['concurrent']} in flight the thread commits"
        f" {many[group]['marks per commit']:.0f} marks at a time, one statement after another on"
        f" one connection, and keeps {many[group]['CPUs busy, Python + backends']:.2f} CPUs busy"
        f" for {statistics.median(ratios('concurrent', group, 'marks/s')):.2f} times asyncpg's"
        " marks/s;"
        f" the async ways commit each mark on {CONNECTIONS} connections and keep"
        f" {many[base]['CPUs busy, Python + backends']:.2f} (asyncpg) and"
        f" {many[names[1]]['CPUs busy, Python + backends']:.2f} (psycopg) busy.",
        "CPU per 1,000 marks, Python + PostgreSQL backends, one at a time / in flight: "
        + "; ".join(f"{name} {_cpu(one[name]):.2f} / {_cpu(many[name]):.2f} s" for name in names)
        + ". Left out: the WAL writer, the checkpointer and autovacuum; the wait for the WAL"
        " flush is wall time, not CPU.",
        f"The run took {took_s:.0f} s.",
    ]
    return rows


def _cpu(figures: dict[str, float]) -> float:
    return figures["Python CPU s / 1,000 marks"] + figures["PostgreSQL CPU s / 1,000 marks"]


def _loop_factory(name: str):
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(
    dsn: str = DSN,
    marks: int = MARKS,
    rounds: int = ROUNDS,
    concurrency: int = CONCURRENCY,
    loop: str = "uvloop",
) -> list[str]:
    host = conninfo_to_dict(dsn).get("host", "/")
    if host not in LOCAL_HOSTS and not host.startswith("/"):
        raise SystemExit(f"{host}: the backends' CPU is read from /proc, so only a local server")
    started = time.perf_counter()
    loads = {"sequential": 1, "concurrent": concurrency}
    requests = len(loads) * 3 * (WARMUP + marks // rounds * rounds)  # 3 ways
    schema = f"bench_pg_driver_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        synchronous_commit = admin.execute("SHOW synchronous_commit").fetchone()[0]
        try:
            admin.execute(f"CREATE SCHEMA {schema}")
            admin.execute(f"SET search_path = {schema}")
            admin.execute(SCHEMA)
            params = {
                "n": requests,
                "agents": AGENTS,
                "holder": HOLDER,
                "epoch": EPOCH,
                "window": CAP_WINDOW_S,
            }
            for statement in FILL:
                admin.execute(statement, params)
            admin.execute("ANALYZE")
            work = admin.execute("SELECT seq, agent_id FROM requests ORDER BY seq").fetchall()
            with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
                ways, samples = runner.run(_compare(dsn, schema, work, loads, marks, rounds))
        finally:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    header = (
        f"The mark transaction on PostgreSQL {version} on this host (synchronous_commit"
        f"={synchronous_commit}), {marks // rounds * rounds:,} marks per way and load in {rounds}"
        f" rounds, the ways in turn; {loop}'s event loop, {os.cpu_count()} CPUs. In brackets:"
        " the median over the rounds of the ratio to asyncpg's figure in the same round."
    )
    return _report(ways, samples, loads, header, time.perf_counter() - started)


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed too, it drops its schema
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DSN, help=f"a local server (default {DSN})")
    parser.add_argument("--marks", type=int, default=MARKS, help="per way and load")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="marks in flight")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.marks < args.rounds:
        parser.error("--marks: at least one per round")
    print("\n".join(run(**vars(args))))


if __name__ == "__main__":
    main()
