"""Prometheus metrics, in a registry per daemon so tests can run several daemons in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric batch-poller exports. Names are documented in the README."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.api_requests = Counter(
            "batch_poller_api_requests", "Batch API requests by kind and status class", ["kind", "status"], registry=r
        )
        self.polls = Counter("batch_poller_polls", "Batch refreshes by result", ["result"], registry=r)
        self.bad_responses = Counter(
            "batch_poller_bad_responses", "API answers that could not be trusted, by reason", ["reason"], registry=r
        )
        self.transitions = Counter("batch_poller_events", "Events emitted, by type", ["type"], registry=r)
        self.deliveries = Counter(
            "batch_poller_deliveries", "Delivery attempts by sink and result", ["sink", "result"], registry=r
        )
        self.outbox_pending = Gauge("batch_poller_outbox_pending", "Undelivered outbox rows", ["sink"], registry=r)
        self.outbox_dead = Gauge("batch_poller_outbox_dead", "Dead-lettered outbox rows", ["sink"], registry=r)
        self.outbox_oldest = Gauge(
            "batch_poller_outbox_oldest_pending_seconds", "Age of the oldest undelivered row", ["sink"], registry=r
        )
        self.sink_up = Gauge(
            "batch_poller_sink_up", "1 while the sink delivers, 0 while it fails", ["sink"], registry=r
        )
        self.tracked = Gauge("batch_poller_tracked_batches", "Tracked batches by status", ["status"], registry=r)
        self.poll_lag = Gauge("batch_poller_poll_lag_seconds", "How late the most overdue batch is polled", registry=r)
        self.rate_limit_waits = Counter(
            "batch_poller_rate_limit_waits", "Times a request waited on the pacer or a Retry-After", registry=r
        )
        self.delivery_latency = Histogram(
            "batch_poller_delivery_latency_seconds",
            "From detection to acknowledgement",
            ["sink"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300, 3600),
            registry=r,
        )
