"""The admin listener and the metrics it serves, through a real listener on 127.0.0.1."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dialerd.admin import AdminListener
from dialerd.config import Listen
from dialerd.metrics import Metrics


class FakeDaemon:
    """What the listener asks of the daemon: a status report and why it is unhealthy, if it is."""

    def __init__(self) -> None:
        self.report: dict = {"agents": {}, "outcomes": {}}
        self.unhealthy: str | None = None
        self.status_fails = False

    async def status(self) -> dict:
        if self.status_fails:
            raise RuntimeError("ledger closed")
        return self.report


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def admin(daemon, metrics):
    """A running listener on a free port: its base URL."""
    listener = AdminListener(
        Listen("127.0.0.1", 0), metrics, daemon.status, lambda: daemon.unhealthy
    )
    url = await listener.start()
    yield url
    await listener.stop()


async def get_json(http, url: str) -> tuple[int, dict]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def scrape(http, admin: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics and parse it: each sample's value by (sample name, its labels)."""
    async with http.get(f"{admin}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(scraped: dict, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


async def test_start_returns_the_loopback_url_of_the_port_it_took(admin):
    host, port = admin.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    assert int(port) > 0


async def test_healthz_is_200_while_healthy_then_503_stalled_or_draining(http, admin, daemon):
    assert await get_json(http, f"{admin}/healthz") == (200, {"status": "running"})

    daemon.unhealthy = "the spool has made no progress for 61 s"
    stalled = {"status": "stalled", "reason": "the spool has made no progress for 61 s"}
    assert await get_json(http, f"{admin}/healthz") == (503, stalled)

    daemon.unhealthy = "draining"
    draining = {"status": "draining", "reason": "draining"}
    assert await get_json(http, f"{admin}/healthz") == (503, draining)


async def test_sends_are_counted_by_agent_and_http_status(http, admin, metrics):
    metrics.send("a", 200, 0.05)
    metrics.send("a", 200, 0.2)
    metrics.send("a", 429, 0.03)
    metrics.send("a", None, 15.0)
    metrics.send("b", 200, 0.1)

    scraped = await scrape(http, admin)

    assert sample(scraped, "dialerd_sends_total", agent="a", http_status="200") == 2
    assert sample(scraped, "dialerd_sends_total", agent="a", http_status="429") == 1
    assert sample(scraped, "dialerd_sends_total", agent="a", http_status="none") == 1
    assert sample(scraped, "dialerd_sends_total", agent="b", http_status="200") == 1
    assert sample(scraped, "dialerd_send_latency_seconds_count", agent="a") == 4
    assert sample(scraped, "dialerd_send_latency_seconds_sum", agent="a") == pytest.approx(15.28)
    # The buckets reach from 10 ms to 30 s: the 15 s send is under 30 s but over 10 s.
    assert sample(scraped, "dialerd_send_latency_seconds_bucket", agent="a", le="0.01") == 0
    assert sample(scraped, "dialerd_send_latency_seconds_bucket", agent="a", le="10.0") == 3
    assert sample(scraped, "dialerd_send_latency_seconds_bucket", agent="a", le="30.0") == 4


async def test_429s_retries_pacing_callbacks_and_outcomes_are_counted(http, admin, metrics):
    metrics.rate_limited("a")
    metrics.rate_limited("a")
    metrics.retry("a")
    metrics.retry("b")
    metrics.retry("b")
    metrics.paced("a", 0.2)
    metrics.paced("a", 0.3)
    metrics.marked("a", 0.002)
    metrics.marked("a", 0.3)
    metrics.callback("busy", "redial")
    metrics.callback("busy", "redial")
    metrics.callback("timeout", "unanswered")
    metrics.callback("busy", "repeat")
    metrics.outcome("dialed")
    metrics.outcome("dialed")
    metrics.outcome("in_doubt")

    scraped = await scrape(http, admin)

    assert sample(scraped, "dialerd_rate_limited_total", agent="a") == 2
    assert sample(scraped, "dialerd_retries_total", agent="a") == 1
    assert sample(scraped, "dialerd_retries_total", agent="b") == 2
    assert sample(scraped, "dialerd_limiter_wait_seconds_count", agent="a") == 2
    assert sample(scraped, "dialerd_limiter_wait_seconds_sum", agent="a") == pytest.approx(0.5)
    assert sample(scraped, "dialerd_mark_latency_seconds_bucket", agent="a", le="0.0025") == 1
    assert sample(scraped, "dialerd_mark_latency_seconds_bucket", agent="a", le="0.5") == 2
    assert sample(scraped, "dialerd_callbacks_total", status="busy", effect="redial") == 2
    assert sample(scraped, "dialerd_callbacks_total", status="timeout", effect="unanswered") == 1
    assert sample(scraped, "dialerd_callbacks_total", status="busy", effect="repeat") == 1
    assert sample(scraped, "dialerd_callbacks_total", status="timeout", effect="redial") is None
    assert sample(scraped, "dialerd_outcomes_total", outcome="dialed") == 2
    assert sample(scraped, "dialerd_outcomes_total", outcome="in_doubt") == 1


async def test_outcomes_are_counted_by_campaign_only_when_the_config_asks(http, admin, metrics):
    metrics.outcome("dialed", "spring")
    metrics.by_campaign = True
    metrics.outcome("dialed", "spring")
    metrics.outcome("cancelled", "spring")
    metrics.outcome("dialed", None)

    scraped = await scrape(http, admin)

    assert sample(scraped, "dialerd_outcomes_total", outcome="dialed") == 3
    counted = {"campaign": "spring"}
    assert sample(scraped, "dialerd_campaign_outcomes_total", outcome="dialed", **counted) == 1
    assert sample(scraped, "dialerd_campaign_outcomes_total", outcome="cancelled", **counted) == 1


async def test_queue_gauges_follow_the_status_report_and_reset_when_an_agent_leaves_it(
    http, admin, daemon
):
    daemon.report["agents"] = {
        "a": {"queued": 7, "due_now": 3, "in_flight": 2},
        "b": {"queued": 1, "due_now": 0, "in_flight": 0},
    }
    scraped = await scrape(http, admin)
    assert sample(scraped, "dialerd_queue_depth", agent="a") == 7
    assert sample(scraped, "dialerd_in_flight", agent="a") == 2
    assert sample(scraped, "dialerd_queue_depth", agent="b") == 1

    daemon.report["agents"] = {"b": {"queued": 4, "due_now": 4, "in_flight": 1}}
    scraped = await scrape(http, admin)

    assert sample(scraped, "dialerd_queue_depth", agent="a") == 0
    assert sample(scraped, "dialerd_in_flight", agent="a") == 0
    assert sample(scraped, "dialerd_queue_depth", agent="b") == 4
    assert sample(scraped, "dialerd_in_flight", agent="b") == 1


async def test_status_returns_exactly_the_report(http, admin, daemon):
    daemon.report = {
        "agents": {"a": {"queued": 2, "due_now": 1, "in_flight": 0, "next_due": None}},
        "outcomes": {"dialed": 5, "invalid": 1},
        "results_unwritten": 0,
    }

    assert await get_json(http, f"{admin}/status") == (200, daemon.report)


@pytest.mark.parametrize("path", ["/status", "/metrics"])
async def test_a_failing_status_report_gives_503_json_without_a_traceback(
    http, admin, daemon, path
):
    daemon.status_fails = True

    async with http.get(f"{admin}{path}") as response:
        assert response.status == 503
        assert response.content_type == "application/json"
        body = await response.text()
    assert "Traceback" not in body
    assert "ledger closed" not in body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/healthz"),
        ("PUT", "/status"),
        ("DELETE", "/metrics"),
        ("HEAD", "/healthz"),
        ("GET", "/nope"),
        ("GET", "/"),
        ("POST", "/nope"),
    ],
)
async def test_other_paths_and_methods_are_404(http, admin, method, path):
    async with http.request(method, f"{admin}{path}") as response:
        assert response.status == 404


async def test_requests_headers_and_bodies_are_not_logged(http, admin, daemon, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    secret = "do-not-log-7f3a"
    headers = {"User-Agent": secret, "Referer": secret, "X-Vgai-Key": secret}

    async with http.get(f"{admin}/status", headers=headers) as response:
        assert response.status == 200
    async with http.post(f"{admin}/status", data=secret, headers=headers) as response:
        assert response.status == 404
    daemon.status_fails = True
    async with http.get(f"{admin}/metrics", headers=headers) as response:
        assert response.status == 503

    captured = capsys.readouterr()
    assert secret not in caplog.text + captured.out + captured.err


async def test_stop_releases_the_port(http, daemon, metrics):
    listener = AdminListener(Listen("127.0.0.1", 0), metrics, daemon.status, lambda: None)
    url = await listener.start()

    await listener.stop()

    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"{url}/healthz")


def test_two_metrics_instances_do_not_share_counts():
    first, second = Metrics(), Metrics()

    first.send("a", 200, 0.1)
    first.outcome("dialed")
    second.send("a", 200, 0.1)

    def count(metrics: Metrics, name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert count(first, "dialerd_sends_total", agent="a", http_status="200") == 1
    assert count(second, "dialerd_sends_total", agent="a", http_status="200") == 1
    assert count(first, "dialerd_outcomes_total", outcome="dialed") == 1
    assert count(second, "dialerd_outcomes_total", outcome="dialed") is None


# -- where it listens, and its token ------------------------------------------------------------

TOKEN = "admin-token-5d1e9c"


@pytest.fixture
async def guarded(daemon, metrics):
    """A running listener on a free port that needs TOKEN: the listener and its base URL."""
    listener = AdminListener(
        Listen("127.0.0.1", 0), metrics, daemon.status, lambda: daemon.unhealthy, token=TOKEN
    )
    url = await listener.start()
    yield listener, url
    await listener.stop()


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/status", "/nope"])
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}",
     TOKEN, f"Bearer  {TOKEN}", "Bearer \u00e9t\u00e9"],
)  # fmt: skip
async def test_without_the_token_every_request_is_401(http, guarded, path, authorization):
    _, url = guarded
    headers = {} if authorization is None else {"Authorization": authorization}

    async with http.get(f"{url}{path}", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_with_the_token_requests_are_served(http, guarded, scheme):
    _, url = guarded
    headers = {"Authorization": f"{scheme} {TOKEN}"}

    async with http.get(f"{url}/healthz", headers=headers) as response:
        assert response.status == 200
    async with http.get(f"{url}/nope", headers=headers) as response:
        assert response.status == 404


async def test_a_new_token_replaces_the_old_one(http, guarded):
    listener, url = guarded

    listener.use_token("rotated-token")

    for token, status in ((TOKEN, 401), ("rotated-token", 200)):
        async with http.get(f"{url}/healthz", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == status, token


async def test_on_loopback_nothing_is_exposed(daemon, metrics):
    listener = AdminListener(Listen("127.0.0.1", 0), metrics, daemon.status, lambda: None)
    url = await listener.start()
    try:
        assert listener.urls == [url]
        assert listener.exposed == []
    finally:
        await listener.stop()


async def test_on_every_address_the_bound_address_is_named_and_exposed(http, daemon, metrics):
    listener = AdminListener(Listen("0.0.0.0", 0), metrics, daemon.status, lambda: None)
    url = await listener.start()
    try:
        port = int(url.rpartition(":")[2])
        assert listener.urls == [f"http://0.0.0.0:{port}"] == listener.exposed
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
    finally:
        await listener.stop()
