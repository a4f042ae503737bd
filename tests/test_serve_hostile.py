"""`python -m latentup.serve` against a hostile client on loopback (issues 29 and 30): every case is replayed against
a real server process and followed by a `ping` that must be answered."""

import asyncio
import base64
import contextlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import websockets
from PIL import Image

from conftest import REPO
from test_serve import BEARER, KEY, pipeline_dir, post, start_server, task, wait_in_flight  # noqa: F401
from test_tasks import png_base64

OTHER = "other-key"  # a second tenant
PING = {"taskType": "ping", "ping": True}


def ping_ok(base) -> None:
    assert post(base, [PING]).json() == {"data": [{"taskType": "ping", "pong": True}]}


def succeeded(response) -> dict:
    """The one item of a REST answer that must be a success (REST always has "data": errors are checked too)."""
    body = response.json()
    assert response.status_code == 200 and "errors" not in body and body["data"][0]["status"] == "success", body
    return body["data"][0]


def rss_peak_mb(process) -> float:
    for line in open(f"/proc/{process.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def small_png(size=(64, 48), colour=(200, 90, 30)) -> str:
    return png_base64(Image.new("RGB", size, colour))


def ws_url(base) -> str:
    return base.replace("http", "ws") + "/v1"


async def authenticate(url, key=KEY, session=None, extra=()):
    ws = await websockets.connect(url, max_size=None)
    auth = {"taskType": "authentication", "apiKey": key, **({"connectionSessionUUID": session} if session else {})}
    await ws.send(json.dumps([auth, *extra]))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return ws, reply["data"][0]["connectionSessionUUID"]


async def receive_until(ws, task_uuid, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        item = (got.get("data") or got.get("errors"))[0]
        if item.get("taskUUID") == task_uuid:
            return got


def raw_http(base, head: str, body: bytes = b"", timeout=5.0) -> bytes:
    """Send a hand-made request (possibly announcing more body than sent); the first bytes answered."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(head.encode() + b"\r\n" + body)
        try:
            return conn.recv(65536)
        except socket.timeout:
            return b""


@pytest.fixture(scope="module")
def store_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("tmpdir")


@pytest.fixture(scope="module")
def server(pipeline_dir, store_tmp):  # noqa: F811
    """The main server: two keys, small caps, allowed fetches from loopback ports (127.0.0.2 on its default port only,
    localhost only by name)."""
    saved = dict(os.environ)
    os.environ.update(LATENTUP_API_KEYS=OTHER, TMPDIR=str(store_tmp))
    try:
        process, base = start_server(pipeline_dir, "fetch_hosts=[127.0.0.1:*,127.0.0.2,localhost:*]", "max_queue=4",
                                     "max_prompt_chars=1000", "max_step_megapixels=50", "max_inflight_per_key=8",
                                     "max_inflight_per_connection=3", "auth_timeout=2", "max_auth_kb=64",
                                     "drain_timeout=4", "fetch_timeout=5")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield process, base
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


# ---- issue 29 -------------------------------------------------------------------------------------------------------
def test_tenants_kept_apart(server):
    """29.1: another key can neither read an async result, nor use an upload, nor resume a session of the first."""
    _, base = server
    other = {"Authorization": f"Bearer {OTHER}"}
    later = task(small_png(), deliveryMethod="async")
    assert post(base, [later]).json()["data"][0]["status"] == "processing"
    poll = [{"taskType": "getResponse", "taskUUID": later["taskUUID"]}]
    for _ in range(300):
        if post(base, poll).json()["data"][0]["status"] == "success":
            break
        time.sleep(0.1)
    stolen = post(base, poll, headers=other).json()["errors"][0]
    assert stolen["code"] == "taskNotFound"
    own = post(base, [later], headers=other)  # its own task under the same UUID: no conflict
    assert own.status_code == 200 and own.json() == {"data": [{"taskType": "upscale", "taskUUID": later["taskUUID"],
                                                               "status": "processing"}]}
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": small_png()}
    image_uuid = post(base, [upload]).json()["data"][0]["imageUUID"]
    used = post(base, [task(image_uuid)], headers=other).json()["errors"][0]
    assert used["parameter"] == "inputs.image" and "no image" in used["message"]

    async def sessions():
        first, uuid1 = await authenticate(ws_url(base))
        second, uuid2 = await authenticate(ws_url(base), OTHER, uuid1)
        await first.close()
        await second.close()
        return uuid1, uuid2

    uuid1, uuid2 = asyncio.run(sessions())
    assert uuid1 != uuid2
    ping_ok(base)


def test_flood_keeps_memory_bounded(server):
    """29.2: 100 tasks with large (compressible) images in one message reserve their queue places before any is
    decoded: the server's peak RSS barely moves; then records, queue and sessions are back to small."""
    process, base = server
    big = small_png((1024, 1024))  # a few KB of PNG, 3 MB decoded
    before = rss_peak_mb(process)
    answers = post(base, [task(big, settings={"steps": 20, "seed": s}) for s in range(100)]).json()
    after = rss_peak_mb(process)
    codes = sorted(e["code"] for e in answers["errors"])
    assert codes.count("queueFull") >= 96 and after - before < 100, (before, after, set(codes))
    health = httpx.get(f"{base}/health").json()
    assert health["queued"] == 0 and health["inFlight"] == 0 and health["records"] < 50
    ping_ok(base)


def test_no_work_before_authentication(server):
    """29.3: a wrong Bearer key is refused before the (announced 50 MB) body arrives; without a key the body may
    hold max_auth_kb; `Authorization: KEY` without Bearer is refused (30.8); a silent WebSocket is closed after
    auth_timeout and a large first frame is refused."""
    _, base = server
    head = "POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n"
    start = time.monotonic()
    assert raw_http(base, head + "Authorization: Bearer nope\r\n").startswith(b"HTTP/1.1 401")
    assert time.monotonic() - start < 3
    assert raw_http(base, head, b"[" + b" " * 100_000).startswith(b"HTTP/1.1 413")
    start = time.monotonic()  # without a key, a body that does not arrive is cut after auth_timeout (2 s)
    assert raw_http(base, head, b"[" + b" " * 1000, timeout=8).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < 4
    bare = post(base, [PING], headers={"Authorization": KEY})
    assert bare.status_code == 401 and "Bearer" in bare.json()["errors"][0]["message"]

    async def sockets():
        start = time.monotonic()
        async with websockets.connect(ws_url(base)) as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))["errors"][0]
            waited = time.monotonic() - start
        async with websockets.connect(ws_url(base), max_size=None) as ws:
            await ws.send("[" + " " * 200_000 + "]")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        return error, waited, closed.value.rcvd.code

    error, waited, code = asyncio.run(sockets())
    assert error["code"] == "missingApiKey" and waited < 5 and code == 1009
    ping_ok(base)


def test_cost_bounded(server):
    """29.4: a 1 MB prompt is refused at once; steps x pixels is capped; one key holds at most its in-flight cap;
    a task whose REST client left stops running."""
    _, base = server
    start = time.monotonic()
    long = post(base, [task(small_png(), settings={"positivePrompt": "a" * 2**20, "steps": 2})]).json()["errors"][0]
    assert long["parameter"] == "settings.positivePrompt" and time.monotonic() - start < 3
    costly = post(base, [task(small_png((512, 512)), settings={"steps": 1000})]).json()["errors"][0]
    assert costly["parameter"] == "settings.steps" and "step-megapixels" in costly["message"]

    async def per_connection():
        ws, _ = await authenticate(ws_url(base))
        tasks = [task(small_png(), settings={"steps": 2, "seed": s}) for s in range(5)]
        await ws.send(json.dumps(tasks))
        got = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(5)]
        await ws.close()
        return sorted(m["errors"][0]["code"] if "errors" in m else "ok" for m in got)

    assert asyncio.run(per_connection()) == ["ok"] * 3 + ["rateLimitExceeded"] * 2
    slow = task(small_png(), settings={"steps": 1000})
    client = httpx.Client(timeout=2)
    with pytest.raises(httpx.TimeoutException):
        client.post(f"{base}/v1", json=[slow], headers=BEARER)
    client.close()
    deadline = time.monotonic() + 2  # the model stops at its next step once the client left
    while httpx.get(f"{base}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{base}/health").json()["running"] == 0, "the abandoned task kept the model busy"
    ping_ok(base)


class DroppingProxy:
    """A TCP proxy to the server that, once armed, swallows the server's next bytes and cuts both sides: the server
    has written a message into a socket its client never reads from again."""

    def __init__(self, port: int):
        self.port, self.armed, self.dropped = port, False, asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(source, sink, from_server):
            while data := await source.read(65536):
                if from_server and self.armed:
                    for end in (writer, up_writer):
                        end.transport.abort()
                    self.dropped.set()
                    return
                sink.write(data)
                await sink.drain()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True)


def test_result_sent_into_a_dropped_socket_is_delivered_on_resume(server):
    """29.5: the result goes out into a socket whose client is gone (the server's write succeeded); the client
    resumes its session and gets it."""
    _, base = server
    job = task(small_png(), settings={"steps": 30, "seed": 1})

    async def main():
        proxy = DroppingProxy(int(base.rpartition(":")[2]))
        port = await proxy.start()
        ws, session = await authenticate(f"ws://127.0.0.1:{port}/v1")
        await ws.send(json.dumps([job]))
        await asyncio.to_thread(wait_in_flight, base)
        proxy.armed = True
        await asyncio.wait_for(proxy.dropped.wait(), 60)
        resumed, same = await authenticate(ws_url(base), session=session)
        got = await receive_until(resumed, job["taskUUID"], 30)
        await resumed.close()
        return same == session, got

    same, got = asyncio.run(main())
    assert same and got["data"][0]["status"] == "success"
    ping_ok(base)


def test_url_allow_list_checks_ports_addresses_and_syntax(server):
    """29.6: a listed name resolving to loopback, a port not listed and a malformed URL are clean errors."""
    _, base = server
    port = base.rpartition(":")[2]
    for url, reason in ((f"http://localhost:{port}/health", "non-public address"),
                        (f"http://127.0.0.2:{port}/health", f"port {port}"),
                        ("http://[::1", "not a valid URL")):
        response = post(base, [task(url)])
        error = response.json()["errors"][0]
        assert response.status_code == 400 and reason in error["message"], (url, error)
    ping_ok(base)


# ---- issue 30 -------------------------------------------------------------------------------------------------------
def test_lone_surrogates_are_answered(server):
    """30.1: an echoed lone surrogate neither fails a REST request nor blocks a WebSocket session."""
    _, base = server
    body = '[{"taskType":"ping"},{"taskType":"\\ud800","taskUUID":"%s"},{"taskType":"upscale","taskUUID":"%s",' \
           '"settings":{"\\udfff":1},"inputs":{"image":"x"}}]' % (uuid.uuid4(), uuid.uuid4())
    response = httpx.post(f"{base}/v1", content=body, headers=BEARER)
    assert response.status_code == 200 and len(response.json()["errors"]) == 2
    assert response.json()["data"] == [{"taskType": "ping", "pong": True}]

    async def main():
        ws, _ = await authenticate(ws_url(base))
        await ws.send(body)
        got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(3)]
        await ws.close()
        return got

    assert sum("errors" in m for m in asyncio.run(main())) == 2
    ping_ok(base)


def test_mpo_upload_is_answered(server):
    """30.2: a multi-picture JPEG is stored (as its first picture, decoded)."""
    _, base = server
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32))])
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
              "image": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()}
    item = httpx.post(f"{base}/v1", json=[upload], headers=BEARER, timeout=10).json()["data"][0]
    assert Image.open(io.BytesIO(httpx.get(item["imageURL"]).content)).size == (32, 32)
    ping_ok(base)


def test_task_beside_authentication_is_answered(server):
    """30.3: the protocol allows tasks in the authenticating message."""
    _, base = server

    async def main():
        ws, _ = await authenticate(ws_url(base), extra=[PING])
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.close()
        return got

    assert asyncio.run(main()) == {"data": [{"taskType": "ping", "pong": True}]}
    ping_ok(base)


def test_uploads_are_stored_as_decoded(server, store_tmp):
    """30.5: trailing junk is not stored nor served; images are served with nosniff; a text/html data URI is
    refused; an image whose file went away (evicted between the index and the file) is a 404, not a 500."""
    _, base = server
    junk = base64.b64decode(small_png()) + b"<html><script>alert(1)</script>" + b"x" * 100_000
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": base64.b64encode(junk).decode()}
    item = post(base, [upload]).json()["data"][0]
    served = httpx.get(item["imageURL"])
    assert b"<html>" not in served.content and len(served.content) < 10_000
    assert served.headers["content-type"] == "image/png" and served.headers["x-content-type-options"] == "nosniff"
    [stored] = store_tmp.glob(f"latentup-serve-*/{item['imageURL'].rpartition('/')[2]}")
    stored.unlink()
    gone = httpx.get(item["imageURL"])
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "taskNotFound"
    html = {**upload, "taskUUID": str(uuid.uuid4()), "image": "data:text/html;base64," + small_png()}
    assert "text/html" in post(base, [html]).json()["errors"][0]["message"]
    ping_ok(base)


def test_settings_range_checked_and_unknown_inputs_refused(server):
    """30.6 (the text-free half is in test_text_free_weights_warn): clipSkip and CFGScale have ranges; unknown
    `inputs.*` are refused by name."""
    _, base = server
    for fields, parameter in (({"settings": {"clipSkip": 99}}, "settings.clipSkip"),
                              ({"settings": {"CFGScale": 1e308}}, "settings.CFGScale"),
                              ({"inputs": {"image": small_png(), "mask": small_png()}}, "inputs.mask")):
        assert post(base, [task(small_png(), **fields)]).json()["errors"][0]["parameter"] == parameter
    ping_ok(base)


class Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(40):  # one byte every 0.25 s: 10 s, under the fetch's 2 x fetch_timeout
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.25)

    def log_message(self, *args):
        pass


def test_slow_fetches_do_not_starve_other_work(server):
    """30.7: six slow-drip fetches in flight; an unrelated upload and upscale still take well under a second each."""
    _, base = server
    drip = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    slow = [task(f"http://127.0.0.1:{drip.server_port}/{i}.png") for i in range(6)]
    try:
        with httpx.Client(timeout=60) as client:
            threads = [threading.Thread(target=client.post, args=(f"{base}/v1",),
                                        kwargs={"json": [t], "headers": {"Authorization": f"Bearer {OTHER}"}})
                       for t in slow]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            start = time.monotonic()
            succeeded(post(base, [task(small_png())]))
            took = time.monotonic() - start
            for thread in threads:
                thread.join(30)
    finally:
        drip.shutdown()
    assert took < 3, took
    ping_ok(base)


def test_leftovers(server):
    """30.8: a rejected task's taskUUID can be sent again; the same key takes a live session over (the old socket
    is closed, answers go to the new one); an aborted upload logs one line (checked at shutdown)."""
    _, base = server
    job = task(small_png(), outputFormat="BMP")
    assert post(base, [job]).json()["errors"][0]["parameter"] == "outputFormat"
    succeeded(post(base, [{**job, "outputFormat": "PNG"}]))

    async def takeover():
        old, session = await authenticate(ws_url(base))
        new, same = await authenticate(ws_url(base), session=session)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(old.recv(), 10)
        await new.send(json.dumps([PING]))
        got = json.loads(await asyncio.wait_for(new.recv(), 10))
        await new.close()
        return same == session, closed.value.rcvd.code, got

    same, code, got = asyncio.run(takeover())
    assert same and code == 4000 and got["data"][0]["pong"]
    head = ("POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n"
            f"Authorization: Bearer {KEY}\r\n")
    raw_http(base, head, b"[" + b" " * 10_000, timeout=0.5)
    ping_ok(base)


def test_sigterm_on_a_stuck_server_exits_0_and_removes_the_store(server, store_tmp):
    """Last of the main server (30.4, 29.5): a task holds the model; SIGTERM drains for drain_timeout (4 s), stops
    it, removes the temporary store and exits 0; the log holds no traceback."""
    process, base = server
    assert list(store_tmp.glob("latentup-serve-*"))
    threading.Thread(target=post, args=(base, [task(small_png(), settings={"steps": 1000})]), daemon=True).start()
    wait_in_flight(base)
    host, port = base.removeprefix("http://").split(":")
    drip = socket.create_connection((host, int(port)))  # an authenticated body that never ends
    drip.sendall(f"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nAuthorization: Bearer {KEY}\r\n"
                 "\r\n[".encode())
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        for _ in range(10):
            try:
                drip.sendall(b" ")
            except OSError:  # the server closed it
                break
            time.sleep(0.2)
        assert process.wait(timeout=30) == 0 and time.monotonic() - start < 4 + 5
    finally:
        drip.close()
    assert not list(store_tmp.glob("latentup-serve-*"))
    log = process.stderr.read()
    assert "Traceback" not in log and log.count("left during its upload") == 1, log


# ---- more servers: text-free weights on 0.0.0.0, broken weights ---------------------------------------------------
def launch(*args, env=None, keys=(KEY,)):
    """(process, base URL on 127.0.0.1) of a server started with these arguments on any host."""
    process = subprocess.Popen([sys.executable, "-m", "latentup.serve", "port=0", f"api_keys=[{','.join(keys)}]",
                                *args],
                               cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("serving on http://"), process.stderr.read()
    return process, "http://127.0.0.1:" + line.split()[2].rpartition(":")[2]


def test_text_free_weights_on_a_public_host(tmp_path):
    """30.6, 29.6, 29.2, 30.8: with the bundled text-free weights, prompts and guidance come back as warnings;
    on host=0.0.0.0 the imageURLs are the client's own address, not 0.0.0.0; an earlier run's files in store_dir
    are deleted and the store keeps under store_max_mb; an async base64 answer expires with its output; SIGTERM
    with a detached session owing a result still exits at once."""
    leftover = tmp_path / f"{uuid.uuid4()}.png"
    leftover.write_bytes(b"old")
    process, base = launch("host=0.0.0.0", f"store_dir={tmp_path}", "store_max_mb=0.05", "output_ttl=4",
                           "drain_timeout=30")
    try:
        assert not leftover.exists()
        item = post(base, [task(small_png(), settings={"steps": 1, "positivePrompt": "a", "CFGScale": 5},
                                outputType="URL")]).json()["data"][0]
        assert item["imageURL"].startswith(base + "/image/")
        assert [w.split()[0] for w in item["warnings"]] == ["settings.positivePrompt", "settings.CFGScale"]
        for seed in range(6):  # the store evicts the images closest to expiry to stay under 50 KB
            post(base, [task(small_png((96, 96)), settings={"steps": 1, "seed": seed}, outputType="URL",
                             outputFormat="PNG")])
        assert httpx.get(f"{base}/health").json()["storedBytes"] <= 0.05 * 2**20
        later = task(small_png(), settings={"steps": 1}, deliveryMethod="async")
        post(base, [later])
        poll = [{"taskType": "getResponse", "taskUUID": later["taskUUID"]}]
        for _ in range(300):
            if post(base, poll).json()["data"][0]["status"] != "processing":
                break
            time.sleep(0.1)
        time.sleep(4.5)
        assert post(base, poll).json()["errors"][0]["code"] == "taskNotFound"
        ping_ok(base)

        async def leave_a_result_behind():
            ws, _ = await authenticate(ws_url(base))
            await ws.send(json.dumps([task(small_png(), settings={"steps": 20})]))
            await ws.close()

        asyncio.run(leave_a_result_behind())
        time.sleep(1.0)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0 and time.monotonic() - start < 10
    finally:
        if process.poll() is None:
            process.kill()


def test_model_failure_is_a_server_error(pipeline_dir, tmp_path):  # noqa: F811
    """29.6, 30.4: weights that pass the loader's checks but overflow to inf give internalError (500), not the
    client's invalidParameter; the server keeps answering; without API keys (on loopback) a REST body may be as
    large as max_request_mb (a 1 MB upload without an Authorization header); an idle SIGTERM exits 0 at once."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(pipeline_dir, tmp_path / "broken")
    [weights] = (broken / "unet").glob("*.safetensors")
    tensors = load_file(weights)
    tensors = {name: t.fill_(3e38) if name.startswith("conv_out") else t for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    process, base = launch(f"weights={broken}", env={"TMPDIR": str(tmp_path)}, keys=())
    try:
        noise = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))
        upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": png_base64(noise)}
        assert len(upload["image"]) > 2**20
        answer = httpx.post(f"{base}/v1", json=[upload], timeout=60)
        assert answer.status_code == 200 and answer.json()["data"][0]["imageUUID"], answer.text[:300]
        response = post(base, [task(small_png())])
        assert response.status_code == 500 and response.json()["errors"][0]["code"] == "internalError"
        ping_ok(base)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0 and time.monotonic() - start < 5
        assert not list(tmp_path.glob("latentup-serve-*"))
    finally:
        if process.poll() is None:
            process.kill()
