"""Rendering events for alerting services: Slack incoming webhooks, PagerDuty Events API v2, Alertmanager.

Pure: every function takes the event (and `now`, where an alert's lifetime depends on it) and returns a
JSON-ready value, or None when the event means nothing to that service. Nothing here sends or logs.

Which events raise and clear which alerts (see docs/webhooks.md for the reasons):

=================  ===================================  ===========================================
event              PagerDuty (dedup_key = batch id)     Alertmanager
=================  ===================================  ===========================================
batch.failed       trigger, severity error              BatchFailed fires for 24 h; Stalled/Expiring end
batch.expired      trigger, severity error              BatchExpired fires for 24 h; Stalled/Expiring end
batch.stalled      trigger, severity warning            BatchStalled fires until the batch's expiry
batch.expiring     trigger, severity warning            BatchExpiring fires until the batch's expiry
batch.progress     -                                    BatchStalled ends
batch.finalizing   -                                    BatchStalled and BatchExpiring end
batch.cancelling   -                                    BatchStalled and BatchExpiring end
batch.completed    resolve                              BatchStalled and BatchExpiring end
batch.cancelled    resolve                              BatchStalled and BatchExpiring end
=================  ===================================  ===========================================
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from poller.domain.events import INTERNAL_TYPES, Event

ALERT_FORMATS: Final = frozenset({"slack", "pagerduty", "alertmanager"})

#: How long a BatchFailed/BatchExpired alert stays active: the condition is final and never clears by itself.
FINAL_ALERT_HOLD: Final = 24 * 3600.0

_PD_SEVERITY: Final = {
    "batch.failed": "error",
    "batch.expired": "error",
    "batch.stalled": "warning",
    "batch.expiring": "warning",
}
_PD_RESOLVE: Final = frozenset({"batch.completed", "batch.cancelled"})

_AM_FIRE: Final = {
    "batch.failed": "BatchFailed",
    "batch.expired": "BatchExpired",
    "batch.stalled": "BatchStalled",
    "batch.expiring": "BatchExpiring",
}
_AM_SEVERITY: Final = {
    "BatchFailed": "error",
    "BatchExpired": "error",
    "BatchStalled": "warning",
    "BatchExpiring": "warning",
}
_AM_CONDITION: Final = {
    "BatchFailed": "failed",
    "BatchExpired": "expired",
    "BatchStalled": "stalled",
    "BatchExpiring": "about to expire",
}
_CLEARS_BOTH: Final = ("BatchStalled", "BatchExpiring")
_AM_END: Final[dict[str, tuple[str, ...]]] = {
    "batch.progress": ("BatchStalled",),
    "batch.finalizing": _CLEARS_BOTH,
    "batch.cancelling": _CLEARS_BOTH,
    "batch.completed": _CLEARS_BOTH,
    "batch.cancelled": _CLEARS_BOTH,
    "batch.failed": _CLEARS_BOTH,
    "batch.expired": _CLEARS_BOTH,
}
#: Labels batch-poller sets itself; a metadata key that sanitises to one of these is dropped.
_FIXED_LABELS: Final = frozenset({"alertname", "severity", "batch_id", "source", "endpoint"})

_TITLES: Final = {
    "batch.validating": ("Batch validating", ":hourglass_flowing_sand:"),
    "batch.in_progress": ("Batch in progress", ":arrow_forward:"),
    "batch.finalizing": ("Batch finalizing", ":package:"),
    "batch.completed": ("Batch completed", ":white_check_mark:"),
    "batch.failed": ("Batch failed", ":x:"),
    "batch.expired": ("Batch expired", ":hourglass:"),
    "batch.cancelling": ("Batch cancelling", ":no_entry_sign:"),
    "batch.cancelled": ("Batch cancelled", ":no_entry_sign:"),
    "batch.progress": ("Batch progress", ":bar_chart:"),
    "batch.stalled": ("Batch stalled", ":warning:"),
    "batch.expiring": ("Batch expiring soon", ":alarm_clock:"),
}

_LABEL_INVALID = re.compile(r"[^A-Za-z0-9_]")


# -- shared pieces ---------------------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    """A Unix time as RFC 3339 UTC with whole seconds, e.g. ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(int(ts), UTC).isoformat().replace("+00:00", "Z")


def link(template: str | None, event: Event) -> str | None:
    """The configured link for an event's batch: ``{batch_id}`` and ``{source}`` replaced, URL-quoted."""
    if not template:
        return None
    return template.replace("{batch_id}", quote(event.batch_id, safe="")).replace(
        "{source}", quote(event.data.source, safe="")
    )


def label_name(key: str) -> str | None:
    """A metadata key as an Alertmanager label name (``[a-zA-Z_][a-zA-Z0-9_]*``, no reserved ``__``)."""
    name = _LABEL_INVALID.sub("_", key).lstrip("_")
    if not name:
        return None
    return "_" + name if name[0].isdigit() else name


def _batch(event: Event) -> dict[str, Any]:
    return event.data.batch


def _metadata(event: Event) -> dict[str, str]:
    raw = _batch(event).get("metadata") or {}
    return {str(k): str(v) for k, v in sorted(raw.items())} if isinstance(raw, dict) else {}


def _counts(event: Event) -> tuple[int, int, int] | None:
    rc = _batch(event).get("request_counts")
    if not isinstance(rc, dict):
        return None
    try:
        return int(rc["completed"]), int(rc["failed"]), int(rc["total"])
    except (KeyError, TypeError, ValueError):
        return None


def _counts_text(event: Event) -> str:
    counts = _counts(event)
    if counts is None:
        return "no request counts yet"
    completed, failed, total = counts
    if total == 0:
        return "no requests processed"
    return f"{completed}/{total} requests completed, {failed} failed"


def _endpoint(event: Event) -> str:
    return str(_batch(event).get("endpoint") or "")


def _errors(event: Event, limit: int = 3) -> list[str]:
    """The batch's first error messages (failed batches carry them), as short lines."""
    errors = _batch(event).get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    lines: list[str] = []
    for item in data or []:
        if not isinstance(item, dict):
            continue
        code, message, line = item.get("code"), item.get("message"), item.get("line")
        text = ": ".join(str(part) for part in (code, message) if part)
        if line is not None:
            text += f" (line {line})"
        if text:
            lines.append(text[:300])
        if len(lines) >= limit:
            break
    return lines


def _expires_at(event: Event) -> int | None:
    value = _batch(event).get("expires_at")
    return value if isinstance(value, int) else None


def _transition(event: Event) -> str:
    previous, status = event.data.previous_status, event.data.status
    if previous is None:
        return status
    if previous == status:
        return f"{status} (unchanged)"
    return f"{previous} → {status}"


def summary(event: Event) -> str:
    """One line saying what happened to the batch; PagerDuty and Alertmanager use it as the alert title."""
    bid, source = event.batch_id, event.data.source
    where = f"on {source}" + (f" ({_endpoint(event)})" if _endpoint(event) else "")
    match event.type:
        case "batch.failed":
            errors = _errors(event, limit=1)
            reason = f": {errors[0]}" if errors else ""
            text = f"Batch {bid} failed {where}{reason}"
        case "batch.expired":
            text = f"Batch {bid} expired {where} with {_counts_text(event)}"
        case "batch.stalled":
            text = f"Batch {bid} stalled {where} at {_counts_text(event)}"
        case "batch.expiring":
            expires = _expires_at(event)
            when = f" at {rfc3339(expires)}" if expires is not None else " soon"
            text = f"Batch {bid} expires{when} {where} with {_counts_text(event)}"
        case _:
            text = f"Batch {bid} {_transition(event)} {where}: {_counts_text(event)}"
    return text[:1024]


# -- Slack -----------------------------------------------------------------------------------------


def _mrkdwn(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(event: Event, *, links: str | None = None) -> dict[str, Any] | None:
    """An incoming-webhook message (``text`` for notifications, ``blocks`` for the channel), or None."""
    if event.type in INTERNAL_TYPES:
        return None
    title, emoji = _TITLES.get(event.type, (f"Batch event {event.type}", ":information_source:"))
    url = link(links, event)
    bid = _mrkdwn(event.batch_id)
    batch_field = f"*Batch*\n<{url}|{bid}>" if url else f"*Batch*\n`{bid}`"
    fields = [
        batch_field,
        f"*Status*\n{_mrkdwn(_transition(event))}",
        f"*Requests*\n{_mrkdwn(_counts_text(event))}",
        f"*Endpoint*\n`{_mrkdwn(_endpoint(event) or '-')}`",
        f"*Source*\n{_mrkdwn(event.data.source)}",
    ]
    expires = _expires_at(event)
    if event.type == "batch.expiring" and expires is not None:
        fields.append(f"*Expires at*\n{rfc3339(expires)}")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{emoji} {title}: {event.batch_id}"[:150]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f[:2000]} for f in fields]},
    ]
    metadata = _metadata(event)
    if metadata:
        lines = "\n".join(f"• `{_mrkdwn(k)}`: {_mrkdwn(v)}" for k, v in metadata.items())
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Metadata*\n{lines}"[:3000]}})
    errors = _errors(event)
    if errors:
        lines = "\n".join(f"• {_mrkdwn(e)}" for e in errors)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Errors*\n{lines}"[:3000]}})
    context = f"`{event.type}` · event `{event.id}` · {rfc3339(event.created_at)}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    text = f"{title}: {event.batch_id} ({_transition(event)}, {_counts_text(event)})"
    return {"text": _mrkdwn(text), "blocks": blocks}


# -- PagerDuty -------------------------------------------------------------------------------------


def _details(event: Event) -> dict[str, Any]:
    batch = _batch(event)
    details: dict[str, Any] = {
        "batch_id": event.batch_id,
        "event_id": event.id,
        "event_type": event.type,
        "status": event.data.status,
        "previous_status": event.data.previous_status,
        "source": event.data.source,
        "endpoint": _endpoint(event) or None,
        "request_counts": batch.get("request_counts"),
        "metadata": _metadata(event) or None,
        "errors": _errors(event, limit=5) or None,
        "expires_at": rfc3339(e) if (e := _expires_at(event)) is not None else None,
        "model": batch.get("model"),
        "input_file_id": batch.get("input_file_id"),
        "output_file_id": batch.get("output_file_id"),
        "error_file_id": batch.get("error_file_id"),
    }
    return {k: v for k, v in details.items() if v is not None}


def pagerduty(event: Event, routing_key: str, *, links: str | None = None) -> dict[str, Any] | None:
    """An Events API v2 event: trigger on failed/expired/stalled/expiring, resolve on completed/cancelled.

    Every event of a batch uses the batch id as ``dedup_key``, so one batch is one PagerDuty alert.
    """
    if event.type in _PD_RESOLVE:
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": event.batch_id}
    severity = _PD_SEVERITY.get(event.type)
    if severity is None:
        return None
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": event.batch_id,
        "payload": {
            "summary": summary(event),
            "source": f"{event.data.source}/{event.batch_id}",
            "severity": severity,
            "timestamp": rfc3339(event.created_at),
            "component": _endpoint(event) or "batch",
            "group": event.data.source,
            "class": event.type,
            "custom_details": _details(event),
        },
        "client": "batch-poller",
    }
    url = link(links, event)
    if url:
        body["client_url"] = url
        body["links"] = [{"href": url, "text": f"Batch {event.batch_id}"}]
    return body


# -- Alertmanager ----------------------------------------------------------------------------------


def alert_labels(alertname: str, event: Event) -> dict[str, str]:
    """The identifying labels of one alert about a batch: the same for its start and its end."""
    fixed = {
        "alertname": alertname,
        "severity": _AM_SEVERITY[alertname],
        "batch_id": event.batch_id,
        "source": event.data.source,
        "endpoint": _endpoint(event),
    }
    labels = {k: v for k, v in fixed.items() if v}
    for key, value in _metadata(event).items():
        name = label_name(key)
        if name and value and name not in _FIXED_LABELS:
            labels.setdefault(name, value)  # keys are sorted: of two that sanitise alike, the first wins
    return labels


def _fire_ends(alertname: str, event: Event, now: float) -> float:
    """When a firing alert stops by itself, since batch-poller sends it once instead of re-sending it."""
    starts = float(event.created_at)
    if alertname in {"BatchFailed", "BatchExpired"}:
        return max(now, starts) + FINAL_ALERT_HOLD
    expires = _expires_at(event)
    # Stalling and nearing expiry cannot outlast the expiry itself, which raises its own event.
    ends = float(expires) if expires is not None else max(now, starts) + FINAL_ALERT_HOLD
    return max(ends, starts)


def alertmanager(event: Event, now: float, *, links: str | None = None) -> list[dict[str, Any]] | None:
    """The ``POST /api/v2/alerts`` body for an event: alerts it starts and alerts it ends, or None."""
    url = link(links, event)
    alerts: list[dict[str, Any]] = []
    fire = _AM_FIRE.get(event.type)
    if fire is not None:
        alert: dict[str, Any] = {
            "labels": alert_labels(fire, event),
            "annotations": {"summary": summary(event), "description": _description(event)},
            "startsAt": rfc3339(event.created_at),
            "endsAt": rfc3339(_fire_ends(fire, event, now)),
        }
        if url:
            alert["generatorURL"] = url
        alerts.append(alert)
    for name in _AM_END.get(event.type, ()):
        # No startsAt: Alertmanager keeps the start of the alert it merges this end into.
        ended: dict[str, Any] = {
            "labels": alert_labels(name, event),
            "annotations": {
                "summary": f"Batch {event.batch_id} is no longer {_AM_CONDITION[name]} ({event.data.status})",
                "description": _description(event),
            },
            "endsAt": rfc3339(event.data.detected_at),
        }
        if url:
            ended["generatorURL"] = url
        alerts.append(ended)
    return alerts or None


def _description(event: Event) -> str:
    parts = [
        f"Batch {event.batch_id} on {event.data.source}: {_transition(event)}.",
        f"Endpoint {_endpoint(event) or '-'}; {_counts_text(event)}.",
    ]
    expires = _expires_at(event)
    if expires is not None and event.data.status in {"validating", "in_progress"}:
        parts.append(f"Expires at {rfc3339(expires)}.")
    parts.extend(f"Error: {e}" for e in _errors(event))
    return " ".join(parts)


# -- dispatch --------------------------------------------------------------------------------------


def render(
    fmt: str, event: Event, *, now: float, links: str | None = None, routing_key: str | None = None
) -> Any | None:
    """The JSON value an alert format sends for an event, or None when there is nothing to send."""
    match fmt:
        case "slack":
            return slack(event, links=links)
        case "pagerduty":
            if routing_key is None:
                raise ValueError("the pagerduty format needs a routing key")
            return pagerduty(event, routing_key, links=links)
        case "alertmanager":
            return alertmanager(event, now, links=links)
        case _:
            raise ValueError(f"{fmt!r} is not an alert format; expected one of {sorted(ALERT_FORMATS)}")
