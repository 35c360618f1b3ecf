"""How a batch row is kept in a store (the same for every store): detection's knowledge as JSON, the
provider's body as canonical JSON text and its fingerprint, and the columns the poll loop reads back.

Knowledge is written as one JSON array, its fields in order after a layout tag (`KNOWLEDGE_LAYOUT`):
an array decodes in half the time of an object with its keys, for every row of a large tracked set.
Rows written before (an object with keys) still read. Counts are kept as [completed, failed, total],
the 0.1 layout; the pace anchors of the ETA as [time, finished] pairs (absent in older rows: no
estimate until counts move).
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from poller.domain.eta import anchor_pairs, pack_anchors
from poller.domain.snapshot import Counts
from poller.domain.transitions import Knowledge
from poller.store.base import TrackedBatch

#: The columns of a batch row that `Decoder.batch` reads: `TrackedBatch`'s first fields, in their order
#: (the body, when wanted, follows).
BATCH_COLUMNS = (
    "source, id, origin, added_at, state, knowledge, created_at, next_due, interval, error_streak,"
    " not_found, updated_at, finished_at, fingerprint"
)


def batch_columns(*, with_raw: bool) -> str:
    """`BATCH_COLUMNS`, and the body after them when `with_raw`: what a store selects for `Decoder.batch`."""
    return BATCH_COLUMNS + ", snapshot" if with_raw else BATCH_COLUMNS


def _counts_out(c: Counts | None) -> list[int] | None:
    return None if c is None else [c.completed, c.failed, c.total]


#: The first element of a knowledge array: which fields follow, in which order.
KNOWLEDGE_LAYOUT = 2


def knowledge_to_json(k: Knowledge) -> str:
    return orjson.dumps(
        [
            KNOWLEDGE_LAYOUT,
            k.status,
            sorted(k.seen),
            k.sequence,
            _counts_out(k.counts),
            k.counts_changed_at,
            _counts_out(k.progress_counts),
            k.progress_at,
            _counts_out(k.stalled_at_counts),
            k.expiring_sent,
            [[at, finished] for at, finished in anchor_pairs(k.anchors)],
        ],
    ).decode()


def knowledge_from_json(text: str | None) -> Knowledge:
    return Decoder().knowledge(text)


_decode = json.JSONDecoder().raw_decode


@contextmanager
def no_collection() -> Iterator[None]:
    """Pause the cycle collector while a large read builds its rows: they hold no cycles, and with
    100,000 rows the collector's full passes over the growing heap were a sixth of the read."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class Decoder:
    """Decodes the rows of one read: equal counts, status sets and names become one shared object each
    (all of them immutable), so a large tracked set decodes faster and holds far fewer objects."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, ...], Counts] = {}
        self._seen: dict[tuple[str, ...], frozenset[str]] = {}
        self._added_at: float | None = None

    def counts(self, value: Any) -> Counts | None:
        if value is None:
            return None
        key = tuple(value)
        found = self._counts.get(key)
        if found is None:
            completed, failed, total = (int(v) for v in key)
            found = self._counts[key] = Counts(total=total, completed=completed, failed=failed)
        return found

    def seen(self, value: Sequence[str]) -> frozenset[str]:
        key = tuple(value)
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = frozenset(sys.intern(str(s)) for s in key)
        return found

    def knowledge(self, text: str | None) -> Knowledge:
        if not text:
            return Knowledge()
        try:
            raw = _decode(text)[0]  # what `knowledge_to_json` writes: no whitespace around it
        except ValueError:
            raw = json.loads(text)
        if isinstance(raw, dict):
            return self._keyed(raw)
        layout, status, seen, sequence, counts, changed_at, progress, progress_at, stalled, expiring, anchors = raw
        if layout != KNOWLEDGE_LAYOUT:
            msg = f"unknown knowledge layout {layout!r}"
            raise ValueError(msg)
        as_counts = self.counts
        return Knowledge(  # positional: the fields in their order (a third faster than keywords)
            None if status is None else sys.intern(status),
            self.seen(seen),
            sequence,
            as_counts(counts),
            changed_at,
            as_counts(progress),
            progress_at,
            as_counts(stalled),
            expiring,
            pack_anchors([(float(at), int(finished)) for at, finished in anchors]) if anchors else b"",
        )

    def _keyed(self, raw: dict[str, Any]) -> Knowledge:
        """A row written before knowledge became an array (and every version-1 row)."""
        get, counts = raw.get, self.counts
        status = get("status")
        anchors = get("anchors")
        return Knowledge(
            status=None if status is None else sys.intern(status),
            seen=self.seen(get("seen", ())),
            sequence=int(get("sequence", 0)),
            counts=counts(get("counts")),
            counts_changed_at=get("counts_changed_at"),
            progress_counts=counts(get("progress_counts")),
            progress_at=get("progress_at"),
            stalled_at_counts=counts(get("stalled_at_counts")),
            expiring_sent=bool(get("expiring_sent", False)),
            anchors=pack_anchors([(float(at), int(finished)) for at, finished in anchors]) if anchors else b"",
        )

    def batch(self, row: Sequence[Any], *, with_raw: bool = False) -> TrackedBatch:
        """A `TrackedBatch` from a row of `BATCH_COLUMNS` (followed by the body when `with_raw`)."""
        intern = sys.intern
        body = row[14] if with_raw else None
        added_at = row[3]
        if added_at == self._added_at:  # tracked together (one `track`, one discovered page): one float for all
            added_at = self._added_at
        else:
            self._added_at = added_at
        # Positional (a third of the cost of keywords, for every row of a large set): the columns are
        # the fields in order, which tests/test_store.py checks.
        return TrackedBatch(
            intern(row[0]),
            row[1],
            intern(row[2]),
            added_at,
            intern(row[4]),
            self.knowledge(row[5]),
            row[6],
            row[7],
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13],
            json.loads(body) if body else None,
        )


def dump_body(raw: Any) -> str:
    """The canonical JSON text of a provider's body: what the store keeps and fingerprints hash.

    orjson writes it (compact, UTF-8, keys in the body's order, as the standard library would with
    these separators, over ten times faster: every list item is dumped to be compared). A body orjson
    refuses (a lone surrogate in its text, an integer past 64 bits) is written by the standard library.
    """
    try:
        return orjson.dumps(raw).decode()
    except TypeError:
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)


def fingerprint(body: str) -> int:
    """A body text's fingerprint: 64 bits of its BLAKE2b hash, as a signed integer (a BIGINT column).

    Stable across processes (unlike `hash`, salted per process), so the store keeps it next to the
    body and a restart still tells an unchanged body without reading the body back. Text with a lone
    surrogate (a bad item, refused later by validation) still hashes: it must not fail the whole page.
    """
    digest = hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
