"""A small Server-Sent Events client for tests: reads `/v1/events` frames as the spec defines them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Frame:
    id: str | None
    event: str
    data: str

    @property
    def position(self) -> int:
        assert self.id is not None
        return int(self.id)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEClient:
    """Follows one stream in a background task, collecting its frames, `retry:` values and comments."""

    response: aiohttp.ClientResponse
    frames: list[Frame] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def last_id(self) -> str | None:
        return self.frames[-1].id if self.frames else None

    async def _read(self) -> None:
        fields: dict[str, list[str]] = {}
        while True:
            raw = await self.response.content.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "data" in fields:
                    ids = fields.get("id")
                    self.frames.append(
                        Frame(ids[-1] if ids else None, fields.get("event", ["message"])[-1], "\n".join(fields["data"]))
                    )
                fields = {}
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "retry":
                    self.retry.append(int(value))
                else:
                    fields.setdefault(name, []).append(value)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.response.close()


async def connect(http: aiohttp.ClientSession, path: str = "/v1/events", **kwargs: Any) -> SSEClient:
    """Open the stream (it must answer 200) and start reading it."""
    response = await http.get(path, timeout=aiohttp.ClientTimeout(total=None, sock_read=None), **kwargs)
    assert response.status == 200, (response.status, await response.text())
    client = SSEClient(response)
    client.task = asyncio.create_task(client._read())
    return client
