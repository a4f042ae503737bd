"""The server's bounds and what a stopped task gives back: a task cancelled before its work started returns its
reserved queue place, the tasks of an expired detached session are stopped, and a test each for the session-buffer
cap, the per-key in-flight cap and the per-key record cap. The cap checks take two base URLs (here the same server),
so tests/test_serve_redis.py replays them across two replicas."""

import asyncio
import json
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from test_serve import pipeline_dir, post, start_server, task, upscaler  # noqa: F401
from test_serve_hostile import authenticate, receive_until, small_png, ws_url
from test_tasks import png_base64

CAPS = ("max_inflight_per_key=2", "max_records_per_key=4", "session_buffer_mb=0.002")


@pytest.fixture(scope="module")
def capped(pipeline_dir):  # noqa: F811
    process, base = start_server(pipeline_dir, *CAPS)
    yield base
    process.kill()
    process.wait(timeout=30)


def wait_idle(*bases, timeout=60.0) -> None:
    """Until no server has an accepted task unanswered."""
    deadline = time.monotonic() + timeout
    while any(httpx.get(f"{base}/health").json()["inFlight"] for base in bases):
        assert time.monotonic() < deadline, "tasks still in flight"
        time.sleep(0.05)


def check_record_cap(first, second) -> None:
    """max_records_per_key=4: a fifth finished task makes room by forgetting the oldest one (its taskUUID may be
    sent again) while the others stay conflicts."""
    uploads = [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": small_png()} for _ in range(5)]
    for i, upload in enumerate(uploads):
        assert "imageUUID" in post((first, second)[i % 2], [upload]).json()["data"][0]
    assert post(second, [uploads[4]]).json()["errors"][0]["code"] == "conflictTaskUUID"
    assert "imageUUID" in post(second, [uploads[0]]).json()["data"][0]  # forgotten: its UUID is free again
    assert post(first, [uploads[2]]).json()["errors"][0]["code"] == "conflictTaskUUID"


def check_inflight_cap(first, second) -> None:
    """max_inflight_per_key=2: with two async tasks of a key unanswered, a third is rateLimitExceeded; once they are
    answered, the key may send again."""
    slow = [task(small_png(), deliveryMethod="async", settings={"steps": 60, "seed": i}) for i in range(3)]
    for one in slow[:2]:
        assert post(first, [one]).json()["data"][0]["status"] == "processing"
    refused = post(second, [slow[2]]).json()["errors"][0]
    assert refused["code"] == "rateLimitExceeded" and "in flight" in refused["message"]
    deadline = time.monotonic() + 120
    for one in slow[:2]:
        ask = [{"taskType": "getResponse", "taskUUID": one["taskUUID"]}]
        while post(second, ask).json()["data"][0]["status"] == "processing":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    wait_idle(first, second)
    assert post(second, [slow[2]]).json()["data"][0]["status"] == "processing"
    wait_idle(first, second)


def check_session_buffer_cap(first, second) -> None:
    """session_buffer_mb=0.002: an answer bigger than 2 kB that finishes while its client is away waits as a short
    sessionBufferFull error for its task; the resumed session gets that error."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    big = task(png_base64(noise), settings={"steps": 30, "seed": 1})

    async def main():
        ws, session = await authenticate(ws_url(first))
        await ws.send(json.dumps([big]))
        await ws.close()  # the client leaves before the answer; the task runs on
        await asyncio.to_thread(wait_idle, first, second)
        ws, resumed = await authenticate(ws_url(second), session=session)
        try:
            assert resumed == session
            return await receive_until(ws, big["taskUUID"])
        finally:
            await ws.close()

    got = asyncio.run(main())
    assert got["errors"][0]["code"] == "sessionBufferFull", got


def test_record_cap(capped):
    check_record_cap(capped, capped)


def test_inflight_cap(capped):
    check_inflight_cap(capped, capped)


def test_session_buffer_cap(capped):
    check_session_buffer_cap(capped, capped)


def test_task_cancelled_before_it_started_gives_its_place_back(upscaler, tmp_path):  # noqa: F811
    """A task stopped before its work began (its REST client left at once) frees its reserved queue place and its
    claim: the queue is empty again and the same taskUUID is accepted."""
    from latentup.serve.service import Service
    from latentup.serve.store import ImageStore

    async def main():
        service = Service(upscaler, ImageStore(tmp_path, 60), dict(max_queue=1, max_batch=1))
        worker = asyncio.ensure_future(service.batcher.run_forever())
        one = task(small_png())
        answer = asyncio.ensure_future(service.answer(one))
        await asyncio.sleep(0)  # admitted: its job is created, not started
        assert service.batcher.reserved == 1
        answer.cancel()
        while service.in_flight:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the stopped claim is answered
        assert service.batcher.reserved == 0
        again = await service.answer(one)
        worker.cancel()
        service.batcher.close()
        return again

    assert "imageBase64Data" in asyncio.run(main())["data"][0]


def test_tasks_of_an_expired_session_are_stopped(upscaler, tmp_path):  # noqa: F811
    """A detached session that expires stops the tasks still running for it: the model leaves the batch early and
    the key's claim is freed."""
    from latentup.serve.service import Caller, Service
    from latentup.serve.sessions import Sessions
    from latentup.serve.store import ImageStore

    async def main():
        service = Service(upscaler, ImageStore(tmp_path, 60), dict(max_queue=4, max_batch=1))
        worker = asyncio.ensure_future(service.batcher.run_forever())
        sessions = Sessions(ttl=0.2)
        session = await sessions.open("")
        slow = task(small_png(), settings={"steps": 1000, "seed": 0})
        job = asyncio.ensure_future(service.answer(slow, Caller("", "", connection=session)))
        session.track(job)
        while not service.batcher.running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        await sessions.purge()
        stopped_at = time.monotonic()
        while service.batcher.running or service.in_flight:
            assert time.monotonic() < stopped_at + 10, "the expired session's task ran on"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        record = await service.records.get("", slow["taskUUID"])
        worker.cancel()
        service.batcher.close()
        return job.cancelled(), len(sessions), record

    assert asyncio.run(main()) == (True, 0, None)
