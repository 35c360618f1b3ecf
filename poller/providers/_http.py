"""What every HTTP adapter shares: one session, the pacer and a concurrency limit in front of every
request, Retry-After (and the provider's own rate-limit headers), JSON parsing that cannot be crashed,
and errors as `ApiError` with the status, the server's request id and whether the API itself answered.

The key is only ever put in a request header, never in a message or a log line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, ClassVar, Self

import aiohttp
import orjson

from poller import __version__
from poller.domain.schedule import Pacer, parse_retry_after
from poller.domain.snapshot import Counts, InvalidSnapshotError, Snapshot
from poller.errors import ApiError, BadResponseError
from poller.metrics import SourceMetrics
from poller.providers.base import Capabilities, Page, Recounted, Unchanged

#: Error texts and log fields are cut to this many characters: a body may be megabytes of anything.
EXCERPT = 300
#: Request ids, by the header each provider sends them in.
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-goog-request-id", "cf-ray")


def excerpt(text: object, limit: int = EXCERPT) -> str:
    """One short line of untrusted text, for an error message or a log field."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class NestedTooDeepError(ValueError):
    """JSON nested deeper than the parser recurses: JSON all right, but never a batch."""


#: Every digit as "0", so that a run of 20 digits (perhaps an integer past 64 bits) is one `find`.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TWENTY_DIGITS = b"0" * 20


def parse_json(raw: bytes) -> Any:
    """JSON from a response body; ValueError for anything that is not (NestedTooDeepError for deep nesting).

    orjson parses the usual body, several times faster than the standard library (every list page goes
    through here). The standard parser takes whatever orjson would read otherwise, and decides as it
    always did: a lone surrogate or `NaN` (orjson refuses the whole page; here only that item is refused)
    and integers past 64 bits (orjson makes them floats), which a run of 20 digits may be.
    """
    if raw.translate(_DIGITS_AS_ZERO).find(_TWENTY_DIGITS) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw)
    except RecursionError:
        raise NestedTooDeepError("JSON nested too deeply") from None


@dataclass(slots=True)
class Endpoint:
    """Where and how to reach one API: the base URL, headers carrying the key, the request timeout."""

    base_url: str
    headers: dict[str, str]
    timeout: float
    params: dict[str, str] = field(default_factory=dict)


class HttpProvider:
    """Base of the HTTP adapters: owns the session while entered, paces and counts every request."""

    name: ClassVar[str] = "?"
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: The field of a batch object that holds its id (for naming items that fail to normalize).
    id_field: ClassVar[str] = "id"
    #: Whether the adapter's `rebase` and `recount` know where its bodies keep their request counts: list
    #: items whose counts alone moved then skip the full check (`Provider.recounted`).
    recounts: ClassVar[bool] = False

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        metrics: SourceMetrics,
        pacer: Pacer,
        max_concurrency: int = 8,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint
        self.metrics = metrics
        self.pacer = pacer
        self._monotonic = monotonic
        self._limit = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self.requests: Counter[str] = Counter()
        self.last_progress = 0.0
        self.unchanged: Unchanged | None = None
        self.recounted: Recounted | None = None

    async def __aenter__(self) -> Self:
        headers = {"User-Agent": f"batch-poller/{__version__}", "Accept": "application/json"}
        headers |= self._endpoint.headers
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self._endpoint.timeout), raise_for_status=False
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def paused_until(self) -> float:
        return self.pacer.paused_until

    # -- what adapters override ----------------------------------------------------------------------

    def normalize(self, raw: Mapping[str, Any]) -> Snapshot:
        raise NotImplementedError

    def rebase(self, raw: Mapping[str, Any], counts: Counts) -> Mapping[str, Any] | None:  # noqa: ARG002
        """`raw` with its request counts set to `counts` in the body's own shape; None when the counts are not
        in the plain shape `recount` handles (then the body is normalized in full). Only with `recounts`."""
        return None

    def recount(self, raw: Mapping[str, Any]) -> Snapshot:
        """`normalize(raw)` for a body the poll loop vouched equal but for its request counts to one this
        adapter normalized before (`Provider.recounted`): the same snapshot, or the same error, checking only
        the counts. Only with `recounts`."""
        return self.normalize(raw)

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        """The delay a rate-limited or overloaded answer asks for (Retry-After and its variants)."""
        return parse_retry_after(headers, now)

    def error_detail(self, body: Any) -> tuple[str, str | None] | None:
        """The message and code of the API's own error body, or None when the body is not one."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type") or error.get("status")
            return excerpt(error.get("message") or ""), None if code is None else str(code)
        if isinstance(body, dict) and ("detail" in body or "message" in body):  # FastAPI-style servers
            return excerpt(body.get("detail") or body.get("message")), None
        return None

    # -- shared plumbing ---------------------------------------------------------------------------

    def snapshot(self, body: Any, kind: str, expect_id: str | None = None) -> Snapshot:
        """Normalize one batch answer; BadResponseError (counted) when it is not one we can trust."""
        if not isinstance(body, dict):
            raise self._bad(f"{kind} answer is not a JSON object", "batch_shape")
        snap = self.normalize(body)
        if expect_id is not None and snap.id != expect_id:
            raise self._bad(f"{kind} answered with another batch ({excerpt(snap.id, 80)})", "wrong_id")
        return snap

    async def id_cursor_page(self, path: str, cursor_param: str, cursor: str | None, page_size: int) -> Page:
        """One page of a `{data, has_more, last_id}` list, newest first (OpenAI's shape, and Anthropic's and
        OpenRouter's): the next page starts after the last id of this one."""
        query = {"limit": str(page_size)}
        if cursor:
            query[cursor_param] = cursor
        body = await self.request("list", "GET", path, query)
        if not isinstance(body, dict):
            raise self._bad("list answer is not a JSON object", "list_shape")
        items = body.get("data")
        page = self.page(items, None)
        if body.get("has_more") is True and isinstance(items, list) and items:
            last = body.get("last_id") or (items[-1].get("id") if isinstance(items[-1], dict) else None)
            if isinstance(last, str) and last:
                return replace(page, next=last)
        return page

    def page(self, items: Any, next_cursor: str | None) -> Page:
        """Normalize a list page's items: the ones that are not batches are counted, logged and skipped."""
        if not isinstance(items, list):
            raise self._bad("list answer has no list of batches", "list_shape")
        snaps: list[Snapshot] = []
        rejected: list[tuple[str | None, str]] = []
        unchanged: list[tuple[str, int]] = []
        known = self.unchanged
        recounted = self.recounted if self.recounts else None
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise self._bad("list item is not an object", "batch_shape")
                if known is not None and isinstance(batch_id := item.get(self.id_field), str):
                    created_at = known(batch_id, item)
                    if created_at is not None:  # the very body the poll loop holds: nothing to check again
                        unchanged.append((batch_id, created_at))
                        continue
                    if recounted is not None and recounted(batch_id, item, self.rebase):
                        snaps.append(self.recount(item))  # that body but for its counts: only they are checked
                        continue
                snaps.append(self.normalize(item))
            except BadResponseError as exc:
                batch_id = item.get(self.id_field) if isinstance(item, dict) else None
                rejected.append((excerpt(batch_id, 80) if batch_id is not None else None, str(exc)))
        return Page(snaps, next_cursor, tuple(rejected), tuple(unchanged))

    def invalid(self, exc: InvalidSnapshotError | ValueError, kind: str = "batch") -> BadResponseError:
        """A BadResponseError for a body whose values cannot be true."""
        return self._bad(f"{kind} answer has an invalid value: {excerpt(exc, 160)}", "invalid_value")

    def _bad(self, message: str, reason: str) -> BadResponseError:
        self.metrics.bad_response(reason)
        return BadResponseError(message, reason=reason)

    async def request(
        self,
        kind: str,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        """Send one paced request; the parsed JSON of a 2xx answer, else ApiError / BadResponseError."""
        assert self._session is not None, "use the provider as an async context manager"
        params = dict(self._endpoint.params) | dict(query or {})
        async with self._limit:
            wait = self.pacer.reserve(self._monotonic())
            if wait > 0:
                self.metrics.rate_limit_waits.inc()
                await asyncio.sleep(wait)
            # A 429 may have paused everything while this request waited for its slot: never send sooner.
            while (pause := self.pacer.paused_until - self._monotonic()) > 0:  # noqa: ASYNC110 - a 429 may extend it
                await asyncio.sleep(pause)
            self.requests[kind] += 1
            self.last_progress = self._monotonic()
            url = self._endpoint.base_url + path
            try:
                async with self._session.request(method, url, params=params, json=body) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
            except TimeoutError:
                self.metrics.api_request(kind, "timeout")
                raise ApiError(f"{kind} timed out after {self._endpoint.timeout:g}s") from None
            except aiohttp.ClientError as exc:
                self.metrics.api_request(kind, "error")
                raise ApiError(f"{kind} failed: {type(exc).__name__}: {excerpt(exc)}") from None
        self.last_progress = self._monotonic()
        self.metrics.api_request(kind, f"{status // 100}xx")
        request_id = next((headers[h] for h in REQUEST_ID_HEADERS if h in headers), None)
        if status >= 400:
            retry_after = self.retry_after(headers, time.time()) if status in {429, 503, 529} else None
            if status in {429, 529}:
                self.pacer.penalize(self._monotonic(), retry_after)
            raise self._error(kind, status, raw, headers.get("content-type", ""), retry_after, request_id)
        self.pacer.reward(self._monotonic())
        try:
            return parse_json(raw)
        except NestedTooDeepError:
            # The API's JSON, but no batch: a bad body of one batch, not a sign that base_url is wrong.
            shape = "list_shape" if kind == "list" else "batch_shape"
            raise self._bad(f"{kind} answer is nested too deeply to be a batch", shape) from None
        except ValueError:
            ctype = excerpt(headers.get("content-type", "?"), 60)
            self.metrics.bad_response("not_json")
            raise BadResponseError(
                f"{kind} answered {status} with a body that is not JSON ({ctype}); is base_url the API's?",
                reason="not_json",
                status=status,
                request_id=request_id,
            ) from None

    def _error(  # noqa: PLR0917 - one answer's parts, passed straight through
        self, kind: str, status: int, raw: bytes, ctype: str, retry_after: float | None, request_id: str | None
    ) -> ApiError:
        detail = None
        if "json" in ctype or raw[:1] in {b"{", b"["}:
            try:
                detail = self.error_detail(parse_json(raw))
            except ValueError:
                detail = None
        if detail is None:
            shown = excerpt(raw[:200].decode("utf-8", "replace"), 120) or "(empty body)"
            message, code, from_api = f"not an API error body: {shown}", None, False
        else:
            (message, code), from_api = detail, True
        return ApiError(
            f"{kind} answered {status}: {message}",
            status=status,
            retry_after=retry_after,
            request_id=request_id,
            code=code,
            from_api=from_api,
        )
