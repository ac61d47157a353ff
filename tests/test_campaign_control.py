"""Campaign control in the ledger (SPEC §2 cancel, pause, resume; §4 campaign, priority,
timezone; §6 cancelled): what `cancel` says it cancelled is never sent, a pause holds at the
mark whatever a lane holds in memory, and an agent's due requests go highest priority first."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    ledger_of_version,
    read_results,
    run_dialerd,
    sim_config,
    wait_for,
    write_config,
)
from test_cluster import ledger_url
from test_faults import drop
from test_lifecycle_callbacks import Setup, free_port
from test_request import CONFIG

from dialerd.cli import main
from dialerd.config import CallingHours, ClusterConfig, ConfigError, RedialPolicy, build_config
from dialerd.hours import CallingWindow
from dialerd.ledger import connect, control, create_schema, status_report
from dialerd.ledger.control import Selection, cancel, pause, resume
from dialerd.ledger.intake import add
from dialerd.ledger.placed import apply_callback, placed
from dialerd.ledger.requeue import requeue
from dialerd.ledger.retention import prune
from dialerd.ledger.sends import due, expire_due, finish, mark_sending, retry_later, unmark
from dialerd.ledger.states import State
from dialerd.report import read_ledger
from dialerd.request import InvalidRequest, build_request
from dialerd.results import Outcome

AGENT = "agent-eu"  # test_request's CONFIG's default agent
BUSY = {"busy": RedialPolicy(attempts=3, delay_s=60)}


@pytest.fixture
def conn(ledger_conn):
    """Each test of the ledger's campaign controls runs on SQLite and on PostgreSQL."""
    return ledger_conn


@pytest.fixture
def state_dir(ledger_where) -> Path:
    """Where the command line's functions find conn's ledger, with `cluster`."""
    return ledger_where[0]


@pytest.fixture
def cluster(ledger_where) -> ClusterConfig | None:
    return ledger_where[1]


def ledger_config(tmp_path: Path, state_dir: Path, cluster: ClusterConfig | None) -> Path:
    """A config whose ledger is conn's: the file in state_dir, or (cluster mode) the schema."""
    top = {} if cluster is None else {"ledger": ledger_url(cluster.url), "instance": "test-1"}
    return write_config(tmp_path, state_dir=str(state_dir), **top)


def take(conn, request_id: str, number: int = 0, **fields) -> int:
    request = build_request(
        {"id": request_id, "to": f"+4477009{number:05d}", **fields}, CONFIG, "test:1"
    )
    add(conn, 1, [request], [], None, 0)
    conn.execute("UPDATE requests SET due_at = 0, created_at = 0 WHERE id = ?", (request_id,))
    return conn.execute("SELECT seq FROM requests WHERE id = ?", (request_id,)).fetchone()[0]


def due_ids(conn) -> list[str]:
    return [pending.id for pending in due(conn, AGENT, 1e12, 100)[0]]


def outcome_of(conn, request_id: str) -> tuple[str, str | None]:
    return conn.execute(
        "SELECT state, outcome FROM requests WHERE id = ?", (request_id,)
    ).fetchone()


def results(conn) -> list[dict]:
    return [json.loads(line) for (line,) in conn.execute("SELECT line FROM outbox ORDER BY seq")]


# -- priority, timezone ---------------------------------------------------------------------------


def test_due_requests_go_highest_priority_first_then_by_due_time_then_arrival(conn):
    take(conn, "low-early")
    take(conn, "high-late", 1, priority=9)
    take(conn, "mid", 2, priority=5)
    take(conn, "high-early", 3, priority=9)
    take(conn, "low-late", 4)
    conn.execute("UPDATE requests SET due_at = 10 WHERE id IN ('high-late', 'low-late')")
    assert due_ids(conn) == ["high-early", "high-late", "mid", "low-early", "low-late"]
    conn.execute("UPDATE requests SET due_at = 5e12 WHERE priority = 9")  # not due yet
    pending, next_due = due(conn, AGENT, 1e12, 100)
    assert [p.id for p in pending] == ["mid", "low-early", "low-late"]
    assert due(conn, AGENT, -1, 100) == ([], 0)  # none due: the next is the earliest


@pytest.mark.parametrize("priority", [-1, 10, 1.5, "9", True, None])
def test_a_priority_is_a_whole_number_from_0_to_9(priority):
    with pytest.raises(InvalidRequest, match="priority: must be a whole number from 0 to 9"):
        build_request({"to": "+447700900123", "priority": priority}, CONFIG, "test:1")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "", 5, "europe/london"])
def test_a_timezone_is_a_known_zone_name(zone):
    with pytest.raises(InvalidRequest, match="timezone: is not a known time zone"):
        build_request({"to": "+447700900123", "timezone": zone}, CONFIG, "test:1")


def test_the_callees_own_zone_decides_the_calling_hours_for_its_request():
    """A US number whose callee is in London: the window is open in London, not in the US."""
    london = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC).timestamp()  # 12:00 in London
    hours = CallingHours(
        start=dt.time(11), end=dt.time(13), days=frozenset(range(7)),
        default_timezone="UTC", holidays=frozenset(),
    )  # fmt: skip
    window = CallingWindow(hours)
    us_number = "12015550123"
    assert window.next_open(us_number, london) > london  # 07:00 in New Jersey: closed
    assert window.next_open(us_number, london, "Europe/London") == london


# -- pause and resume ---------------------------------------------------------------------------


def test_a_paused_campaign_is_neither_due_nor_marked_and_goes_on_when_resumed(
    state_dir, cluster, conn
):
    a1 = take(conn, "a1", 1, campaign="A")
    take(conn, "b1", 2, campaign="B")
    take(conn, "none", 3)
    assert pause(state_dir, Selection(campaign="A"), cluster) == (True, 1)
    assert pause(state_dir, Selection(campaign="A"), cluster) == (False, 1)  # already

    assert due_ids(conn) == ["a1", "b1", "none"][1:]
    # A lane that read a1 before the pause: the mark refuses it, in its own statement.
    assert mark_sending(conn, a1, None, 1, 0.0, None) == (False, None)
    assert outcome_of(conn, "a1") == (State.QUEUED, None)
    report = status_report(conn, 0)
    assert report["paused"] == [{"kind": "campaign", "name": "A", "since": pytest.approx(
        report["paused"][0]["since"])}]  # fmt: skip
    assert report["campaigns"]["A"]["paused"] == report["agents"][AGENT]["paused"] == 1

    assert resume(state_dir, Selection(campaign="A"), cluster) == (True, 1)
    assert resume(state_dir, Selection(campaign="A"), cluster) == (False, 1)
    assert due_ids(conn) == ["a1", "b1", "none"]
    assert mark_sending(conn, a1, None, 1, 0.0, None) == (True, None)


def test_a_paused_agent_has_nothing_due_and_nothing_marked(state_dir, cluster, conn):
    seq = take(conn, "r1")
    pause(state_dir, Selection(agent=AGENT), cluster)
    assert due(conn, AGENT, 1e12, 10) == ([], None)
    assert mark_sending(conn, seq, None, 1, 0.0, None) == (False, None)
    resume(state_dir, Selection(agent=AGENT), cluster)
    assert due_ids(conn) == ["r1"]


# -- cancel --------------------------------------------------------------------------------------


def test_cancel_ends_every_waiting_request_of_the_campaign_and_says_how_each_waited(
    state_dir, cluster, conn
):
    for n, request_id in enumerate(["queued", "held", "redial", "sending", "placed", "other"]):
        take(conn, request_id, n, campaign="B" if request_id != "other" else "C")
    conn.execute("UPDATE requests SET held = 'calling_hours', due_at = 9e9 WHERE id = 'held'")
    conn.execute("UPDATE requests SET attempts = 1, due_at = 9e9 WHERE id = 'redial'")
    for request_id in ("sending", "placed"):
        (seq,) = conn.execute("SELECT seq FROM requests WHERE id = ?", (request_id,)).fetchone()
        assert mark_sending(conn, seq, f"t-{request_id}", 1, 0.0, None) == (True, None)
    placed(conn, 5, "t-placed", 9e9, BUSY, {"attempts": 1, "http_status": 200})

    dry = cancel(state_dir, Selection(campaign="B"), dry_run=True, cluster=cluster)
    assert dict(dry.by_state) == {"queued": 1, "held for calling hours": 1,
                                  "waiting for a redial": 1}  # fmt: skip
    assert dry.in_flight == 2
    assert results(conn) == []  # a dry run changes nothing

    done = cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    assert dict(done.by_state) == dict(dry.by_state) and done.in_flight == 2
    cancelled = {r["id"]: r for r in results(conn)}
    assert set(cancelled) == {"queued", "held", "redial"}
    assert {(r["outcome"], r["campaign"]) for r in cancelled.values()} == {("cancelled", "B")}
    assert outcome_of(conn, "other") == (State.QUEUED, None)
    # In flight: not recalled, but a refusal is not retried, and a busy callback not redialed.
    retry_later(conn, 4, 0.0, True, "HTTP 503")
    assert outcome_of(conn, "sending") == (State.FINAL, Outcome.CANCELLED)
    assert apply_callback(conn, "t-placed", callback("busy", 4), BUSY, 1.0) == (
        "cancelled", AGENT
    )  # fmt: skip
    assert outcome_of(conn, "placed") == (State.FINAL, Outcome.CANCELLED)
    counts = status_report(conn, 0)["campaigns"]["B"]["outcomes"]
    assert counts == {"cancelled": 5}


def callback(status: str, number: int) -> dict:
    return {"status": status, "to": f"4477009{number:05d}", "agent_id": AGENT}


def test_a_cancelled_call_that_went_unanswered_with_no_redial_left_is_unanswered(
    state_dir, cluster, conn
):
    seq = take(conn, "r1", 7, campaign="B")
    mark_sending(conn, seq, "t", 1, 0.0, None)
    placed(conn, seq, "t", 9e9, {}, {"attempts": 1, "http_status": 200})
    cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    assert apply_callback(conn, "t", callback("busy", 7), {}, 1.0) == ("unanswered", AGENT)


def test_cancel_by_ids_cancels_nothing_when_one_is_unknown(state_dir, cluster, conn):
    take(conn, "r1")
    take(conn, "r2", 1)
    done = cancel(state_dir, Selection(ids=("r1", "nobody", "r2")), cluster=cluster)
    assert done.unknown == ["nobody"]
    assert results(conn) == []
    done = cancel(state_dir, Selection(ids=("r1",)), cluster=cluster)
    assert (done.count, done.final_already) == (1, 0)
    again = cancel(state_dir, Selection(ids=("r1", "r2")), cluster=cluster)
    assert (again.count, again.final_already) == (1, 1)
    assert [r["id"] for r in results(conn)] == ["r1", "r2"]


def test_cancel_is_made_in_batches_and_takes_only_what_was_in_the_ledger_when_it_began(
    state_dir, cluster, conn, monkeypatch
):
    monkeypatch.setattr(control, "CANCEL_BATCH", 3)
    for n in range(10):
        take(conn, f"r{n}", n, campaign="B")
    done = cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    assert done.count == 10 and len(results(conn)) == 10
    assert status_report(conn, 0)["campaigns"]["B"]["outcomes"] == {"cancelled": 10}


def test_a_ledger_of_version_6_gets_priorities_pauses_and_campaign_counts(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    old = ledger_of_version(path, 6)
    old.execute(
        "INSERT INTO requests (id, run, agent_id, to_number, body, source, due_at, state,"
        " outcome, created_at, campaign) VALUES"
        " ('a', 1, 'x', '447700900123', '{}', 's', 0, 'final', 'dialed', 0, 'A'),"
        " ('b', 1, 'x', '447700900124', '{}', 's', 0, 'queued', NULL, 0, 'A')"
    )
    old.close()
    conn = connect(path)
    create_schema(conn)
    assert conn.execute("SELECT priority FROM requests WHERE id = 'b'").fetchone() == (0,)
    report = status_report(conn, 0)
    assert report["campaigns"]["A"]["outcomes"] == {"dialed": 1}
    assert report["campaigns"]["A"]["queued"] == 1 and report["paused"] == []


# -- through the real daemon and the simulator ---------------------------------------------------


def ctl(config: Path, *args: str) -> str:
    done = run_dialerd(*args, "-c", str(config), timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


NUMBERS = {"A": "447700901", "B": "447700902"}  # each campaign's numbers start so


def two_campaigns(count: int) -> str:
    """`count` requests of campaigns A and B in turn, each to a number of its own."""
    lines = []
    for n in range(count):
        campaign = "AB"[n % 2]
        number = f"+{NUMBERS[campaign]}{n:03d}"
        lines.append({"id": f"{campaign.lower()}-{n}", "to": number, "campaign": campaign})
    return "".join(json.dumps(line) + "\n" for line in lines)


def sent_of(sim, campaign: str, after: float = 0.0) -> list[dict]:
    prefix = NUMBERS[campaign]
    return [a for a in sim.arrivals() if a["to"].startswith(prefix) and a["wall"] > after]


def cancelled_results(path: Path) -> list[dict]:
    return [r for r in read_results(path) if r["outcome"] == "cancelled"]


def rate_one_config(tmp_path: Path, sim, **top) -> Path:
    api = {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()}
    agents = {"agent-a": {"region": "eu", "rate": 1}}
    return write_config(
        tmp_path, agents, api=api, default_agent="agent-a", spool={"dir": str(tmp_path / "spool")},
        **top,
    )  # fmt: skip


def test_pause_holds_a_campaign_across_a_restart_resume_frees_it_and_cancel_ends_the_other(
    tmp_path, simulator, daemons
):
    """At rate 1 the lane holds the next 32 requests in memory (its prefetch) all along: the
    pause and the cancel each come while it holds requests they are about, and each mark
    checks them again, so none of those goes out."""
    sim = simulator("--latency", "0.01-0.02", agents=("agent-a=1",))
    admin_port = free_port()
    config = rate_one_config(tmp_path, sim, admin={"listen": f"127.0.0.1:{admin_port}"})
    results = tmp_path / "state" / "results.jsonl"
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    drop(tmp_path / "spool", "list.jsonl", two_campaigns(200))
    wait_for(lambda: len(sim.arrivals()) >= 2, 10, "the first sends")

    paused_at = time.time()
    assert "campaign A: paused; " in ctl(config, "pause", "--campaign", "A")
    wait_for(lambda: len(sent_of(sim, "B", paused_at)) >= 3, 10, "B going on")
    # Obeyed at once: the lane holds A's requests in memory, and each mark checks the pause.
    assert sent_of(sim, "A", paused_at + 0.1) == []

    assert daemon.stop()[0] == 0
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    restarted_at = time.time()
    wait_for(lambda: len(sent_of(sim, "B", restarted_at)) >= 2, 10, "B after the restart")
    assert sent_of(sim, "A", paused_at + 0.1) == []
    status = json.loads(ctl(config, "status", "--json"))
    assert [(p["kind"], p["name"]) for p in status["paused"]] == [("campaign", "A")]
    assert status["campaigns"]["A"]["paused"] == status["campaigns"]["A"]["queued"] > 90
    assert "paused: campaign A since " in ctl(config, "status")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=10) as answer:
        live = json.load(answer)  # the admin listener says the same, for an interface on it
    assert live["paused"] == status["paused"] and live["campaigns"]["A"]["paused"] > 90

    resumed_at = time.time()
    ctl(config, "resume", "--campaign", "A")
    first_a = wait_for(lambda: sent_of(sim, "A", resumed_at), 10, "A again")[0]
    assert first_a["wall"] - resumed_at < 2.5  # a second to notice, an interval to send

    printed = ctl(config, "cancel", "--campaign", "B")
    cancelled_at = time.time()
    said = re.match(r"cancelled (\d+) request\(s\) of campaign B: (\d+) queued", printed)
    assert said, printed
    count = int(said[1])
    lines = wait_for(
        lambda: len(c := cancelled_results(results)) >= count and c, 10, "the cancelled results"
    )
    wait_for(lambda: len(sent_of(sim, "A", cancelled_at)) >= 2, 10, "A going on")
    assert daemon.stop()[0] == 0

    assert len(lines) == count and {r["campaign"] for r in lines} == {"B"}
    in_flight = 1 if "sent and not final yet" in printed else 0
    assert len(sent_of(sim, "B", cancelled_at)) <= in_flight
    sent_b = {a["to"] for a in sent_of(sim, "B")}
    assert {r["to"] for r in lines}.isdisjoint(sent_b)  # what it cancelled was never sent
    assert len(sent_b) + count + in_flight == 100


def test_no_redial_follows_a_cancel_whether_the_call_was_out_or_waiting_to_be_redialed(
    tmp_path, simulator, daemons
):
    sim = simulator("--unreached", "busy=1", "--callback-delay", "1.5-1.5", "--latency", "0.02")
    setup = Setup(
        tmp_path, sim, wait_s=30, redial={"busy": {"attempts": 3, "delay_s": 60}}, spool=True
    )
    daemon = daemons("-c", str(setup.config))
    daemon.wait_running()
    setup.drop("two.jsonl", [
        {"id": "out", "to": "+447700900711", "campaign": "X"},
        {"id": "waiting", "to": "+447700900712", "campaign": "Y"},
    ])  # fmt: skip
    wait_for(lambda: len(sim.arrivals()) == 2, 10, "both calls placed")

    printed = ctl(setup.config, "cancel", "--campaign", "X")  # its callback is yet to come
    assert printed.splitlines() == [
        "cancelled 0 request(s) of campaign X",
        "1 sent and not final yet: not recalled; no retry or redial follows",
    ]
    wait_for(
        lambda: json.loads(ctl(setup.config, "status", "--json"))["campaigns"]["Y"]["queued"],
        10,
        "Y's busy callback, and its redial queued",
    )
    assert ctl(setup.config, "cancel", "--campaign", "Y").splitlines() == [
        "cancelled 1 request(s) of campaign Y: 1 waiting for a redial"
    ]
    results = wait_for(lambda: len(r := read_results(setup.results_file)) == 2 and r, 10, "both")
    assert daemon.stop()[0] == 0
    assert {(r["id"], r["outcome"], r["status"]) for r in results} == {
        ("out", "cancelled", "busy"), ("waiting", "cancelled", "busy"),
    }  # fmt: skip
    assert len(sim.arrivals()) == 2  # neither was called again


def test_cancel_by_id_says_what_it_would_do_and_refuses_an_unknown_id(
    tmp_path, state_dir, cluster, conn
):
    for n in range(3):
        take(conn, f"r{n}", n)
    config = ledger_config(tmp_path, state_dir, cluster)

    def cancel_command(*args: str) -> tuple[int, str, str]:
        done = run_dialerd("cancel", "-c", str(config), *args, timeout=30)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    assert cancel_command("r0", "r1", "--dry-run") == (
        0, "would cancel 2 request(s) of 2 id(s): 2 queued\n", ""
    )  # fmt: skip
    code, out, err = cancel_command("r0", "nobody")
    assert (code, out) == (65, "")
    assert err == "dialerd: cancel: no request has the id 'nobody': nothing cancelled\n"
    assert cancel_command()[0] == cancel_command("r0", "--agent", "agent-eu")[0] == 64
    assert status_report(conn, 0)["agents"][AGENT]["queued"] == 3  # nothing changed yet
    assert cancel_command("r0")[:2] == (0, "cancelled 1 request(s) of 1 id(s): 1 queued\n")
    assert cancel_command("r0", "r1")[1].splitlines() == [
        "cancelled 1 request(s) of 2 id(s): 1 queued",
        "1 of the ids given are final already",
    ]


def test_higher_priorities_go_first_and_a_callees_zone_decides_its_calling_hours(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.01-0.02")
    now = dt.datetime.now(dt.UTC)
    hours = {  # open now in London (UTC or an hour ahead of it), closed in every US zone
        "start": (now - dt.timedelta(minutes=50)).strftime("%H:%M"),
        "end": (now + dt.timedelta(minutes=130)).strftime("%H:%M"),
        "default_timezone": "UTC",
    }
    config = sim_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")}, calling_hours=hours)
    daemon = daemons("-c", str(config))
    daemon.wait_running()
    requests = [
        {"id": "p0-first", "to": "+447700900901"},
        {"id": "p9", "to": "+447700900902", "priority": 9},
        {"id": "p3", "to": "+447700900903", "priority": 3},
        {"id": "p9-later", "to": "+447700900904", "priority": 9},
        {"id": "p0-second", "to": "+447700900905"},
        # A US number: closed in every US zone now, but its callee is in London.
        {"id": "in-london", "to": "+12015550123", "timezone": "Europe/London", "priority": 1},
        {"id": "in-the-us", "to": "+12015550124"},
    ]
    drop(tmp_path / "spool", "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in requests))
    results_file = tmp_path / "state" / "results.jsonl"
    wait_for(lambda: len(read_results(results_file)) == 6, 15, "all but the one held")
    status = json.loads(ctl(config, "status", "--json"))
    assert daemon.stop()[0] == 0

    order = [a["to"] for a in sim.arrivals()]
    assert order == [
        "447700900902", "447700900904", "447700900903", "12015550123", "447700900901",
        "447700900905",
    ]  # fmt: skip
    assert status["agents"]["agent-a"]["held_calling_hours"] == 1  # in-the-us waits


def test_campaign_metrics_is_a_boolean_of_the_admin_section():
    admin = {"listen": "127.0.0.1:9090"}
    base = {"api": {"key_env": "K"}, "agents": {"a": {"region": "eu", "rate": 1}}}
    assert not build_config({**base, "admin": admin}).admin.campaign_metrics
    assert build_config(
        {**base, "admin": {**admin, "campaign_metrics": True}}
    ).admin.campaign_metrics
    with pytest.raises(ConfigError) as refused:
        build_config({**base, "admin": {**admin, "campaign_metrics": "yes"}})
    assert refused.value.problems == ["admin.campaign_metrics: must be true or false, not 'yes'"]


@pytest.mark.parametrize(
    ("selection", "index"),
    [
        (Selection(campaign="B"), "requests_by_campaign (campaign=?)"),
        (Selection(agent=AGENT), "requests_open (agent_id=?)"),
        (Selection(ids=("r1", "r2")), "sqlite_autoindex_requests_1 (id=?)"),
    ],
)
def test_what_a_cancel_is_about_is_found_by_an_index_not_among_the_history(
    sqlite_conn, selection, index
):
    """SQLite only: its query plans."""
    conn = sqlite_conn
    where, params = selection.where(conn)
    plan = [row[3] for row in conn.execute(
        f"EXPLAIN QUERY PLAN SELECT seq FROM requests WHERE {where} AND state != 'final'", params
    )]  # fmt: skip
    assert f"SEARCH requests USING INDEX {index}" in plan or (
        f"SEARCH requests USING COVERING INDEX {index}" in plan
    ), plan


# -- a campaign's report, and a pause's limits ---------------------------------------------------


def test_a_campaigns_report_counts_the_same_from_the_ledger_and_from_its_results(
    tmp_path, sqlite_conn, capsys
):
    """SQLite only: `dialerd report` reads the ledger file (report.read_ledger takes no
    cluster)."""
    conn, state_dir = sqlite_conn, tmp_path
    for n, campaign in enumerate("AABBA"):
        take(conn, f"r{n}", n, campaign=campaign)
    repeat = build_request({"id": "r0", "to": "+447700900000", "campaign": "A"}, CONFIG, "t:9")
    add(conn, 1, [repeat], [], None, 0)  # a duplicate of campaign A
    for seq, outcome in ((1, Outcome.DIALED), (2, Outcome.FAILED), (3, Outcome.DIALED)):
        finish(conn, seq, outcome, {})
    cancel(state_dir, Selection(campaign="A"))  # r4
    results = tmp_path / "results.jsonl"
    results.write_text("".join(line + "\n" for (line,) in conn.execute("SELECT line FROM outbox")))
    config = write_config(tmp_path, state_dir=str(state_dir))

    def report(*args: str) -> dict:
        assert main(["report", "--json", "--campaign", "A", *args]) == 0
        numbers = json.loads(capsys.readouterr().out)
        assert numbers.pop("source") in ("ledger", "results")
        return numbers

    from_ledger = report("-c", str(config))
    assert from_ledger == report("--results", str(results))
    assert from_ledger["campaign"] == "A"
    assert from_ledger["outcomes"] == {"dialed": 1, "failed": 1, "duplicate": 1, "cancelled": 1}


def test_a_paused_request_still_expires_by_its_expires_at_and_by_max_queue_s(
    state_dir, cluster, conn
):
    take(conn, "expiring", 1, campaign="A", expires_at="2030-01-01T00:00:00Z")
    take(conn, "waiting", 2, campaign="A")
    take(conn, "fresh", 3, campaign="A")
    conn.execute("UPDATE requests SET first_due_at = 0")
    conn.execute("UPDATE requests SET first_due_at = 1e12 WHERE id = 'fresh'")
    pause(state_dir, Selection(campaign="A"), cluster)
    now = dt.datetime(2030, 1, 2, tzinfo=dt.UTC).timestamp()
    assert expire_due(conn, now, max_queue_s=86400) == 2
    assert {r["id"]: r["outcome"] for r in results(conn)} == {
        "expiring": "expired", "waiting": "expired",
    }  # fmt: skip


def test_what_a_lane_sends_while_the_cancel_runs_is_counted_as_out_not_as_cancelled(
    state_dir, cluster, conn, monkeypatch
):
    for n in range(4):
        take(conn, f"r{n}", n, campaign="B")
    looked = control._look

    def look_then_a_lane_sends(*args):
        found = looked(*args)
        assert mark_sending(conn, 2, "t", 1, 0.0, None) == (True, None)  # r1, after the look
        return found

    monkeypatch.setattr(control, "_look", look_then_a_lane_sends)
    done = cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    assert (dict(done.by_state), done.in_flight) == ({"queued": 3}, 1)
    assert [r["id"] for r in results(conn)] == ["r0", "r2", "r3"]
    assert conn.execute("SELECT cancelled_at IS NOT NULL FROM requests WHERE seq = 2").fetchone()


# -- found in review ------------------------------------------------------------------------------


def test_a_paused_campaign_is_left_out_of_the_due_index_and_put_back_when_resumed(
    state_dir, cluster, conn
):
    for n in range(5):
        take(conn, f"a{n}", n, campaign="A")
    pause(state_dir, Selection(campaign="A"), cluster)
    take(conn, "late", 9, campaign="A")  # taken while paused: left out at once
    assert control.pause_targets(conn) == (["A"], [])
    assert control.set_paused(conn, "A", paused=True) == 5
    assert control.set_paused(conn, "A", paused=True) == 0
    flagged = conn.execute("SELECT count(*) FROM requests WHERE paused = 1").fetchone()
    assert flagged == (6,)
    resume(state_dir, Selection(campaign="A"), cluster)
    assert control.pause_targets(conn) == ([], ["A"])
    assert control.set_paused(conn, "A", paused=False) == 6
    assert len(due_ids(conn)) == 6 and control.pause_targets(conn) == ([], [])


def test_a_campaign_to_pause_or_cancel_is_named_as_requests_name_one(
    tmp_path, state_dir, cluster, conn
):
    config = ledger_config(tmp_path, state_dir, cluster)
    for command in ("pause", "cancel"):
        done = run_dialerd(command, "-c", str(config), "--campaign", "", timeout=30)
        assert done.returncode == 64, done.stderr
        assert b"--campaign '': expected 1-64 of A-Za-z0-9._:-" in done.stderr
    done = run_dialerd("pause", "-c", str(config), "--agent", "agnet-eu", timeout=30)
    assert done.returncode == 0
    assert b"note: agent 'agnet-eu' is not in the config" in done.stderr


def test_report_reads_a_ledger_its_daemon_has_not_upgraded_yet(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    old = ledger_of_version(state / "ledger.sqlite3", 6)
    old.execute("INSERT INTO rejects (outcome, source, at) VALUES ('invalid', 's', 0)")
    old.close()
    assert read_ledger(state, None).finals.total() == 1


def test_a_send_marked_and_cancelled_as_a_stop_begins_ends_cancelled_not_in_doubt(
    state_dir, cluster, conn
):
    seq = take(conn, "r1", campaign="B")
    mark_sending(conn, seq, None, 1, 0.0, None)
    cancel(state_dir, Selection(campaign="B"), cluster=cluster)  # out: flagged
    unmark(conn, seq)  # the stop: it never left
    assert outcome_of(conn, "r1") == (State.FINAL, Outcome.CANCELLED)


def test_a_requeue_is_a_new_send_and_counts_move_with_it(state_dir, cluster, conn):
    seq = take(conn, "r1", campaign="B")
    mark_sending(conn, seq, None, 1, 0.0, None)
    cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    finish(conn, seq, Outcome.IN_DOUBT, {})
    assert requeue(state_dir, ["r1"], cluster) == (["r1"], {})
    row = conn.execute("SELECT state, cancelled_at FROM requests WHERE seq = ?", (seq,))
    assert row.fetchone() == (State.QUEUED, None)
    assert status_report(conn, 0)["campaigns"]["B"]["outcomes"] == {}
    assert control.last_control(conn) == 2  # the cancel and the requeue


def test_a_request_found_out_then_queued_again_and_cancelled_is_counted_as_cancelled(
    state_dir, cluster, conn, monkeypatch
):
    seq = take(conn, "r1", campaign="B")
    mark_sending(conn, seq, None, 1, 0.0, None)
    looked = control._look

    def look_then_it_is_refused(*args):
        found = looked(*args)
        retry_later(conn, seq, 0.0, True, "HTTP 429")  # queued again before its batch
        return found

    monkeypatch.setattr(control, "_look", look_then_it_is_refused)
    done = cancel(state_dir, Selection(campaign="B"), cluster=cluster)
    assert (dict(done.by_state), done.in_flight) == ({"queued": 1}, 0)
    assert outcome_of(conn, "r1") == (State.FINAL, Outcome.CANCELLED)


def test_a_campaign_long_over_leaves_the_status_and_the_controls_counter_never_goes_back(
    state_dir, cluster, conn
):
    seq = take(conn, "r1", campaign="old")
    finish(conn, seq, Outcome.DIALED, {})
    conn.execute("UPDATE campaign_counts SET last_at = 10")
    conn.execute("UPDATE requests SET finished_at = 10")
    pause(state_dir, Selection(campaign="x"), cluster)
    conn.execute("UPDATE controls SET at = 10")
    before = control.last_control(conn)
    prune(conn, now=1000, retention_s=100, batch=100)
    assert status_report(conn, 0)["campaigns"] == {}
    assert count_rows(conn, "controls") == 0
    resume(state_dir, Selection(campaign="x"), cluster)
    assert control.last_control(conn) == before + 1


def count_rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_status_of_no_ledger_yet_has_the_keys_of_any_other(tmp_path):
    status = json.loads(ctl(write_config(tmp_path), "status", "--json"))
    assert status == {
        "agents": {}, "outcomes": {}, "results_unwritten": 0, "paused": [], "campaigns": {},
    }  # fmt: skip
