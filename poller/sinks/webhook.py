"""The webhook sink: one signed HTTP POST per event, in OpenAI's, CloudEvents' or an alerting service's format.

Every request carries Standard Webhooks headers (``webhook-id`` is the event id, stable across retries;
``webhook-timestamp`` is the attempt's time) and, when secrets are configured, ``webhook-signature`` over
the exact bytes sent. Redirects are not followed. `classify` is the one place HTTP outcomes become
delivered / retry / dead letter / disable. Secrets, the routing key and the URL never reach logs or errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Self
from urllib.parse import urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

import poller
from poller import signing
from poller.config import WebhookSinkConfig, read_secret, webhook_secrets
from poller.domain.events import CLOUDEVENTS_CONTENT_TYPE, Event, encode_cloudevent
from poller.domain.schedule import parse_retry_after
from poller.errors import DeliveryError
from poller.sinks import alerts

log = structlog.get_logger("poller.sinks.webhook")

#: Response bodies are read up to this size; the rest is discarded.
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: How much of a response body an error message quotes.
EXCERPT_CHARS: Final = 200
#: A receiver's Retry-After is honoured up to this many seconds.
MAX_RETRY_AFTER: Final = 86400.0
JSON_CONTENT_TYPE: Final = "application/json"


def classify(sink: str, status: int | None, detail: str, *, retry_after: float | None = None) -> DeliveryError | None:
    """The outcome of one attempt: None when delivered, else the error the delivery stage acts on.

    `status` is the HTTP status, or None when no response arrived (timeout, connection error), in which
    case `detail` says what happened; for a response `detail` is an excerpt of its body.
    2xx delivered; 3xx (redirects are not followed), 408, 429, 5xx and transport failures are retried,
    429/503 no sooner than their Retry-After; 410 Gone disables the sink; any other 4xx is dead-lettered.
    """
    if status is None:
        return DeliveryError(sink, detail, retryable=True)
    if 200 <= status < 300:
        return None
    message = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status == 410:
        return DeliveryError(sink, message, retryable=False, status=status, disable=True)
    if status in {429, 503}:
        wait = None if retry_after is None else min(retry_after, MAX_RETRY_AFTER)
        return DeliveryError(sink, message, retryable=True, status=status, retry_after=wait)
    if 300 <= status < 400 or status == 408 or status >= 500:
        return DeliveryError(sink, message, retryable=True, status=status)
    return DeliveryError(sink, message, retryable=False, status=status)


class WebhookSink:
    """POSTs each event to `config.url`. The context manager owns the HTTP session."""

    def __init__(
        self,
        name: str,
        config: WebhookSinkConfig,
        *,
        environ: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.config = config
        self.max_in_flight = config.max_concurrency
        self.retry_schedule: Sequence[float] | None = list(config.retry_schedule)
        self._clock = clock
        key = f"sinks.{name}"
        self._secrets = webhook_secrets(config, key, environ)
        self._routing_key: str | None = None
        if config.routing_key_env is not None or config.routing_key_file is not None:
            self._routing_key = read_secret(
                f"{key}.routing_key", config.routing_key_env, config.routing_key_file, environ
            )
        self._base_headers = CIMultiDict({"User-Agent": f"batch-poller/{poller.__version__}"})
        self._base_headers.update(config.headers)
        # Redacted from every error text: the credentials, and the URL (a Slack URL is itself a credential).
        parts = urlsplit(config.url)
        candidates = (*self._secrets, self._routing_key, config.url, parts.path, parts.query)
        self._hidden: list[str] = [s for s in candidates if s is not None and len(s) > 1]
        self._session: aiohttp.ClientSession | None = None
        self._health = "ok"

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            connector=aiohttp.TCPConnector(limit=self.max_in_flight),
            cookie_jar=aiohttp.DummyCookieJar(),  # a receiver's cookies must not ride along to the next request
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> str:
        return self._health

    def body(self, event: Event, payload: bytes) -> tuple[bytes, str] | None:
        """The bytes to POST for an event and their content type, or None when the format has nothing to say."""
        fmt = self.config.format
        if fmt == "openai":
            return payload, JSON_CONTENT_TYPE
        if fmt == "cloudevents":
            return encode_cloudevent(event), CLOUDEVENTS_CONTENT_TYPE
        value = alerts.render(fmt, event, now=self._clock(), links=self.config.links, routing_key=self._routing_key)
        if value is None:
            return None
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(), JSON_CONTENT_TYPE

    def headers(self, event: Event, body: bytes, content_type: str, timestamp: int) -> CIMultiDict[str]:
        headers = CIMultiDict(self._base_headers)
        headers["Content-Type"] = content_type
        headers[signing.ID_HEADER] = event.id
        headers[signing.TIMESTAMP_HEADER] = str(timestamp)
        if self._secrets:
            headers[signing.SIGNATURE_HEADER] = signing.sign(self._secrets, event.id, timestamp, body)
        return headers

    async def send(self, event: Event, payload: bytes) -> None:
        if self._session is None:
            raise RuntimeError("use the webhook sink as an async context manager")
        if self._health == "disabled":
            raise DeliveryError(self.name, "disabled after HTTP 410 Gone", retryable=False, status=410, disable=True)
        rendered = self.body(event, payload)
        if rendered is None:
            return  # nothing to send for this event in this format: acknowledged as is
        body, content_type = rendered
        headers = self.headers(event, body, content_type, int(self._clock()))
        error = await self._post(body, headers)
        if error is None:
            self._health = "ok"
            log.debug("webhook delivered", sink=self.name, event_id=event.id, batch_id=event.batch_id)
            return
        self._health = "disabled" if error.disable else "failing"
        raise error

    async def _post(self, body: bytes, headers: CIMultiDict[str]) -> DeliveryError | None:
        assert self._session is not None
        try:
            async with self._session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                excerpt = await self._excerpt(response)
                retry_after = parse_retry_after(response.headers, self._clock())
                status = response.status
        except TimeoutError:
            return classify(self.name, None, f"no response within {self.config.timeout:g}s")
        except aiohttp.ClientError as exc:
            return classify(self.name, None, self._redact(f"{type(exc).__name__}: {exc}"))
        return classify(self.name, status, excerpt, retry_after=retry_after)

    async def _excerpt(self, response: aiohttp.ClientResponse) -> str:
        """The start of the response body, read up to MAX_RESPONSE_BYTES, as one short redacted line."""
        chunks: list[bytes] = []
        size = 0
        while size < MAX_RESPONSE_BYTES:
            chunk = await response.content.read(MAX_RESPONSE_BYTES - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        text = " ".join(b"".join(chunks).decode("utf-8", errors="replace").split())
        return self._redact(text)[:EXCERPT_CHARS]

    def _redact(self, text: str) -> str:
        for hidden in sorted(self._hidden, key=len, reverse=True):
            text = text.replace(hidden, "[redacted]")
        return text
