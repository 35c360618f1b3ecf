"""How detection's knowledge is kept in a store row (JSON, the same for every store).

Counts are kept as [completed, failed, total], the 0.1 layout, so version-1 rows read unchanged; the
pace anchors of the ETA as [time, finished] pairs (absent in older rows: no estimate until counts move).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from poller.domain.snapshot import Counts
from poller.domain.transitions import Knowledge


def _counts_out(c: Counts | None) -> list[int] | None:
    return None if c is None else [c.completed, c.failed, c.total]


def _counts_in(value: Any) -> Counts | None:
    if value is None:
        return None
    completed, failed, total = (int(v) for v in value)
    return Counts(total=total, completed=completed, failed=failed)


def knowledge_to_json(k: Knowledge) -> str:
    return orjson.dumps(
        {
            "status": k.status,
            "seen": sorted(k.seen),
            "sequence": k.sequence,
            "counts": _counts_out(k.counts),
            "counts_changed_at": k.counts_changed_at,
            "progress_counts": _counts_out(k.progress_counts),
            "progress_at": k.progress_at,
            "stalled_at_counts": _counts_out(k.stalled_at_counts),
            "expiring_sent": k.expiring_sent,
            "anchors": [[at, finished] for at, finished in k.anchors],
        },
    ).decode()


def knowledge_from_json(text: str | None) -> Knowledge:
    raw = json.loads(text or "{}")
    return Knowledge(
        status=raw.get("status"),
        seen=frozenset(raw.get("seen", ())),
        sequence=int(raw.get("sequence", 0)),
        counts=_counts_in(raw.get("counts")),
        counts_changed_at=raw.get("counts_changed_at"),
        progress_counts=_counts_in(raw.get("progress_counts")),
        progress_at=raw.get("progress_at"),
        stalled_at_counts=_counts_in(raw.get("stalled_at_counts")),
        expiring_sent=bool(raw.get("expiring_sent", False)),
        anchors=tuple((float(at), int(finished)) for at, finished in raw.get("anchors", ())),
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
