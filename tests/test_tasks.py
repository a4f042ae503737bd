"""Hosted-API tasks (RUNWARE.md §2-4) through `infer.py task=FILE.json`."""

import base64
import io
import json
import struct
import subprocess
import sys
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED
from pipeline_fixtures import make_diffusers_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_diffusers_pipeline(tmp_path_factory.mktemp("tasks"))


def run(pipeline_dir, tasks, tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    return subprocess.run([sys.executable, str(REPO / "infer.py"), f"weights={pipeline_dir}", f"task={tmp_path / 'tasks.json'}",
                           f"output={tmp_path / 'out'}", "progress=false"], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_upscale_tasks(pipeline_dir, tmp_path):
    from latentup.pipeline import Upscaler

    photo = Image.open(SHARED / "datasets/eval/Set5/bird.png").convert("RGB").resize((64, 48))
    photo.save(tmp_path / "in.png")
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    tasks = [
        {"taskType": "upscale", "taskUUID": first, "model": "runware:502@1", "inputs": {"image": str(tmp_path / "in.png")},
         "upscaleFactor": 2, "settings": {"positivePrompt": "a bird", "negativePrompt": "blur", "steps": 3, "seed": 7,
                                           "CFGScale": 4, "clipSkip": 2}, "outputFormat": "PNG", "includeCost": True},
        {"taskType": "imageUpscale", "taskUUID": second, "inputImage": data_uri, "settings": {"steps": 2, "seed": 1},
         "outputType": "dataURI", "outputFormat": "WEBP"},
    ]
    result = run(pipeline_dir, tasks, tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert [d["taskUUID"] for d in data] == [first, second]
    assert [d["taskType"] for d in data] == ["upscale", "imageUpscale"]
    assert data[0]["cost"] == 0.0 and data[0]["seed"] == 7
    path = data[0]["imageURL"].removeprefix("file://")
    assert Image.open(path).size == (128, 96)
    # the settings reach the upscaler under their API names: the PNG is upscale_image with them (float -> uint8
    # rounding may differ by 1 between processes), and changing any one of them (to its default, bar steps and seed)
    # changes the image
    upscaler = Upscaler.from_pretrained(pipeline_dir, dtype="float32")
    given = {"prompt": "a bird", "negative_prompt": "blur", "steps": 3, "seed": 7, "cfg_scale": 4, "clip_skip": 2}
    expected = np.asarray(upscaler.upscale_image(tmp_path / "in.png", **given), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - expected).max() <= 1
    changed = {"prompt": "", "negative_prompt": "", "steps": 2, "seed": 8, "cfg_scale": 0, "clip_skip": 1}
    for key, value in changed.items():
        other = np.asarray(upscaler.upscale_image(tmp_path / "in.png", **{**given, key: value}), dtype=np.int16)
        assert np.abs(other - expected).max() > 8, key
    assert uuid.UUID(data[0]["imageUUID"]).version == 4 and data[0]["inputImageUUID"] == data[1]["inputImageUUID"]
    assert data[1]["imageDataURI"].startswith("data:image/webp;base64,")
    webp = Image.open(io.BytesIO(base64.b64decode(data[1]["imageDataURI"].partition(",")[2])))
    assert webp.size == (128, 96)


def _huge_png_base64() -> str:
    """A PNG whose header claims 100000 x 100000 px (over PIL's decompression-bomb limit); no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def test_task_errors_are_per_task(pipeline_dir, tmp_path):
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "in.png")
    good = {"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": str(tmp_path / "in.png")},
            "settings": {"steps": 1, "seed": 0}, "outputFormat": "PNG"}
    tasks = [
        good,
        {**good, "taskUUID": good["taskUUID"]},
        {**good, "taskUUID": str(uuid.uuid4()), "upscaleFactor": 4},
        {**good, "taskUUID": str(uuid.uuid4()), "inputs": {"image": "https://example.com/a.png"}},
        {**good, "taskUUID": str(uuid.uuid4()), "settings": {"steps": 0}},
        {**good, "taskUUID": str(uuid.uuid4()), "model": "runware:503@1"},
        {**good, "taskUUID": str(uuid.uuid4()), "upscaleFactor": "abc"},
        {**good, "taskUUID": str(uuid.uuid4()), "outputQuality": "high"},
        {**good, "taskUUID": str(uuid.uuid4()), "inputs": "in.png"},
        {**good, "taskUUID": str(uuid.uuid4()), "settings": {"seed": "abc"}},
        {**good, "taskUUID": str(uuid.uuid4()), "inputs": {"image": _huge_png_base64()}},
    ]
    result = run(pipeline_dir, tasks, tmp_path)
    assert result.returncode == 2
    response = json.loads(result.stdout)
    assert len(response["data"]) == 1
    codes = [(e["code"], e["parameter"]) for e in response["errors"]]
    assert codes == [("conflictTaskUUID", "taskUUID"), ("invalidParameter", "upscaleFactor"),
                     ("invalidParameter", "inputs.image"), ("invalidParameter", None), ("unsupportedModel", "model"),
                     ("invalidParameter", "upscaleFactor"), ("invalidParameter", "outputQuality"),
                     ("invalidParameter", "inputs"), ("invalidParameter", None), ("invalidParameter", "inputs.image")]
    assert "steps must be >= 1" in response["errors"][3]["message"]
    assert "seed must be" in response["errors"][8]["message"] and "too large" in response["errors"][9]["message"]
    assert result.stderr.startswith("error: 10 of 11 tasks failed")


def test_task_file_must_be_an_array(pipeline_dir, tmp_path):
    (tmp_path / "tasks.json").write_text('{"taskType": "upscale"}')
    result = subprocess.run([sys.executable, str(REPO / "infer.py"), f"weights={pipeline_dir}", f"task={tmp_path / 'tasks.json'}"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 2 and "JSON array" in result.stderr and "Traceback" not in result.stderr
