"""The Batch object as the API sends it, and the event batch-poller publishes.

`Batch` mirrors the OpenAI SDK's `Batch` type field for field. Fields the SDK does not know yet are
kept (``extra="allow"``) and passed through into events untouched.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]

#: Every status in lifecycle order; the position is the rank transition detection compares.
LIFECYCLE: Final[tuple[str, ...]] = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed", "expired", "cancelled"})
KNOWN_STATUSES: Final[frozenset[str]] = frozenset(LIFECYCLE) | FINAL_STATUSES
#: The most batches one `GET /batches` page returns (the API's `limit` maximum).
LIST_PAGE_SIZE: Final = 100


class _Open(BaseModel):
    """A model that keeps fields it does not know, so nothing the API adds is lost."""

    model_config = ConfigDict(extra="allow")


class BatchError(_Open):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class Errors(_Open):
    data: list[BatchError] | None = None
    object: str | None = None


class BatchRequestCounts(_Open):
    completed: int
    failed: int
    total: int


class InputTokensDetails(_Open):
    cached_tokens: int | None = None


class OutputTokensDetails(_Open):
    reasoning_tokens: int | None = None


class BatchUsage(_Open):
    """Token usage; newer API versions report it on finished batches."""

    input_tokens: int | None = None
    input_tokens_details: InputTokensDetails | None = None
    output_tokens: int | None = None
    output_tokens_details: OutputTokensDetails | None = None
    total_tokens: int | None = None


class Batch(_Open):
    id: str = Field(min_length=1)
    completion_window: str
    created_at: int
    endpoint: str
    input_file_id: str
    object: Literal["batch"]
    # A status the SDK does not list yet must still parse: detection logs and counts it instead.
    status: BatchStatus | str
    cancelled_at: int | None = None
    cancelling_at: int | None = None
    completed_at: int | None = None
    error_file_id: str | None = None
    errors: Errors | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    failed_at: int | None = None
    finalizing_at: int | None = None
    in_progress_at: int | None = None
    metadata: dict[str, str] | None = None
    output_file_id: str | None = None
    request_counts: BatchRequestCounts | None = None
    model: str | None = None
    usage: BatchUsage | None = None

    def wire(self) -> dict[str, Any]:
        """The object as the API sent it: unknown fields kept, absent fields left absent."""
        return self.model_dump(mode="json", exclude_unset=True)

    def status_time(self, status: str) -> int | None:
        """When the batch entered `status`, by its own timestamps (`created_at` for validating)."""
        if status == "validating":
            return self.created_at
        value = getattr(self, f"{status}_at", None)
        return value if isinstance(value, int) else None


class BatchList(_Open):
    """One page of `GET /batches`."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class EventData(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    previous_status: str | None
    sequence: int
    detected_at: float
    source: str
    batch: dict[str, Any]


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
