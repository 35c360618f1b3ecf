"""How a batch row is encoded for every store (`poller.store.codec`): fingerprints that stay valid from
one process and one release to the next, and rows decoded into shared immutable parts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from poller.domain.eta import pack_anchors
from poller.domain.snapshot import Counts
from poller.domain.transitions import Knowledge
from poller.store import ACTIVE, TrackedBatch
from poller.store.codec import BATCH_COLUMNS, Decoder, fingerprint, knowledge_from_json, knowledge_to_json

BODY = '{"id":"batch_a","status":"validating"}'


def test_a_fingerprint_is_the_same_in_every_process_and_release() -> None:
    # Stored next to each body: a change of the function would make every stored batch look changed once.
    assert fingerprint(BODY) == 854574706368602154
    assert fingerprint("") == -1970711489451281740
    other = subprocess.run(
        [sys.executable, "-c", f"from poller.store.codec import fingerprint; print(fingerprint({BODY!r}))"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "random"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert int(other.stdout) == fingerprint(BODY)
    assert -(2**63) <= fingerprint(BODY + " ") < 2**63  # fits a BIGINT / SQLite INTEGER


def test_the_batch_columns_are_the_first_fields_of_a_tracked_batch_in_order() -> None:
    names = [c.strip() for c in BATCH_COLUMNS.split(",")]
    assert names == [f.name for f in fields(TrackedBatch)][: len(names)]


def test_rows_of_one_read_share_equal_parts() -> None:
    known = Knowledge(
        status="in_progress",
        seen=frozenset({"validating", "in_progress"}),
        sequence=2,
        counts=Counts(total=9, completed=1, failed=0),
        progress_counts=Counts(total=9, completed=1, failed=0),
        anchors=pack_anchors([(1.5, 1)]),
    )
    text = knowledge_to_json(known)
    decoder = Decoder()
    rows = [
        ("openai", f"b{i}", "cli", float("1.5"), "active", text, 7, 2.0, None, 0, 0, None, None, i) for i in range(2)
    ]
    a, b = (decoder.batch(r) for r in rows)
    assert rows[0][3] is not rows[1][3]
    assert a.added_at is b.added_at == 1.5  # rows come in `added_at` order: those tracked together share it
    assert a.knowledge == b.knowledge == known == knowledge_from_json(text)
    assert a.knowledge.counts is b.knowledge.counts is a.knowledge.progress_counts
    assert a.knowledge.seen is b.knowledge.seen
    assert (a.id, a.state, a.created_at, a.fingerprint, b.fingerprint, a.raw) == ("b0", ACTIVE, 7, 0, 1, None)
    with_body = decoder.batch((*rows[0], '{"id":"b0"}'), with_raw=True)
    assert with_body.raw == {"id": "b0"}


def test_knowledge_written_with_whitespace_still_reads() -> None:
    assert knowledge_from_json(' {"status": "completed", "sequence": 3}') == Knowledge(status="completed", sequence=3)
    assert knowledge_from_json(None) == knowledge_from_json("") == Knowledge()
