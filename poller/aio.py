"""Small asyncio helpers shared by the loops."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` passed; True when it was set.

    `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11, `wait_for` can swallow a cancellation that
    arrives just as the event is set (CPython gh-86296), which leaves a cancelled loop running and the
    task awaiting it (a shutdown, a lease hand-over) stuck.
    """
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
    except TimeoutError:
        return False
    return True
