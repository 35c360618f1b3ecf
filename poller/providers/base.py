"""The seam between batch-poller and a provider's Batch API: what an adapter offers and promises.

An adapter turns its provider's objects into `Snapshot`s (`normalize`) and reaches its API with its
own auth, paging and rate-limit headers. Everything above this seam speaks only the common lifecycle.
Errors are `poller.errors.ApiError` (transport, HTTP status, rate limits) and `BadResponseError`
(a 2xx body that is not a batch we can trust).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, Self

from poller.domain.snapshot import Counts, Snapshot

Paging = Literal["cursor", "offset", "token", "single"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider's API can do, as the runner plans around it.

    `paging` is how list pages follow each other: an id cursor (`after`), a page number, an opaque page
    token, or one unpaged list. `newest_first` says pages run from the newest batch back.
    """

    can_list: bool = True
    can_cancel: bool = True
    paging: Paging = "cursor"
    page_size: int = 100
    newest_first: bool = True


@dataclass(frozen=True, slots=True)
class Page:
    """One list page: the batches that normalized, how many items did not, and the next page's cursor."""

    snapshots: list[Snapshot]
    next: str | None
    #: Items that are not batches we can trust: (their id if they had one, the problem).
    rejected: tuple[tuple[str | None, str], ...] = ()
    #: Items the poll loop already holds byte for byte (`Provider.unchanged`), not normalized again:
    #: (id, created_at).
    unchanged: tuple[tuple[str, int], ...] = ()

    @property
    def oldest_created_at(self) -> int | None:
        dates = [s.created_at for s in self.snapshots] + [c for _, c in self.unchanged]
        return min(dates, default=None)

    @property
    def newest_created_at(self) -> int | None:
        dates = [s.created_at for s in self.snapshots] + [c for _, c in self.unchanged]
        return max(dates, default=None)


Unchanged = Callable[[str, Mapping[str, Any]], int | None]
"""Given a list item's id and its body: the created_at of a batch the poll loop holds with exactly this
body and nothing time-based due (the item needs no validation and no detection), else None."""

Rebase = Callable[[Mapping[str, Any], Counts], Mapping[str, Any] | None]
"""A list item's body with its request counts set to `counts` (in the item's own shape and key order),
or None when its counts are not in the plain shape that allows it (the provider's `rebase`)."""

Recounted = Callable[[str, Mapping[str, Any], Rebase], bool]
"""Given a list item's id, its body and the provider's `Rebase`: whether the body is the one the poll
loop holds (seen and checked by this process) but for its request counts, so that only the counts need
checking (the provider's `recount`)."""


class Provider(Protocol):
    """One provider's Batch API, reached with one key. An async context manager owning its session."""

    #: The provider's name as `[[sources]] provider` spells it.
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: Requests sent, by kind (retrieve, list, cancel): what bulk refresh economises.
    requests: Counter[str]
    #: When a request last went out or came back (monotonic); liveness reads it.
    last_progress: float
    #: Set by the poll loop: list items it already holds unchanged are not normalized again.
    unchanged: Unchanged | None
    #: Set by the poll loop: list items whose request counts alone moved have only their counts checked.
    recounted: Recounted | None

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def retrieve(self, batch_id: str) -> Snapshot:
        """The batch now; ApiError (404 for an unknown id), BadResponseError for an untrustworthy body."""
        ...

    async def list_page(self, cursor: str | None) -> Page:
        """One page of the provider's batch list, from the first (`cursor` None) or the one `cursor` names."""
        ...

    async def cancel(self, batch_id: str) -> Snapshot:
        """Ask the provider to cancel; the batch as the answer shows it."""
        ...

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        """The snapshot of one of this provider's batch objects; BadResponseError if it is not one."""
        ...

    @property
    def paused_until(self) -> float:
        """Until when (monotonic) a rate-limit pause holds every request back."""
        ...
