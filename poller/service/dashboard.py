"""The dashboard's files (HTML, CSS, JS from the package's `static/` folder), served as they are.

No build step and nothing from elsewhere: the page works offline, and its Content-Security-Policy lets
it load and connect to this service only. The page itself holds no data; it reads the control API.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

#: The files the page is made of, and their content types.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the first request may carry ?token=
    "Cache-Control": "no-cache",
}


class Dashboard:
    """Reads the files once; `index` answers `GET /`, `asset` answers `GET /static/{name}`."""

    def __init__(self) -> None:
        folder = resources.files("poller.service") / "static"
        self._files = {name: (folder / name).read_bytes() for name in FILES}

    def _file(self, name: str) -> web.Response:
        return web.Response(body=self._files[name], headers={**HEADERS, "Content-Type": FILES[name]})

    async def index(self, _: web.Request) -> web.Response:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files or name == "index.html":
            raise web.HTTPNotFound
        return self._file(name)
