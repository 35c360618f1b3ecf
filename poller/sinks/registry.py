"""Sink kinds: each `[[sinks]] kind` maps to a factory and the capabilities callers plan around.

Callers ask the registry, never a sink's class name: routing asks `keeps_state` (whether the kind keeps
per-batch state that internal events such as the prune notice must reach); the status line asks
`connection` (whether the kind holds a connection worth showing). A kind's module is imported only
when a sink of that kind is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poller.config.sinks import SinkConfig
from poller.errors import ConfigError
from poller.sinks.base import Sink

Factory = Callable[[str, Any, dict[str, str]], Sink]


@dataclass(frozen=True, slots=True)
class SinkKind:
    kind: str
    factory: Factory
    keeps_state: bool = False
    connection: bool = False


def _stdout(name: str, config: Any, environ: dict[str, str]) -> Sink:
    from poller.sinks.stdout import StdoutSink  # noqa: PLC0415

    del environ
    return StdoutSink(name, text=config.format == "text", max_in_flight=config.max_in_flight)


def _file(name: str, config: Any, environ: dict[str, str]) -> Sink:
    from poller.sinks.file import FileSink  # noqa: PLC0415

    del environ
    return FileSink(name, config.path, max_in_flight=config.max_in_flight)


def _mqtt(name: str, config: Any, environ: dict[str, str]) -> Sink:
    from poller.sinks.mqtt import MqttSink  # noqa: PLC0415 - aiomqtt loads only when configured

    return MqttSink(name, config, environ=environ)


def _webhook(name: str, config: Any, environ: dict[str, str]) -> Sink:
    from poller.sinks.webhook import WebhookSink  # noqa: PLC0415

    return WebhookSink(name, config, environ=environ)


def _apprise(name: str, config: Any, environ: dict[str, str]) -> Sink:
    from poller.sinks.apprise import AppriseSink  # noqa: PLC0415 - apprise loads only when configured

    return AppriseSink(name, config, environ=environ)


REGISTRY: dict[str, SinkKind] = {
    k.kind: k
    for k in (
        SinkKind("stdout", _stdout),
        SinkKind("file", _file),
        SinkKind("mqtt", _mqtt, keeps_state=True, connection=True),
        SinkKind("webhook", _webhook),
        SinkKind("apprise", _apprise),
    )
}


def sink_kind(kind: str) -> SinkKind:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ConfigError("sinks.kind", f"unknown sink kind {kind!r}", f"use one of: {', '.join(REGISTRY)}") from None


def build_sink(name: str, config: SinkConfig, environ: dict[str, str]) -> Sink:
    """The sink object for one `[[sinks]]` entry (not yet entered); raises ConfigError."""
    return sink_kind(config.kind).factory(name, config, environ)
