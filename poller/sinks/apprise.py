"""The apprise sink: a readable notification per event to any service Apprise reaches (Teams, Discord,
Telegram, email, ntfy, Opsgenie and a hundred more).

The URLs hold tokens, so they come only from ``urls_env`` or ``urls_file`` and never reach logs or
errors: Apprise's own log lines are not passed on, and what an error quotes of them is redacted. Apprise
is synchronous: each notification runs in the sink's own threads, bounded by ``timeout``. Any failure is
retried by the delivery stage; a service that accepted an event is not notified again when a retry of
that event is for the others (within this process).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import apprise
import structlog
from apprise.utils.parse import parse_urls

from poller.config.secrets import read_secret
from poller.config.sinks import AppriseSinkConfig
from poller.domain.events import INTERNAL_TYPES, Event
from poller.errors import ConfigError, DeliveryError
from poller.sinks.alerts import link, rfc3339

log = structlog.get_logger("poller.sinks.apprise")

#: How much of one outside value (batch id, metadata, error message) a message shows.
MAX_FIELD: Final = 200
MAX_METADATA: Final = 10
MAX_ERRORS: Final = 3
#: How long past `timeout` the sink waits for Apprise to return before it gives up on the call.
GRACE: Final = 5.0
#: Events whose services only partly accepted them, remembered so a retry skips the ones that did.
MAX_REMEMBERED: Final = 10_000
EXCERPT_CHARS: Final = 300

_TITLES: Final = {
    "batch.in_progress": "Batch in progress",
    "batch.expiring": "Batch expiring soon",
}
_TYPES: Final = {
    "batch.completed": apprise.NotifyType.SUCCESS,
    "batch.failed": apprise.NotifyType.FAILURE,
    "batch.expired": apprise.NotifyType.FAILURE,
    "batch.stalled": apprise.NotifyType.WARNING,
    "batch.expiring": apprise.NotifyType.WARNING,
    "batch.cancelled": apprise.NotifyType.WARNING,
}


# -- rendering (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    body: str
    notify_type: apprise.NotifyType


def clean(value: object, limit: int = MAX_FIELD) -> str:
    """An outside value as one plain line: control, format and bidi characters and line breaks removed,
    whitespace collapsed, at most `limit` characters. Apprise escapes it for HTML and Markdown services."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def title(event: Event) -> str:
    kind = _TITLES.get(event.type) or "Batch " + event.type.removeprefix("batch.").replace("_", " ")
    return clean(f"{kind}: {clean(event.batch_id)} on {clean(event.data.source)}", 250)


def _transition(event: Event) -> str:
    previous, status = event.data.previous_status, event.data.status
    if previous is None:
        return f"{clean(status)} (first seen)"
    if previous == status:
        return clean(status)
    return f"{clean(previous)} → {clean(status)}"


def _counts(event: Event) -> str:
    rc = event.data.request_counts
    if not rc:
        return "no request counts yet"
    total, completed, failed = rc.get("total", 0), rc.get("completed", 0), rc.get("failed", 0)
    if not total:
        return "no requests yet"
    return f"{completed + failed}/{total} done ({completed} completed, {failed} failed)"


def _errors(event: Event) -> list[str]:
    errors = event.data.batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    lines: list[str] = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict):
            text = ": ".join(str(item[k]) for k in ("code", "message") if item.get(k))
            if item.get("line") is not None:
                text += f" (line {item['line']})"
            if text:
                lines.append(clean(text))
        if len(lines) >= MAX_ERRORS:
            break
    return lines


def body(event: Event, *, links: str | None = None) -> str:
    """The notification text: what happened to which batch, its counts, errors and metadata."""
    batch = event.data.batch
    lines = [
        f"Batch: {clean(event.batch_id)}",
        f"Source: {clean(event.data.source)} ({clean(event.data.provider)})",
        f"Status: {_transition(event)}",
        f"Requests: {_counts(event)}",
    ]
    if batch.get("endpoint"):
        lines.append(f"Endpoint: {clean(batch['endpoint'])}")
    expires = batch.get("expires_at")
    if event.type == "batch.expiring" and isinstance(expires, int):
        lines.append(f"Expires at: {rfc3339(expires)}")
    errors = _errors(event)
    if errors:
        lines.append("Errors:")
        lines.extend(f"- {e}" for e in errors)
    metadata = batch.get("metadata")
    if isinstance(metadata, dict) and metadata:
        shown = sorted(metadata.items(), key=lambda kv: str(kv[0]))[:MAX_METADATA]
        pairs = ", ".join(f"{clean(k, 60)}={clean(v, 100)}" for k, v in shown)
        more = f" (+{len(metadata) - MAX_METADATA} more)" if len(metadata) > MAX_METADATA else ""
        lines.append(f"Metadata: {pairs}{more}")
    url = link(links, event)
    if url:
        lines.append(f"Link: {url}")
    lines.append(f"Event: {clean(event.type)} {clean(event.id)} at {rfc3339(event.created_at)}")
    return "\n".join(lines)


def render(event: Event, *, links: str | None = None) -> Message | None:
    """The notification for an event, or None for internal events (nothing to tell a person)."""
    if event.type in INTERNAL_TYPES:
        return None
    return Message(title(event), body(event, links=links), _TYPES.get(event.type, apprise.NotifyType.INFO))


def split_urls(text: str) -> list[str]:
    """The URLs in an ``urls_env``/``urls_file`` value: one or more a line (space or comma separated);
    blank lines and lines starting with ``#`` are skipped."""
    urls: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            urls.extend(str(u) for u in parse_urls(line))  # type: ignore[no-untyped-call]  # apprise leaves it untyped
    return urls


def secret_parts(url: str) -> list[str]:
    """Every piece of a URL that may be a credential: the redaction list for error texts."""
    parts = urlsplit(url)
    pieces = [url, parts.netloc, parts.path, parts.query]
    pieces += [parts.username or "", parts.password or "", parts.hostname or ""]
    pieces += [unquote(p) for p in parts.path.split("/")]
    pieces += [v for _, v in parse_qsl(parts.query)]
    return [p for p in pieces if len(p) >= 3]


# -- the sink --------------------------------------------------------------------------------------


class AppriseSink:
    """Notifies every configured Apprise service of each event. The context manager owns its threads."""

    def __init__(self, name: str, config: AppriseSinkConfig, *, environ: dict[str, str] | None = None) -> None:
        self.name = name
        self.config = config
        self.max_in_flight = config.max_concurrency
        self.retry_schedule: Sequence[float] | None = list(config.retry_schedule)
        key = f"sinks.{name}.urls"
        where = f"{key}_env" if config.urls_env is not None else f"{key}_file"
        urls = split_urls(read_secret(key, config.urls_env, config.urls_file, environ))
        if not urls:
            raise ConfigError(where, "holds no URL", "put one Apprise URL a line in it (lines with # are comments)")
        # Apprise's log lines may quote URL parts; each call's result carries them instead.
        logging.getLogger("apprise").propagate = False
        self._asset = apprise.AppriseAsset(app_id="batch-poller", storage_mode="memory")
        self._apprise = apprise.Apprise(asset=self._asset)
        self._tags: list[str] = []
        self._hidden: list[str] = []
        for n, url in enumerate(urls, 1):
            tag = f"url{n}"
            plugin = apprise.Apprise.instantiate(url, asset=self._asset, tag=tag)
            if plugin is None:
                raise ConfigError(
                    where,
                    f"entry {n} of {len(urls)} is not a URL Apprise can use (unknown scheme or missing parts)",
                    "see https://github.com/caronc/apprise/wiki for each service's URL; "
                    "`apprise --dry-run -vv URL` checks one",
                )
            self._apprise.add(plugin)
            self._tags.append(tag)
            self._hidden += secret_parts(url)
        self._hidden = sorted(set(self._hidden), key=len, reverse=True)
        self._accepted: OrderedDict[str, set[str]] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._health = "ok"

    @property
    def services(self) -> int:
        return len(self._tags)

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"poller.apprise[{self.name}]")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # A call past its timeout may still hold a thread; it ends with its own socket timeout.
            executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str:
        return self._health

    async def send(self, event: Event, payload: bytes) -> None:
        del payload
        if self._executor is None:
            raise RuntimeError("use the apprise sink as an async context manager")
        message = render(event, links=self.config.links)
        if message is None:
            return  # nothing to tell a person: acknowledged as is
        accepted = self._accepted.get(event.id, set())
        pending = [t for t in self._tags if t not in accepted]
        error = await self._notify(message, pending, accepted)
        if error is None:
            self._accepted.pop(event.id, None)
            self._health = "ok"
            log.debug("apprise delivered", sink=self.name, event_id=event.id, batch_id=event.batch_id)
            return
        self._remember(event.id, accepted)
        self._health = "failing"
        raise error

    async def _notify(self, message: Message, pending: list[str], accepted: set[str]) -> DeliveryError | None:
        """Notify the `pending` services; adds those that accepted to `accepted`."""
        assert self._executor is not None
        timeout = self.config.timeout
        call = functools.partial(
            self._apprise.notify,
            body=message.body,
            title=message.title,
            notify_type=message.notify_type,
            body_format=apprise.NotifyFormat.TEXT,
            tag=pending,
            interpret_escapes=False,
            timeout=timeout,
        )
        try:
            result = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, call), timeout + GRACE
            )
        except TimeoutError:
            return DeliveryError(self.name, f"no answer within {timeout:g}s", retryable=True)
        except Exception as exc:  # a plugin's bug is one failed attempt, never the worker's end
            return DeliveryError(self.name, self._redact(f"apprise raised {type(exc).__name__}: {exc}"), retryable=True)
        failed: list[str] = []
        for service in result.results:
            if service.status == apprise.AppriseResultStatus.SUCCESS:
                accepted.update(service.tag)
                continue
            notes = [e.message for e in service.logs() if e.level in {"WARNING", "ERROR", "CRITICAL"}]
            reason = service.status.name.lower() + (f": {notes[-1]}" if notes else "")
            failed.append(f"{service.name} ({self._redact(reason)})")
        missing = [t for t in pending if t not in accepted]
        if not missing:
            return None
        if not failed:
            failed.append(f"apprise answered {result.status.name.lower()}")
        text = f"{len(missing)} of {len(self._tags)} services failed: " + "; ".join(failed)
        return DeliveryError(self.name, text[:EXCERPT_CHARS], retryable=True)

    def _remember(self, event_id: str, accepted: set[str]) -> None:
        if not accepted:
            return
        self._accepted[event_id] = accepted
        self._accepted.move_to_end(event_id)
        while len(self._accepted) > MAX_REMEMBERED:
            self._accepted.popitem(last=False)

    def _redact(self, text: str) -> str:
        for hidden in self._hidden:
            text = text.replace(hidden, "[redacted]")
        return " ".join(text.split())
