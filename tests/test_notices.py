"""Cluster mode's wake-ups (LISTEN/NOTIFY) on a real PostgreSQL server: what the ledger tells
the other daemons as its transactions commit, and the daemon's listener, which reconnects."""

from __future__ import annotations

import asyncio
import os

import psycopg
import pytest
from conftest import cluster_of
from test_request import CONFIG

from dialerd.ledger.control import Selection, record
from dialerd.ledger.dialect import NOTICES
from dialerd.ledger.intake import add
from dialerd.ledger.leases import release
from dialerd.notices import Notices
from dialerd.request import build_request


def heard(listener: psycopg.Connection) -> list[str]:
    return [notice.payload for notice in listener.notifies(timeout=0.5, stop_after=10)]


def request(request_id: str, agent: str):
    fields = {"id": request_id, "to": "+447700900123", "agent_id": agent}
    return build_request(fields, CONFIG, "test:1")


def test_what_the_ledger_tells_the_other_daemons_as_it_commits(pg, pg_dsn):
    listener = psycopg.connect(pg_dsn, autocommit=True)
    listener.execute(f"LISTEN {NOTICES}")
    pg.execute("BEGIN")
    add(pg, 1, [request("r1", "agent-eu"), request("r2", "agent-eu")], [], None, 0)
    assert heard(listener) == [], "told before the commit"
    pg.execute("COMMIT")
    assert heard(listener) == ["queued:agent-eu"]  # once per agent
    record(pg, "pause", Selection(campaign="c"))
    release(pg, 1, ["agent-eu"])
    assert heard(listener) == ["control", "leases"]


async def test_the_listener_wakes_what_each_notice_is_of_and_comes_back_after_a_cut(pg, pg_dsn):
    calls: asyncio.Queue = asyncio.Queue()
    cluster = cluster_of(pg_dsn, instance=f"notices-test-{os.getpid()}")
    notices = Notices(
        cluster,
        lambda agents: calls.put_nowait(("queued", agents)),
        lambda: calls.put_nowait(("control",)),
        lambda: calls.put_nowait(("leases",)),
    )
    task = asyncio.create_task(notices.run())
    try:
        # Listening: what may have been said before is looked at (queues, controls).
        assert [await asyncio.wait_for(calls.get(), 10) for _ in range(2)] == [
            ("queued", None),
            ("control",),
        ]
        for payload in ("queued:agent-us", "control", "leases", "something else"):
            pg.execute("SELECT pg_notify(?, ?)", (NOTICES, payload))
        assert [await asyncio.wait_for(calls.get(), 10) for _ in range(3)] == [
            ("queued", ["agent-us"]),
            ("control",),
            ("leases",),
        ]
        # The server ends the listener's connection: it listens again, and since a notice may
        # have been missed meanwhile, every lane reads its queue again and controls are synced.
        pg.execute(  # this test's listener only: the server may be other tests' and daemons'
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
            (f"dialerd {cluster.instance} notices",),
        )
        assert [await asyncio.wait_for(calls.get(), 20) for _ in range(2)] == [
            ("queued", None),
            ("control",),
        ]
        pg.execute("SELECT pg_notify(?, ?)", (NOTICES, "control"))
        assert await asyncio.wait_for(calls.get(), 10) == ("control",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
