"""Prometheus metrics, in a registry per daemon so tests can run several daemons in one process.

`SourceMetrics` binds one source's label once, so the polling hot path never looks labels up per batch.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric batch-poller exports. Names are documented in docs/metrics.md."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.api_requests = Counter(
            "batch_poller_api_requests",
            "Batch API requests by source, kind and status class",
            ["source", "kind", "status"],
            registry=r,
        )
        self.polls = Counter(
            "batch_poller_polls", "Batch refreshes by source and result", ["source", "result"], registry=r
        )
        self.bad_responses = Counter(
            "batch_poller_bad_responses",
            "API answers that could not be trusted, by source and reason",
            ["source", "reason"],
            registry=r,
        )
        self.transitions = Counter(
            "batch_poller_events", "Events recorded, by source and type", ["source", "type"], registry=r
        )
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
        self.tracked = Gauge(
            "batch_poller_tracked_batches", "Tracked batches by source and status", ["source", "status"], registry=r
        )
        self.stalled = Gauge(
            "batch_poller_stalled_batches",
            "Batches in progress whose request counts have not moved for poll.stall_after, by source",
            ["source"],
            registry=r,
        )
        self.source_up = Gauge(
            "batch_poller_source_up",
            "1 while the source's API answers and accepts the credentials, 0 while it fails",
            ["source"],
            registry=r,
        )
        self.poll_lag = Gauge(
            "batch_poller_poll_lag_seconds",
            "How late the most overdue batch of a source is polled",
            ["source"],
            registry=r,
        )
        self.rate_limit_waits = Counter(
            "batch_poller_rate_limit_waits",
            "Times a request waited on the pacer or a Retry-After, by source",
            ["source"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "batch_poller_delivery_latency_seconds",
            "From detection to acknowledgement",
            ["sink"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300, 3600),
            registry=r,
        )
        # Replicas on a shared store (PostgreSQL); absent with SQLite, where one process polls everything.
        self.replica_info = Gauge(
            "batch_poller_replica_info", "1, labelled with this replica's name", ["replica"], registry=r
        )
        self.replicas = Gauge("batch_poller_replicas", "Live replicas this replica sees in the lease table", registry=r)
        self.source_polled = Gauge(
            "batch_poller_source_polled",
            "1 while this replica holds the source's lease and polls it, 0 while another replica does",
            ["source"],
            registry=r,
        )
        self.lease_failures = Counter(
            "batch_poller_lease_failures", "Lease rounds that could not reach the store", registry=r
        )

    def source(self, name: str) -> SourceMetrics:
        return SourceMetrics(self, name)


class SourceMetrics:
    """One source's view of the metrics, with its label bound."""

    def __init__(self, metrics: Metrics, source: str) -> None:
        self.source = source
        self.root = metrics
        self.rate_limit_waits = metrics.rate_limit_waits.labels(source)
        self.poll_lag = metrics.poll_lag.labels(source)
        self.up = metrics.source_up.labels(source)
        self._polls = {r: metrics.polls.labels(source, r) for r in ("ok", "ignored")}

    def api_request(self, kind: str, status: str) -> None:
        self.root.api_requests.labels(self.source, kind, status).inc()

    def bad_response(self, reason: str) -> None:
        self.root.bad_responses.labels(self.source, reason).inc()

    def poll(self, result: str, count: int = 1) -> None:
        counter = self._polls.get(result)
        if counter is None:
            counter = self._polls[result] = self.root.polls.labels(self.source, result)
        counter.inc(count)

    def event(self, event_type: str) -> None:
        self.root.transitions.labels(self.source, event_type).inc()
