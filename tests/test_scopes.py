"""API errors by their scope (SPEC §1, §8.7), against the real daemon and the simulator: a key
the API refuses holds every lane, an agent it refuses holds that agent's lane; both are tried
again with backoff and go on by themselves once the API accepts, or at once after a reload.
Nothing ends `failed` for it, and an operator hears of it once, at error level."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections import Counter

import pytest
from conftest import read_results, result_lines, run_dialerd, sim_config, wait_for

NUMBERS = [f"4477009005{n:02d}" for n in range(6)]


def requests_for(*agents: str) -> bytes:
    return b"".join(
        json.dumps({"to": number, "agent_id": agents[n % len(agents)]}).encode() + b"\n"
        for n, number in enumerate(NUMBERS)
    )


def log_lines(stderr: bytes | str, event_start: str) -> list[dict]:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"].startswith(event_start)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_holds_every_lane_until_the_api_accepts_it(tmp_path, simulator, status):
    sim = simulator("--latency", "0.01-0.03", "--refuse-key", f"{status}:3")
    config = sim_config(tmp_path, sim)
    done = run_dialerd("run", "-c", str(config), input=requests_for("agent-a", "agent-b"))
    assert done.returncode == 0, done.stderr.decode()
    results = result_lines(done.stdout)
    assert Counter(r["outcome"] for r in results) == {"dialed": len(NUMBERS)}
    assert all(r["attempts"] == 1 for r in results)
    assert sim.placed() == Counter(NUMBERS)
    arrivals = sim.arrivals()
    refusals = sorted(a["at"] for a in arrivals if a["http_status"] == status)
    # After the sends that were out as the hold began, one send per try, whatever the lanes.
    tries = [at for at in refusals if at > refusals[0] + 0.5]
    assert tries and all(b - a > 0.9 for a, b in zip(tries, tries[1:], strict=False)), refusals
    # Once the key is accepted again, every lane goes on at once, not at its own next try.
    first_placed = [min(a["at"] for a in arrivals if a["agent_id"] == agent and a["placed"])
                    for agent in ("agent-a", "agent-b")]  # fmt: skip
    assert abs(first_placed[0] - first_placed[1]) < 1.0, first_placed
    # A refused request was queued again in its place: each agent's calls in the order given.
    for agent in ("agent-a", "agent-b"):
        placed = [a["to"] for a in arrivals if a["agent_id"] == agent and a["placed"]]
        assert placed == [n for n in NUMBERS if n in placed], placed
    (refused,) = log_lines(done.stderr, "the API refuses the key")
    assert refused["level"] == "error" and refused["reason"] == "Invalid API key"
    (cleared,) = log_lines(done.stderr, "the API accepts the key again")
    assert cleared["level"] == "warning"


@pytest.mark.parametrize("form", ["404", "unknown", "unpublished", "phone"])
def test_a_refused_agent_holds_its_lane_only(tmp_path, simulator, form):
    """An agent just published (Vonage asks to wait about five minutes) or not found: its
    requests wait; the other agent's go out at once."""
    sim = simulator("--latency", "0.01-0.03", "--refuse-agent", f"agent-a:{form}:3")
    config = sim_config(tmp_path, sim)
    done = run_dialerd("run", "-c", str(config), input=requests_for("agent-a", "agent-b"))
    assert done.returncode == 0, done.stderr.decode()
    assert Counter(r["outcome"] for r in result_lines(done.stdout)) == {"dialed": len(NUMBERS)}
    assert sim.placed() == Counter(NUMBERS)
    arrivals = sim.arrivals()
    first_placed_of_a = min(a["at"] for a in arrivals if a["agent_id"] == "agent-a" and a["placed"])
    last_of_b = max(a["at"] for a in arrivals if a["agent_id"] == "agent-b")
    assert last_of_b < first_placed_of_a  # b did not wait for a
    assert not [a for a in arrivals if a["agent_id"] == "agent-b" and not a["placed"]]
    (refused,) = log_lines(done.stderr, "the API refuses the agent")
    assert refused["level"] == "error" and refused["agent"] == "agent-a"
    (cleared,) = log_lines(done.stderr, "the API accepts the agent again")
    assert cleared["agent"] == "agent-a"


def test_a_wrong_key_is_held_with_healthz_503_until_a_reload_brings_the_right_one(
    tmp_path, simulator, daemons
):
    sim = simulator("--latency", "0.01-0.03", "--only-key", "the-right-key")
    key_file = tmp_path / "key"
    key_file.write_text("a-revoked-key\n")
    key_file.chmod(0o600)
    port = free_port()
    results = tmp_path / "results.jsonl"
    config = sim_config(tmp_path, sim, results=str(results), admin={"listen": f"127.0.0.1:{port}"})
    document = config.read_text().replace("key_env: VGAI_KEY", f"key_file: {key_file}")
    config.write_text(document)
    daemon = daemons("-c", str(config), stdin=subprocess.PIPE)
    daemon.proc.stdin.write(requests_for("agent-a", "agent-b"))
    daemon.proc.stdin.flush()
    daemon.wait_running()

    def healthz() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    code, body = wait_for(lambda: (h := healthz())[0] == 503 and h, 20, "healthz to say so")
    assert body["reason"] == "the API refuses the key: Invalid API key"
    refusals = len(sim.arrivals())
    assert refusals >= 1 and read_results(results) == []  # held: nothing failed

    key_file.write_text("the-right-key\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(read_results(results)) == len(NUMBERS), 20, "every request dialed")
    assert Counter(r["outcome"] for r in read_results(results)) == {"dialed": len(NUMBERS)}
    assert healthz()[0] == 200
    daemon.proc.stdin.close()
    assert daemon.stop()[0] == 0
    assert len(log_lines(daemon.stderr, "the API refuses the key")) == 1
    assert sim.placed() == Counter(NUMBERS)
    # Held, the lanes tried again with backoff, not once per request or per interval.
    assert sum(a["http_status"] == 401 for a in sim.arrivals()) < 20
