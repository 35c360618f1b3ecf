"""The event batch-poller publishes: deterministic ids, the OpenAI-shaped envelope and its CloudEvents form.

An event id depends only on (source, batch id, type[, discriminator]), so a redelivery or a re-detection
after a crash carries the same id and consumers can deduplicate.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from poller.domain.snapshot import Snapshot
from poller.domain.transitions import Change

#: Types that exist only to drive sinks (not published to consumers that do not ask for them).
INTERNAL_TYPES = frozenset({"batch.pruned"})
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"


class EventData(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    previous_status: str | None
    sequence: int
    detected_at: float
    source: str
    #: The provider (`openai`, `azure`, `anthropic`, ...) and the batch's status in its own words.
    provider: str = "openai"
    provider_status: str | None = None
    #: Requests in one shape for every provider; None where the provider reports none.
    request_counts: dict[str, int] | None = None
    #: The provider's batch object, unchanged.
    batch: dict[str, Any]
    #: When the batch should finish its requests (Unix seconds), while in progress; left out when unknown.
    eta: int | None = Field(default=None, exclude_if=lambda v: v is None)


class Event(BaseModel):
    """The contract every sink serialises. Outer shape follows OpenAI's batch webhooks."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["event"] = "event"
    type: str
    created_at: int
    data: EventData

    @property
    def batch_id(self) -> str:
        return self.data.id


def event_id(source: str, batch_id: str, event_type: str, discriminator: str = "") -> str:
    """A stable id: same inputs, same id, across processes and restarts."""
    digest = hashlib.sha256(f"{source}\x1f{batch_id}\x1f{event_type}\x1f{discriminator}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def build_event(
    source: str, provider: str, snap: Snapshot, change: Change, detected_at: float, *, eta: int | None = None
) -> Event:
    """The published event for one change of a batch, seen in `snap` (`eta`: its estimated completion)."""
    return Event(
        id=event_id(source, snap.id, change.type, change.discriminator),
        type=change.type,
        created_at=change.occurred_at,
        data=EventData(
            id=snap.id,
            status=change.status,
            previous_status=change.previous_status,
            sequence=change.sequence,
            detected_at=round(detected_at, 3),
            source=source,
            provider=provider,
            provider_status=snap.provider_status,
            request_counts=None if snap.counts is None else snap.counts.as_dict(),
            batch=dict(snap.raw),
            eta=eta,
        ),
    )


def encode(event: Event) -> bytes:
    """The canonical JSON bytes of an event: what the store keeps and the `openai` format sends."""
    return event.model_dump_json().encode()


def decode(payload: bytes | str) -> Event:
    return Event.model_validate_json(payload)


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
