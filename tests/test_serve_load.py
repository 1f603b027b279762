"""``dinodet serve`` under load: 200 requests from 16 concurrent httpx clients on 127.0.0.1 all get an
answer in bounded time, none a 5xx besides the designed 503 (full queue), and dynamic batching forms
batches of more than one image (read from /metrics, as an operator would)."""
from __future__ import annotations

import asyncio
import re
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import COCO128_IMAGES  # noqa: E402

from dinodet.serve import BackgroundServer, ServeOptions  # noqa: E402

REQUESTS, CLIENTS = 200, 16
# two shapes after the test resize (640x480 and 640x428 photos): same-shape requests can batch
PHOTOS = ("000000000009.jpg", "000000000250.jpg", "000000000030.jpg", "000000000149.jpg")


async def _load(url: str, photos: list[bytes]) -> list[tuple[int, float, str | None]]:
    """(status, seconds, Retry-After) of each request; CLIENTS workers share REQUESTS requests."""
    todo = iter(range(REQUESTS))
    results: list[tuple[int, float, str | None]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            start = time.perf_counter()
            answer = await client.post(url + "/v1/detect", files={"image": photos[i % len(photos)]})
            results.append((answer.status_code, time.perf_counter() - start, answer.headers.get("retry-after")))
            if answer.status_code == 503:  # the designed back-pressure: wait as told
                await asyncio.sleep(float(answer.headers["retry-after"]) / 10)

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(CLIENTS))), timeout=240)
    return results


def test_load_16_clients(tiny_detector):
    photos = [(COCO128_IMAGES / n).read_bytes() for n in PHOTOS]
    options = ServeOptions(port=0, max_batch=8, max_wait_ms=10, max_queue=64)
    with BackgroundServer(tiny_detector, options) as server:
        results = asyncio.run(_load(server.url, photos))
        metrics = httpx.get(server.url + "/metrics").text
        assert httpx.post(server.url + "/v1/detect", files={"image": photos[0]}).status_code == 200
    statuses = [s for s, _, _ in results]
    assert len(results) == REQUESTS
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert all(retry == "1" for s, _, retry in results if s == 503)
    assert statuses.count(200) >= REQUESTS * 0.9  # 16 clients fit the 64-deep queue: 503s would be a fault
    assert max(t for _, t, _ in results) < 60
    # batches of more than one image were formed: the batch-size histogram has observations above 1
    ones = float(re.search(r'dinodet_batch_size_bucket\{le="1.0"\} (\S+)', metrics).group(1))
    batches = float(re.search(r"dinodet_batch_size_count (\S+)", metrics).group(1))
    images = float(re.search(r"dinodet_batch_size_sum (\S+)", metrics).group(1))
    assert batches > ones, metrics
    assert images == statuses.count(200) and images / batches > 1.5
    served = float(re.search(r'dinodet_requests_total\{method="POST",route="/v1/detect",status="200"\} (\S+)',
                             metrics).group(1))
    assert served == statuses.count(200)
