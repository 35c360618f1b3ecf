"""The Batch API client: retrieve, list (cursor pages, newest first) and cancel, for OpenAI and Azure.

Every request passes the global pacer (requests per second, halved on 429, paused for a Retry-After)
and a concurrency limit. Errors surface as `ApiError` with the status, the server's Retry-After and its
`x-request-id`; a 2xx body that is not a Batch raises `BadResponseError`. The API key is only ever put
in a request header, never in a message or a log line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog
from pydantic import ValidationError

from poller import __version__
from poller.config import SourceConfig
from poller.errors import ApiError, BadResponseError
from poller.metrics import Metrics
from poller.models import LIST_PAGE_SIZE, Batch, BatchList
from poller.schedule import Pacer, parse_retry_after

log = structlog.get_logger("poller.api")


class Page:
    """One list page: the batches that parsed, and how many items did not."""

    def __init__(self, batches: list[Batch], last_id: str | None, has_more: bool, rejected: int) -> None:
        self.batches = batches
        self.last_id = last_id
        self.has_more = has_more
        self.rejected = rejected


class BatchApi:
    """An async context manager owning one HTTP session to one Batch API."""

    def __init__(
        self,
        config: SourceConfig,
        api_key: str,
        *,
        metrics: Metrics,
        pacer: Pacer,
        max_concurrency: int = 8,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self.metrics = metrics
        self.pacer = pacer
        self._monotonic = monotonic
        self._limit = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        #: Requests sent, by kind (retrieve, list, cancel): what bulk refresh economises.
        self.requests: Counter[str] = Counter()
        #: When a request last went out or came back (monotonic): the daemon's liveness check reads it.
        self.last_progress = 0.0

    async def __aenter__(self) -> Self:
        headers = {"User-Agent": f"batch-poller/{__version__}", "Accept": "application/json"}
        if self.config.kind == "azure":
            headers["api-key"] = self._api_key
        else:
            headers["Authorization"] = f"Bearer {self._api_key}"
            if self.config.organization:
                headers["OpenAI-Organization"] = self.config.organization
            if self.config.project:
                headers["OpenAI-Project"] = self.config.project
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _params(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        params = dict(extra or {})
        if self.config.api_version:
            params["api-version"] = self.config.api_version
        return params

    async def retrieve(self, batch_id: str) -> Batch:
        body = await self._request("retrieve", "GET", f"/batches/{batch_id}")
        return self._batch(body, "retrieve")

    async def cancel(self, batch_id: str) -> Batch:
        body = await self._request("cancel", "POST", f"/batches/{batch_id}/cancel")
        return self._batch(body, "cancel")

    async def list_page(self, after: str | None = None, limit: int = LIST_PAGE_SIZE) -> Page:
        query = {"limit": str(limit)}
        if after:
            query["after"] = after
        body = await self._request("list", "GET", "/batches", query)
        try:
            page = BatchList.model_validate(body)
        except ValidationError as exc:
            self.metrics.bad_responses.labels("list_shape").inc()
            raise BadResponseError(f"list answer is not a list of batches: {exc.error_count()} problem(s)") from None
        batches: list[Batch] = []
        rejected = 0
        for item in page.data:
            try:
                batches.append(Batch.model_validate(item))
            except ValidationError as exc:
                rejected += 1
                self.metrics.bad_responses.labels("batch_shape").inc()
                log.warning("list item is not a batch; skipped", batch_id=item.get("id"), problems=exc.error_count())
        last_id = page.last_id or (str(page.data[-1].get("id")) if page.data else None)
        return Page(batches, last_id, page.has_more, rejected)

    def _batch(self, body: Any, kind: str) -> Batch:
        try:
            return Batch.model_validate(body)
        except ValidationError as exc:
            self.metrics.bad_responses.labels("batch_shape").inc()
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:3])
            raise BadResponseError(f"{kind} answer is not a batch (bad fields: {fields})") from None

    async def _request(self, kind: str, method: str, path: str, query: dict[str, str] | None = None) -> Any:
        assert self._session is not None, "use BatchApi as an async context manager"
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
            url = self.config.base_url + path
            try:
                async with self._session.request(method, url, params=self._params(query)) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
            except TimeoutError:
                self.metrics.api_requests.labels(kind, "timeout").inc()
                raise ApiError(f"{kind} timed out after {self.config.timeout:g}s") from None
            except aiohttp.ClientError as exc:
                self.metrics.api_requests.labels(kind, "error").inc()
                raise ApiError(f"{kind} failed: {type(exc).__name__}: {exc}") from None
        self.last_progress = self._monotonic()
        self.metrics.api_requests.labels(kind, f"{status // 100}xx").inc()
        request_id = headers.get("x-request-id")
        if status >= 400:
            retry_after = parse_retry_after(headers, time.time())
            if status == 429:
                self.pacer.penalize(self._monotonic(), retry_after)
            raise _error(kind, status, raw, retry_after, request_id)
        self.pacer.reward(self._monotonic())
        try:
            return json.loads(raw)
        except ValueError:
            self.metrics.bad_responses.labels("not_json").inc()
            ctype = headers.get("content-type", "?")
            raise BadResponseError(
                f"{kind} answered {status} with a body that is not JSON ({ctype})", status=status, request_id=request_id
            ) from None


def _error(kind: str, status: int, raw: bytes, retry_after: float | None, request_id: str | None) -> ApiError:
    """An ApiError from an error response, with OpenAI's error message and code when the body has them."""
    message, code = raw[:200].decode("utf-8", "replace"), None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or message)[:300]
        code = body["error"].get("code")
    return ApiError(
        f"{kind} answered {status}: {message}",
        status=status,
        retry_after=retry_after,
        request_id=request_id,
        code=str(code) if code is not None else None,
    )
