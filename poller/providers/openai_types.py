"""The OpenAI Batch object as the API sends it (also Azure OpenAI's and the compatible servers').

`Batch` mirrors the OpenAI SDK's `Batch` type field for field (`shared/reference/openai-batches.d.mts`).
Fields the SDK does not know yet are kept (``extra="allow"``); events carry the body as received anyway.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


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


class BatchList(_Open):
    """One page of `GET /batches`."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
