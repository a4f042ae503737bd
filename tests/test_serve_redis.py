"""Many replicas of `python -m latentup.serve` sharing one real `redis-server` (issue 28): uploads, results, sessions,
taskUUIDs, caps and keys span replicas; a replica killed holding a task loses nothing; a Redis restart is survived.
The tests drive two replicas on loopback with a tiny random-weight model (A with a model worker, B a front-end
only, model_workers=0); redis-server runs on a free port in
a temporary folder (Debian's package, installed by .ci/run: these tests fail, never skip, without it)."""

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from PIL import Image

from conftest import REPO
from test_serve import KEY, KILLED_CLIENT, pipeline_dir, post, start_server, task  # noqa: F401
from test_serve_hostile import OTHER, authenticate, receive_until, small_png, ws_url
from test_serve_state import CAPS, check_inflight_cap, check_record_cap, check_session_buffer_cap, wait_idle

OTHER_BEARER = {"Authorization": f"Bearer {OTHER}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of its own on a free loopback port, its append-only file in ``folder`` (so a restart keeps
    what was accepted)."""

    def __init__(self, folder):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server (.ci/run does)")
        self.folder, self.port, self.process = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--dir", str(self.folder), "--save", "", "--appendonly", "yes",
                                         "--appendfsync", "always"], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def replica(pipeline_dir, url, *overrides):  # noqa: F811
    saved = dict(os.environ)
    os.environ["LATENTUP_API_KEYS"] = OTHER
    try:
        return start_server(pipeline_dir, f"redis_url={url}", "redis_claim_after=2", *overrides)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stop(process) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(pipeline_dir, redis_server):  # noqa: F811
    with ThreadPoolExecutor(2) as pool:  # started side by side; B is a front-end only: A's worker runs every task
        started = list(pool.map(lambda workers: replica(pipeline_dir, redis_server.url, *CAPS,
                                                        f"model_workers={workers}"), (1, 0)))
    yield [base for _, base in started]
    for process, _ in started:
        stop(process)


def until_answered(base, task_uuid, headers=None, timeout=60.0) -> dict:
    """getResponse on ``base`` until the task is no longer processing."""
    deadline = time.monotonic() + timeout
    while True:
        got = post(base, [{"taskType": "getResponse", "taskUUID": task_uuid}], **({"headers": headers} if headers
                                                                                  else {})).json()
        item = (got.get("data") or got.get("errors"))[0]
        if item.get("status") != "processing":
            return item
        assert time.monotonic() < deadline, "never answered"
        time.sleep(0.1)


def test_upload_on_a_upscaled_on_b(replicas):
    """An upload on A is an input on B (for its key only); the output's URL is served by both."""
    a, b = replicas
    upload = post(a, [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": small_png()}]).json()
    image_uuid = upload["data"][0]["imageUUID"]
    item = post(b, [task(image_uuid, outputType="URL")]).json()["data"][0]
    assert item["status"] == "success" and item["inputImageUUID"] == image_uuid
    name = item["imageURL"].rpartition("/")[2]
    for base in (a, b):
        got = httpx.get(f"{base}/image/{name}")
        assert got.status_code == 200 and got.headers["content-type"] == "image/png" and got.content
    foreign = post(b, [task(image_uuid)], headers=OTHER_BEARER).json()["errors"][0]
    assert foreign["code"] == "invalidParameter"  # another key's upload is no input of this one
    assert httpx.get(f"{b}/health").json()["tasksRun"] == 0  # B runs no model: A's worker ran it


def test_async_on_a_answered_on_b(replicas):
    """An async task accepted by A is answered by getResponse on B, and to its own key only."""
    a, b = replicas
    one = task(small_png(), deliveryMethod="async")
    assert post(a, [one]).json()["data"][0]["status"] == "processing"
    item = until_answered(b, one["taskUUID"])
    assert item["status"] == "success" and item["imageBase64Data"]
    assert until_answered(b, one["taskUUID"], OTHER_BEARER)["code"] == "taskNotFound"


def test_task_uuid_conflict_across_replicas(replicas):
    """A taskUUID used on A is a conflict on B for the same key, and free for another key."""
    a, b = replicas
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": small_png()}
    assert "imageUUID" in post(a, [upload]).json()["data"][0]
    assert post(b, [upload]).json()["errors"][0]["code"] == "conflictTaskUUID"
    assert "imageUUID" in post(b, [upload], headers=OTHER_BEARER).json()["data"][0]


def test_session_resumed_on_b(replicas):
    """A WebSocket client killed while its task runs on A resumes its session on B and gets the answer once."""
    a, b = replicas
    slow = task(small_png(), outputType="URL", settings={"steps": 40, "seed": 5})  # fits the 2 kB session cap
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, ws_url(a), KEY, json.dumps([slow])],
                              stdout=subprocess.PIPE, text=True)
    session = client.stdout.readline().strip()
    deadline = time.monotonic() + 30
    while not httpx.get(f"{a}/health").json()["inFlight"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=30)

    async def resume():
        ws, resumed = await authenticate(ws_url(b), session=session)
        try:
            assert resumed == session
            messages = [await receive_until(ws, slow["taskUUID"])]
            await ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
            while "pong" not in (messages[-1].get("data") or [{}])[0]:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return messages
        finally:
            await ws.close()

    messages = asyncio.run(resume())
    results = [m for m in messages if (m.get("data") or [{}])[0].get("taskUUID") == slow["taskUUID"]]
    assert len(results) == 1 and results[0]["data"][0]["imageURL"], messages


def test_sdk_through_a_front_end(replicas, tmp_path):
    """The official SDK on B (a front-end only): a local file (imageUpload, then upscale) is answered through the
    session from A's worker."""
    from runware import IImageUpscale, Runware

    _, b = replicas
    Image.open(io.BytesIO(base64.b64decode(small_png()))).save(tmp_path / "small.png")

    async def main():
        client = Runware(api_key=KEY, url=b.replace("http", "ws"))
        await asyncio.wait_for(client.connect(), 30)
        try:
            return await asyncio.wait_for(client.imageUpscale(upscaleGanPayload=IImageUpscale(
                inputImage=str(tmp_path / "small.png"), upscaleFactor=2, model="runware:502@1",
                settings={"steps": 2, "seed": 1}, outputType="base64Data", outputFormat="PNG")), 60)
        finally:
            await client.disconnect()

    [image] = asyncio.run(main())
    assert Image.open(io.BytesIO(base64.b64decode(image.imageBase64Data))).size == (128, 96)


def test_record_cap_across_replicas(replicas):
    check_record_cap(*replicas)


def test_inflight_cap_across_replicas(replicas):
    check_inflight_cap(*replicas)


def test_session_buffer_cap_across_replicas(replicas):
    check_session_buffer_cap(*replicas)


def test_killed_replica_loses_no_task(pipeline_dir, redis_server):  # noqa: F811
    """A replica SIGKILLed while its worker holds an accepted async task and a WebSocket client's sync task: another
    replica takes both over after redis_claim_after (2 s) and answers each once (getResponse; the session resumed
    there); the stream ends empty."""
    url = redis_server.url.replace("/0", "/1")  # a database of its own: no other worker takes the tasks
    first, a = replica(pipeline_dir, url)
    kept = task(small_png(), deliveryMethod="async", settings={"steps": 400, "seed": 1})
    sync = task(small_png(), outputType="URL", settings={"steps": 400, "seed": 2})

    async def run():
        ws, session = await authenticate(ws_url(a))
        await ws.send(json.dumps([sync]))
        assert post(a, [kept]).json()["data"][0]["status"] == "processing"
        deadline = time.monotonic() + 30
        while not httpx.get(f"{a}/health").json()["running"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        second, b = await asyncio.to_thread(replica, pipeline_dir, url)
        try:
            ws, resumed = await authenticate(ws_url(b), session=session)
            assert resumed == session
            answers = [await receive_until(ws, sync["taskUUID"], timeout=120)]
            await ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
            while "pong" not in (answers[-1].get("data") or [{}])[0]:
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.close()
            item = await asyncio.to_thread(until_answered, b, kept["taskUUID"], None, 120)
            return answers, item, httpx.get(f"{b}/health").json()["tasksRun"]
        finally:
            stop(second)

    try:
        answers, item, run_there = asyncio.run(run())
    finally:
        stop(first)
    assert item["status"] == "success" and item["imageBase64Data"], item
    assert [m["data"][0]["status"] for m in answers[:-1]] == ["success"], answers  # once
    assert run_there == 2
    client = redis.Redis(port=redis_server.port, db=1)
    assert client.xlen("latentup:tasks") == 0 and client.xpending("latentup:tasks", "workers")["pending"] == 0


def test_a_claim_is_answered_once(redis_server):
    """Two finishes of one claim (two workers ran the task, or a front-end timed it out as a worker finished it):
    the first wins, and only it reaches the task's session; a finish of an older claim of the same UUID is
    ignored."""
    from latentup.serve.redis_link import Link
    from latentup.serve.redis_records import RedisRecords
    from latentup.serve.redis_sessions import RedisSessions

    async def main():
        link = Link(redis_server.url.replace("/0", "/2"))
        records = RedisRecords(link, 10, 10, 60, 2**20)
        session = await RedisSessions(link, 60, 2**20, 40, 10).open("k")
        token = await records.claim("k", "u", "upscale", False)
        answers = [{"data": [{"taskType": "upscale", "taskUUID": "u", "n": n}]} for n in (1, 2)]
        won = [await records.finish("k", "u", token, answer, 60, session.uuid) for answer in answers]
        waiting = await link.aio.lrange(session.keys[1], 0, -1)
        stale = await records.finish("k", "u", "an older claim", answers[1], 60)
        record = await records.get("k", "u")
        await link.aio.aclose()
        return won, [json.loads(text)["data"][0]["n"] for text in waiting], stale, record.answer

    won, waiting, stale, answer = asyncio.run(main())
    assert won == [True, False] and waiting == [1] and not stale and answer["data"][0]["n"] == 1


def test_expired_shared_session_stops_its_tasks(redis_server):
    """A detached session that expired in Redis: the replica where its tasks run stops them at its next purge."""
    from latentup.serve.redis_link import Link
    from latentup.serve.redis_sessions import RedisSessions

    async def main():
        link = Link(redis_server.url.replace("/0", "/2"))
        sessions = RedisSessions(link, 0.2, 2**20, 40, 10)
        session = await sessions.open("k")
        job = asyncio.ensure_future(asyncio.sleep(60))
        session.track(job)
        await sessions.purge()
        alive = not job.done()
        await asyncio.sleep(0.4)
        await sessions.purge()
        await asyncio.sleep(0)
        await link.aio.aclose()
        return alive, job.cancelled(), len(sessions)

    assert asyncio.run(main()) == (True, True, 0)


def test_redis_down_at_start_is_one_line_and_exit_2(pipeline_dir):  # noqa: F811
    """Also the environment's LATENTUP_REDIS_URL is used."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = subprocess.run([sys.executable, "-m", "latentup.serve", f"weights={pipeline_dir}", "port=0"], cwd=REPO,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "LATENTUP_REDIS_URL": url})
    assert process.returncode == 2 and process.stdout == ""
    assert process.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:")
    assert process.stderr.count("\n") == 1


def test_redis_restarted(replicas, redis_server):
    """Redis stopped under two serving replicas: tasks get serviceUnavailable (503), an async task accepted before
    stays accepted; Redis back (its append-only file kept): both replicas serve again and the task is answered."""
    a, b = replicas
    wait_idle(a, b)
    one = task(small_png(), deliveryMethod="async", settings={"steps": 400, "seed": 2})
    assert post(a, [one]).json()["data"][0]["status"] == "processing"
    redis_server.stop()  # while the task runs
    try:
        refused = post(b, [task(small_png())])
        assert refused.status_code == 503 and refused.json()["errors"][0]["code"] == "serviceUnavailable"
        asked = post(b, [{"taskType": "getResponse", "taskUUID": one["taskUUID"]}]).json()
        assert asked["errors"][0]["code"] == "serviceUnavailable"
        assert post(a, [{"taskType": "ping", "ping": True}]).json()["data"][0]["pong"]
        health = httpx.get(f"{a}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
    finally:
        redis_server.start()
    deadline = time.monotonic() + 60
    while True:  # the replicas reconnect on their own
        answer = post(b, [task(small_png())]).json()
        if "data" in answer and answer["data"]:
            break
        assert answer["errors"][0]["code"] == "serviceUnavailable" and time.monotonic() < deadline
        time.sleep(0.2)
    assert answer["data"][0]["status"] == "success"
    assert post(a, [task(small_png())]).json()["data"][0]["status"] == "success"
    assert until_answered(b, one["taskUUID"], timeout=120)["status"] == "success"


def test_session_buffer_capped_while_held(redis_server):
    """The session_buffer cap holds while a socket holds the session too (a client that does not read its
    answers): beyond it, each answer waits as a short sessionBufferFull error."""
    from latentup.serve.redis_link import Link
    from latentup.serve.redis_sessions import RedisSessions

    async def main():
        link = Link(redis_server.url.replace("/0", "/2"))
        session = await RedisSessions(link, 60, 1000, 40, 10).open("k")
        await link.aio.hset(session.keys[0], "holder", "a-replica-elsewhere")
        for n in range(5):
            await session.deliver({"data": [{"taskType": "upscale", "taskUUID": str(n), "pad": "x" * 300}]})
        waiting = [json.loads(text) for text in await link.aio.lrange(session.keys[1], 0, -1)]
        await link.aio.aclose()
        return ["data" if "data" in m else m["errors"][0]["code"] for m in waiting]

    assert asyncio.run(main()) == ["data"] * 2 + ["sessionBufferFull"] * 3


@pytest.fixture(scope="module")
def lone(pipeline_dir, tmp_path_factory):  # noqa: F811
    """A redis-server of its own (restarted empty by the last test) and a replica with a model worker on it."""
    server = RedisServer(tmp_path_factory.mktemp("lone-redis"))
    server.start()
    process, base = replica(pipeline_dir, server.url, "drain_timeout=1")
    yield server, base
    stop(process)
    server.stop()


def test_stopped_front_end_leaves_its_queued_task_to_the_worker(pipeline_dir, lone):  # noqa: F811
    """A front-end stopped (SIGTERM) while its async task waits in the stream behind a busy worker: the worker
    answers the task, and getResponse on another replica returns the real answer, not serverShuttingDown."""
    server, a = lone
    front, b = replica(pipeline_dir, server.url, "model_workers=0", "drain_timeout=1")
    busy = ThreadPoolExecutor(1)
    try:
        busy.submit(post, a, [task(small_png(), settings={"steps": 400, "seed": 1})])
        deadline = time.monotonic() + 30
        while not httpx.get(f"{a}/health").json()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        later = task(small_png(), deliveryMethod="async", settings={"steps": 2, "seed": 2})
        assert post(b, [later]).json()["data"][0]["status"] == "processing"
        front.send_signal(signal.SIGTERM)
        assert front.wait(timeout=30) == 0
        item = until_answered(a, later["taskUUID"], timeout=120)
        assert item["status"] == "success" and item["imageBase64Data"], item
    finally:
        busy.shutdown()
        stop(front)


def test_malformed_stream_entry_is_acknowledged(lone):
    """An entry the worker cannot read is answered (its claim gets internalError) and acknowledged once, not taken
    over again and again; the worker goes on serving."""
    server, a = lone
    client = redis.Redis(port=server.port)
    client.xadd("latentup:tasks", {"owner": "nobody", "uuid": str(uuid.uuid4()), "token": "t", "task": "{not json"})
    client.xadd("latentup:tasks", {"what": "no fields of ours"})
    deadline = time.monotonic() + 20
    while client.xlen("latentup:tasks") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.xlen("latentup:tasks") == 0 and client.xpending("latentup:tasks", "workers")["pending"] == 0
    assert post(a, [task(small_png())]).json()["data"][0]["status"] == "success"


def test_session_survives_redis_restarted_empty(lone):
    """Redis restarted WITHOUT its data under a live WebSocket: the session's hash is gone, yet the next sync
    answer on that socket arrives (the replica holding it recreates it), not silently dropped."""
    server, a = lone
    first, second = (task(small_png(), settings={"steps": 2, "seed": s}) for s in (1, 2))

    async def main():
        ws, _ = await authenticate(ws_url(a))
        await ws.send(json.dumps([first]))
        before = await receive_until(ws, first["taskUUID"])
        server.stop()
        shutil.rmtree(server.folder)
        server.folder.mkdir()
        server.start()
        deadline = time.monotonic() + 60
        while "data" not in (await asyncio.to_thread(post, a, [task(small_png())])).json():  # back to serving
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await ws.send(json.dumps([second]))
        after = await receive_until(ws, second["taskUUID"], timeout=30)
        await ws.close()
        return before, after

    before, after = asyncio.run(main())
    assert before["data"][0]["status"] == "success" and after["data"][0]["status"] == "success", after
