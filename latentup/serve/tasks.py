"""The one task core for the hosted API's upscale task (RUNWARE.md §2-4): parse -> validate -> run -> encode.

Shared by the server (``latentup.serve.app``) and ``infer.py task=FILE.json`` (:func:`run_task_file`).

- parse: :func:`parse_header` (``taskType``, ``taskUUID``) and :func:`parse_upscale` check every field's type and
  range before any work and raise :class:`TaskError` naming the request's own field (``settings.CFGScale``);
- validate: :func:`check_with_model` (model-dependent limits such as ``clipSkip``) and :func:`load_input`, which
  resolves ``inputs.image`` / ``inputImage`` (an earlier imageUUID, a data URI, bare base64, an allowed URL, a local
  path only where the operator enabled it) and reads the image header before decoding: PNG / JPEG / WEBP only, and
  a 2x output of at most 4096 px a side (the hosted API's cap);
- run: :func:`run_batch`, one sampler call for tasks of the same size and settings (seed aside);
- encode: :func:`encode_output` and :func:`response_item`.

An error is answered as ``{"code", "message", "parameter", "taskType", "taskUUID"}`` (:func:`error_object`).
"""

import base64
import binascii
import hashlib
import io
import json
import math
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from latentup.atomic import write_atomic
from latentup.errors import ConfigError, InputError, LatentupError
from latentup.imageio import for_format
from latentup.settings import MAX_SEED, MAX_STEPS

UPSCALE_TYPES = ("upscale", "imageUpscale")  # current and legacy names; the response echoes the one received
MODEL_AIR = "runware:502@1"
MAX_OUTPUT_SIDE = 4096
MAX_TASKS_PER_FILE = 100
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
OUTPUT_FORMATS = {"JPG": ("JPEG", "jpg", "image/jpeg"), "PNG": ("PNG", "png", "image/png"),
                  "WEBP": ("WEBP", "webp", "image/webp")}
OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
DATA_URI_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
MAX_CFG_SCALE = 50  # the hosted API's range
MAX_CLIP_SKIP = 12  # CLIP ViT-L's depth; deeper text towers are checked against the weights
# API setting -> (Upscaler keyword, type, lowest value, highest value)
SETTINGS = {"positivePrompt": ("prompt", str, None, None), "negativePrompt": ("negative_prompt", str, None, None),
            "seed": ("seed", int, 0, MAX_SEED), "steps": ("steps", int, 1, MAX_STEPS),
            "CFGScale": ("cfg_scale", float, 0, MAX_CFG_SCALE), "clipSkip": ("clip_skip", int, 0, MAX_CLIP_SKIP)}
TEXT_SETTINGS = ("positivePrompt", "negativePrompt", "CFGScale", "clipSkip")  # no effect with text-free weights
COMPATIBILITY_SETTINGS = ("colorFix", "tileDiffusion")  # booleans the SDK lists for this model; accepted, no effect
UPSCALE_FIELDS = {"taskType", "taskUUID", "model", "inputs", "inputImage", "upscaleFactor", "settings", "outputType",
                  "outputFormat", "outputQuality", "includeCost", "deliveryMethod", "ttl"}
TYPE_NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}


class TaskError(LatentupError):
    """A failed task, answered in the response's ``errors`` list with ``code`` and the request's ``parameter``."""

    def __init__(self, code: str, message: str, parameter: str | None = None):
        super().__init__(message)
        self.code, self.parameter = code, parameter


def error_object(error: TaskError, task_type=None, task_uuid=None) -> dict:
    """RUNWARE.md §4's error item; ``taskType`` / ``taskUUID`` only echoed when they were text."""
    return {"code": error.code, "message": str(error), "parameter": error.parameter,
            "taskType": task_type if isinstance(task_type, str) else None,
            "taskUUID": task_uuid if isinstance(task_uuid, str) else None}


def typed(value, kind: type, name: str, low=None, high=None):
    """``value`` if it is of ``kind`` (an int for a float, never a bool for a number) and within low..high, else a
    TaskError naming ``name``."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise TaskError("invalidParameter", f"{name} must be {TYPE_NAMES[kind]}, got {_show(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise TaskError("invalidParameter", f"{name} must be {bounds}, got {_show(value)}", name)
    return value


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_uuid(value) -> bool:
    """A UUID in its usual 36-character form (any version)."""
    try:
        return isinstance(value, str) and len(value) == 36 and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def parse_header(task) -> tuple[str, str]:
    """(taskType, taskUUID) of a task object; a TaskError when either is missing or malformed."""
    if not isinstance(task, dict):
        raise TaskError("invalidParameter", f"each task must be an object such as "
                        f'{{"taskType": "upscale", "taskUUID": "..."}}, got {_show(task)}')
    if "taskType" not in task:
        raise TaskError("missingParameter", "taskType is required, e.g. \"upscale\"", "taskType")
    task_type = typed(task["taskType"], str, "taskType")
    if "taskUUID" not in task:
        raise TaskError("missingParameter", "taskUUID is required: a new UUID v4 per task", "taskUUID")
    task_uuid = typed(task["taskUUID"], str, "taskUUID")
    if not is_uuid(task_uuid):
        raise TaskError("invalidParameter", f"taskUUID must be a UUID such as {uuid.uuid4()}, got {_show(task_uuid)}",
                        "taskUUID")
    return task_type, task_uuid


@dataclass(frozen=True)
class UpscaleTask:
    """A parsed ``upscale`` / ``imageUpscale`` task; ``settings`` are the Upscaler's keywords (seed always set)."""

    task_type: str
    task_uuid: str
    image: str  # an imageUUID, data URI, base64, URL or (where enabled) a local path; checked by load_input
    image_parameter: str  # "inputs.image" or "inputImage": the field it came from
    settings: dict = field(default_factory=dict)
    output_type: str = "URL"
    output_format: str = "JPG"
    output_quality: int = 95
    include_cost: bool = False
    delivery: str = "sync"
    ttl: int | None = None

    def batch_key(self, image: Image.Image) -> tuple:
        """Tasks with equal keys run in one sampler call: same input size and mode, same settings bar the seed."""
        return image.size, image.mode, tuple(sorted((k, v) for k, v in self.settings.items() if k != "seed"))


def _choice(task: dict, name: str, choices, default: str) -> str:
    value = typed(task.get(name, default), str, name)
    if value not in choices:
        raise TaskError("invalidParameter", f"{name} {_show(value)} is not supported: use {', '.join(choices)}", name)
    return value


def _image_reference(task: dict) -> tuple[str, str]:
    if "inputs" in task:
        inputs = typed(task["inputs"], dict, "inputs")
        unknown = sorted(set(inputs) - {"image"})
        if unknown:
            raise TaskError("invalidParameter", f"inputs.{unknown[0]} is not supported by {MODEL_AIR}: use "
                            "inputs.image only", f"inputs.{unknown[0]}")
        if "image" in inputs:
            return typed(inputs["image"], str, "inputs.image"), "inputs.image"
        if "inputImage" not in task:
            raise TaskError("missingParameter", "inputs.image is required: an image UUID, data URI, base64 or URL",
                            "inputs.image")
    if "inputImage" not in task:
        raise TaskError("missingParameter", "inputs.image is required: an image UUID, data URI, base64 or URL",
                        "inputs.image")
    return typed(task["inputImage"], str, "inputImage"), "inputImage"


def _settings(task: dict) -> dict:
    given = typed(task.get("settings", {}), dict, "settings")
    out = {}
    for key, value in given.items():
        if key in COMPATIBILITY_SETTINGS:
            typed(value, bool, f"settings.{key}")
            continue
        if key not in SETTINGS:
            raise TaskError("invalidParameter", f"settings.{key} is not supported by {MODEL_AIR}: use "
                            f"{', '.join(SETTINGS)}", f"settings.{key}")
        name, kind, low, high = SETTINGS[key]
        out[name] = typed(value, kind, f"settings.{key}", low, high)
    out.setdefault("seed", secrets.randbelow(2**31))  # the hosted API picks one and returns it
    return out


def parse_upscale(task: dict, task_type: str, task_uuid: str) -> UpscaleTask:
    """Every field of an upscale task checked (type, range, support) before any work."""
    unknown = sorted(set(task) - UPSCALE_FIELDS)
    if unknown:
        raise TaskError("invalidParameter", f"{unknown[0]} is not supported by this server: drop it", unknown[0])
    if "model" in task and typed(task["model"], str, "model") != MODEL_AIR:
        raise TaskError("unsupportedModel", f"model {_show(task['model'])} is not served here: use {MODEL_AIR}",
                        "model")
    factor = typed(task.get("upscaleFactor", 2), float, "upscaleFactor")
    if factor != 2:
        raise TaskError("invalidParameter", f"upscaleFactor {_show(factor)} is not supported by {MODEL_AIR}: use 2",
                        "upscaleFactor")
    ttl = task.get("ttl")
    image, parameter = _image_reference(task)
    return UpscaleTask(
        task_type=task_type, task_uuid=task_uuid, image=image, image_parameter=parameter, settings=_settings(task),
        output_type=_choice(task, "outputType", OUTPUT_TYPES, "URL"),
        output_format=_choice(task, "outputFormat", tuple(OUTPUT_FORMATS), "JPG"),
        output_quality=typed(task.get("outputQuality", 95), int, "outputQuality", 20, 99),
        include_cost=typed(task.get("includeCost", False), bool, "includeCost"),
        delivery=_choice(task, "deliveryMethod", ("sync", "async"), "sync"),
        ttl=None if ttl is None else typed(ttl, int, "ttl", 60),
    )


def check_with_model(upscaler, task: UpscaleTask) -> None:
    """The limits that depend on the weights (e.g. ``clipSkip`` at most the text tower's depth), in API names."""
    try:
        upscaler.settings(**task.settings)
    except ConfigError as error:
        names = [api for api, (name, *_) in SETTINGS.items() if str(error).startswith(name)]
        parameter = f"settings.{names[0]}" if names else "settings"
        raise TaskError("invalidParameter", f"{parameter}: {error}", parameter) from None


@dataclass
class Sources:
    """Where image references may come from: ``lookup(imageUUID)`` -> bytes or None; ``fetch(url, parameter)`` ->
    bytes or a TaskError (None: URLs refused); local paths only with ``allow_paths`` (the operator's choice; never in
    the server)."""

    lookup: Callable[[str], bytes | None]
    fetch: Callable[[str, str], bytes] | None = None
    allow_paths: bool = False
    max_bytes: int = 64 * 2**20


def _is_file(value: str) -> bool:
    try:
        return len(value) < 4096 and Path(value).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def read_reference(value: str, parameter: str, sources: Sources) -> bytes:
    """The bytes an image reference stands for."""
    if is_uuid(value):
        data = sources.lookup(value)
        if data is None:
            raise TaskError("invalidParameter", f"no image with UUID {value} here (or it expired): upload it with "
                            "imageUpload or pass the image itself", parameter)
        return data
    if value.startswith(("http://", "https://")):
        if sources.fetch is None:
            raise TaskError("invalidParameter", "image URLs are not fetched here: pass the image as a data URI or "
                            "base64 (the operator may allow hosts with fetch_hosts)", parameter)
        return sources.fetch(value, parameter)
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise TaskError("invalidParameter", f"{parameter} is a data URI without ;base64: encode the image as "
                            "data:image/png;base64,...", parameter)
        if head[5:].partition(";")[0].lower() not in DATA_URI_TYPES:
            raise TaskError("invalidParameter", f"{parameter} is a data URI of type {_show(head[5:-7])}: send "
                            f"{', '.join(DATA_URI_TYPES)}", parameter)
    elif sources.allow_paths and _is_file(value):
        if Path(value).stat().st_size > sources.max_bytes:
            raise TaskError("invalidParameter", f"{parameter} file is over {sources.max_bytes} bytes", parameter)
        return Path(value).read_bytes()
    text = "".join(value.split())
    if len(text) * 3 // 4 > sources.max_bytes:
        raise TaskError("invalidParameter", f"{parameter} is over {sources.max_bytes} bytes: send a smaller image",
                        parameter)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        hint = " (local paths are not read here)" if not sources.allow_paths else ""
        raise TaskError("invalidParameter", f"{parameter} is neither an image UUID, a data URI, base64 nor a URL"
                        f"{hint}", parameter) from None


def open_image(data: bytes, parameter: str) -> Image.Image:
    """Decode PNG / JPEG / WEBP bytes (EXIF orientation applied) after checking the header's size: the 2x output
    must fit in MAX_OUTPUT_SIDE² (bombs are refused before any pixel is decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:
            width, height = image.size
            if 2 * max(width, height) > MAX_OUTPUT_SIDE:
                raise TaskError("invalidParameter", f"{parameter} is {width}x{height}: its 2x output would exceed "
                                f"{MAX_OUTPUT_SIDE}x{MAX_OUTPUT_SIDE}; downscale it to at most "
                                f"{MAX_OUTPUT_SIDE // 2} px a side", parameter)
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise TaskError("invalidParameter", f"{parameter} is too large to open: downscale it to at most "
                        f"{MAX_OUTPUT_SIDE // 2} px a side", parameter) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise TaskError("invalidParameter", f"{parameter} is not a readable PNG, JPEG or WEBP image "
                        f"({type(error).__name__})", parameter) from None


def ignored_settings(upscaler, task: UpscaleTask) -> list[str]:
    """One line per setting the weights ignore (prompts and guidance with text-free weights), for ``warnings``."""
    if upscaler.text is not None:
        return []
    names = [api for api in TEXT_SETTINGS if SETTINGS[api][0] in task.settings]
    return [f"settings.{name} has no effect: these weights take no text" for name in names]


def load_input(task: UpscaleTask, sources: Sources, data: bytes | None = None) -> tuple[Image.Image, str]:
    """(input image, inputImageUUID): the referenced UUID, else one derived from the input's bytes (``data``: the
    bytes, already read)."""
    data = read_reference(task.image, task.image_parameter, sources) if data is None else data
    image = open_image(data, task.image_parameter)
    input_uuid = task.image if is_uuid(task.image) else str(uuid.UUID(bytes=hashlib.sha256(data).digest()[:16],
                                                                       version=4))
    return image, input_uuid


def run_batch(upscaler, tasks: list[UpscaleTask], images: list[Image.Image], progress=False) -> list[Image.Image]:
    """Upscale tasks that share a :meth:`UpscaleTask.batch_key` in one sampler call; output i equals task i run
    alone with its seed."""
    settings = {k: v for k, v in tasks[0].settings.items() if k != "seed"}
    seeds = [t.settings["seed"] for t in tasks]
    if len(tasks) == 1:
        return [upscaler.upscale_image(images[0], progress=progress, seed=seeds[0], **settings)]
    return upscaler.upscale_images(images, seeds, progress=progress, **settings)


def encode_output(image: Image.Image, task: UpscaleTask) -> tuple[bytes, str, str]:
    """(file bytes, suffix, MIME type) in the task's outputFormat and outputQuality (JPEG drops alpha)."""
    fmt, suffix, mime = OUTPUT_FORMATS[task.output_format]
    buffer = io.BytesIO()
    for_format(image, fmt).save(buffer, format=fmt, quality=task.output_quality)
    return buffer.getvalue(), suffix, mime


def response_item(task: UpscaleTask, data: bytes, mime: str, image_uuid: str, input_uuid: str, url: str) -> dict:
    """RUNWARE.md §3's result: the image in the field ``outputType`` names."""
    item = {"taskType": task.task_type, "taskUUID": task.task_uuid, "status": "success", "imageUUID": image_uuid,
            "inputImageUUID": input_uuid, "seed": task.settings["seed"]}
    if task.output_type == "URL":
        item["imageURL"] = url
    elif task.output_type == "base64Data":
        item["imageBase64Data"] = base64.b64encode(data).decode()
    else:
        item["imageDataURI"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    if task.include_cost:
        item["cost"] = 0.0  # nothing is billed on your own machine
    return item


def read_task_file(path: Path, max_tasks: int = MAX_TASKS_PER_FILE) -> list:
    """A task file's JSON array (its items are checked one by one later); an InputError for anything else."""
    try:
        tasks = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"task file {path} is not UTF-8 text: save it as UTF-8 JSON") from None
    except (json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else f"line {error.lineno}: {error.msg}"
        raise InputError(f"task file {path} is not valid JSON ({reason}): check the file") from None
    if not isinstance(tasks, list):
        raise InputError(f'task file {path} must hold a JSON array of task objects, e.g. [{{"taskType": "upscale", '
                         '...}]')
    if len(tasks) > max_tasks:
        raise InputError(f"task file {path} holds {len(tasks)} tasks, over the cap of {max_tasks}: split it "
                         "(or raise max_tasks=)")
    return tasks


def run_task_file(tasks: list, load_upscaler: Callable[[], object], output_dir, *, allow_paths=False,
                  progress=False, emit=None) -> int:
    """Run a task file's upscale tasks one by one, answering each as soon as it is done.

    Every task is parsed before the model is loaded; each answer is one JSON line ``{"data": [item]}`` or
    ``{"errors": [error]}`` given to ``emit`` (default: printed and flushed), so a killed run keeps every finished
    answer. Outputs are ``output_dir/<imageUUID>.<suffix>`` (atomic writes), referable by later tasks' imageUUID.
    Returns the number of failed tasks.
    """
    emit = emit or (lambda message: print(json.dumps(message), flush=True))
    output_dir = Path(output_dir)
    outputs: dict[str, Path] = {}
    sources = Sources(lookup=lambda key: outputs[key].read_bytes() if key in outputs else None,
                      allow_paths=allow_paths)
    parsed, seen, failed = [], set(), 0

    def fail(error, task_type, task_uuid):
        nonlocal failed
        failed += 1
        emit({"errors": [error_object(error, task_type, task_uuid)]})

    for task in tasks:
        task_type = task.get("taskType") if isinstance(task, dict) else None
        task_uuid = task.get("taskUUID") if isinstance(task, dict) else None
        try:
            task_type, task_uuid = parse_header(task)
            if task_type not in UPSCALE_TYPES:
                raise TaskError("unsupportedTaskType", f"taskType {_show(task_type)} is not run from a task file: "
                                "use upscale or imageUpscale", "taskType")
            if task_uuid in seen:
                raise TaskError("conflictTaskUUID", f"taskUUID {task_uuid} is used twice: give each task its own",
                                "taskUUID")
            seen.add(task_uuid)
            parsed.append(parse_upscale(task, task_type, task_uuid))
        except TaskError as error:
            fail(error, task_type, task_uuid)
    if not parsed:
        return failed
    upscaler = load_upscaler()
    for task in parsed:
        try:
            check_with_model(upscaler, task)
            image, input_uuid = load_input(task, sources)
            [output] = run_batch(upscaler, [task], [image], progress=progress)
            data, suffix, mime = encode_output(output, task)
            image_uuid = str(uuid.uuid4())
            path = write_atomic(output_dir / f"{image_uuid}.{suffix}", lambda tmp: Path(tmp).write_bytes(data))
            outputs[image_uuid] = path
            emit({"data": [response_item(task, data, mime, image_uuid, input_uuid, path.resolve().as_uri())]})
        except TaskError as error:
            fail(error, task.task_type, task.task_uuid)
        except LatentupError as error:  # e.g. a non-finite output refused by the Upscaler
            fail(TaskError("invalidParameter", str(error)), task.task_type, task.task_uuid)
    return failed
