"""What the MQTT sink publishes besides the event itself: the retained state document, topic levels,
and readable reasons for broker failures."""

from __future__ import annotations

import json

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from poller.domain.events import Event
from poller.errors import DeliveryError


def state_payload(event: Event) -> bytes:
    """The retained state document of a batch after `event` (the same for both formats)."""
    data = event.data
    state = {
        "batch_id": data.id,
        "source": data.source,
        "status": data.status,
        "previous_status": data.previous_status,
        "provider": data.provider,
        "provider_status": data.provider_status,
        "request_counts": data.request_counts,
        "eta": data.eta,
        "updated_at": event.created_at,
        "detected_at": data.detected_at,
        "sequence": data.sequence,
        "event_id": event.id,
        "type": event.type,
        "batch": data.batch,
    }
    return json.dumps(state, separators=(",", ":")).encode()


def level(sink: str, what: str, value: str) -> str:
    """`value` as one topic level, unchanged; escaping would make two names share a topic, so reject."""
    if not value.isprintable() or not value or "/" in value or "+" in value or "#" in value:
        raise DeliveryError(
            sink,
            f"{what} {value!r} cannot be an MQTT topic level: it must be non-empty, without '/', '+', '#' "
            "or control characters",
            retryable=False,
        )
    return value


def describe(exc: BaseException) -> tuple[str, int | None]:
    """A readable reason and the MQTT/paho code, looking through aiomqtt's wrapping."""
    parts: list[str] = []
    code: int | None = None
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        if isinstance(seen, aiomqtt.MqttCodeError) and code is None:
            rc = seen.rc
            code = rc.value if isinstance(rc, ReasonCode) else rc
        text = str(seen) or type(seen).__name__
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__
    return ": ".join(parts), code
