"""poller.polling.health: an outage is logged once when it starts and once when it ends, and a source
that just started is not "unready" for want of a poll it has had no time to make."""

from __future__ import annotations

from structlog.testing import capture_logs

from poller.errors import ApiError
from poller.metrics import Metrics
from poller.polling.health import SourceHealth

T0 = 1_800_000_000.0


def health() -> SourceHealth:
    return SourceHealth("openai", Metrics().source("openai"), started_at=T0)


def test_an_outage_is_logged_when_it_starts_and_when_it_ends_single_failures_at_debug() -> None:
    h = health()
    with capture_logs() as logs:
        for i in range(5):
            h.failed(ApiError("connection refused"), T0 + i)  # transport errors: the API is unreachable
        h.ok(T0 + 10)
        h.failed(ApiError("bad request", status=400), T0 + 11)  # one failed request, not an outage
    levels = [(e["log_level"], e["event"]) for e in logs]
    assert levels.count(("warning", "Batch API unreachable; backing off until it answers")) == 1
    assert next(e for e in logs if e["event"] == "Batch API recovered")["outage_seconds"] == 10.0
    assert [lvl for lvl, _ in levels].count("info") == 1  # only the recovery
    assert all(lvl == "debug" for lvl, ev in levels if ev == "Batch API request failed")


def test_a_source_that_just_started_is_ready_and_one_that_never_succeeds_is_not() -> None:
    h = health()
    assert h.reasons(T0 + 6, 900, tracking=True) == []
    [reason] = h.reasons(T0 + 901, 900, tracking=True)
    assert reason == "openai: no successful poll in the last 900s"
    assert h.reasons(T0 + 901, 900, tracking=False) == []  # nothing to poll: nothing is late
    h.ok(T0 + 902)
    assert h.reasons(T0 + 903, 900, tracking=True) == []


def test_misconfiguration_is_logged_once_and_named_in_readiness() -> None:
    h = health()
    with capture_logs() as logs:
        for _ in range(3):
            h.set_misconfigured("the API answers HTML 404s")
        h.set_misconfigured(None)
    assert [e["event"] for e in logs] == ["the Batch API looks misconfigured", "the Batch API answers properly again"]
    h.set_misconfigured("the API answers HTML 404s")
    assert h.reasons(T0, 900, tracking=False) == ["openai: the API answers HTML 404s; check base_url"]
    assert not h.up
