"""A webhook receiver in its own process: answers every POST with 204 as soon as the body is read.

`python -m bench.receiver` serves on a free loopback port and prints ``READY <url>``; GET / returns how
many POSTs it received.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import suppress

from aiohttp import web


def app() -> web.Application:
    received = 0

    async def post(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.Response(status=204)

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"received": received})

    application = web.Application()
    application.router.add_post("/{tail:.*}", post)
    application.router.add_get("/", count)
    return application


async def _serve() -> None:
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sys.stdout.write(f"READY http://127.0.0.1:{port}/hook\n")
    sys.stdout.flush()
    try:
        with suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    loop = asyncio.new_event_loop()
    task = loop.create_task(_serve())
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with suppress(KeyboardInterrupt):
        loop.run_until_complete(task)
    loop.close()


if __name__ == "__main__":
    main()
