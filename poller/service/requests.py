"""Parsing what clients send the control API, and the JSON shapes of its answers and refusals."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

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
