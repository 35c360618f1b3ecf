"""A batch as one provider showed it at one moment, normalized onto the common lifecycle.

Adapters build snapshots; detection compares them. A snapshot that exists is valid: out-of-range
values (negative or absurd timestamps, negative counts, more finished requests than requests) and
bodies no event could carry (nested too deeply, text that is not Unicode) are refused at construction
with `InvalidSnapshotError`, so they never become events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from poller.domain.lifecycle import RANK, Status

#: Timestamps outside [2015-01-01, 2100-01-01) are not times any Batch API means.
EARLIEST: Final = 1_420_070_400
LATEST: Final = 4_102_444_800
#: Counts beyond this are not request counts (and would not fit a 64-bit column anyway).
MAX_COUNT: Final = 10**12
#: Batch objects are a few levels deep. An event nests the body further down, and the JSON encoders
#: give up near 255 levels, so a deeper body could be detected but never recorded.
MAX_DEPTH: Final = 64


class InvalidSnapshotError(ValueError):
    """A batch body whose values cannot be true; `field` names the offending field."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {problem}")


@dataclass(frozen=True, slots=True)
class Counts:
    """Requests of a batch in one normalized shape: total, completed (succeeded) and failed."""

    total: int
    completed: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}

    @property
    def finished(self) -> int:
        return self.completed + self.failed


def check_time(name: str, value: object, *, optional: bool = True) -> int | None:
    """An epoch-seconds field, or InvalidSnapshotError when it is not a plausible time."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSnapshotError(name, f"expected epoch seconds, got {type(value).__name__}")
    if not EARLIEST <= value < LATEST:
        raise InvalidSnapshotError(name, f"{value} is not a plausible time")
    return value


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSnapshotError(name, f"expected an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_COUNT:
        raise InvalidSnapshotError(name, f"{value} is not a request count")
    return value


def _plain_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def make_counts(total: object, completed: object, failed: object, prefix: str = "request_counts") -> Counts:
    """Checked counts: each a non-negative integer, completed + failed at most total."""
    if not (_plain_count(total) and _plain_count(completed) and _plain_count(failed)):  # else say which
        total = check_count(f"{prefix}.total", total)
        completed = check_count(f"{prefix}.completed", completed)
        failed = check_count(f"{prefix}.failed", failed)
    counts = Counts(total, completed, failed)  # type: ignore[arg-type]
    if counts.finished > counts.total:
        raise InvalidSnapshotError(prefix, "completed + failed exceeds total")
    return counts


def _check_text(text: str) -> None:
    """Text that is not ASCII must encode as UTF-8 (callers test `isascii()` first: the common case)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidSnapshotError("raw", "text that is not Unicode (a lone surrogate)") from None


#: Leaves of parsed JSON besides text: nothing in them to check.
_SCALARS: Final = (int, float, type(None))


def _children(value: object) -> Iterable[object] | None:
    """The values inside a list or a mapping (its keys checked), None for anything else."""
    if isinstance(value, list):
        return value
    # Parsed JSON holds plain dicts: test for one before the abstract Mapping, which costs far more.
    if isinstance(value, dict) or isinstance(value, Mapping):  # noqa: SIM101 - the cheap test first
        for key in value:
            if not isinstance(key, str):
                raise InvalidSnapshotError("raw", "a key is not text")
            if not key.isascii():
                _check_text(key)
        return value.values()
    return None


def check_raw(raw: Mapping[str, Any]) -> None:
    """A provider's body an event can carry: at most MAX_DEPTH levels deep, text keys, valid Unicode."""
    stack: list[tuple[object, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        children = _children(value)
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise InvalidSnapshotError("raw", f"nested deeper than {MAX_DEPTH} levels")
        for v in children:
            if isinstance(v, str):
                if not v.isascii():
                    _check_text(v)
            elif not isinstance(v, _SCALARS):
                stack.append((v, depth + 1))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One batch at one poll.

    `status` is the common status, None when the provider's own status (`provider_status`) maps onto
    none (detection then counts it and emits nothing). `entered` holds, for each status the provider
    stamps, when the batch entered it (epoch seconds). `raw` is the provider's object, unchanged.
    """

    id: str
    status: Status | None
    provider_status: str
    created_at: int
    raw: Mapping[str, Any] = field(repr=False)
    entered: Mapping[str, int] = field(default_factory=dict)
    counts: Counts | None = None
    expires_at: int | None = None
    metadata: Mapping[str, str] | None = None
    #: What kind of work the batch does, where the provider says (OpenAI's endpoint); discovery filters on it.
    endpoint: str | None = None

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise InvalidSnapshotError("id", "missing")
        check_time("created_at", self.created_at, optional=False)
        check_time("expires_at", self.expires_at)
        counts = self.counts
        if counts is not None and not (  # adapters may build Counts directly; most use make_counts
            _plain_count(counts.total)
            and _plain_count(counts.completed)
            and _plain_count(counts.failed)
            and counts.completed + counts.failed <= counts.total
        ):
            make_counts(counts.total, counts.completed, counts.failed)
        for status, when in self.entered.items():
            if status not in RANK:
                raise InvalidSnapshotError("entered", f"{status!r} is not a lifecycle status")
            if type(when) is not int or not EARLIEST <= when < LATEST:  # the field's name only to say so
                check_time(f"{status}_at", when, optional=False)
        check_raw(self.raw)

    def entered_at(self, status: str) -> int | None:
        return self.entered.get(status)

    @classmethod
    def prechecked(  # noqa: PLR0917 - the fields, in their order
        cls,
        id: str,  # noqa: A002 - the field's name
        status: Status | None,
        provider_status: str,
        created_at: int,
        raw: Mapping[str, Any],
        entered: Mapping[str, int],
        counts: Counts | None,
        expires_at: int | None,
        metadata: Mapping[str, str] | None,
        endpoint: str | None,
    ) -> Snapshot:
        """A snapshot of values `__post_init__` already accepted, without checking them again.

        Only for a body equal to one that made a snapshot before but for its counts, which come from
        `make_counts` (a list item whose counts alone moved: `HttpProvider.recount`). Checking the whole
        body again is most of what such a snapshot cost.
        """
        snap = object.__new__(cls)
        put = object.__setattr__  # the dataclass's own way past `frozen`
        put(snap, "id", id)
        put(snap, "status", status)
        put(snap, "provider_status", provider_status)
        put(snap, "created_at", created_at)
        put(snap, "raw", raw)
        put(snap, "entered", entered)
        put(snap, "counts", counts)
        put(snap, "expires_at", expires_at)
        put(snap, "metadata", metadata)
        put(snap, "endpoint", endpoint)
        return snap
