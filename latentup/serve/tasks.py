"""Hosted-API tasks (Runware ``upscale`` / legacy ``imageUpscale``, model ``runware:502@1``) run locally.

A request is a JSON array of task objects (RUNWARE.md §2); the response is ``{"data": [...]}`` with one item per
finished task, plus ``"errors": [...]`` (code, message, parameter, taskType, taskUUID) for tasks that failed.
Inputs: ``inputs.image`` (or legacy ``inputImage``) as a local path, a data URI, bare base64, or the imageUUID
of an earlier task in the same request. URLs are refused: nothing reaches the network.
"""

import base64
import binascii
import hashlib
import io
import secrets
import uuid
from pathlib import Path

from PIL import Image

from latentup.errors import LatentupError
from latentup.imageio import load_image, save_image

TASK_TYPES = {"upscale", "imageUpscale"}
MODEL_AIR = "runware:502@1"
MAX_SIDE = 4096
SETTINGS = {"positivePrompt": "prompt", "negativePrompt": "negative_prompt", "seed": "seed", "steps": "steps",
            "CFGScale": "cfg_scale", "clipSkip": "clip_skip"}
IGNORED_SETTINGS = {"colorFix", "tileDiffusion"}  # accepted for compatibility, no effect on this model
FORMATS = {"JPG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "WEBP": ("webp", "image/webp")}


class TaskError(LatentupError):
    """A per-task failure, reported in the response's ``errors`` list."""

    def __init__(self, code: str, message: str, parameter: str | None = None):
        super().__init__(message)
        self.code, self.parameter = code, parameter


def _decode_image(value: str, known: dict[str, Path]) -> Image.Image:
    if not isinstance(value, str) or not value:
        raise TaskError("missingParameter", "inputs.image is required", "inputs.image")
    if value in known:
        return load_image(known[value])
    if value.startswith(("http://", "https://")):
        raise TaskError("invalidParameter", "image URLs are not fetched locally: pass a path, data URI or base64",
                        "inputs.image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    elif Path(value).is_file():
        return load_image(value)
    try:
        return Image.open(io.BytesIO(base64.b64decode(value, validate=True))).copy()
    except Image.DecompressionBombError:
        raise TaskError("invalidParameter", "inputs.image is too large to open: downscale it", "inputs.image") from None
    except (binascii.Error, ValueError, OSError):
        raise TaskError("invalidParameter", "inputs.image is neither a file, a data URI nor base64 image data",
                        "inputs.image") from None


def _number(task: dict, key: str, default, cast):
    """``cast(task[key])`` (default when absent); a TaskError naming ``key`` for a value that is not a number."""
    value = task.get(key, default)
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise TaskError("invalidParameter", f"{key} must be a number, got {value!r}", key) from None


def _settings(task: dict) -> dict:
    given = task.get("settings") or {}
    unknown = set(given) - set(SETTINGS) - IGNORED_SETTINGS
    if unknown:
        name = sorted(unknown)[0]
        raise TaskError("invalidParameter", f"setting {name} is not supported by {MODEL_AIR}", f"settings.{name}")
    out = {SETTINGS[k]: v for k, v in given.items() if k in SETTINGS}
    if out.get("seed") is None:
        out["seed"] = secrets.randbelow(2**31)
    return out


def _cap(image: Image.Image) -> Image.Image:
    """Shrink the input so that the 2x output fits in MAX_SIDE x MAX_SIDE (the hosted API's cap)."""
    scale = min(1.0, MAX_SIDE / (2 * image.width), MAX_SIDE / (2 * image.height))
    return image if scale == 1.0 else image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)


def run_task(upscaler, task: dict, output_dir: Path, known: dict[str, Path], progress=False) -> dict:
    """Run one task; returns the response item or raises TaskError."""
    if task.get("model", MODEL_AIR) != MODEL_AIR:
        raise TaskError("unsupportedModel", f"model {task['model']} is not served here: use {MODEL_AIR}", "model")
    if _number(task, "upscaleFactor", 2, float) != 2:
        raise TaskError("invalidParameter", f"upscaleFactor {task['upscaleFactor']} is not supported: only 2",
                        "upscaleFactor")
    fmt = str(task.get("outputFormat", "JPG")).upper()
    if fmt not in FORMATS:
        raise TaskError("invalidParameter", f"outputFormat {fmt} is not supported: use JPG, PNG or WEBP",
                        "outputFormat")
    output_type = task.get("outputType", "URL")
    output_type = output_type[0] if isinstance(output_type, list) else output_type
    if output_type not in ("URL", "base64Data", "dataURI"):
        raise TaskError("invalidParameter", f"outputType {output_type} is not supported", "outputType")
    quality = _number(task, "outputQuality", 95, int)
    if not 20 <= quality <= 99:
        raise TaskError("invalidParameter", f"outputQuality {quality} is outside 20..99", "outputQuality")
    inputs = task.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise TaskError("invalidParameter", 'inputs must be an object such as {"image": "photo.png"}', "inputs")
    source = inputs.get("image") or task.get("inputImage")
    settings = _settings(task)
    image = _decode_image(source, known)
    upscaled = upscaler.upscale_image(_cap(image), progress=progress, **settings)
    image_uuid = str(uuid.uuid4())
    suffix, mime = FORMATS[fmt]
    path = save_image(upscaled, output_dir / f"{image_uuid}.{suffix}", quality=quality)
    known[image_uuid] = path
    item = {
        "taskType": task["taskType"],
        "taskUUID": task["taskUUID"],
        "imageUUID": image_uuid,
        "inputImageUUID": str(uuid.UUID(bytes=hashlib.sha256(image.tobytes()).digest()[:16], version=4)),
        "seed": settings["seed"],
        "cost": 0.0,
    }
    if output_type == "URL":
        item["imageURL"] = path.resolve().as_uri()
    else:
        data = base64.b64encode(path.read_bytes()).decode()
        item["imageBase64Data" if output_type == "base64Data" else "imageDataURI"] = (
            data if output_type == "base64Data" else f"data:{mime};base64,{data}"
        )
    return item


def validate_tasks(tasks) -> None:
    """Reject a request that is not a JSON array of task objects (the whole request fails)."""
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise LatentupError('the task file must hold a JSON array of task objects, e.g. [{"taskType": "upscale", ...}]')


def run_tasks(upscaler, tasks: list[dict], output_dir, progress=False) -> dict:
    """Run every upscale task; other task types and failures go to ``errors`` without stopping the rest."""
    validate_tasks(tasks)
    output_dir = Path(output_dir)
    data, errors, seen, known = [], [], set(), {}
    for task in tasks:
        task_type, task_uuid = task.get("taskType"), task.get("taskUUID")
        try:
            if task_type not in TASK_TYPES:
                raise TaskError("unsupportedTaskType", f"taskType {task_type!r} is not served: use upscale", "taskType")
            if not task_uuid:
                raise TaskError("missingParameter", "taskUUID is required", "taskUUID")
            if task_uuid in seen:
                raise TaskError("conflictTaskUUID", f"taskUUID {task_uuid} was used twice in this request", "taskUUID")
            seen.add(task_uuid)
            data.append(run_task(upscaler, task, output_dir, known, progress))
        except TaskError as error:
            errors.append({"code": error.code, "message": str(error), "parameter": error.parameter,
                           "taskType": task_type, "taskUUID": task_uuid})
        except LatentupError as error:
            errors.append({"code": "invalidParameter", "message": str(error), "parameter": None,
                           "taskType": task_type, "taskUUID": task_uuid})
    return {"data": data, **({"errors": errors} if errors else {})}
