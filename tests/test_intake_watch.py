"""The intake is watched: a spool stuck in a file system call (a hung mount) counts as a stall
for the watchdog and /healthz, as a stuck lane does, and never holds a stop; so does stdin stuck
with a batch it cannot record, while a quiet stdin is no stall. The daemon runs in this
process, on its built-in simulator, so that the spool's file calls can be made to hang."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time

import aiohttp
import pytest
from test_request import CONFIG
from test_systemd import NotifySocket, watchdog_pings

from dialerd import spool as spool_module
from dialerd.aio import Progress
from dialerd.config import build_config
from dialerd.daemon import Daemon
from dialerd.simulator import Faults
from dialerd.sources import StdinSource

SHUTDOWN_TIMEOUT_S = 3.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hung_listing(monkeypatch):
    """The spool's listing of incoming/ hangs, as on a hung mount, until released."""
    entered, release = threading.Event(), threading.Event()
    real = spool_module.list_incoming

    def hang(dirs):
        entered.set()
        release.wait(60)
        return real(dirs)

    monkeypatch.setattr(spool_module, "list_incoming", hang)
    yield entered
    release.set()


async def healthz(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url) as answer:
        return answer.status, await answer.json()


async def test_a_spool_stuck_in_a_read_stalls_health_and_watchdog_and_never_holds_a_stop(
    tmp_path, monkeypatch, hung_listing
):
    port = free_port()
    manager = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # WatchdogSec 0.6: the stall limit too
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = build_config(
        {
            "api": {"key_env": "VGAI_KEY", "timeout_s": 0.5},
            "agents": {"agent-a": {"region": "eu", "rate": 5}},
            "state_dir": str(tmp_path / "state"),
            "spool": {"dir": str(tmp_path / "spool")},
            "stdin": False,
            "admin": {"listen": f"127.0.0.1:{port}"},
            "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S,
        }
    )
    daemon = Daemon(config, simulate=Faults())
    run = asyncio.create_task(daemon.run())
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(asyncio.to_thread(hung_listing.wait, 10), 15)
            async with asyncio.timeout(10):
                while (answer := await healthz(session, url))[0] == 200:
                    await asyncio.sleep(0.05)
            status, body = answer
            assert status == 503 and body["status"] == "stalled", body
            assert "spool" in body["reason"], body
            await asyncio.to_thread(manager.drain)
            quiet = await asyncio.to_thread(manager.collect, 0.9)  # past the ping interval
            assert watchdog_pings(quiet) == [], [m.text for m in quiet]

            daemon.request_stop("test")
            started = time.monotonic()
            await asyncio.wait_for(run, SHUTDOWN_TIMEOUT_S + 5)
            elapsed = time.monotonic() - started
    finally:
        manager.sock.close()
        if not run.done():
            run.cancel()
    assert elapsed < SHUTDOWN_TIMEOUT_S, f"the stop took {elapsed:.1f} s"


def test_waiting_for_work_is_no_stall_and_a_step_that_ends_starts_the_next():
    now = [100.0]
    progress = Progress(lambda: now[0])
    now[0] = 103.0
    assert progress.stalled_for(now[0]) == 3.0  # in a step since it was made
    with progress.waiting():
        now[0] = 500.0
        assert progress.stalled_for(now[0]) == 0.0
    now[0] = 502.0
    assert progress.stalled_for(now[0]) == 2.0
    progress.advanced()
    assert progress.stalled_for(now[0]) == 0.0
    now[0] = 503.0
    assert progress.stalled_for(now[0]) == 1.0
    progress.ended()  # no more work for good: never stuck, however long the daemon runs on
    now[0] = 10_000.0
    assert progress.stalled_for(now[0]) == 0.0


async def test_stdin_at_its_end_is_no_stall_while_the_daemon_runs_on(monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end, "rb", buffering=0))
    source = StdinSource(HungIntake())
    os.close(write_end)  # at its end at once
    await asyncio.wait_for(source.run(), 5)
    assert source.progress.stalled_for(asyncio.get_running_loop().time() + 3600) == 0.0


class HungIntake:
    """An intake whose recording never ends, as a ledger call that hangs would."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    def config(self):
        return CONFIG

    async def record(self, _batch) -> None:
        self.asked.set()
        await asyncio.Event().wait()


async def test_stdin_waiting_for_data_is_no_stall_and_a_batch_it_cannot_record_is_one(
    monkeypatch,
):
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end, "rb", buffering=0))
    intake = HungIntake()
    source = StdinSource(intake)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.3)
        assert source.progress.stalled_for(loop.time()) == 0.0  # a quiet stdin is no stall

        os.write(write_end, b'{"to": "447700900001"}\n')
        await asyncio.wait_for(intake.asked.wait(), 5)
        await asyncio.sleep(0.3)
        assert source.progress.stalled_for(loop.time()) >= 0.3
    finally:
        source.stop()
        os.close(write_end)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
