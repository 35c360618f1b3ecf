"""Building events: deterministic ids, the OpenAI-shaped envelope, and its CloudEvents rendering.

An event id depends only on (source, batch id, type[, discriminator]), so a redelivery or a re-detection
after a crash carries the same id and consumers can deduplicate.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from poller.models import Batch, Event, EventData

#: Types that exist only to drive sinks (not published to consumers that do not ask for them).
INTERNAL_TYPES = frozenset({"batch.pruned"})


def event_id(source: str, batch_id: str, event_type: str, discriminator: str = "") -> str:
    """A stable id: same inputs, same id, across processes and restarts."""
    digest = hashlib.sha256(f"{source}\x1f{batch_id}\x1f{event_type}\x1f{discriminator}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def make_event(
    *,
    source: str,
    batch: Batch,
    event_type: str,
    status: str,
    previous_status: str | None,
    sequence: int,
    created_at: int,
    detected_at: float,
    discriminator: str = "",
) -> Event:
    return Event(
        id=event_id(source, batch.id, event_type, discriminator),
        type=event_type,
        created_at=created_at,
        data=EventData(
            id=batch.id,
            status=status,
            previous_status=previous_status,
            sequence=sequence,
            detected_at=round(detected_at, 3),
            source=source,
            batch=batch.wire(),
        ),
    )


def encode(event: Event) -> bytes:
    """The canonical JSON bytes of an event: what the store keeps and the `openai` format sends."""
    return event.model_dump_json().encode()


def decode(payload: bytes | str) -> Event:
    return Event.model_validate_json(payload)


CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"


def cloudevent(event: Event, source_uri: str | None = None) -> dict[str, Any]:
    """The CloudEvents 1.0 structured-mode envelope of an event."""
    return {
        "specversion": "1.0",
        "id": event.id,
        "source": source_uri or f"batch-poller/{event.data.source}",
        "type": event.type,
        "subject": event.data.id,
        "time": datetime.fromtimestamp(event.created_at, UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": event.data.model_dump(mode="json"),
    }


def encode_cloudevent(event: Event, source_uri: str | None = None) -> bytes:
    return json.dumps(cloudevent(event, source_uri), separators=(",", ":")).encode()
