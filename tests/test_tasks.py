"""The task core (latentup/serve/tasks.py) and `infer.py task=FILE.json` (RUNWARE.md §2-4, issue 21 items 3-5)."""

import base64
import io
import json
import struct
import subprocess
import sys
import uuid
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED
from pipeline_fixtures import make_diffusers_pipeline

from latentup.errors import InputError
from latentup.serve.tasks import (MAX_OUTPUT_SIDE, Sources, TaskError, UpscaleTask, encode_output, load_input,
                                  parse_header, parse_upscale, read_task_file, run_task_file)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_diffusers_pipeline(tmp_path_factory.mktemp("tasks"))


def run(pipeline_dir, tasks, tmp_path, *extra):
    text = tasks if isinstance(tasks, str) else json.dumps(tasks)
    (tmp_path / "tasks.json").write_text(text)
    return subprocess.run([sys.executable, str(REPO / "infer.py"), f"weights={pipeline_dir}",
                           f"task={tmp_path / 'tasks.json'}", f"output={tmp_path / 'out'}", "progress=false", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def answers(stdout: str) -> dict:
    """taskUUID -> the data item of each JSON line (error lines are checked on their own)."""
    out = {}
    for line in stdout.splitlines():
        for item in json.loads(line).get("data", []):
            assert item["taskUUID"] not in out, "answered twice"
            out[item["taskUUID"]] = item
    return out


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_upscale_tasks(pipeline_dir, tmp_path):
    from latentup.pipeline import Upscaler

    photo = Image.open(SHARED / "datasets/eval/Set5/bird.png").convert("RGB").resize((64, 48))
    photo.save(tmp_path / "in.png")
    data_uri = "data:image/png;base64," + png_base64(photo)
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    tasks = [
        {"taskType": "upscale", "taskUUID": first, "model": "runware:502@1",
         "inputs": {"image": str(tmp_path / "in.png")},
         "upscaleFactor": 2, "settings": {"positivePrompt": "a bird", "negativePrompt": "blur", "steps": 3, "seed": 7,
                                           "CFGScale": 4, "clipSkip": 2}, "outputFormat": "PNG", "includeCost": True},
        {"taskType": "imageUpscale", "taskUUID": second, "inputImage": data_uri, "settings": {"steps": 2, "seed": 1},
         "outputType": "dataURI", "outputFormat": "WEBP"},
        {"taskType": "upscale", "taskUUID": third, "inputs": {"image": png_base64(photo)},  # bare base64
         "settings": {"steps": 2, "seed": 1}, "outputType": "base64Data", "outputFormat": "PNG"},
    ]
    result = run(pipeline_dir, tasks, tmp_path, "task_paths=true")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and [json.loads(line)["data"][0]["taskUUID"] for line in lines] == [first, second, third]
    data = answers(result.stdout)
    assert data[first]["taskType"] == "upscale" and data[second]["taskType"] == "imageUpscale"
    assert data[first]["cost"] == 0.0 and data[first]["seed"] == 7 and "cost" not in data[second]
    path = data[first]["imageURL"].removeprefix("file://")
    assert Image.open(path).size == (128, 96)
    # the settings reach the upscaler under their API names: the PNG is upscale_image with them (float -> uint8
    # rounding may differ by 1 between processes), and changing any one of them changes the image
    upscaler = Upscaler.from_pretrained(pipeline_dir, dtype="float32")
    given = {"prompt": "a bird", "negative_prompt": "blur", "steps": 3, "seed": 7, "cfg_scale": 4, "clip_skip": 2}
    expected = np.asarray(upscaler.upscale_image(tmp_path / "in.png", **given), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - expected).max() <= 1
    changed = {"prompt": "", "negative_prompt": "", "steps": 2, "seed": 8, "cfg_scale": 0, "clip_skip": 1}
    for key, value in changed.items():
        other = np.asarray(upscaler.upscale_image(tmp_path / "in.png", **{**given, key: value}), dtype=np.int16)
        assert np.abs(other - expected).max() > 8, key
    assert uuid.UUID(data[first]["imageUUID"]).version == 4
    assert data[second]["inputImageUUID"] == data[third]["inputImageUUID"]  # same bytes, data URI or bare base64
    webp = Image.open(io.BytesIO(base64.b64decode(data[second]["imageDataURI"].partition(",")[2])))
    assert data[second]["imageDataURI"].startswith("data:image/webp;base64,") and webp.size == (128, 96)
    bare = Image.open(io.BytesIO(base64.b64decode(data[third]["imageBase64Data"])))
    assert bare.size == (128, 96)


def _huge_png_base64() -> str:
    """A PNG whose header claims 100000 x 100000 px (over PIL's decompression-bomb limit); no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def bad_tasks(good: dict) -> list[tuple[dict, str, str | None]]:
    """(task, expected code, expected parameter) for every kind of bad field (issue 22 item 3, issue 21 item 4)."""
    def task(**fields):
        return {**good, "taskUUID": str(uuid.uuid4()), **fields}

    wide = Image.new("RGB", (MAX_OUTPUT_SIDE // 2 + 1, 8))
    return [
        (task(upscaleFactor=4), "invalidParameter", "upscaleFactor"),
        (task(upscaleFactor="abc"), "invalidParameter", "upscaleFactor"),
        (task(inputs={"image": "https://example.com/a.png"}), "invalidParameter", "inputs.image"),
        (task(settings={"steps": 0}), "invalidParameter", "settings.steps"),
        (task(settings={"CFGScale": "high"}), "invalidParameter", "settings.CFGScale"),
        (task(settings={"seed": "abc"}), "invalidParameter", "settings.seed"),
        (task(settings={"clipSkip": 1.5}), "invalidParameter", "settings.clipSkip"),
        (task(settings={"positivePrompt": 5}), "invalidParameter", "settings.positivePrompt"),
        (task(settings={"strength": 0.5}), "invalidParameter", "settings.strength"),
        (task(settings=5), "invalidParameter", "settings"),
        (task(model="runware:503@1"), "unsupportedModel", "model"),
        (task(outputQuality="high"), "invalidParameter", "outputQuality"),
        (task(outputQuality=100), "invalidParameter", "outputQuality"),
        (task(outputType=[]), "invalidParameter", "outputType"),
        (task(outputFormat="GIF"), "invalidParameter", "outputFormat"),
        (task(includeCost="yes"), "invalidParameter", "includeCost"),
        (task(webhookURL="https://example.com/hook"), "invalidParameter", "webhookURL"),
        (task(inputs="in.png"), "invalidParameter", "inputs"),
        (task(inputs={}), "missingParameter", "inputs.image"),
        (task(inputs={"image": 5}), "invalidParameter", "inputs.image"),
        (task(inputs={"image": "not base64 !"}), "invalidParameter", "inputs.image"),
        (task(inputs={"image": base64.b64encode(b"plain text, not an image").decode()}), "invalidParameter",
         "inputs.image"),
        (task(inputs={"image": _huge_png_base64()}), "invalidParameter", "inputs.image"),
        (task(inputs={"image": png_base64(wide)}), "invalidParameter", "inputs.image"),
        (task(inputs={"image": str(uuid.uuid4())}), "invalidParameter", "inputs.image"),  # no such upload
        (task(taskUUID=["a"]), "invalidParameter", "taskUUID"),
        (task(taskUUID="not-a-uuid"), "invalidParameter", "taskUUID"),
        (task(taskType="imageInference"), "unsupportedTaskType", "taskType"),
        ({k: v for k, v in task().items() if k != "taskType"}, "missingParameter", "taskType"),
        ({k: v for k, v in task().items() if k != "taskUUID"}, "missingParameter", "taskUUID"),
        (task(taskUUID=good["taskUUID"]), "conflictTaskUUID", "taskUUID"),
    ]


def test_task_errors_are_per_task(pipeline_dir, tmp_path):
    """Each bad task gets its own error in the request's field names, with `parameter` set; the good ones run; a
    local path is refused unless the operator enables task_paths."""
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "in.png")
    image = png_base64(Image.open(tmp_path / "in.png"))
    good = {"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": image},
            "settings": {"steps": 1, "seed": 0}, "outputFormat": "PNG"}
    cases = bad_tasks(good)
    path_task = {**good, "taskUUID": str(uuid.uuid4()), "inputs": {"image": str(tmp_path / "in.png")}}
    second_good = {**good, "taskUUID": str(uuid.uuid4())}
    text = json.dumps([good, *(c[0] for c in cases), path_task, second_good, 5])
    infinite = '{"taskType": "upscale", "taskUUID": "%s", "inputImage": "eA", "outputQuality": 1e999}' % uuid.uuid4()
    text = f"{text[:-1]}, {infinite}]"  # 1e999: a JSON number that parses to inf
    result = run(pipeline_dir, text, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "tasks failed" in result.stderr
    out = answers(result.stdout)
    assert "imageURL" in out[good["taskUUID"]] and "imageURL" in out[second_good["taskUUID"]]
    errors = [json.loads(line)["errors"][0] for line in result.stdout.splitlines() if "errors" in json.loads(line)]
    expected = [(code, parameter) for _, code, parameter in cases]
    expected += [("invalidParameter", "inputs.image"), ("invalidParameter", None),
                 ("invalidParameter", "outputQuality")]
    assert Counter((e["code"], e["parameter"]) for e in errors) == Counter(expected)
    for error in errors:
        assert set(error) == {"code", "message", "parameter", "taskType", "taskUUID"} and "\n" not in error["message"]
    assert "local paths are not read" in next(e["message"] for e in errors if e["taskUUID"] == path_task["taskUUID"])


def test_task_file_errors(tmp_path):
    """A task file that is not a JSON array of at most max_tasks items fails as a whole, in one line, before any
    model is loaded."""
    cases = {"object.json": b'{"taskType": "upscale"}', "latin1.json": b'[{"taskType": "caf\xe9"}]',
             "deep.json": b"[" * 100_000 + b"]" * 100_000, "broken.json": b"[{"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as error:
            read_task_file(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)
    (tmp_path / "many.json").write_text(json.dumps([{}] * 101))
    with pytest.raises(InputError, match="over the cap of 100"):
        read_task_file(tmp_path / "many.json")
    assert len(read_task_file(tmp_path / "many.json", max_tasks=101)) == 101
    result = subprocess.run([sys.executable, str(REPO / "infer.py"), f"task={tmp_path / 'latin1.json'}"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_answers_are_written_as_each_task_finishes(tmp_path):
    """A killed run keeps every finished answer: task 1's line is out before task 2 starts."""
    emitted = []

    class Recorder:  # stands in for the Upscaler: records what was emitted when each task starts
        def settings(self, **given):
            return given

        def upscale_image(self, image, progress=False, **settings):
            if len(emitted) == 1:
                raise KeyboardInterrupt  # the run is killed during the second task
            return image.resize((2 * image.width, 2 * image.height))

    image = png_base64(Image.new("RGB", (8, 8)))
    tasks = [{"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": image}} for _ in range(2)]
    with pytest.raises(KeyboardInterrupt):
        run_task_file(tasks, Recorder, tmp_path, emit=emitted.append)
    assert len(emitted) == 1 and emitted[0]["data"][0]["taskUUID"] == tasks[0]["taskUUID"]
    assert (tmp_path / emitted[0]["data"][0]["imageURL"].rpartition("/")[2]).is_file()


def test_parse_checks_every_field_before_work():
    header = parse_header({"taskType": "upscale", "taskUUID": "8f7c2a1e-0b6d-4c1a-9e5f-3d2b1a0c9e8f"})
    assert header == ("upscale", "8f7c2a1e-0b6d-4c1a-9e5f-3d2b1a0c9e8f")
    task = parse_upscale({"inputImage": "x", "settings": {"colorFix": True}}, *header)
    assert task.output_type == "URL" and task.output_format == "JPG" and task.output_quality == 95
    assert 0 <= task.settings["seed"] < 2**31  # a seed is picked (and returned) when none is given
    for bad in ({"inputImage": "x", "deliveryMethod": "later"}, {"inputImage": "x", "ttl": 10}):
        with pytest.raises(TaskError) as error:
            parse_upscale(bad, *header)
        assert error.value.parameter in bad
    with pytest.raises(TaskError, match="each task must be an object"):
        parse_header(5)
    task = parse_upscale({"inputImage": "aGVsbG8"}, *header)  # unpadded base64 decodes, then is not an image
    with pytest.raises(TaskError, match="not a readable PNG"):
        load_input(task, Sources(lookup=lambda key: None))


@pytest.mark.parametrize(("output_format", "mode"), [("JPG", "L"), ("WEBP", "RGB"), ("PNG", "I;16")])
def test_sixteen_bit_outputs_are_scaled_not_clipped(output_format, mode):
    """A 16-bit output keeps its depth where the format can (PNG) and is scaled by its own white elsewhere."""
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1)))
    task = UpscaleTask("upscale", str(uuid.uuid4()), image="", image_parameter="inputs.image", output_format=output_format)
    data, _, _ = encode_output(ramp, task)
    out = Image.open(io.BytesIO(data))
    assert out.mode == mode
    white = 65535 if mode == "I;16" else 255
    assert abs(np.asarray(out, dtype=np.float64).mean() / white - 0.5) < 0.02
