"""poller.alerts: golden renderings with a fixed clock, and the tables of which events raise and clear alerts.

Regenerate the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_alerts.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from poller.domain.events import Event
from poller.providers.openai_types import Batch
from poller.sinks import alerts
from tests.helpers import make_event

GOLDEN = Path(__file__).parent / "golden"
NOW = 1714600000.0  # 2024-05-01T21:46:40Z: the fixed clock of every rendering
CREATED = 1714550000  # 2024-05-01T07:53:20Z
LINKS = "https://platform.openai.com/batches/{batch_id}"
ROUTING_KEY = "R0123456789abcdef0123456789abcdef"


def batch(status: str, **extra: Any) -> Batch:
    raw: dict[str, Any] = {
        "id": "batch_6630f1c2a8e4",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "input_file_id": "file-in-7Qh2",
        "created_at": CREATED,
        "in_progress_at": CREATED + 60,
        "expires_at": CREATED + 86400,
        "status": status,
        "metadata": {"team": "ml-infra", "job.name": "nightly-eval", "9lives": "yes", "<b>": "a & b"},
        "request_counts": {"completed": 420, "failed": 3, "total": 1000},
    }
    raw.update(extra)
    return Batch.model_validate(raw)


def event(event_type: str, status: str, previous: str | None, *, sequence: int, created: int, **extra: Any) -> Event:
    return make_event(
        source="openai",
        batch=batch(status, **extra),
        event_type=event_type,
        status=status,
        previous_status=previous,
        sequence=sequence,
        created_at=created,
        detected_at=created + 2.5,
    )


FAILED = event(
    "batch.failed",
    "failed",
    "validating",
    sequence=2,
    created=CREATED + 30,
    failed_at=CREATED + 30,
    in_progress_at=None,
    request_counts={"completed": 0, "failed": 0, "total": 0},
    errors={
        "object": "list",
        "data": [{"code": "invalid_json_line", "line": 3, "message": "This line is not parseable as valid JSON."}],
    },
)
STALLED = event("batch.stalled", "in_progress", "in_progress", sequence=4, created=CREATED + 7200)
EXPIRING = event("batch.expiring", "in_progress", "in_progress", sequence=5, created=CREATED + 83000)
PROGRESS = event(
    "batch.progress",
    "in_progress",
    "in_progress",
    sequence=6,
    created=CREATED + 83500,
    request_counts={"completed": 900, "failed": 3, "total": 1000},
)
COMPLETED = event(
    "batch.completed",
    "completed",
    "finalizing",
    sequence=8,
    created=CREATED + 84000,
    finalizing_at=CREATED + 83900,
    completed_at=CREATED + 84000,
    output_file_id="file-out-9Zk1",
    request_counts={"completed": 997, "failed": 3, "total": 1000},
)
IN_PROGRESS = event("batch.in_progress", "in_progress", "validating", sequence=2, created=CREATED + 60)


def check_golden(name: str, value: Any) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert json.loads(json.dumps(value)) == json.loads(path.read_text(encoding="utf-8"))


# -- golden renderings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ev", "links"),
    [("slack_failed.json", FAILED, LINKS), ("slack_completed.json", COMPLETED, None)],
)
def test_slack_golden(name: str, ev: Event, links: str | None) -> None:
    check_golden(name, alerts.slack(ev, links=links))


def test_pagerduty_golden() -> None:
    check_golden("pagerduty_trigger.json", alerts.pagerduty(EXPIRING, ROUTING_KEY, links=LINKS))
    check_golden("pagerduty_resolve.json", alerts.pagerduty(COMPLETED, ROUTING_KEY, links=LINKS))
    check_golden("pagerduty_failed.json", alerts.pagerduty(FAILED, ROUTING_KEY))


def test_alertmanager_golden() -> None:
    check_golden("alertmanager_start.json", alerts.alertmanager(STALLED, NOW, links=LINKS))
    check_golden("alertmanager_end.json", alerts.alertmanager(COMPLETED, NOW, links=LINKS))
    check_golden("alertmanager_failed.json", alerts.alertmanager(FAILED, NOW))


# -- pairing: a resolution names exactly what the trigger opened ------------------------------------


def test_pagerduty_trigger_and_resolve_share_the_dedup_key() -> None:
    trigger = alerts.pagerduty(STALLED, ROUTING_KEY)
    resolve = alerts.pagerduty(COMPLETED, ROUTING_KEY)
    assert trigger is not None
    assert resolve is not None
    assert trigger["event_action"] == "trigger"
    assert resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "batch_6630f1c2a8e4"
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": "batch_6630f1c2a8e4"}


@pytest.mark.parametrize(
    ("start", "end", "alertname"),
    [(STALLED, PROGRESS, "BatchStalled"), (STALLED, COMPLETED, "BatchStalled"), (EXPIRING, COMPLETED, "BatchExpiring")],
)
def test_alertmanager_end_repeats_the_start_labels(start: Event, end: Event, alertname: str) -> None:
    started = alerts.alertmanager(start, NOW)
    ended = alerts.alertmanager(end, NOW)
    assert started is not None
    assert ended is not None
    [firing] = [a for a in started if a["labels"]["alertname"] == alertname]
    [resolved] = [a for a in ended if a["labels"]["alertname"] == alertname]
    assert firing["labels"] == resolved["labels"]
    assert resolved["endsAt"] >= firing["startsAt"]
    assert "startsAt" not in resolved  # Alertmanager keeps the start of the alert it merges into


def test_alertmanager_firing_alerts_outlive_the_single_post() -> None:
    # Alertmanager resolves an alert without endsAt after resolve_timeout (5 min) unless it is re-sent,
    # and batch-poller sends each event once: every firing alert carries its own end.
    [failed, *ends] = alerts.alertmanager(FAILED, NOW) or []
    assert failed["endsAt"] == alerts.rfc3339(NOW + alerts.FINAL_ALERT_HOLD)
    assert [a["labels"]["alertname"] for a in ends] == ["BatchStalled", "BatchExpiring"]
    [stalled] = alerts.alertmanager(STALLED, NOW) or []
    assert stalled["endsAt"] == alerts.rfc3339(CREATED + 86400)  # the batch's expiry


# -- which events mean what -------------------------------------------------------------------------

PD_TABLE = [
    ("batch.validating", None, None),
    ("batch.in_progress", None, None),
    ("batch.finalizing", None, None),
    ("batch.progress", None, None),
    ("batch.cancelling", None, None),
    ("batch.failed", "trigger", "error"),
    ("batch.expired", "trigger", "error"),
    ("batch.stalled", "trigger", "warning"),
    ("batch.expiring", "trigger", "warning"),
    ("batch.completed", "resolve", None),
    ("batch.cancelled", "resolve", None),
    ("batch.pruned", None, None),
]


@pytest.mark.parametrize(("event_type", "action", "severity"), PD_TABLE)
def test_pagerduty_table(event_type: str, action: str | None, severity: str | None) -> None:
    status = event_type.removeprefix("batch.")
    ev = event(event_type, status, "in_progress", sequence=3, created=CREATED + 100)
    body = alerts.pagerduty(ev, ROUTING_KEY)
    if action is None:
        assert body is None
        return
    assert body is not None
    assert body["event_action"] == action
    assert body.get("payload", {}).get("severity") == severity


AM_TABLE = [
    ("batch.validating", [], []),
    ("batch.in_progress", [], []),
    ("batch.failed", ["BatchFailed"], ["BatchStalled", "BatchExpiring"]),
    ("batch.expired", ["BatchExpired"], ["BatchStalled", "BatchExpiring"]),
    ("batch.stalled", ["BatchStalled"], []),
    ("batch.expiring", ["BatchExpiring"], []),
    ("batch.progress", [], ["BatchStalled"]),
    ("batch.finalizing", [], ["BatchStalled", "BatchExpiring"]),
    ("batch.cancelling", [], ["BatchStalled", "BatchExpiring"]),
    ("batch.completed", [], ["BatchStalled", "BatchExpiring"]),
    ("batch.cancelled", [], ["BatchStalled", "BatchExpiring"]),
    ("batch.pruned", [], []),
]


@pytest.mark.parametrize(("event_type", "fires", "ends"), AM_TABLE)
def test_alertmanager_table(event_type: str, fires: list[str], ends: list[str]) -> None:
    status = event_type.removeprefix("batch.")
    ev = event(event_type, status, "in_progress", sequence=3, created=CREATED + 100)
    body = alerts.alertmanager(ev, NOW)
    if not fires and not ends:
        assert body is None
        return
    assert body is not None
    assert [a["labels"]["alertname"] for a in body if "startsAt" in a] == fires
    assert [a["labels"]["alertname"] for a in body if "startsAt" not in a] == ends
    for alert in body:
        assert alert["endsAt"] >= alert.get("startsAt", "")


def test_internal_events_render_to_nothing() -> None:
    pruned = event("batch.pruned", "completed", "completed", sequence=9, created=CREATED + 90000)
    assert alerts.slack(pruned) is None
    assert alerts.pagerduty(pruned, ROUTING_KEY) is None
    assert alerts.alertmanager(pruned, NOW) is None


# -- details ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("team", "team"),
        ("job.name", "job_name"),
        ("kebab-case", "kebab_case"),
        ("9lives", "_9lives"),
        ("__reserved", "reserved"),
        ("ünïcode", "n_code"),
        ("...", None),
        ("", None),
    ],
)
def test_label_name(key: str, label: str | None) -> None:
    assert alerts.label_name(key) == label


def test_metadata_never_overrides_the_identifying_labels() -> None:
    ev = event(
        "batch.stalled",
        "in_progress",
        "in_progress",
        sequence=4,
        created=CREATED + 7200,
        metadata={"alertname": "Spoof", "batch_id": "other", "a-b": "first", "a.b": "second", "empty": ""},
    )
    labels = alerts.alert_labels("BatchStalled", ev)
    assert labels == {
        "alertname": "BatchStalled",
        "severity": "warning",
        "batch_id": "batch_6630f1c2a8e4",
        "source": "openai",
        "endpoint": "/v1/chat/completions",
        "a_b": "first",
    }


def test_link_quotes_the_substituted_values() -> None:
    ev = event("batch.failed", "failed", "validating", sequence=2, created=CREATED, id="batch/../x?y")
    assert (
        alerts.link("https://example.com/{source}/b/{batch_id}", ev)
        == "https://example.com/openai/b/batch%2F..%2Fx%3Fy"
    )
    assert alerts.link(None, ev) is None


def test_slack_escapes_metadata_and_links_the_batch() -> None:
    message = alerts.slack(FAILED, links=LINKS)
    assert message is not None
    text = json.dumps(message)
    assert "a &amp; b" in text
    assert "&lt;b&gt;" in text
    assert "<b>" not in text
    assert "<https://platform.openai.com/batches/batch_6630f1c2a8e4|batch_6630f1c2a8e4>" in text
    assert len(message["blocks"][0]["text"]["text"]) <= 150


def test_render_dispatches_and_rejects_unknown_formats() -> None:
    assert alerts.render("pagerduty", COMPLETED, now=NOW, routing_key=ROUTING_KEY) == alerts.pagerduty(
        COMPLETED, ROUTING_KEY
    )
    assert alerts.render("alertmanager", IN_PROGRESS, now=NOW) is None
    with pytest.raises(ValueError, match="routing key"):
        alerts.render("pagerduty", COMPLETED, now=NOW)
    with pytest.raises(ValueError, match="not an alert format"):
        alerts.render("openai", COMPLETED, now=NOW)
