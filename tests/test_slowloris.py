"""Slowloris against the real `dialerd run` under systemd's default descriptor limit (soft 1024),
while it sends a backlog at each agent's rate (SPEC 7, 8.1).

More idle connections than the callback listener's cap, each sending the start of a request and
a header line now and then but never the end of its headers: the listener holds at most its cap
(the rest wait in the kernel's backlog), so the daemon keeps descriptors for the ledger, the spool
and the sends, the sends keep their rate, and the header timeout closes the idle ones. On the old
listener, which accepted them all, the spool scan and the ledger failed with "Too many open files"
and the sends stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import threading
import time
from collections import defaultdict

import pytest
from conftest import sim_config, wait_for
from test_lifecycle_callbacks import callback, free_port

from dialerd.config import MAX_CONNECTIONS
from dialerd.listener import BACKLOG, HEADERS_TIMEOUT_S

ATTACKERS = 1100
SYSTEMD_SOFT_NOFILE = 1024  # DefaultLimitNOFILE's soft part: a unit without LimitNOFILE= gets it
PER_AGENT = 60  # 12 s of sends at 5/s: the busy period outlasts the header timeout
RATE = 5
TRICKLE_S = 2.0
START_OF_REQUEST = b"POST /callbacks/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app"


def systemd_default_limit() -> None:
    """In the daemon's child, before exec: the descriptor limit a unit gets by default."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SYSTEMD_SOFT_NOFILE, hard))


@pytest.fixture
def many_descriptors():
    """The test's own limit raised, for its ATTACKERS sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = ATTACKERS + 1024
    assert hard >= needed, f"the test needs a hard limit of {needed} descriptors, not {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Slowloris:
    """`count` connections to 127.0.0.1:port, in a thread of the test: each sends the start of a
    request once connected and a header line every TRICKLE_S, and never finishes its headers."""

    def __init__(self, port: int, count: int):
        self.connected = 0  # connections the kernel completed: held by the server or queued
        self.lasted: list[float] = []  # seconds each connection lasted before the server closed it
        self.resets = 0  # connections reset by the kernel instead
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))  # in progress; the kernel may queue it long
            self._selector.register(sock, selectors.EVENT_WRITE, time.monotonic())
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_trickle = time.monotonic() + TRICKLE_S
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            for key, events in self._selector.select(0.1):
                if events & selectors.EVENT_WRITE:
                    self._connected(key.fileobj, key.data)
                else:
                    self._readable(key.fileobj, key.data)
            if time.monotonic() >= next_trickle:
                next_trickle += TRICKLE_S
                for key in list(self._selector.get_map().values()):
                    if key.events == selectors.EVENT_READ:
                        with contextlib.suppress(OSError):
                            key.fileobj.send(b"X-Slow: y\r\n")

    def _connected(self, sock: socket.socket, opened: float) -> None:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._drop(sock)  # refused or timed out: not one the server holds
            return
        self.connected += 1
        with contextlib.suppress(OSError):
            sock.send(START_OF_REQUEST)
        self._selector.modify(sock, selectors.EVENT_READ, opened)

    def _readable(self, sock: socket.socket, opened: float) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            # Reset: one the kernel completed past a full accept queue and dropped after its
            # SYN-ACK retries (about 8 s), never one the server held.
            self.resets += 1
            self._drop(sock)
            return
        if not data:
            self.lasted.append(time.monotonic() - opened)
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self._selector.get_map().values()):
            self._drop(key.fileobj)
        self._selector.close()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def held_connections(pid: int, port: int) -> int:
    """The connections to 127.0.0.1:`port` that the process holds open: its sockets whose
    local port it is, less the listening one (a count of descriptors would count whatever
    else the daemon happens to have open too)."""
    on_port = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: listening
                on_port.add(inode)
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            held += target.startswith("socket:[") and target[8:-1] in on_port
    return held


def test_slowloris_past_the_cap_under_the_default_limit_neither_blinds_nor_slows_the_daemon(
    tmp_path, simulator, daemons, many_descriptors
):
    sim = simulator()
    port, admin_port = free_port(), free_port()
    spool = tmp_path / "spool"
    config = sim_config(
        tmp_path,
        sim,
        spool={"dir": str(spool)},
        callbacks={
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
            "wait_s": 300,
        },
        admin={"listen": f"127.0.0.1:{admin_port}"},
    )
    daemon = daemons("-c", str(config), preexec_fn=systemd_default_limit)
    daemon.wait_running()
    pid = daemon.proc.pid
    with open(f"/proc/{pid}/limits") as limits:
        assert any(
            line.startswith("Max open files") and line.split()[3] == str(SYSTEMD_SOFT_NOFILE)
            for line in limits
        )
    before_attack = open_descriptors(pid)

    attack = Slowloris(port, ATTACKERS)
    try:
        # The listener full and the kernel's backlog too, before the backlog of sends comes.
        held = [0]  # the most connections the daemon held at once: the first ones held time
        # out after 10 s, and on a slow machine the backlog may fill only after that

        def filled() -> bool:
            held[0] = max(held[0], held_connections(pid, port))
            return held[0] >= MAX_CONNECTIONS and attack.connected >= MAX_CONNECTIONS + BACKLOG

        try:
            wait_for(filled, 45, "the listener and the kernel's backlog to fill up")
        except AssertionError as error:  # a busy machine completes 1,100 handshakes slowly
            raise AssertionError(f"{error}: held {held[0]}, connected {attack.connected}") from None
        requests = [
            {"id": f"{agent}-{n}", "to": f"4477009{index + 1}{n:04d}", "agent_id": agent}
            for index, agent in enumerate(("agent-a", "agent-b"))
            for n in range(PER_AGENT)
        ]
        (spool / "incoming").mkdir(parents=True, exist_ok=True)
        aside = spool / ".backlog.jsonl"
        aside.write_text("".join(json.dumps(r) + "\n" for r in requests))
        aside.rename(spool / "incoming" / "backlog.jsonl")
        most_descriptors = 0

        def all_sent() -> bool:
            nonlocal most_descriptors
            most_descriptors = max(most_descriptors, open_descriptors(pid))
            return len(sim.arrivals()) >= len(requests)

        wait_for(all_sent, 60, "the backlog to be sent")

        arrivals = sim.arrivals()
        assert [a["http_status"] for a in arrivals] == [200] * len(requests)  # no 429
        by_agent = defaultdict(list)
        for arrival in arrivals:
            by_agent[arrival["agent_id"]].append(arrival["at"])
        for agent, times in by_agent.items():
            achieved = (len(times) - 1) / (max(times) - min(times))  # over the busy period
            assert achieved >= 0.95 * RATE, (agent, achieved)
        # The listener held its cap and no more: the daemon stayed far from its limit.
        assert most_descriptors <= before_attack + MAX_CONNECTIONS + 64, most_descriptors
        assert "Too many open files" not in daemon.stderr
        # The header timeout, not the test, closes the idle connections the listener holds.
        wait_for(lambda: len(attack.lasted) >= MAX_CONNECTIONS, 30, "the idle ones to be closed")
        assert min(attack.lasted) >= HEADERS_TIMEOUT_S - 0.05, min(attack.lasted)
    finally:
        attack.stop()

    # With the idle ones gone, a genuine callback gets through.
    call = next(a for a in arrivals if a["agent_id"] == "agent-a")
    assert callback(call, "rejected") == (200, {"result": "unanswered"})
    assert daemon.proc.poll() is None
    code, _ = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.stderr
    assert "Too many open files" not in daemon.stderr
    assert "Traceback" not in daemon.stderr
