"""poller.logs: values from outside can neither flood a log line nor forge one, and secrets never show."""

from __future__ import annotations

import io
import json

import structlog

from poller.logs import MAX_VALUE, configure


def _line(fmt: str, **fields: object) -> str:
    stream = io.StringIO()
    configure("info", fmt, stream=stream)
    structlog.get_logger("test").info("something happened", **fields)
    return stream.getvalue()


def test_console_escapes_control_characters_so_a_value_cannot_forge_a_line() -> None:
    out = _line("console", metadata="ok\n2026-01-01 [error    ] forged\x1b[31m")
    assert out.count("\n") == 1
    assert "\\n2026-01-01" in out
    assert "\x1b" not in out


def test_json_lines_stay_one_line_each() -> None:
    out = _line("json", metadata="a\nb\x1b")
    assert out.count("\n") == 1
    assert json.loads(out)["metadata"] == "a\nb\x1b"


def test_long_values_are_cut() -> None:
    out = _line("json", body="x" * (50 * MAX_VALUE))
    record = json.loads(out)
    assert len(record["body"]) < MAX_VALUE + 100
    assert record["body"].endswith(f"({49 * MAX_VALUE} more characters)")


def test_secret_named_fields_are_redacted() -> None:
    out = _line("json", api_key="sk-live-123", webhook_secret="whsec_abc")
    assert "sk-live-123" not in out
    assert "whsec_abc" not in out
