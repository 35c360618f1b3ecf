"""Which replica polled which source when, read from the replicas' own JSON logs (`polling source` and
`stopped polling source`, each line dated and naming its `replica`): for the chaos test and `make bench`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Span:
    source: str
    replica: str
    start: float
    end: float


def log_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads(line)


def at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def spans(log: Path, replica: str, end: float) -> list[Span]:
    """The intervals `replica` (whose log is `log`) polled each source; one still open ends at `end`
    (the time it was killed, or now)."""
    out: list[Span] = []
    since: dict[str, float] = {}
    for entry in log_lines(log):
        source = entry.get("source")
        if not isinstance(source, str):
            continue
        if entry.get("event") == "polling source":
            since[source] = at(entry)
        elif entry.get("event") == "stopped polling source" and source in since:
            out.append(Span(source, replica, since.pop(source), at(entry)))
    out += [Span(source, replica, start, end) for source, start in since.items()]
    return out


def polling_now(all_spans: list[Span], now: float) -> dict[str, set[str]]:
    """Per source, the replicas whose span is open at `now`."""
    out: dict[str, set[str]] = {}
    for span in all_spans:
        if span.start <= now < span.end:
            out.setdefault(span.source, set()).add(span.replica)
    return out


def taken_over(all_spans: list[Span], source: str, after: float, not_by: str) -> float | None:
    """When another replica than `not_by` started polling `source` at or after `after`."""
    starts = [s.start for s in all_spans if s.source == source and s.start >= after and s.replica != not_by]
    return min(starts) if starts else None
