"""systemd integration: the notify protocol from the real `dialerd run` to a fake $NOTIFY_SOCKET
(READY, STATUS, RELOADING, STOPPING, WATCHDOG), the watchdog going quiet while the dispatcher is
stuck, journald's priority prefixes, and the unit, sysusers.d and tmpfiles.d files.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    AGENTS,
    Daemon,
    SimulatorProcess,
    dialerd,
    dialerd_env,
    wait_for,
    write_config,
)

from dialerd import admin
from dialerd.cli import EX_CONFIG, EX_USAGE
from dialerd.config import build_config
from dialerd.dispatcher import Dispatcher
from dialerd.lane import Wiring
from dialerd.ledger import Ledger
from dialerd.logs import JOURNAL_PRIORITY
from dialerd.metrics import Metrics
from dialerd.notify import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "dialerd.service"
SYSUSERS = REPO / "systemd" / "sysusers.d" / "dialerd.conf"
TMPFILES = REPO / "systemd" / "tmpfiles.d" / "dialerd.conf"
INSTALLED_DIALERD = "/opt/dialerd/bin/dialerd"  # where the unit expects the executable
SPOOL = "/var/spool/dialerd"
KEY = "vgai-systemd-test-key-7c41e9"  # distinctive: found nowhere in what dialerd writes
WATCHDOG_USEC = 400_000
SYSTEMD_DEFAULT_SOFT_NOFILE = 1024  # DefaultLimitNOFILE's soft part (systemd-system.conf(5))


# -- a fake service manager ---------------------------------------------------------------------


@dataclass
class Message:
    """One datagram to $NOTIFY_SOCKET, with when it arrived (CLOCK_MONOTONIC, µs)."""

    text: str
    received_usec: int

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.partition("=")[::2] for line in self.text.split("\n") if line)

    def has(self, key: str, value: str | None = None) -> bool:
        fields = self.fields
        return key in fields and (value is None or fields[key] == value)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifySocket:
    """A datagram socket as systemd offers it: a path, or "@name" in the abstract namespace.

    Every message is kept in `messages`, in order; `wait_for` returns the first one after those
    already returned that carries KEY (=VALUE).
    """

    def __init__(self, address: str):
        self.address = address
        self.messages: list[Message] = []
        self._cursor = 0
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        assert len(bind_to.encode()) < 108, f"a unix socket address this long fails: {address}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = Message(data.decode(), monotonic_usec())
        self.messages.append(message)
        return message

    def drain(self) -> list[Message]:
        """Every message already sent, without waiting."""
        start = len(self.messages)
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(65536)
                self.messages.append(Message(data.decode(), monotonic_usec()))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.messages[start:]

    def wait_for(
        self, key: str, timeout: float, daemon: Any = None, value: str | None = None
    ) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._cursor, len(self.messages)):
                if self.messages[index].has(key, value):
                    self._cursor = index + 1
                    return self.messages[index]
            self._cursor = len(self.messages)
            remaining = deadline - time.monotonic()
            exited = daemon is not None and daemon.proc.poll() is not None
            if remaining <= 0 or (exited and not self.drain()):
                seen = [m.text for m in self.messages]
                why = f"dialerd exited: {daemon.stderr}" if exited else f"{timeout} s passed"
                raise AssertionError(f"no {key}= on the notify socket ({why}); got {seen}")
            self._receive(min(remaining, 0.2))

    def collect(self, seconds: float) -> list[Message]:
        """Every message arriving within the next `seconds`."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._receive(remaining)
        self._cursor = len(self.messages)
        return self.messages[start:]


async def arrived(manager: NotifySocket, seconds: float) -> list[Message]:
    """In-process tests: let the loop run for `seconds`, then take what arrived meanwhile."""
    await asyncio.sleep(seconds)
    return manager.drain()


def watchdog_pings(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.has("WATCHDOG", "1")]


# -- helpers ------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """dialerd's environment, with nothing from a service manager the tests may run under."""
    env = dialerd_env(VGAI_KEY=KEY)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS"):
        env.pop(name, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def daemon_config(directory: Path, sim: SimulatorProcess, rate_b: int = 5, **top) -> Path:
    """agent-a and agent-b on the simulator process, written to directory/config.yaml."""
    agents = {**AGENTS, "agent-b": {**AGENTS["agent-b"], "rate": rate_b}}
    api = {"key_env": "VGAI_KEY", "timeout_s": 5, "endpoints": sim.endpoints()}
    return write_config(directory, agents, api=api, default_agent="agent-a", **top)


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each {key: [values, in order]} (a key may be repeated)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not read here: {line}"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service_entry(key: str) -> str:
    values = read_unit(UNIT)["Service"].get(key)
    assert values, f"{key}= is missing from [Service] of {UNIT.name}"
    return values[-1]


def venv_dialerd() -> Path:
    executable = Path(sys.executable).parent / "dialerd"
    assert executable.is_file() and os.access(executable, os.X_OK), executable
    return executable


def tmpfiles_lines() -> list[list[str]]:
    lines = TMPFILES.read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


# -- 1. the notify protocol from the real daemon ------------------------------------------------


def test_ready_status_reload_and_stopping_reach_the_notify_socket(tmp_path, simulator, daemons):
    sim = simulator()
    port = free_port()
    top = {"spool": {"dir": str(tmp_path / "spool")}, "admin": {"listen": f"127.0.0.1:{port}"}}
    config = daemon_config(tmp_path, sim, **top)

    with NotifySocket(str(tmp_path / "notify.sock")) as manager:
        daemon = daemons("-c", str(config), env=clean_env(NOTIFY_SOCKET=manager.address))

        ready = manager.wait_for("READY", 15, daemon, value="1")
        # READY=1 comes only once the admin listener is bound: it answers at once.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            assert answer.status == 200
        assert manager.messages[0] is ready, "nothing is sent before READY=1"
        assert ready.fields == {"READY": "1"}

        status = manager.wait_for("STATUS", 3, daemon).fields["STATUS"]
        assert re.search(r"\b0 queued\b", status) and re.search(r"\b10 calls/s\b", status), status

        # A good reload: RELOADING=1 with the time of the reload, then READY=1.
        daemon_config(tmp_path, sim, rate_b=3, **top)
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING", 5, daemon)
        assert set(reloading.fields) == {"RELOADING", "MONOTONIC_USEC"}, reloading.text
        assert reloading.fields["RELOADING"] == "1"
        usec = int(reloading.fields["MONOTONIC_USEC"])
        assert 0 <= reloading.received_usec - usec < 1_000_000, (reloading.received_usec, usec)
        manager.wait_for("READY", 5, daemon, value="1")
        wait_for(lambda: '"event": "reloaded"' in daemon.stderr, 5, "the reload to be logged")
        # STATUS= comes again every few seconds, with the new rates.
        status = manager.wait_for("STATUS", 8, daemon).fields["STATUS"]
        assert re.search(r"\b8 calls/s\b", status), status

        # A bad config is refused, and the daemon says it is ready again, with the old one.
        config.write_text("agents: [\n")
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING", 5, daemon)
        assert 0 <= reloading.received_usec - int(reloading.fields["MONOTONIC_USEC"]) < 1_000_000
        manager.wait_for("READY", 5, daemon, value="1")
        wait_for(lambda: "reload refused" in daemon.stderr, 5, "the refusal to be logged")
        assert daemon.proc.poll() is None

        code, _ = daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.stderr
        stopping = manager.wait_for("STOPPING", 2, daemon, value="1")
        after = manager.messages[manager.messages.index(stopping) + 1 :]
        assert not [m for m in after if m.has("READY")], [m.text for m in after]
        assert not watchdog_pings(manager.messages), "no WATCHDOG_USEC: no pings"
        assert "Traceback" not in daemon.stderr


def test_watchdog_pings_every_half_period_on_an_abstract_socket(tmp_path, simulator, daemons):
    sim = simulator()
    config = daemon_config(tmp_path, sim, spool={"dir": str(tmp_path / "spool")})
    address = f"@dialerd-test-{os.getpid()}-{time.monotonic_ns()}"

    with NotifySocket(address) as manager:
        env = clean_env(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        daemon = daemons("-c", str(config), env=env)
        manager.wait_for("READY", 15, daemon, value="1")

        pings = watchdog_pings(manager.collect(2.0))

        assert 6 <= len(pings) <= 14, f"{len(pings)} pings in 2 s at WatchdogSec=0.4"
        gaps = [
            (b.received_usec - a.received_usec) / 1e6
            for a, b in zip(pings, pings[1:], strict=False)
        ]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # systemd would act on a longer silence
        code, _ = daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.stderr
        manager.wait_for("STOPPING", 2, daemon, value="1")


# -- 2. the watchdog goes quiet while the dispatcher is stuck -------------------------------------


def test_watchdog_is_for_this_process_only_and_off_without_a_socket():
    usec = str(WATCHDOG_USEC)
    assert Notifier({"WATCHDOG_USEC": usec}).watchdog_s == 0.4
    assert Notifier({"WATCHDOG_USEC": usec, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 0.4
    assert (
        Notifier({"WATCHDOG_USEC": usec, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None
    )
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_s is None
    quiet = Notifier({})
    assert not quiet.enabled and quiet.watchdog_s is None
    quiet.ready()  # no manager: nothing to do, and no error


async def test_watchdog_goes_quiet_while_stalled_and_resumes(tmp_path):
    stalled = [0.0]
    with NotifySocket(str(tmp_path / "wd.sock")) as manager:
        notifier = Notifier({"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        task = asyncio.create_task(notifier.keep_watchdog(lambda: ("dispatcher", stalled[0])))
        try:
            healthy = watchdog_pings(await arrived(manager, 1.0))
            assert 3 <= len(healthy) <= 6, len(healthy)

            stalled[0] = notifier.watchdog_s + 0.1  # a lane stuck for longer than WatchdogSec
            assert watchdog_pings(await arrived(manager, 1.0)) == []

            stalled[0] = 0.0
            resumed = watchdog_pings(await arrived(manager, 0.5))
            assert 1 <= len(resumed) <= 4, len(resumed)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class StuckLedger:
    """A ledger whose every call never returns, as a hung database call would."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def hang(*_args: Any, **_kwargs: Any) -> Any:
            self.asked.set()
            await asyncio.Event().wait()

        return hang


async def test_a_lane_stuck_in_a_ledger_call_stalls_and_silences_the_watchdog(tmp_path):
    document = {
        "api": {"key_env": "VGAI_KEY"},
        "agents": {"agent-a": {"region": "eu", "rate": 5}},
        "state_dir": str(tmp_path / "state"),
    }
    agents = build_config(document).agents.values()
    stuck_ledger = StuckLedger()
    idle_ledger = Ledger(tmp_path / "state")
    idle_ledger.open()  # real, and empty: its lane waits for work, by design
    try:
        lanes = {}
        for name, ledger in (("stuck", stuck_ledger), ("idle", idle_ledger)):
            wiring = Wiring(ledger=ledger, client=None, on_final=lambda: None, metrics=Metrics())
            lanes[name] = Dispatcher(wiring)
        sockets = {name: NotifySocket(str(tmp_path / f"{name}.sock")) for name in lanes}
        try:
            async with asyncio.timeout(20), asyncio.TaskGroup() as group:
                before = asyncio.all_tasks()
                for name, dispatcher in lanes.items():
                    dispatcher.start(agents, group)
                    notifier = Notifier(
                        {"NOTIFY_SOCKET": sockets[name].address, "WATCHDOG_USEC": "400000"}
                    )
                    stalled = functools.partial(
                        lambda d: ("dispatcher", d.stalled_for()), dispatcher
                    )
                    group.create_task(notifier.keep_watchdog(stalled))
                tasks = asyncio.all_tasks() - before  # the lanes and the watchdogs
                await asyncio.wait_for(stuck_ledger.asked.wait(), 2)

                await asyncio.sleep(0.6)
                first = lanes["stuck"].stalled_for()
                await asyncio.sleep(0.3)
                second = lanes["stuck"].stalled_for()
                assert 0.5 < first < second, (first, second)  # growing, as the call goes on
                assert lanes["idle"].stalled_for() == 0.0  # waiting for work is no stall
                idle_pings = watchdog_pings(sockets["idle"].drain())
                stuck_pings = watchdog_pings(sockets["stuck"].drain())
                assert len(idle_pings) >= 3, len(idle_pings)
                assert len(stuck_pings) <= 2, len(stuck_pings)  # before it passed WatchdogSec

                await asyncio.sleep(0.6)
                assert watchdog_pings(sockets["stuck"].drain()) == []
                assert len(watchdog_pings(sockets["idle"].drain())) >= 2
                assert lanes["idle"].stalled_for() == 0.0
                for dispatcher in lanes.values():
                    dispatcher.stop()
                for task in tasks:
                    task.cancel()
        finally:
            for manager in sockets.values():
                manager.sock.close()
    finally:
        idle_ledger.close()


# -- 3. journald's priority prefixes ------------------------------------------------------------


class LoggingRun(Daemon):
    """`dialerd run` with stdin a pipe and stderr a file; optionally that file is the "journal"."""

    def __init__(self, directory: Path, sim: SimulatorProcess, journal: bool):
        directory.mkdir()
        self.config = daemon_config(directory, sim)
        super().__init__(
            directory, "-c", str(self.config), stdin=subprocess.PIPE, env=clean_env(),
            journal=journal,
        )  # fmt: skip


def test_log_lines_carry_journald_priorities_only_on_the_journal_stream(tmp_path, simulator):
    # The simulator allows 1 call/s where dialerd sends 5/s: the second call of each run meets a
    # 429, which dialerd logs as a warning; a refused reload is logged as an error.
    sim = simulator(agents=("agent-a=1", "agent-b=1"))
    runs = {
        "journal": LoggingRun(tmp_path / "journal", sim, journal=True),
        "plain": LoggingRun(tmp_path / "plain", sim, journal=False),
    }
    try:
        agent_of = {"journal": "agent-a", "plain": "agent-b"}
        for n, (name, run) in enumerate(runs.items()):
            for i in range(2):
                request = {
                    "id": f"{name}-{i}",
                    "to": f"4477009004{n}{i}",
                    "agent_id": agent_of[name],
                }
                run.proc.stdin.write(json.dumps(request).encode() + b"\n")
            run.proc.stdin.flush()
        for run in runs.values():
            wait_for(lambda run=run: run.stdout.count("\n") >= 2, 15, "both results")
            run.config.write_text("agents: [\n")
            run.proc.send_signal(signal.SIGHUP)
        for run in runs.values():
            wait_for(lambda run=run: "reload refused" in run.stderr, 5, "the refused reload")
            run.proc.stdin.close()  # stdin, the only source, is done: the run ends
        for run in runs.values():
            assert run.proc.wait(timeout=15) == 0, run.stderr
    finally:
        for run in runs.values():
            run.kill()

    levels = {name: [] for name in runs}
    for name, run in runs.items():
        assert KEY not in run.stderr and KEY not in run.stdout, f"the key leaked ({name})"
        assert [json.loads(line)["outcome"] for line in run.stdout.splitlines()] == ["dialed"] * 2
        lines = run.stderr.splitlines()
        assert lines, name
        for line in lines:
            if name == "journal":
                match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
                assert match, f"no priority prefix: {line!r}"
                priority, record = int(match.group(1)), json.loads(match.group(2))
                assert priority == JOURNAL_PRIORITY[record["level"]], line
            else:
                assert line.startswith("{"), f"a prefix without the journal: {line!r}"
                record = json.loads(line)
            levels[name].append(record["level"])
    for name in runs:
        assert {"info", "warning", "error"} <= set(levels[name]), (name, levels[name])
    assert re.search(r"^<4>.*rate limited", runs["journal"].stderr, re.M)
    assert re.search(r"^<3>.*reload refused", runs["journal"].stderr, re.M)
    assert re.search(r"^<6>.*\"event\": \"running\"", runs["journal"].stderr, re.M)


def test_a_fatal_error_on_the_journal_stream_has_error_priority(tmp_path):
    # Two problems: the message is more than one line, and journald reads each line on its own.
    config = write_config(tmp_path, {"agent-a": {"region": "eu", "rate": 0}}, colour="blue")
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as err:
        status = os.fstat(err.fileno())
        env = clean_env(JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}")
        run = subprocess.run(
            [sys.executable, "-m", "dialerd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env, timeout=20,
        )  # fmt: skip

    assert run.returncode == EX_CONFIG
    lines = stderr_path.read_text().splitlines()
    assert len(lines) >= 3 and "bad config" in lines[0] and "colour" in stderr_path.read_text()
    # Without a prefix journald files a line at SyslogLevel= (info): `journalctl -p err` would
    # not show why the service failed to start.
    unprefixed = [line for line in lines if not line.startswith("<3>")]
    assert not unprefixed, f"lines the journal files as info, not error: {unprefixed}"


# -- 4. the unit, sysusers.d and tmpfiles.d ---------------------------------------------------


def test_unit_runs_dialerd_as_a_notify_service_with_watchdog_reload_and_credentials():
    unit = read_unit(UNIT)
    service = unit["Service"]
    defaults = build_config(
        {"api": {"key_env": "VGAI_KEY"}, "agents": {"a": {"region": "eu", "rate": 1}}}
    )

    assert service_entry("Type") == "notify"
    assert service_entry("NotifyAccess") in ("main", "exec", "all")
    assert re.search(r"\bdialerd run\b", service_entry("ExecStart"))
    reload = service["ExecReload"]
    assert any(re.fullmatch(r"\S*/kill (-HUP|-s ?HUP|-SIGHUP|-1) \$MAINPID", c) for c in reload)
    watchdog = service_entry("WatchdogSec")
    assert watchdog.isdigit(), f"WatchdogSec={watchdog}: seconds expected"
    # A send may wait api.timeout_s for its connection; the watchdog must outlast it.
    assert int(watchdog) > defaults.api.timeout_s
    assert service_entry("Restart") == "on-failure"
    # A restart mends no bad command line (64) and no bad config or path it names (78).
    assert {str(EX_USAGE), str(EX_CONFIG)} <= set(service_entry("RestartPreventExitStatus").split())
    # The drain ends by itself (shutdown_timeout_s) before systemd would kill the daemon.
    assert float(service_entry("TimeoutStopSec")) > defaults.shutdown_timeout_s
    assert service_entry("StateDirectory") == "dialerd"
    credential = service_entry("LoadCredential")
    assert re.fullmatch(r"vgai-key:/\S+", credential), credential
    assert service_entry("User") == "dialerd"
    # Not of the submitters' group: their files (0604, in that group) are the daemon's to read
    # and no other submitter's.
    assert "dialerd-submit" not in " ".join(
        read_unit(UNIT)["Service"].get("SupplementaryGroups", [])
    )
    assert SPOOL in service_entry("ReadWritePaths").split()
    assert service_entry("ProtectSystem") == "strict"
    assert "AF_UNIX" in service_entry("RestrictAddressFamilies").split()  # the notify socket
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_units_descriptor_limit_holds_both_listeners_full_and_room_for_the_rest():
    """At systemd's default soft limit (1024), idle connections to the callback listener took
    the descriptors that the ledger, the spool and the sends need; the unit's limit must hold
    both listeners at their caps with at least that default left for everything else."""
    limit = service_entry("LimitNOFILE")
    assert limit.isdigit(), f"LimitNOFILE={limit}: one number, the soft and hard limit alike"
    defaults = build_config(
        {
            "api": {"key_env": "VGAI_KEY"},
            "agents": {"a": {"region": "eu", "rate": 1}},
            "callbacks": {},
        }
    )
    listeners = defaults.callbacks.max_connections + admin.MAX_CONNECTIONS

    assert int(limit) >= listeners + SYSTEMD_DEFAULT_SOFT_NOFILE


def test_sysusers_and_tmpfiles_declare_the_user_the_submitters_and_the_spool():
    lines = [line.split() for line in SYSUSERS.read_text().splitlines() if line.strip()]
    entries = [line[:3] for line in lines if not line[0].startswith("#")]
    assert ["u", "dialerd", "-"] in entries
    assert ["g", "dialerd-submit", "-"] in entries
    assert ["m", "dialerd", "dialerd-submit"] not in entries

    directories = {line[1]: line for line in tmpfiles_lines() if line[0] == "d"}
    modes = {
        sub: int(directories[SPOOL + sub][2], 8) for sub in ("", "/incoming", "/done", "/rejected")
    }
    groups = {sub: directories[SPOOL + sub][4] for sub in modes}
    for sub, mode in modes.items():
        assert directories[SPOOL + sub][3] == "dialerd", sub
        assert mode & stat.S_IRWXO == 0, f"{SPOOL + sub}: nothing of the spool for others"
    # As Postfix's maildrop: submitters pass through the root and write into incoming/, which
    # they cannot list, and where the sticky bit keeps each one's files from the others.
    assert groups[""] == groups["/incoming"] == "dialerd-submit"
    assert modes[""] & stat.S_IRWXG == stat.S_IXGRP
    assert modes["/incoming"] == 0o1730
    # done/ and rejected/ hold everyone's submissions: the daemon's alone.
    for sub in ("/done", "/rejected"):
        assert groups[sub] != "dialerd-submit" and modes[sub] & stat.S_IWGRP == 0, sub


def test_a_bad_config_does_not_restart_the_service_in_a_loop(tmp_path):
    """dialerd exits 78 on a bad config, and RestartPreventExitStatus=78 is to stop systemd from
    restarting it. But that setting applies to the main process only (systemd.service(5),
    systemd/systemd#11868): an ExecStartPre= that exits 78 fails the start as any failure does,
    and Restart=on-failure starts it again every RestartSec= (at 5 s apart it never reaches the
    default start limit of 5 starts in 10 s), for ever. So no ExecStartPre= may be the one to
    find the bad config."""
    prevented = set(service_entry("RestartPreventExitStatus").split())
    bad = write_config(tmp_path, {"agent-a": {"region": "eu", "rate": 0}})
    for command in read_unit(UNIT)["Service"].get("ExecStartPre", []):
        if command.startswith("-"):
            continue  # its failure is ignored: the main process meets the bad config
        argv = command.lstrip("@:+!").split()
        argv[0] = str(venv_dialerd()) if argv[0] == INSTALLED_DIALERD else argv[0]
        argv = [str(bad) if arg.endswith("config.yaml") else arg for arg in argv]
        run = subprocess.run(argv, capture_output=True, env=clean_env(), timeout=20)
        assert str(run.returncode) not in prevented, (
            f"ExecStartPre={command} exits {run.returncode} on a bad config; systemd restarts "
            f"the service every RestartSec= for ever: RestartPreventExitStatus= only applies "
            f"to the main process"
        )


def test_incoming_made_again_under_the_units_umask_stays_writable_by_submitters(
    tmp_path, simulator
):
    """The spool laid out as tmpfiles.d does; the daemon under the unit's UMask=; incoming/
    removed while it runs is made again (sources.py), and submitters must still write there."""
    umask = int(service_entry("UMask"), 8)
    declared = {line[1]: int(line[2], 8) for line in tmpfiles_lines() if line[0] == "d"}
    spool = tmp_path / "spool"
    for path, mode in sorted(declared.items()):
        if path == SPOOL or path.startswith(SPOOL + "/"):
            directory = spool / path[len(SPOOL) :].lstrip("/")
            directory.mkdir()
            os.chmod(directory, mode)
    sim = simulator()
    config = daemon_config(tmp_path, sim, spool={"dir": str(spool)})
    err_path = tmp_path / "umask.stderr"
    with open(err_path, "wb") as err:
        proc = dialerd(
            "run", "-c", str(config), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err, env=clean_env(), umask=umask,
        )  # fmt: skip
    try:
        wait_for(lambda: '"event": "running"' in err_path.read_text(), 15, "dialerd to run")
        shutil.rmtree(spool / "incoming")
        wait_for(lambda: (spool / "incoming").is_dir(), 5, "incoming/ to be made again")
        mode = stat.S_IMODE(os.stat(spool / "incoming").st_mode)
        assert proc.poll() is None, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    want = declared[SPOOL + "/incoming"]
    assert mode == want, (
        f"incoming/ made again as {mode:o} under UMask={umask:04o}; {want:o} wanted"
    )


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_and_rates_its_exposure_low(tmp_path):
    text = UNIT.read_text()
    assert INSTALLED_DIALERD in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_DIALERD, str(venv_dialerd())))

    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = verify.stdout + verify.stderr
    assert verify.returncode == 0, output
    assert UNIT.name not in output and "dialerd" not in output, output

    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(
        r"Overall exposure level for dialerd\.service: (\d+(?:\.\d+)?)", security.stdout
    )
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 1.5, security.stdout


def test_the_documented_credential_path_matches_the_unit():
    """api.key_file as docs/operations.md has it must be where LoadCredential= puts the key."""
    name = service_entry("LoadCredential").partition(":")[0]
    docs = (REPO / "docs" / "operations.md").read_text()
    match = re.search(r"key_file:\s*(\S+)", docs)
    assert match, "docs/operations.md shows no api.key_file"
    assert match.group(1) == f"/run/credentials/{UNIT.name}/{name}"
    # and such a config is one dialerd accepts
    document = {"api": {"key_file": match.group(1)}, "agents": {"a": {"region": "eu", "rate": 1}}}
    assert str(build_config(yaml.safe_load(yaml.safe_dump(document))).api.key_file) == match.group(
        1
    )
