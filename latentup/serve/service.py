"""The server's task handling, independent of the transport: one task object in, one response message out.

Task types: ``ping``, ``imageUpload``, ``upscale`` / ``imageUpscale`` (through the task core, ``tasks.py``) and
``getResponse``. Every taskUUID is remembered for ``store.ttl`` seconds: a reused one is refused
(``conflictTaskUUID``) and ``getResponse`` finds its answer. Upscales wait in the :class:`Batcher`; input images are
fetched and decoded, outputs encoded and stored, in worker threads, so the event loop never blocks.
"""

import asyncio
import hashlib
import hmac
import logging
import time
import traceback
from dataclasses import dataclass

from latentup.errors import LatentupError
from latentup.serve.batcher import Batcher, QueueFull
from latentup.serve.store import ImageStore
from latentup.serve.tasks import (UPSCALE_TYPES, Sources, TaskError, check_with_model, encode_output, error_object,
                                  file_type, load_input, open_image, parse_header, parse_upscale,
                                  read_reference, response_item, run_batch, typed)

log = logging.getLogger("latentup.serve")
HTTP_STATUS = {"missingApiKey": 401, "invalidApiKey": 401, "taskNotFound": 404, "conflictTaskUUID": 409,
               "requestTooLarge": 413, "queueFull": 503, "serverShuttingDown": 503, "timeoutProvider": 504,
               "internalError": 500}


def message(error: TaskError, task_type=None, task_uuid=None) -> dict:
    return {"errors": [error_object(error, task_type, task_uuid)]}


@dataclass
class Record:
    """What is known of one taskUUID: whether it is answered, and for async delivery the answer itself (a sync
    answer goes out on its request or session and is not kept: it may carry a whole image inline)."""

    task_type: str
    keep: bool = False
    answer: dict | None = None
    expires: float = 0.0


class Service:
    def __init__(self, upscaler, store: ImageStore, batcher_options: dict, api_keys=(), fetch=None,
                 task_timeout: float = 300.0, public_url: str = ""):
        self.upscaler, self.store, self.public_url = upscaler, store, public_url.rstrip("/")
        self.keys = [key.encode() for key in api_keys]
        self.sources = Sources(lookup=store.read, fetch=fetch)
        self.task_timeout = task_timeout
        self.batcher = Batcher(self._run, **batcher_options)
        self.records: dict[str, Record] = {}
        self.in_flight = 0  # tasks accepted and not yet answered
        self._background: set[asyncio.Future] = set()
        self.draining = False

    # authentication
    def key_id(self, key) -> str | None:
        """A stable id of a valid key ("" when no key is configured), None for a wrong or missing one; every key
        is compared in constant time."""
        if not self.keys:
            return ""
        given = key.encode() if isinstance(key, str) else b""
        matches = [hmac.compare_digest(given, known) for known in self.keys]
        return hashlib.sha256(given).hexdigest() if any(matches) else None

    # the model thread
    def _run(self, payloads: list) -> list:
        """Results (or exceptions) for a batch; a batch that fails is retried task by task, so one bad task never
        fails its neighbours."""
        tasks, images = [p[0] for p in payloads], [p[1] for p in payloads]
        try:
            return run_batch(self.upscaler, tasks, images)
        except Exception as error:
            if len(payloads) > 1:
                log.warning("a batch of %d failed (%s: %s): running its tasks one by one", len(payloads),
                            type(error).__name__, error)
                return [self._run([payload])[0] for payload in payloads]
            return [error]

    # tasks
    async def answer(self, task) -> dict:
        """The response message for one task object: ``{"data": [item]}`` or ``{"errors": [error]}``."""
        task_type = task.get("taskType") if isinstance(task, dict) else None
        task_uuid = task.get("taskUUID") if isinstance(task, dict) else None
        if task_type == "ping":
            return {"data": [{"taskType": "ping", "pong": True}]}
        try:
            task_type, task_uuid = parse_header(task)
            if task_type == "getResponse":
                return self._get_response(task_uuid)
            if self.draining:
                raise TaskError("serverShuttingDown", "the server is shutting down: send the task to another "
                                "server or retry later")
            if task_type not in (*UPSCALE_TYPES, "imageUpload"):
                raise TaskError("unsupportedTaskType", f"taskType {task_type} is not served here: use upscale, "
                                "imageUpscale, imageUpload, getResponse or ping", "taskType")
            self._purge()
            if task_uuid in self.records:
                raise TaskError("conflictTaskUUID", f"taskUUID {task_uuid} was already used: give each task a new "
                                "UUID", "taskUUID")
            keep = task_type in UPSCALE_TYPES and task.get("deliveryMethod") == "async"
            record = self.records[task_uuid] = Record(task_type, keep, expires=time.monotonic() + self.store.ttl)
        except TaskError as error:
            return message(error, task_type, task_uuid)
        coroutine = self._upload if task_type == "imageUpload" else self._upscale
        work = asyncio.ensure_future(self._guard(coroutine(task, task_type, task_uuid), task_type, task_uuid))
        self.in_flight += 1
        self._background.add(work)

        def finish(done):
            record.answer = done.result() if record.keep else {}
            self.in_flight -= 1
            self._background.discard(done)

        work.add_done_callback(finish)
        if record.keep:  # answered by getResponse
            return {"data": [{"taskType": task_type, "taskUUID": task_uuid, "status": "processing"}]}
        return await asyncio.shield(work)  # runs on when the caller goes away (a WebSocket session buffers it)

    async def _guard(self, work, task_type, task_uuid) -> dict:
        try:
            return await work
        except TaskError as error:
            return message(error, task_type, task_uuid)
        except LatentupError as error:
            return message(TaskError("invalidParameter", str(error)), task_type, task_uuid)
        except Exception:  # a bug must not take the server down; the client gets an answer, the log the trace
            log.error("task %s failed:\n%s", task_uuid, traceback.format_exc())
            return message(TaskError("internalError", "the server failed on this task: see its log"), task_type,
                           task_uuid)

    async def _upload(self, task: dict, task_type: str, task_uuid: str) -> dict:
        unknown = sorted(set(task) - {"taskType", "taskUUID", "image"})
        if unknown:
            raise TaskError("invalidParameter", f"{unknown[0]} is not supported in imageUpload", unknown[0])
        if "image" not in task:
            raise TaskError("missingParameter", "image is required: a data URI, base64 or URL", "image")
        value = typed(task["image"], str, "image")

        def store():
            data = read_reference(value, "image", self.sources)
            open_image(data, "image")  # checked like an upscale's input
            return self.store.put(data, *file_type(data))

        image_uuid, name = await asyncio.to_thread(store)
        return {"data": [{"taskType": task_type, "taskUUID": task_uuid, "imageUUID": image_uuid,
                          "imageURL": f"{self.public_url}/image/{name}"}]}

    async def _upscale(self, task: dict, task_type: str, task_uuid: str) -> dict:
        parsed = parse_upscale(task, task_type, task_uuid)
        check_with_model(self.upscaler, parsed)
        if self.batcher.full():  # before decoding: a full queue costs the server nothing
            raise TaskError("queueFull", "the queue is full: retry in a moment")
        image, input_uuid = await asyncio.to_thread(load_input, parsed, self.sources)
        try:
            future = self.batcher.submit(parsed.batch_key(image), (parsed, image))
        except QueueFull:
            raise TaskError("queueFull", "the queue is full: retry in a moment") from None
        try:
            output = await asyncio.wait_for(asyncio.shield(future), self.task_timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise TaskError("timeoutProvider", f"the task took over {self.task_timeout:g} s: retry later or "
                            "with fewer steps") from None

        def encode():
            data, suffix, mime = encode_output(output, parsed)
            image_uuid, name = self.store.put(data, suffix, mime, parsed.ttl)
            return response_item(parsed, data, mime, image_uuid, input_uuid, f"{self.public_url}/image/{name}")

        return {"data": [await asyncio.to_thread(encode)]}

    def _get_response(self, task_uuid: str) -> dict:
        record = self.records.get(task_uuid)
        if record is None:
            raise TaskError("taskNotFound", f"no task {task_uuid} here (or it expired)", "taskUUID")
        if not record.keep:
            raise TaskError("taskNotFound", f"task {task_uuid} was delivered sync, on its own request: getResponse "
                            'serves tasks sent with "deliveryMethod": "async"', "taskUUID")
        if record.answer is None:
            return {"data": [{"taskType": record.task_type, "taskUUID": task_uuid, "status": "processing"}]}
        return record.answer

    def _purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self.records.items() if r.answer is not None and r.expires < now]:
            del self.records[key]

    async def drain(self, pending=lambda: 0, timeout: float = 60.0) -> None:
        """Refuse new tasks, then wait (at most ``timeout`` s) until every accepted one is answered and
        ``pending()`` (results not yet delivered) is 0."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.in_flight or pending()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
