"""Routing: which sinks take an event, from a table; the answer is the same whether worked out once or each time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from poller.delivery.routing import Routes
from tests.helpers import config_dict, make_config

SINKS: list[dict[str, Any]] = [
    {"kind": "file", "name": "all", "path": "/tmp/all.jsonl"},
    {"kind": "file", "name": "done", "path": "/tmp/done.jsonl", "events": ["batch.completed"]},
    {"kind": "file", "name": "azure", "path": "/tmp/azure.jsonl", "sources": ["azure"]},
    {"kind": "mqtt", "name": "mqtt", "url": "mqtt://127.0.0.1:1883"},
]


def routes(sinks: list[dict[str, Any]]) -> Routes:
    return Routes(make_config(config_dict("http://127.0.0.1:9/v1", Path("/tmp/state.db"), sinks)).named_sinks())


@pytest.mark.parametrize(
    ("event_type", "metadata", "source", "expected"),
    [
        ("batch.completed", None, "openai", ["all", "done", "mqtt"]),
        ("batch.in_progress", {"team": "ml"}, "openai", ["all", "mqtt"]),
        ("batch.in_progress", None, "azure", ["all", "azure", "mqtt"]),
        ("batch.pruned", None, "openai", ["mqtt"]),  # internal: only kinds that keep per-batch state
    ],
)
def test_routes_without_metadata_filters(
    event_type: str, metadata: dict[str, str] | None, source: str, expected: list[str]
) -> None:
    table = routes(SINKS)
    assert table(event_type, metadata, source) == expected
    assert table(event_type, metadata, source) == expected  # asked again: the remembered answer


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [({"team": "ml"}, ["all", "ml"]), ({"team": "ops"}, ["all"]), (None, ["all"])],
)
def test_a_metadata_filter_is_asked_every_time(metadata: dict[str, str] | None, expected: list[str]) -> None:
    table = routes([SINKS[0], {"kind": "file", "name": "ml", "path": "/tmp/ml.jsonl", "metadata": {"team": "ml"}}])
    assert table("batch.completed", metadata, "openai") == expected


def test_a_caller_may_keep_and_change_its_list() -> None:
    table = routes(SINKS)
    first = table("batch.completed", None, "openai")
    first.append("changed")
    assert table("batch.completed", None, "openai") == ["all", "done", "mqtt"]
