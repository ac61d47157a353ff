"""The call lifecycle through the real `dialerd run` process and a `dialerd simulate` server:
callbacks, redials by policy, the end of the wait, restarts, and the admin listener (SPEC 3, 6, 7).

Where the test must know exactly when a callback came, it plays the API's callbacks itself: it
reads each placed call's status_url from the simulator's log and POSTs to it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import SimulatorProcess, read_results, result_lines, run_dialerd, sim_config, wait_for
from prometheus_client.parser import text_string_to_metric_families

ANSWER_RECORDED_S = 0.3  # after a call reaches the simulator, its answer is in the ledger by then
TOKEN_URL = r"/callbacks/[A-Za-z0-9_-]{43}"


# -- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Setup:
    """A config on the simulator with callbacks (and the admin listener) on free ports."""

    def __init__(
        self,
        tmp_path: Path,
        sim: SimulatorProcess,
        *,
        wait_s: float,
        redial: dict[str, dict],
        spool: bool = False,
    ):
        self.callback_port = free_port()
        self.admin_port = free_port()
        self.public_url = f"http://127.0.0.1:{self.callback_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.spool_dir = tmp_path / "spool"
        self.state_dir = tmp_path / "state"
        top: dict[str, Any] = {
            "callbacks": {
                "listen": f"127.0.0.1:{self.callback_port}",
                "public_url": self.public_url,
                "wait_s": wait_s,
            },
            "redial": redial,
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
        }
        if spool:
            top["spool"] = {"dir": str(self.spool_dir)}
        self.config = sim_config(tmp_path, sim, **top)
        self.results_file = self.state_dir / "results.jsonl"  # when stdin is not a source

    def drop(self, name: str, requests: list[dict]) -> None:
        incoming = self.spool_dir / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        aside = self.spool_dir / f".{name}"
        aside.write_text("".join(json.dumps(r) + "\n" for r in requests))
        os.rename(aside, incoming / name)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON body or text); never raises for an HTTP error status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def callback(call: dict, status: str, url: str | None = None) -> tuple[int, Any]:
    """POST the API's callback for a placed call (its arrival at the simulator), with the call's
    agent_id, to and conversation_uuid, to its status_url (or to `url`)."""
    body = {
        "agent_id": call["agent_id"],
        "to": call["to"],
        "conversation_uuid": call["conversation_uuid"],
        "status": status,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return http("POST", url or call["body"]["status_url"], body)


def calls_to(sim: SimulatorProcess, to: str) -> list[dict]:
    """The calls placed to a callee, in order."""
    return sorted(
        (a for a in sim.arrivals() if a["placed"] and a["to"] == to), key=lambda a: a["wall"]
    )


def by_id(results: list[dict]) -> dict[str, dict]:
    table = {result["id"]: result for result in results}
    assert len(table) == len(results), "one result per request"
    return table


def scrape(admin_url: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics, parsed by prometheus_client: each sample's value by (name, labels)."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples(scraped: dict, name: str) -> dict[frozenset, float]:
    """The nonzero samples of one metric, by their labels."""
    return {labels: value for (n, labels), value in scraped.items() if n == name and value}


def labels(**pairs: str) -> frozenset:
    return frozenset(pairs.items())


class ScriptedApi:
    """Plays the API's callbacks: for the n-th call placed to a callee, POSTs the n-th status of
    its script to that call's status_url (None: no callback), once the answer is recorded."""

    def __init__(self, sim: SimulatorProcess, script: dict[str, list[str | None]]):
        self.sim = sim
        self.script = script
        self.handled: set[tuple[str, int]] = set()
        self.posts: defaultdict[str, list[dict]] = defaultdict(list)

    def step(self) -> None:
        now = time.time()
        calls: defaultdict[str, list[dict]] = defaultdict(list)
        for arrival in sorted(self.sim.arrivals(), key=lambda a: a["wall"]):
            if arrival["placed"]:
                calls[arrival["to"]].append(arrival)
        for to, placed in calls.items():
            for index, arrival in enumerate(placed):
                if (to, index) in self.handled or arrival["wall"] + ANSWER_RECORDED_S > now:
                    continue
                self.handled.add((to, index))
                statuses = self.script[to]
                assert index < len(statuses), f"an unexpected call {index + 1} to {to}"
                if statuses[index] is None:
                    continue
                started = time.time()
                answer = callback(arrival, statuses[index])
                self.posts[to].append({"at": started, "answer": answer, "call": index})

    def run_until(self, done: Callable[[], bool], timeout: float, tick: Callable = lambda: None):
        deadline = time.monotonic() + timeout
        while not done():
            self.step()
            tick()
            assert time.monotonic() < deadline, f"not done within {timeout} s"
            time.sleep(0.02)


# -- redials by policy, and the end of the wait -------------------------------------------------


def test_busy_callbacks_from_the_simulator_redial_after_the_delay_until_attempts_run_out(
    tmp_path, simulator
):
    sim = simulator("--unreached", "busy=1", "--callback-delay", "0.2-0.2", "--latency", "0.05")
    setup = Setup(tmp_path, sim, wait_s=5, redial={"busy": {"attempts": 3, "delay_s": 1}})
    request = {"id": "request-id-b1", "to": "+44 7700 900011", "agent_id": "agent-b"}

    started = time.time()
    run = run_dialerd(
        "run", "-c", str(setup.config), input=json.dumps(request).encode(), timeout=30
    )
    ended = time.time()

    assert run.returncode == 0, run.stderr.decode()
    assert "Traceback" not in run.stderr.decode()
    calls = calls_to(sim, "447700900011")
    assert len(calls) == 3
    assert len(sim.arrivals()) == 3
    # Each callback leaves 0.05 s (latency) + 0.2 s (callback delay) after its call reaches the
    # API; the redial is due delay_s after the callback.
    gaps = [b["wall"] - a["wall"] for a, b in zip(calls, calls[1:], strict=False)]
    assert all(1.25 - 0.01 <= gap < 1.25 + 1.0 for gap in gaps), gaps
    (result,) = result_lines(run.stdout)
    assert (result["id"], result["outcome"], result["status"], result["attempts"]) == (
        "request-id-b1", "unanswered", "busy", 3,
    )  # fmt: skip
    assert result["conversation_uuid"] == calls[-1]["conversation_uuid"]
    assert ended - started >= 2 * 1.25 + 0.25  # the run waited for the redials and the last call
    status_urls = [call["body"]["status_url"] for call in calls]
    assert len(set(status_urls)) == 3
    for url in status_urls:
        assert re.fullmatch(re.escape(setup.public_url) + TOKEN_URL, url), url
        for part in ("request-id-b1", "447700900011", "agent-b", "agent"):
            assert part not in url


def test_each_status_takes_its_policy_and_calls_with_no_callback_end_dialed_after_wait_s(
    tmp_path, simulator, daemons
):
    """stdin as the only source: the run ends only once every wait and redial is over."""
    sim = simulator("--latency", "0.05")
    wait_s, delay_s = 1.5, 1.0
    setup = Setup(
        tmp_path,
        sim,
        wait_s=wait_s,
        redial={
            "busy": {"attempts": 3, "delay_s": delay_s},
            "timeout": {"attempts": 2, "delay_s": delay_s},
        },
    )
    script: dict[str, list[str | None]] = {
        "447700900001": ["busy", "busy", "busy"],
        "447700900002": ["busy", "timeout"],  # timeout allows 2 calls in all, whatever came first
        "447700900003": ["timeout", "timeout"],
        "447700900004": ["rejected"],  # no policy
        "447700900005": [None],
        "447700900006": ["busy", None],
    }
    ids = {to: f"life-{to[-1]}" for to in script}
    requests = [
        {"id": ids[to], "to": to, "agent_id": ("agent-a", "agent-b")[n % 2]}
        for n, to in enumerate(script)
    ]
    daemon = daemons("-c", str(setup.config), stdin=subprocess.PIPE)
    daemon.proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    daemon.proc.stdin.close()
    api = ScriptedApi(sim, script)
    seen: dict[str, float] = {}  # when each result first showed on stdout

    def watch_results() -> None:
        for result in result_lines(daemon.stdout.rpartition("\n")[0]):
            seen.setdefault(result["id"], time.time())

    api.run_until(lambda: daemon.proc.poll() is not None, 30, watch_results)
    exited = time.time()
    watch_results()

    assert daemon.proc.returncode == 0, daemon.stderr
    assert "Traceback" not in daemon.stderr
    results = by_id(result_lines(daemon.stdout))
    assert set(results) == set(ids.values())
    expected = {
        "447700900001": ("unanswered", "busy", 3),
        "447700900002": ("unanswered", "timeout", 2),
        "447700900003": ("unanswered", "timeout", 2),
        "447700900004": ("unanswered", "rejected", 1),
        "447700900005": ("dialed", None, 1),
        "447700900006": ("dialed", None, 2),
    }
    calls = {to: calls_to(sim, to) for to in script}
    for to, (outcome, status, attempts) in expected.items():
        result = results[ids[to]]
        assert (result["outcome"], result["status"], result["attempts"]) == (
            outcome, status, attempts,
        ), result  # fmt: skip
        assert len(calls[to]) == attempts, to
        assert result["conversation_uuid"] == calls[to][-1]["conversation_uuid"]
        assert result["http_status"] == 200 and result["error"] is None
    # Each redial came delay_s after the callback that caused it, not before (nor much after).
    for to, posts in api.posts.items():
        for post in posts:
            status, answer = post["answer"]
            assert status == 200, (to, post)
            following = post["call"] + 1
            if following < len(calls[to]):
                assert answer == {"result": "redial"}
                delay = calls[to][following]["wall"] - post["at"]
                assert delay_s <= delay < delay_s + 1.0, (to, delay)
            else:
                assert answer == {"result": "unanswered"}
    # A status with no policy ends at once; no callback: dialed after wait_s, not before.
    assert seen[ids["447700900004"]] < api.posts["447700900004"][0]["at"] + 1.0
    for to in ("447700900005", "447700900006"):
        last_call = calls[to][-1]["wall"]
        assert last_call + wait_s <= seen[ids[to]] < last_call + wait_s + 2.0, to
        assert exited >= last_call + wait_s
    # Every call had a status_url of its own, naming nothing of the request.
    urls = [c["body"]["status_url"] for placed in calls.values() for c in placed]
    assert len(urls) == len(set(urls)) == sum(e[2] for e in expected.values())
    for url in urls:
        assert re.fullmatch(re.escape(setup.public_url) + TOKEN_URL, url), url
    assert len(sim.arrivals()) == len(urls)


# -- restarts -----------------------------------------------------------------------------------


def dialerd_status(config: Path) -> dict:
    run = run_dialerd("status", "-c", str(config), "--json", timeout=20)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout)


def test_callbacks_and_redials_carry_over_a_restart(tmp_path, simulator, daemons):
    sim = simulator("--latency", "0.05")
    delay_s = 2.0
    setup = Setup(
        tmp_path, sim, wait_s=30, redial={"busy": {"attempts": 3, "delay_s": delay_s}}, spool=True
    )
    first = daemons("-c", str(setup.config))
    first.wait_running()
    secret_file = setup.state_dir / "callback.secret"
    secret = secret_file.read_bytes()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    setup.drop("two.jsonl", [{"id": "waits", "to": "447700900021"}])
    setup.drop("one.jsonl", [{"id": "redials", "to": "447700900022"}])
    wait_for(lambda: len(sim.arrivals()) == 2, 10, "both calls")
    time.sleep(ANSWER_RECORDED_S)
    (waits,) = calls_to(sim, "447700900021")
    (redials,) = calls_to(sim, "447700900022")
    busy_at = time.time()
    assert callback(redials, "busy") == (200, {"result": "redial"})

    code, _ = first.stop(signal.SIGTERM)

    assert code == 0, first.stderr
    assert read_results(setup.results_file) == []  # one awaits its callback, one its redial
    agent = dialerd_status(setup.config)["agents"]["agent-a"]
    assert (agent["queued"], agent["awaiting_callback"]) == (1, 1), agent
    # The redial falls due while no daemon runs.
    time.sleep(max(0.0, busy_at + delay_s + 0.3 - time.time()))
    assert len(calls_to(sim, "447700900022")) == 1

    restarted_at = time.time()
    second = daemons("-c", str(setup.config))
    second.wait_running()
    redialed = wait_for(lambda: calls_to(sim, "447700900022")[1:], 10, "the redial")[0]

    assert redialed["wall"] >= max(restarted_at, busy_at + delay_s)
    assert redialed["body"]["status_url"] != redials["body"]["status_url"]
    # A status_url issued before the restart still verifies and applies after it.
    assert callback(waits, "rejected") == (200, {"result": "unanswered"})
    assert callback(redials, "busy") == (200, {"result": "repeat"})
    time.sleep(ANSWER_RECORDED_S)
    assert callback(redialed, "rejected") == (
        200, {"result": "unanswered"},
    )  # fmt: skip
    wait_for(lambda: len(read_results(setup.results_file)) == 2, 10, "both results")
    results = by_id(read_results(setup.results_file))
    time.sleep(1.0)  # time for a second redial, if one were (wrongly) made
    code, _ = second.stop(signal.SIGTERM)

    assert code == 0, second.stderr
    assert sim.placed() == Counter({"447700900021": 1, "447700900022": 2})
    assert len(read_results(setup.results_file)) == 2
    assert {k: (r["outcome"], r["status"], r["attempts"]) for k, r in results.items()} == {
        "waits": ("unanswered", "rejected", 1),
        "redials": ("unanswered", "rejected", 2),
    }
    assert results["waits"]["conversation_uuid"] == waits["conversation_uuid"]
    assert results["redials"]["conversation_uuid"] == redialed["conversation_uuid"]
    assert secret_file.read_bytes() == secret
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    for daemon in (first, second):
        assert "Traceback" not in daemon.stderr
        assert secret.hex() not in daemon.stderr


# -- the admin listener, and what the callback listener refuses ---------------------------------


def test_admin_listener_reports_what_happened_and_the_callback_listener_refuses_the_rest(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.05")
    setup = Setup(
        tmp_path, sim, wait_s=3, redial={"busy": {"attempts": 2, "delay_s": 1}}, spool=True
    )
    daemon = daemons("-c", str(setup.config))
    daemon.wait_running()
    admin = setup.admin_url
    assert http("GET", f"{admin}/healthz") == (200, {"status": "running"})
    status = http("GET", f"{admin}/status")[1]
    assert status["state"] == "running"
    assert {a: (s["rate"], s["queued"]) for a, s in status["agents"].items()} == {
        "agent-a": (5, 0), "agent-b": (5, 0),
    }  # fmt: skip
    setup.drop("three.jsonl", [
        {"id": "a1", "to": "447700900031", "agent_id": "agent-a"},
        {"id": "a2", "to": "447700900032", "agent_id": "agent-a"},
        {"id": "b1", "to": "447700900033", "agent_id": "agent-b"},
    ])  # fmt: skip

    def awaiting() -> dict[str, int]:
        agents = http("GET", f"{admin}/status")[1]["agents"]
        return {agent: entry["awaiting_callback"] for agent, entry in agents.items()}

    wait_for(lambda: awaiting() == {"agent-a": 2, "agent-b": 1}, 5, "three calls awaiting")
    (a1,) = calls_to(sim, "447700900031")
    (a2,) = calls_to(sim, "447700900032")
    (b1,) = calls_to(sim, "447700900033")
    a1_url = a1["body"]["status_url"]

    assert callback(a1, "busy") == (200, {"result": "redial"})
    agent_a = http("GET", f"{admin}/status")[1]["agents"]["agent-a"]
    assert (agent_a["queued"], agent_a["awaiting_callback"]) == (1, 1), agent_a
    assert agent_a["next_due"] > time.time()
    assert callback(b1, "timeout") == (200, {"result": "unanswered"})
    assert callback(a1, "busy") == (200, {"result": "repeat"})
    # Refused: forged tokens, other methods and paths; the listeners do not serve each other.
    token = a1_url.rpartition("/")[2]
    other_end = "BBBB" if token.endswith("AAAA") else "AAAA"
    forged = f"{setup.public_url}/callbacks/{token[:-4]}{other_end}"  # a wrong MAC
    assert callback(a1, "busy", forged)[0] == 404
    assert callback(a1, "busy", setup.public_url + "/callbacks/" + "A" * 43)[0] == 404
    for method in ("GET", "PUT"):
        assert http(method, a1_url, {"status": "busy"})[0] == 404, method
    assert http("GET", f"{setup.public_url}/metrics")[0] == 404
    assert http("GET", f"{setup.public_url}/healthz")[0] == 404
    assert callback(a1, "busy", f"{admin}/callbacks/{token}")[0] == 404
    assert http("GET", f"{admin}/callbacks/{token}")[0] == 404
    assert http("POST", f"{admin}/metrics", {})[0] == 404

    redialed = wait_for(lambda: calls_to(sim, "447700900031")[1:], 5, "the redial")[0]
    time.sleep(ANSWER_RECORDED_S)
    assert callback(redialed, "rejected") == (200, {"result": "unanswered"})
    wait_for(lambda: len(read_results(setup.results_file)) == 3, 8, "a2 to end dialed")
    assert callback(a2, "cancelled") == (200, {"result": "stale"})

    def counted() -> dict | None:
        scraped = scrape(admin)
        outcomes = samples(scraped, "dialerd_outcomes_total")
        expected = {labels(outcome="unanswered"): 2, labels(outcome="dialed"): 1}
        return scraped if outcomes == expected else None

    scraped = wait_for(counted, 5, "the outcomes to be counted")
    assert samples(scraped, "dialerd_sends_total") == {
        labels(agent="agent-a", http_status="200"): 3,
        labels(agent="agent-b", http_status="200"): 1,
    }
    assert Counter(a["agent_id"] for a in sim.arrivals()) == {"agent-a": 3, "agent-b": 1}
    assert samples(scraped, "dialerd_callbacks_total") == {
        labels(status="busy", effect="redial"): 1,
        labels(status="timeout", effect="unanswered"): 1,
        labels(status="busy", effect="repeat"): 1,
        labels(status="rejected", effect="unanswered"): 1,
        labels(status="cancelled", effect="stale"): 1,
    }
    assert samples(scraped, "dialerd_send_latency_seconds_count") == {
        labels(agent="agent-a"): 3, labels(agent="agent-b"): 1,
    }  # fmt: skip
    assert samples(scraped, "dialerd_queue_depth") == {}
    results = by_id(read_results(setup.results_file))
    assert {k: (r["outcome"], r["status"], r["attempts"]) for k, r in results.items()} == {
        "a1": ("unanswered", "rejected", 2),
        "a2": ("dialed", None, 1),
        "b1": ("unanswered", "timeout", 1),
    }
    status = http("GET", f"{admin}/status")[1]
    assert status["outcomes"] == {"unanswered": 2, "dialed": 1}
    for entry in status["agents"].values():
        assert entry["awaiting_callback"] == entry["queued"] == entry["in_flight"] == 0, entry
    assert http("GET", f"{admin}/healthz") == (200, {"status": "running"})

    code, _ = daemon.stop(signal.SIGTERM)

    assert code == 0, daemon.stderr
    assert "Traceback" not in daemon.stderr
    assert len(sim.arrivals()) == 4


# -- a callback tied to its call ------------------------------------------------------------------


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_a_genuine_status_url_with_another_calls_body_neither_redials_nor_ends_the_call(
    tmp_path, simulator, daemons
):
    """The attack: the status_url of one call, the body of another (its conversation_uuid, to
    and agent_id), status busy. It is answered 200, counted as a mismatch and changes nothing."""
    sim = simulator("--latency", "0.05")
    wait_s = 2.0
    setup = Setup(
        tmp_path, sim, wait_s=wait_s, redial={"busy": {"attempts": 3, "delay_s": 0.2}}, spool=True
    )
    daemon = daemons("-c", str(setup.config))
    daemon.wait_running()
    setup.drop("two.jsonl", [
        {"id": "target", "to": "447700900041", "agent_id": "agent-a"},
        {"id": "other", "to": "+1 202 555 0142", "agent_id": "agent-b"},
    ])  # fmt: skip
    wait_for(lambda: len(sim.arrivals()) == 2, 10, "both calls")
    time.sleep(ANSWER_RECORDED_S)
    (target,) = calls_to(sim, "447700900041")
    (other,) = calls_to(sim, "12025550142")
    token = target["body"]["status_url"].rpartition("/")[2]

    assert callback(other, "busy", url=target["body"]["status_url"]) == (
        200, {"result": "mismatch"},
    )  # fmt: skip

    seen: dict[str, float] = {}  # when each result first showed

    def both_ended() -> bool:
        for result in read_results(setup.results_file):
            seen.setdefault(result["id"], time.time())
        return len(seen) == 2

    wait_for(both_ended, 10, "both calls to end")
    results = by_id(read_results(setup.results_file))
    for name, call in (("target", target), ("other", other)):
        result = results[name]
        assert (result["outcome"], result["status"], result["attempts"]) == ("dialed", None, 1)
        assert result["conversation_uuid"] == call["conversation_uuid"]
    # dialed only once wait_s was over: the forged busy did not end it either.
    assert seen["target"] >= target["wall"] + wait_s
    assert sim.placed() == Counter({"447700900041": 1, "12025550142": 1})
    assert samples(scrape(setup.admin_url), "dialerd_callbacks_total") == {
        labels(status="busy", effect="mismatch"): 1,
    }
    code, _ = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.stderr
    (warning,) = [e for e in log_events(daemon.stderr) if "callback not about" in e["event"]]
    assert (warning["level"], warning["status"], warning["agent"]) == ("warning", "busy", "agent-a")
    assert token not in daemon.stderr
