"""How the CLI prints batches and status: columns sized to their content, bars for progress."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

from poller.store.base import ACTIVE, Delivery, TrackedBatch


def bar(done: int, total: int, width: int = 12) -> str:
    if total <= 0:
        return " " * (width + 2) + "    -"
    filled = min(round(width * done / total), width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {min(100 * done // total, 100):>3}%"


def printable(value: object, limit: int = 120) -> str:
    """An outside value (a batch id, a status, an error) as plain text for a terminal: control and format
    characters (escape sequences, newlines, bidi overrides) become `?`, and overlong text is cut."""
    text = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def eta_text(eta: float | None, now: float) -> str:
    """An estimated completion as local time and how far off it is (`14:05 (in 12m)`), `-` when unknown."""
    if eta is None:
        return "-"
    clock = time.strftime("%H:%M" if eta - now < 86400 else "%m-%d %H:%M", time.localtime(eta))
    return f"{clock} (in {ago(eta - now)})" if eta > now else f"{clock} (due)"


def iso(at: float | None) -> str:
    """Unix seconds as UTC RFC 3339 (`2026-12-03T14:05:00Z`), `-` for none: what plain columns print."""
    return "-" if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def done_text(counts: dict[str, int] | None) -> str:
    """Finished of total requests (`412/1000`), `-` where the provider reports no counts."""
    if counts is None or counts.get("total", 0) <= 0:
        return "-"
    return f"{counts.get('completed', 0) + counts.get('failed', 0)}/{counts['total']}"


def ago(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def list_record(b: TrackedBatch, now: float) -> dict[str, Any]:
    counts = b.knowledge.counts
    return {
        "id": b.id,
        "source": b.source,
        "state": b.state,
        "status": b.knowledge.status,
        "request_counts": None if counts is None else counts.as_dict(),
        "progress": None if counts is None or counts.total <= 0 else round(min(counts.finished / counts.total, 1), 4),
        "eta": b.knowledge.eta(now) if b.state == ACTIVE else None,
        "created_at": b.created_at,
        "next_due": b.next_due if b.state == ACTIVE else None,
        "origin": b.origin,
    }


def print_list(batches: list[TrackedBatch], now: float, out: TextIO, *, as_json: bool, tty: bool = False) -> None:
    """Tracked batches: one JSON object per line, or columns (with progress bars when `out` is a terminal;
    plain `finished/total` and UTC times when piped)."""
    if as_json:
        for b in batches:
            print(json.dumps(list_record(b, now), separators=(",", ":")), file=out)
        return
    if not batches:
        print("(no batches tracked)", file=out)
        return
    rows = []
    for b in batches:
        record = list_record(b, now)
        counts = record["request_counts"]
        status = "gone (404)" if b.state == "gone" else (b.knowledge.status or "(pending)")
        age = ago(now - b.created_at) if b.created_at else "-"
        due = "-" if b.state != ACTIVE else ("now" if b.next_due <= now else "in " + ago(b.next_due - now))
        if tty:
            done = (counts["completed"] + counts["failed"], counts["total"]) if counts else (0, 0)
            progress, eta = f"{bar(*done)} {done_text(counts):>9}", eta_text(record["eta"], now)
        else:
            progress, eta = done_text(counts), iso(record["eta"])
        cells = (b.id, b.source, status, progress, eta, age, due, b.origin)
        rows.append(tuple(printable(c, limit=200) for c in cells))
    header = ("ID", "SOURCE", "STATUS", "PROGRESS", "ETA", "AGE", "NEXT POLL", "TRACKED")
    print_table(header, rows, out, right={5, 6})


def print_table(
    header: tuple[str, ...], rows: Sequence[tuple[str, ...]], out: TextIO, *, right: set[int] | None = None
) -> None:
    """Columns as wide as their widest cell (ids of any length line up), `right` ones right-aligned."""
    right = right or set()
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        print("  ".join(cells).rstrip(), file=out)


def print_deliveries(deliveries: list[Delivery], out: TextIO) -> None:
    if not deliveries:
        print("no pending or dead deliveries", file=out)
        return
    rows = [
        (d.sink, d.state, d.batch_id, d.type, f"#{d.sequence}", str(d.attempts), d.last_error or "") for d in deliveries
    ]
    print_table(("SINK", "STATE", "BATCH", "EVENT", "SEQ", "TRIES", "LAST ERROR"), rows, out, right={4, 5})


def print_status(report: dict[str, Any], out: TextIO) -> None:
    line = f" ({report['status_line']})" if report.get("status_line") else ""
    print(f"daemon:  {report['daemon']}{line}", file=out)
    if "ready" in report:
        reasons = "; ".join(report.get("reasons") or [])
        print(f"ready:   {'yes' if report['ready'] else 'NO: ' + reasons}", file=out)
    tracked = report.get("tracked") or {}
    print("tracked: " + (", ".join(f"{n} {s}" for s, n in sorted(tracked.items())) or "none"), file=out)
    for name, source in (report.get("sources") or {}).items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted((source.get("tracked") or {}).items())) or "none"
        print(f"source {name} ({source.get('provider', '?')}): {source.get('health', '?')}; {counts}", file=out)
    for name, sink in (report.get("sinks") or {}).items():
        health = sink.get("health", "?")
        print(f"sink {name}: {health}, {sink.get('pending', 0)} pending, {sink.get('dead', 0)} dead", file=out)
