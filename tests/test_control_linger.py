"""A refused upload is read to its end, so its client reads the answer.

urllib (and many other clients) sends a whole body before reading anything. A
body over ``control.max_body_bytes`` is answered 413 at once; the daemon must then
read and drop the rest of it (bounded in time, like nginx's lingering close),
or the client's next write meets a reset and it never sees the 413.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

MiB = 1024 * 1024


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_body_twenty_times_the_limit_sent_whole_gets_its_413(
    daemon_factory: Any,
) -> None:
    async with daemon_factory(control__max_body_bytes=MiB) as d:
        body = b'"' + b"x" * (20 * MiB) + b'"'
        status, doc = await asyncio.to_thread(post, f"{d.control_url}/publish/news", body)
        assert status == 413
        assert doc["error"]["code"] == "payload_too_large"
        status, doc = await asyncio.to_thread(post, f"{d.control_url}/publish/news", b'"ok"')
        assert (status, doc["offset"]) == (200, 1)
