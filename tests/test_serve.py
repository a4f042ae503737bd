"""`python -m latentup.serve` on loopback with a small random-weight model, driven by the official SDK (`runware`
0.5.24), by hand over REST and by raw WebSockets (issue 22)."""

import asyncio
import base64
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from conftest import REPO, SHARED
from pipeline_fixtures import make_diffusers_pipeline
from test_tasks import bad_tasks, png_base64

KEY = "test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
os.environ.setdefault("RUNWARE_IMAGE_OPERATION_TIMEOUT", "60000")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_diffusers_pipeline(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def upscaler(pipeline_dir):
    from latentup.pipeline import Upscaler

    return Upscaler.from_pretrained(pipeline_dir, dtype="float32")


def start_server(pipeline_dir, *overrides):
    """(process, http base URL) of a server on a free loopback port, once it printed its ready line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "latentup.serve", f"weights={pipeline_dir}", "port=0",
                                f"api_keys=[{KEY}]", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # blocks until ready (or the process ended)
    assert line.startswith("serving on http://127.0.0.1:"), (line, process.stderr.read() if not line else "")
    base, _, ws = line.removeprefix("serving on ").strip().partition(" ")
    assert ws == f"({base.replace('http', 'ws')}/v1)"
    return process, base


@pytest.fixture(scope="module")
def server(pipeline_dir):
    process, base = start_server(pipeline_dir, "fetch_hosts=[127.0.0.1:*]", "batch_wait=0.2", "max_batch=4",
                                 "session_ttl=60")
    yield process, base
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def task(image: str, **fields) -> dict:
    return {"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "model": "runware:502@1", "inputs": {"image": image},
            "settings": {"steps": 2, "seed": 3}, "outputType": "base64Data", "outputFormat": "PNG", **fields}


def decoded(item: dict) -> np.ndarray:
    data = item.get("imageBase64Data") or item["imageDataURI"].partition(",")[2]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


def close_to(array: np.ndarray, image: Image.Image) -> bool:
    """Equal up to float -> uint8 rounding between processes."""
    return np.abs(array - np.asarray(image, dtype=np.int16)).max() <= 1


def wait_in_flight(base, timeout=30.0):
    """Until the server has accepted a task that is not answered yet."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base}/health").json()["inFlight"] < 1:
        assert time.monotonic() < deadline, "the task never reached the server"
        time.sleep(0.01)


def post(base, tasks, headers=BEARER):
    return httpx.post(f"{base}/v1", json=tasks, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def photo():
    return Image.open(SHARED / "datasets/eval/Set5/bird.png").convert("RGB").resize((64, 48))


def test_sdk_upscale(server, upscaler, photo, tmp_path):
    """The official SDK: a local file (uploaded first with imageUpload) and a data URI, with every setting; the
    pixels equal upscale_image with the same settings and seed."""
    from runware import IImageUpscale, Runware

    _, base = server
    photo.save(tmp_path / "photo.png")
    settings = {"positivePrompt": "a bird", "negativePrompt": "blur", "steps": 3, "seed": 11, "CFGScale": 4,
                "clipSkip": 2}
    expected = upscaler.upscale_image(photo, prompt="a bird", negative_prompt="blur", steps=3, seed=11, cfg_scale=4,
                                      clip_skip=2)

    async def main():
        client = Runware(api_key=KEY, url=base.replace("http", "ws"))
        await asyncio.wait_for(client.connect(), 30)
        try:
            by_file = await asyncio.wait_for(client.imageUpscale(upscaleGanPayload=IImageUpscale(
                inputImage=str(tmp_path / "photo.png"), upscaleFactor=2, model="runware:502@1", settings=settings,
                outputType="base64Data", outputFormat="PNG", includeCost=True)), 60)
            uri = "data:image/png;base64," + png_base64(photo)
            by_uri = await asyncio.wait_for(client.imageUpscale(upscaleGanPayload=IImageUpscale(
                inputs={"image": uri}, model="runware:502@1", settings={**settings, "seed": 12},
                outputType="dataURI", outputFormat="PNG")), 60)
            return by_file[0], by_uri[0]
        finally:
            await client.disconnect()

    by_file, by_uri = asyncio.run(main())
    assert by_file.cost == 0.0 and uuid.UUID(by_file.imageUUID) and by_file.inputImageUUID  # the upload's UUID
    assert close_to(decoded({"imageBase64Data": by_file.imageBase64Data}), expected)
    other = decoded({"imageDataURI": by_uri.imageDataURI})
    assert other.shape == (96, 128, 3) and not close_to(other, expected)  # seed 12 is another image
    assert close_to(other, upscaler.upscale_image(photo, prompt="a bird", negative_prompt="blur", steps=3, seed=12,
                                                   cfg_scale=4, clip_skip=2))


def test_rest_by_hand(server, photo):
    """REST: Bearer key or an authentication task first; output types and formats; URL outputs served by GET;
    uploads and earlier outputs referable by UUID; async delivery with getResponse; URLs only from allowed hosts."""
    _, base = server
    image = png_base64(photo)
    first = task(image, outputType="URL", outputFormat="JPG", outputQuality=80)
    response = post(base, [{"taskType": "authentication", "apiKey": KEY}, first], headers={})
    assert response.status_code == 200, response.text
    auth, item = response.json()["data"]
    assert auth["taskType"] == "authentication" and item["taskUUID"] == first["taskUUID"]
    fetched = httpx.get(item["imageURL"])
    assert fetched.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(fetched.content)).size == (128, 96)
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": "data:image/png;base64," + image}
    uploaded = post(base, [upload]).json()["data"][0]
    assert httpx.get(uploaded["imageURL"]).headers["content-type"] == "image/png"
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG")
    jpeg_upload = {**upload, "taskUUID": str(uuid.uuid4()), "image": base64.b64encode(jpeg.getvalue()).decode()}
    jpeg_url = post(base, [jpeg_upload]).json()["data"][0]["imageURL"]
    # uploads are stored as decoded (issue 30): a JPEG comes back as the lossless PNG of its pixels, never sniffed
    served = httpx.get(jpeg_url)
    assert jpeg_url.endswith(".png") and served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    from_upload = task(uploaded["imageUUID"], outputType="dataURI", outputFormat="WEBP")
    from_output = task(item["imageUUID"])  # an earlier output as input (its 2x: 256 x 192)
    from_url = task(item["imageURL"])  # fetched from an allowed host
    answered = post(base, [from_upload, from_output, from_url]).json()["data"]
    assert answered[0]["imageDataURI"].startswith("data:image/webp;base64,")
    assert answered[0]["inputImageUUID"] == uploaded["imageUUID"]
    assert decoded(answered[1]).shape == (192, 256, 3) and decoded(answered[2]).shape == (192, 256, 3)
    later = task(image, deliveryMethod="async")
    ack = post(base, [later]).json()["data"][0]
    assert ack["status"] == "processing" and "imageUUID" not in ack
    poll = {"taskType": "getResponse", "taskUUID": later["taskUUID"]}
    for _ in range(200):
        result = post(base, [poll]).json()["data"][0]
        if result["status"] == "success":
            break
        time.sleep(0.1)
    assert result["status"] == "success" and result["taskUUID"] == later["taskUUID"] and "imageBase64Data" in result
    sync = post(base, [{**poll, "taskUUID": first["taskUUID"]}]).json()["errors"][0]  # answers kept for async only
    assert (sync["code"], sync["parameter"]) == ("taskNotFound", "taskUUID")


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, photo):
    _, base = server
    good = task(png_base64(photo))
    assert post(base, [good]).status_code == 200
    for bad, code, parameter in bad_tasks(good):
        response = post(base, [bad])
        errors = response.json()["errors"]
        assert response.status_code >= 400 and len(errors) == 1, (bad, response.text)
        assert (errors[0]["code"], errors[0]["parameter"]) == (code, parameter), (bad, errors)
        assert set(errors[0]) == {"code", "message", "parameter", "taskType", "taskUUID"}
    # one bad task beside a good one: the good one is answered
    mixed = post(base, [task(png_base64(photo)), task(png_base64(photo), upscaleFactor=4)]).json()
    assert len(mixed["data"]) == 1 and len(mixed["errors"]) == 1
    # wrong or missing key, not JSON, not an array, a URL off the allow-list, a redirect off it
    wrong = post(base, [good], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["errors"][0]["code"] == "invalidApiKey"
    assert post(base, [good], headers={}).json()["errors"][0]["code"] == "missingApiKey"
    for body in (b"{", b"[", b"{}", b"[]", b"[" * 100_000):
        response = httpx.post(f"{base}/v1", content=body, headers=BEARER)
        assert response.status_code == 400 and response.json()["errors"][0]["code"] == "invalidRequest"
    port = base.rpartition(":")[2]
    off_list = post(base, [task(f"http://localhost:{port}/health")]).json()["errors"][0]
    assert off_list["parameter"] == "inputs.image" and "not an allowed host" in off_list["message"]

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/health")
            self.end_headers()

        def log_message(self, *args):
            pass

    redirector = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    try:
        redirected = post(base, [task(f"http://127.0.0.1:{redirector.server_port}/a.png")]).json()["errors"][0]
        assert "localhost is not an allowed host" in redirected["message"]
    finally:
        redirector.shutdown()
    local = post(base, [task(str(SHARED / "datasets/eval/Set5/bird.png"))]).json()["errors"][0]  # never read
    assert local["parameter"] == "inputs.image" and "imageBase64Data" not in str(local)
    ping = post(base, [{"taskType": "ping", "ping": True}]).json()
    assert ping == {"data": [{"taskType": "ping", "pong": True}]}
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_batched_results_equal_single_results(server, upscaler, photo):
    """Four compatible tasks in one request run as fewer sampler calls; each equals upscale_image with its seed."""
    _, base = server
    before = httpx.get(f"{base}/health").json()
    image = png_base64(photo)
    tasks = [task(image, settings={"steps": 2, "seed": seed, "positivePrompt": "a bird", "CFGScale": 3})
             for seed in (1, 2, 3, 4)]
    data = post(base, tasks).json()["data"]
    after = httpx.get(f"{base}/health").json()
    assert after["tasksRun"] - before["tasksRun"] == 4 and after["batches"] - before["batches"] < 4
    for item, seed in zip(data, (1, 2, 3, 4)):
        assert close_to(decoded(item), upscaler.upscale_image(photo, steps=2, seed=seed, prompt="a bird", cfg_scale=3))


KILLED_CLIENT = """
import asyncio, json, sys, websockets
async def main():
    ws = await websockets.connect(sys.argv[1])
    await ws.send(json.dumps([{"taskType": "authentication", "apiKey": sys.argv[2]}]))
    print(json.loads(await ws.recv())["data"][0]["connectionSessionUUID"], flush=True)
    await ws.send(sys.argv[3])
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_killed_client_resumes_its_session(server, photo):
    """A client killed mid-task reconnects with its connectionSessionUUID and gets the result, exactly once."""
    _, base = server
    url = base.replace("http", "ws") + "/v1"
    slow = task(png_base64(photo), settings={"steps": 40, "seed": 5})
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, url, KEY, json.dumps([slow])],
                              stdout=subprocess.PIPE, text=True)
    session = client.stdout.readline().strip()
    wait_in_flight(base)  # the task is accepted and not answered yet
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=30)

    async def resume():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY, "connectionSessionUUID": session}]))
            assert json.loads(await ws.recv())["data"][0]["connectionSessionUUID"] == session
            messages = []
            while not any(m.get("data", [{}])[0].get("taskUUID") == slow["taskUUID"] for m in messages):
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            await ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return messages

    messages = asyncio.run(resume())
    results = [m for m in messages if "imageBase64Data" in m.get("data", [{}])[0]]
    assert len(results) == 1 and messages[-1] == {"data": [{"taskType": "ping", "pong": True}]}


def test_websocket_auth_errors_and_several_tasks_in_flight(server, photo):
    _, base = server
    url = base.replace("http", "ws") + "/v1"

    async def main():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "nope"}]))
            error = json.loads(await ws.recv())["errors"][0]
            assert (error["code"], error["taskType"]) == ("invalidApiKey", "authentication")
            assert error["parameter"] == "apiKey"
        async with websockets.connect(base.replace("http", "ws") + "/") as ws:
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            await ws.recv()
            tasks = [task(png_base64(photo), settings={"steps": 2, "seed": s}) for s in range(3)]
            await ws.send(json.dumps(tasks[:2] + [{**tasks[2], "outputFormat": "BMP"}]))
            await ws.send("not json")
            got = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(4)]
            return tasks, got

    tasks, got = asyncio.run(main())
    done = {m["data"][0]["taskUUID"] for m in got if "data" in m}
    failed = [m["errors"][0] for m in got if "errors" in m]
    assert done == {tasks[0]["taskUUID"], tasks[1]["taskUUID"]}
    assert [(e["code"], e["parameter"]) for e in failed if e["parameter"]] == [("invalidParameter", "outputFormat")]
    assert any(e["code"] == "invalidRequest" for e in failed)


def test_refuses_a_public_host_without_keys(pipeline_dir):
    result = subprocess.run([sys.executable, "-m", "latentup.serve", f"weights={pipeline_dir}", "host=0.0.0.0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "LATENTUP_API_KEYS"})
    assert result.returncode == 2 and result.stderr.startswith("error: host 0.0.0.0") and result.stdout == ""
    assert result.stderr.count("\n") == 1


def test_sigterm_drains(server, photo):
    """Last (it stops the module's server): an accepted task is still delivered after SIGTERM; a new one gets
    serverShuttingDown; the process then exits."""
    process, base = server
    url = base.replace("http", "ws") + "/v1"
    slow = task(png_base64(photo), settings={"steps": 40, "seed": 5})

    async def main():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": KEY}]))
            await ws.recv()
            await ws.send(json.dumps([slow]))
            await asyncio.to_thread(wait_in_flight, base)
            process.send_signal(signal.SIGTERM)
            while httpx.get(f"{base}/health").json()["status"] != "draining":
                await asyncio.sleep(0.01)
            await ws.send(json.dumps([task(png_base64(photo))]))
            return [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(2)]

    got = asyncio.run(main())
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    codes = sorted(m["errors"][0]["code"] if "errors" in m else m["data"][0]["taskUUID"] for m in got)
    assert codes == sorted([slow["taskUUID"], "serverShuttingDown"])


def test_full_queue_and_timeout_are_per_task_errors(upscaler, photo, tmp_path):
    """In process: with room for one waiting task, a third concurrent one gets queueFull; a task over task_timeout
    gets timeoutProvider; the others are answered."""
    from latentup.serve.service import Service
    from latentup.serve.store import ImageStore

    async def main(timeout, sizes):
        service = Service(upscaler, ImageStore(tmp_path, 60), dict(max_queue=1, max_batch=1), task_timeout=timeout)
        worker = asyncio.ensure_future(service.batcher.run_forever())
        tasks = [task(png_base64(photo.resize(size)), settings={"steps": 100 if i == 0 else 2, "seed": 0})
                 for i, size in enumerate(sizes)]
        first = asyncio.ensure_future(service.answer(tasks[0]))
        while not service.batcher.running:  # the first task holds the model
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(first, *(service.answer(t) for t in tasks[1:]))
        await service.drain(timeout=60)
        worker.cancel()
        service.batcher.close()
        return [a.get("errors", a.get("data"))[0] for a in answers]

    answers = asyncio.run(main(60, [(64, 48), (48, 64), (32, 32)]))
    assert "imageBase64Data" in answers[0]
    assert sorted(a.get("code", "answered") for a in answers[1:]) == ["answered", "queueFull"]
    [late] = asyncio.run(main(0.05, [(64, 48)]))
    assert late["code"] == "timeoutProvider" and late["parameter"] is None


def test_keys_from_the_environment_allow_a_public_host(monkeypatch):
    from omegaconf import OmegaConf

    from latentup.errors import ConfigError
    from latentup.serve.__main__ import _check

    cfg = OmegaConf.load(REPO / "configs/serve/serve.yaml")
    cfg.host = "0.0.0.0"
    monkeypatch.delenv("LATENTUP_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no API key"):
        _check(cfg)
    monkeypatch.setenv("LATENTUP_API_KEYS", "k1, k2")
    assert _check(cfg) == (["k1", "k2"], [])
    cfg.max_batch = 0
    with pytest.raises(ConfigError, match="max_batch must be an integer >= 1"):
        _check(cfg)


def test_url_fetcher_caps_size_and_hosts():
    from latentup.serve.fetch import UrlFetcher
    from latentup.serve.tasks import TaskError

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"x" * 10_000
            self.send_response(200 if self.path == "/big" else 404)
            self.end_headers()
            self.wfile.write(body if self.path == "/big" else b"")

        def log_message(self, *args):
            pass

    files = http.server.HTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_port}"
    try:
        assert asyncio.run(UrlFetcher(["127.0.0.1:*"], 20_000, 5)(f"{url}/big")) == b"x" * 10_000
        for fetcher, path, reason in ((UrlFetcher(["127.0.0.1:*"], 1_000, 5), "/big", "over 1000 bytes"),
                                      (UrlFetcher(["127.0.0.1:*"], 20_000, 5), "/missing", "HTTP 404"),
                                      (UrlFetcher(["127.0.0.1"], 20_000, 5), "/big", "port .* not allowed"),
                                      (UrlFetcher(["example.com"], 20_000, 5), "/big", "not an allowed host")):
            with pytest.raises(TaskError, match=reason) as error:
                asyncio.run(fetcher(url + path, "inputs.image"))
            assert error.value.parameter == "inputs.image"
    finally:
        files.shutdown()
