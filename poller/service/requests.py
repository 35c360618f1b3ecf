"""Parsing what clients send the control API, and the JSON shapes of its answers and refusals."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from poller.service.stream import Filters

#: What POST accepts as a batch id (matched whole: `$` alone would let a trailing newline through);
#: Gemini's ids may come with their `batches/` prefix.
BATCH_ID = re.compile(r"(?:batches/)?[A-Za-z0-9_-]{1,128}")
#: What names a source in `?source=` or a POST body.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Most ids one POST may track; a bigger list is refused with 400 rather than held on the event loop.
MAX_IDS = 1000


class BadRequestError(Exception):
    """A control API request that cannot be used; the message is returned to the client."""


def requested_ids(raw: bytes) -> tuple[list[str], str | None]:
    """The ids of a POST /v1/batches body, de-duplicated in order, and its optional source."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequestError('the body must be JSON: {"id": "batch_..."} or {"ids": ["batch_...", ...]}') from None
    if not isinstance(body, dict):
        raise BadRequestError('the body must be a JSON object: {"id": "batch_..."} or {"ids": [...]}')
    source = body.pop("source", None)
    if len(body) != 1 or not ({"id", "ids"} & body.keys()):
        raise BadRequestError('the body must hold exactly one of "id" or "ids" (and optionally "source")')
    ids: Any = [body["id"]] if "id" in body else body["ids"]
    if not isinstance(ids, list) or not ids:
        raise BadRequestError("ids must be a non-empty list of batch ids")
    if len(ids) > MAX_IDS:
        raise BadRequestError(f"at most {MAX_IDS} ids per request")
    for batch_id in ids:
        if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
            raise BadRequestError(f"not a batch id: {batch_id!r} (1-128 of A-Z a-z 0-9 _ -)")
    return list(dict.fromkeys(ids)), check_source(source)


def check_source(source: object) -> str | None:
    if source is None:
        return None
    if not isinstance(source, str) or not SOURCE_NAME.fullmatch(source):
        raise BadRequestError(f"not a source name: {source!r}")
    return source


def query_source(request: web.Request) -> str | None:
    return check_source(request.query.get("source"))


def with_status(ok: bool, detail: dict[str, object]) -> dict[str, object]:
    body: dict[str, object] = {"status": "ok" if ok else "fail"}
    body.update((k, v) for k, v in detail.items() if k != "status")
    return body


def number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def not_tracked(batch_id: str) -> web.Response:
    return error(404, f"batch {batch_id!r} is not tracked", "not_found")


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status, headers=headers)


#: What `?type=` accepts: an event type as docs/events.md lists them.
EVENT_TYPE = re.compile(r"batch\.[a-z_]{1,32}")
#: What `?since=` and `Last-Event-ID` accept: an event log position.
POSITION = re.compile(r"[0-9]{1,18}")


def stream_request(request: web.Request) -> tuple[Filters, int | None]:
    """The filters of a `GET /v1/events` and where to replay from (None: only new events).

    Each filter may repeat or hold a comma-separated list; `Last-Event-ID` wins over `?since=`.
    """
    sources = _listed(request, "source", SOURCE_NAME, "a source name")
    batch_ids = _listed(request, "batch", BATCH_ID, "a batch id")
    types = _listed(request, "type", EVENT_TYPE, "an event type such as batch.completed")
    raw = (request.headers.get("Last-Event-ID") or request.query.get("since") or "").strip()
    if raw and not POSITION.fullmatch(raw):
        raise BadRequestError(f"since and Last-Event-ID take an event position (an integer >= 0), not {raw!r}")
    since = int(raw) if raw else None
    return Filters(sources, batch_ids, types), since


def _listed(request: web.Request, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    values = [v.strip() for raw in request.query.getall(key, ()) for v in raw.split(",") if v.strip()]
    for value in values:
        if not pattern.fullmatch(value):
            raise BadRequestError(f"{key}: not {what}: {value!r}")
    if len(values) > MAX_IDS:
        raise BadRequestError(f"{key}: at most {MAX_IDS} values")
    return tuple(dict.fromkeys(values))
