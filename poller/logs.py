"""Logging: structlog to stderr, JSON lines when not on a TTY (journald), readable console on a TTY.

stdout belongs to the stdout sink; logs never go there. A last processor drops any field whose name
looks like a secret, as a guard behind the rule that secrets are never logged. Values come from outside
(batch metadata, error bodies): every string is cut to `MAX_VALUE` characters, and on the console its
control characters are escaped, so a hostile value can neither flood the journal nor forge a log line.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

#: Longest string value a log line carries; the rest is replaced by a count.
MAX_VALUE = 1000
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}
_SECRET_WORDS = ("api_key", "apikey", "authorization", "secret", "password", "token", "routing_key")


@functools.cache
def _secretish(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _drop_secrets(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in [k for k in event_dict if _secretish(k)]:
        event_dict[key] = "[redacted]"
    return event_dict


def _cut(value: str) -> str:
    if len(value) <= MAX_VALUE:
        return value
    return f"{value[:MAX_VALUE]}... ({len(value) - MAX_VALUE} more characters)"


def _tame(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and key != "exception":
            event_dict[key] = _cut(value)
    return event_dict


def _escape(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and key != "exception":
            event_dict[key] = value.translate(_CONTROL)
    return event_dict


def _dumps(obj: Any, **kwargs: Any) -> str:
    """A log line's JSON: orjson (one line per transition adds up), else the standard library (a value
    orjson refuses, such as text with a lone surrogate, still gets its line)."""
    try:
        return orjson.dumps(obj, default=kwargs.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(obj, **kwargs)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog once per process; `fmt` is auto, json or console."""
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            _drop_secrets,
            _tame,
            *([_escape] if console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
