"""Prometheus metrics of one daemon, kept in its own registry and served by the admin listener."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# A make-call POST answers in tens of milliseconds at best and is cut off at api.timeout_s
# (15 s by default, configurable upwards), so the buckets span 10 ms to 30 s.
SEND_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# A due send waits up to one interval (1 s at rate 1) for its slot, longer while a 429's
# Retry-After holds the agent.
LIMITER_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A send's mark is one commit of the ledger: a millisecond or two on a local disk, longer while
# the disk is slow or a group commit carries an intake batch.
MARK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
NO_ANSWER = "none"  # the http_status label of a send that got no HTTP answer


class _Children:
    """A labelled metric's children, looked up once per label values: prometheus_client's
    labels() validates and locks on every call, and a send touches three of them."""

    def __init__(self, metric: Counter | Gauge | Histogram):
        self._metric = metric
        self._children: dict[tuple[str, ...], Counter | Gauge | Histogram] = {}

    def __call__(self, *values: str) -> Counter | Gauge | Histogram:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """Counters, histograms and queue gauges of one daemon.

    The registry is the daemon's own, not prometheus_client's global one, so several daemons or
    tests in one process never add to each other's counts or clash over metric names.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Outcomes by campaign too (admin.campaign_metrics): off unless asked for, since the
        # names are the submitters' and a series per name is unbounded.
        self.by_campaign = False
        self._sends = self._labelled(
            Counter,
            "dialerd_sends_total",
            "Make-call POSTs finished, by HTTP status ('none': no answer)",
            ["agent", "http_status"],
        )
        self._send_latency = self._labelled(
            Histogram,
            "dialerd_send_latency_seconds",
            "Time from a make-call POST to its answer or failure",
            ["agent"],
            buckets=SEND_LATENCY_BUCKETS,
        )
        self._rate_limited = self._labelled(
            Counter,
            "dialerd_rate_limited_total",
            "Make-call POSTs answered 429",
            ["agent"],
        )
        self._retries = self._labelled(
            Counter,
            "dialerd_retries_total",
            "Refused sends queued again",
            ["agent"],
        )
        self._limiter_wait = self._labelled(
            Histogram,
            "dialerd_limiter_wait_seconds",
            "How long a due send waited for its slot",
            ["agent"],
            buckets=LIMITER_WAIT_BUCKETS,
        )
        self._mark_latency = self._labelled(
            Histogram,
            "dialerd_mark_latency_seconds",
            "Time to record in the ledger that a send is about to go out",
            ["agent"],
            buckets=MARK_LATENCY_BUCKETS,
        )
        self._fenced = self._labelled(
            Counter,
            "dialerd_fenced_marks_total",
            "Cluster mode: sends not made because the agent's lease was another daemon's",
            ["agent"],
        )
        self._leases_held = Gauge(
            "dialerd_leases_held",
            "Cluster mode: agents whose lease this daemon holds",
            registry=self.registry,
        )
        self._lease_moves = self._labelled(
            Counter,
            "dialerd_lease_moves_total",
            "Cluster mode: leases taken and given up by this daemon, and lost to another",
            ["change"],
        )
        self._callbacks = self._labelled(
            Counter,
            "dialerd_callbacks_total",
            "Callbacks accepted, by status and effect (redial, unanswered, early, stale, repeat,"
            " mismatch)",
            ["status", "effect"],
        )
        self._outcomes = self._labelled(
            Counter,
            "dialerd_outcomes_total",
            "Final results written, by outcome",
            ["outcome"],
        )
        self._campaign_outcomes = self._labelled(
            Counter,
            "dialerd_campaign_outcomes_total",
            "Final results written, by campaign and outcome (with admin.campaign_metrics)",
            ["campaign", "outcome"],
        )
        self._queue_depth = self._labelled(
            Gauge,
            "dialerd_queue_depth",
            "Requests queued per agent",
            ["agent"],
        )
        self._in_flight = self._labelled(
            Gauge,
            "dialerd_in_flight",
            "Sends in flight per agent",
            ["agent"],
        )
        self._agents_with_queues: set[str] = set()

    def _labelled(
        self, kind: type, name: str, documentation: str, labels: list[str], **options
    ) -> _Children:
        """A labelled metric in this registry, its children looked up once."""
        return _Children(kind(name, documentation, labels, registry=self.registry, **options))

    def send(self, agent_id: str, http_status: int | None, latency_s: float) -> None:
        status_label = NO_ANSWER if http_status is None else str(http_status)
        self._sends(agent_id, status_label).inc()
        self._send_latency(agent_id).observe(latency_s)

    def rate_limited(self, agent_id: str) -> None:
        self._rate_limited(agent_id).inc()

    def retry(self, agent_id: str) -> None:
        self._retries(agent_id).inc()

    def paced(self, agent_id: str, wait_s: float) -> None:
        self._limiter_wait(agent_id).observe(wait_s)

    def marked(self, agent_id: str, latency_s: float) -> None:
        self._mark_latency(agent_id).observe(latency_s)

    def fenced(self, agent_id: str) -> None:
        self._fenced(agent_id).inc()

    def leases(self, held: int, change: str | None = None, count: int = 0) -> None:
        """How many leases are held now; `change` (taken, given_up, lost): by how many."""
        self._leases_held.set(held)
        if change is not None:
            self._lease_moves(change).inc(count)

    def callback(self, status: str, effect: str) -> None:
        self._callbacks(status, effect).inc()

    def outcome(self, outcome: str, campaign: str | None = None) -> None:
        self._outcomes(outcome).inc()
        if self.by_campaign and campaign is not None:
            self._campaign_outcomes(campaign, outcome).inc()

    def set_queues(self, agents: Mapping[str, Mapping[str, int]]) -> None:
        """Set the queue gauges from a status report's "agents"; an agent gone from it reads 0."""
        for agent_id in self._agents_with_queues - set(agents):
            self._queue_depth(agent_id).set(0)
            self._in_flight(agent_id).set(0)
        for agent_id, entry in agents.items():
            self._queue_depth(agent_id).set(entry.get("queued", 0))
            self._in_flight(agent_id).set(entry.get("in_flight", 0))
        self._agents_with_queues.update(agents)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
