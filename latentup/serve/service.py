"""The server's task handling, independent of the transport: one task object in, one response message out.

Task types: ``ping``, ``imageUpload``, ``upscale`` / ``imageUpscale`` (through the task core, ``tasks.py``) and
``getResponse``. Everything a task makes belongs to the API key that sent it (:class:`Caller`): its taskUUID
(``records.py``), its upload and output (``store.py``). A task is checked and its place in the queue reserved before
it is accepted (a refusal claims nothing, so its taskUUID can be sent again); inputs are fetched with async I/O and
decoded, outputs encoded and stored, in worker threads, so the event loop never blocks. Upscales wait in the
:class:`Batcher` (in Redis mode: in the shared stream, run by whichever replica's worker takes them); a model-side
failure is the server's ``internalError``, never the client's ``invalidParameter``. Every accepted task ends with
its claim answered once, by whoever answers first (a worker, or this front-end on a timeout or a stop; a task already
in the shared stream is left to the worker when its front-end stops).
"""

import asyncio
import base64
import copy
import hashlib
import hmac
import io
import logging
import traceback
from dataclasses import dataclass, field

from latentup.errors import LatentupError
from latentup.imageio import for_format
from latentup.serve.batcher import Batcher, Place, QueueFull
from latentup.serve.limits import InFlight, Limits
from latentup.serve.records import Record, Records
from latentup.serve.store import ImageStore
from latentup.serve.tasks import (UPSCALE_TYPES, Sources, TaskError, check_with_model, encode_output, error_object,
                                  ignored_settings, load_input, open_image, parse_header, parse_upscale,
                                  read_reference, response_item, run_batch, typed)

log = logging.getLogger("latentup.serve")
HTTP_STATUS = {"missingApiKey": 401, "invalidApiKey": 401, "taskNotFound": 404, "conflictTaskUUID": 409,
               "requestTimeout": 408,
               "requestTooLarge": 413, "rateLimitExceeded": 429, "queueFull": 503, "serverShuttingDown": 503,
               "serviceUnavailable": 503,
               "timeoutProvider": 504, "internalError": 500}
PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")


def message(error: TaskError, task_type=None, task_uuid=None) -> dict:
    return {"errors": [error_object(error, task_type, task_uuid)]}


@dataclass(frozen=True)
class Caller:
    """Who sent a task: the API key's id (it scopes records, uploads and outputs), the base of the imageURLs it is
    given, its connection (counted against ``max_inflight_per_connection``; None: not counted) and its shared
    session (Redis mode, WebSocket: its sync answers go to the session in Redis, whichever replica makes them)."""

    key_id: str
    base_url: str
    connection: object = None
    session: str | None = None


@dataclass
class Ticket:
    """What an accepted task holds: its claim (``token``), its queue place (in-process), the shared session its
    answer goes to (a sync task's, in Redis mode) and what to give back."""

    task_type: str
    task_uuid: str
    token: str
    keep: bool
    place: Place | None = None
    session: str | None = None
    held: list = field(default_factory=list)
    queued: bool = False  # in the shared stream: a worker answers its claim even if this front-end stops

    def release(self) -> None:
        while self.held:
            self.held.pop()()


class Abandoned(Exception):
    """Nobody waits for the running batch any more (its tasks timed out or their clients left)."""


class Stoppable:
    """A denoiser that raises :class:`Abandoned` before its next step once ``stop`` is set."""

    def __init__(self, denoiser, stop):
        self.denoiser, self.stop = denoiser, stop

    def __call__(self, *args, **kwargs):
        if self.stop.is_set():
            raise Abandoned
        return self.denoiser(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


class Service:
    """Tasks in, answers out. ``records``: the taskUUID table (default: in this process); ``queue``: None to run
    every upscale on this process's model, else the shared queue (``redis_queue.SharedQueue``) whose workers run
    them (:meth:`produce`) and answer their claims."""

    def __init__(self, upscaler, store: ImageStore, batcher_options: dict, api_keys=(), fetch=None,
                 task_timeout: float = 300.0, limits: Limits = Limits(), records=None, queue=None):
        self.store, self.fetch, self.limits, self.queue = store, fetch, limits, queue
        self.keys = [key.encode() for key in api_keys]
        self.task_timeout = task_timeout
        self.batcher = Batcher(self._run_batch, **batcher_options)
        self.upscaler = copy.copy(upscaler)  # its own denoiser, which stops when nobody waits for the batch
        self.upscaler.denoiser = Stoppable(upscaler.denoiser, self.batcher.abandoned)
        self.records = records if records is not None else Records(10_000, limits.max_inflight_per_key)
        self.per_connection = InFlight(limits.max_inflight_per_connection, "connection")
        self.in_flight = 0  # tasks accepted and not yet answered
        self._background: set[asyncio.Future] = set()
        self._closing: set[asyncio.Future] = set()  # claims of stopped tasks being answered
        self.draining = False
        self.broken = False  # a background loop ended: /health says unavailable

    # authentication
    def key_id(self, key) -> str | None:
        """A stable id of a valid key ("" when no key is configured), None for a wrong or missing one; every key
        is compared in constant time."""
        if not self.keys:
            return ""
        given = key.encode("utf-8", "replace") if isinstance(key, str) else b""
        matches = [hmac.compare_digest(given, known) for known in self.keys]
        return hashlib.sha256(given).hexdigest() if any(matches) else None

    # the model thread
    def _run_batch(self, payloads: list) -> list:
        """Results (or exceptions) for a batch; a batch that fails is retried task by task, so one bad task never
        fails its neighbours."""
        tasks, images = [p[0] for p in payloads], [p[1] for p in payloads]
        try:
            return run_batch(self.upscaler, tasks, images)
        except Abandoned as error:
            return [error] * len(payloads)
        except Exception as error:
            if len(payloads) > 1:
                log.warning("a batch of %d failed (%s: %s): running its tasks one by one", len(payloads),
                            type(error).__name__, error)
                return [self._run_batch([payload])[0] for payload in payloads]
            return [error]

    # tasks
    async def answer(self, task, caller: Caller = Caller("", "")) -> dict | None:
        """The response message for one task object: ``{"data": [item]}`` or ``{"errors": [error]}``; None when
        it went to the caller's shared session instead."""
        task_type = task.get("taskType") if isinstance(task, dict) else None
        task_uuid = task.get("taskUUID") if isinstance(task, dict) else None
        if task_type == "ping":
            return {"data": [{"taskType": "ping", "pong": True}]}
        try:
            task_type, task_uuid = parse_header(task)
            if task_type == "getResponse":
                return await self._get_response(caller.key_id, task_uuid)
            if self.draining:
                raise TaskError("serverShuttingDown", "the server is shutting down: send the task to another "
                                "server or retry later")
            if task_type not in (*UPSCALE_TYPES, "imageUpload"):
                raise TaskError("unsupportedTaskType", f"taskType {task_type} is not served here: use upscale, "
                                "imageUpscale, imageUpload, getResponse or ping", "taskType")
            work, ticket = await self._admit(task, task_type, task_uuid, caller)
        except TaskError as error:
            return message(error, task_type, task_uuid)
        return await self._start(work, ticket, caller)

    async def _admit(self, task: dict, task_type: str, task_uuid: str, caller: Caller):
        """(the task's work: a function of the future set once the task is accepted for good, its Ticket) once
        every check passed and its taskUUID, queue place and in-flight counts are held; a TaskError (nothing held)
        otherwise."""
        ticket = Ticket(task_type, task_uuid, "", False)
        if task_type == "imageUpload":
            value = self._check_upload(task)
        else:
            parsed = parse_upscale(task, task_type, task_uuid)
            self.limits.check_prompts(parsed)  # before any tokenizer runs over it
            check_with_model(self.upscaler, parsed)
            ticket.keep = parsed.delivery == "async"
            if not self._fetched(parsed.image):  # before decoding: a full queue costs the server nothing
                await self._take_place(ticket)
        ticket.session = None if ticket.keep else caller.session  # async answers wait for getResponse
        try:
            if caller.connection is not None:
                self.per_connection.acquire(caller.connection)
                ticket.held.append(lambda: self.per_connection.release(caller.connection))
            ticket.token = await self.records.claim(caller.key_id, task_uuid, task_type, ticket.keep)
        except BaseException:
            ticket.release()
            raise
        if task_type == "imageUpload":
            return lambda accepted: self._upload(value, task_type, task_uuid, caller, accepted), ticket
        return lambda accepted: self._upscale(parsed, caller, ticket, accepted), ticket

    def _fetched(self, value: str) -> bool:
        """Whether the input is a URL fetched with async I/O (its queue place is taken once it arrived)."""
        return self.fetch is not None and value.startswith(("http://", "https://"))

    async def _take_place(self, ticket: Ticket) -> None:
        ticket.place = await self._reserve()
        if ticket.place is not None:
            ticket.held.append(ticket.place.release)

    async def _reserve(self) -> Place | None:
        if self.queue is not None:
            await self.queue.room()
            return None
        try:
            return self.batcher.reserve()
        except QueueFull:
            raise TaskError("queueFull", "the queue is full: retry in a moment") from None

    async def _start(self, work, ticket: Ticket, caller: Caller) -> dict | None:
        accepted = asyncio.get_running_loop().create_future()
        coroutine = work(accepted)
        job = asyncio.ensure_future(self._run(coroutine, ticket, caller))
        self.in_flight += 1
        self._background.add(job)

        def done(finished):
            self.in_flight -= 1
            self._background.discard(finished)
            ticket.release()  # also for a task stopped before its work started
            if finished.cancelled() and not ticket.queued:
                coroutine.close()
                stopped = message(TaskError("serverShuttingDown", "the task was stopped before it was done (its "
                                            "client left or the server shut down): send it again"),
                                  ticket.task_type, ticket.task_uuid)
                closing = asyncio.ensure_future(self._finish(ticket, caller, stopped))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

        job.add_done_callback(done)
        if ticket.keep:  # answered by getResponse, once the task is accepted for good
            await asyncio.wait({accepted, job}, return_when=asyncio.FIRST_COMPLETED)
            if not accepted.done():  # refused before that (e.g. an unreadable input)
                return job.result()
            return {"data": [{"taskType": ticket.task_type, "taskUUID": ticket.task_uuid, "status": "processing"}]}
        return await job  # cancelled with its caller (a REST client that left, an expired session)

    async def _run(self, work, ticket: Ticket, caller: Caller) -> dict | None:
        """The answer of an accepted task, given to its claim (once); what the task held is given back (for a
        stopped task: by ``_start``'s callback, which runs even when this never started)."""
        try:
            answer = await self._guard(work, ticket.task_type, ticket.task_uuid)
        finally:
            ticket.release()
        return await self._finish(ticket, caller, answer)

    async def _finish(self, ticket: Ticket, caller: Caller, answer: dict) -> dict | None:
        """Give ``answer`` to the task's claim. What the caller gets: this answer, or the one the claim got first
        (another replica's worker); None when that went to the caller's shared session."""
        try:
            won = await self.records.finish(caller.key_id, ticket.task_uuid, ticket.token, answer, self.store.ttl,
                                            ticket.session)
            if won:  # 2: its session was gone from Redis, so it is delivered from here
                return None if ticket.session and won != 2 else answer
            record = await self.records.get(caller.key_id, ticket.task_uuid)
            if record is None or record.token != ticket.token or not record.done:  # lost with Redis' state
                return answer
            if ticket.session and not record.unsent:
                return None
            return await self.stored_answer(record, caller.key_id, ticket.task_uuid)
        except TaskError as error:  # the shared table is unreachable: the caller gets the answer from here
            log.warning("task %s: its answer was not recorded (%s)", ticket.task_uuid, error)
            return answer

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

    async def _read(self, value: str, parameter: str, caller: Caller) -> bytes:
        """The bytes of an image reference: URLs fetched with async I/O, the rest read in a worker thread."""
        if self._fetched(value):
            return await self.fetch(value, parameter)
        sources = Sources(lookup=lambda image_uuid: self.store.read(image_uuid, caller.key_id))
        return await asyncio.to_thread(read_reference, value, parameter, sources)

    @staticmethod
    def _check_upload(task: dict) -> str:
        unknown = sorted(set(task) - {"taskType", "taskUUID", "image"})
        if unknown:
            raise TaskError("invalidParameter", f"{unknown[0]} is not supported in imageUpload", unknown[0])
        if "image" not in task:
            raise TaskError("missingParameter", "image is required: a data URI, base64 or URL", "image")
        return typed(task["image"], str, "image")

    async def _upload(self, value: str, task_type: str, task_uuid: str, caller: Caller, accepted) -> dict:
        accepted.set_result(None)
        data = await self._read(value, "image", caller)

        def store():  # what was decoded, as PNG: never the bytes as sent (trailing data, other pictures of an MPO)
            image = open_image(data, "image")
            image = for_format(image, "PNG")
            buffer = io.BytesIO()
            (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
            return self.store.put(buffer.getvalue(), "png", "image/png", owner=caller.key_id)

        image_uuid, name = await asyncio.to_thread(store)
        return {"data": [{"taskType": task_type, "taskUUID": task_uuid, "imageUUID": image_uuid,
                          "imageURL": f"{caller.base_url}/image/{name}"}]}

    async def _upscale(self, parsed, caller: Caller, ticket: Ticket, accepted) -> dict:
        """Read and check the input, then run it here or hand it to the shared queue (which sets ``accepted``
        once the task is stored in Redis). A fetched input takes its queue place once it arrived: slow fetches
        (at most ``fetch.MAX_FETCHES`` at once) never fill the queue."""
        data = await self._read(parsed.image, parsed.image_parameter, caller)
        if self._fetched(parsed.image):
            await self._take_place(ticket)
        if self.queue is None:
            accepted.set_result(None)
        image, input_uuid = await asyncio.to_thread(load_input, parsed, Sources(lookup=lambda image_uuid: None), data)
        self.limits.check_cost(self.upscaler.settings(**parsed.settings).steps, *image.size)
        if self.queue is not None:  # answered by a worker; what the claim got is read back by _finish
            return await self.queue.run(parsed, data, caller, ticket, accepted)
        return await self.produce(parsed, image, input_uuid, caller.key_id, caller.base_url, ticket.place)

    async def run_queued(self, parsed, data: bytes, owner: str, base_url: str) -> dict:
        """The answer to a task of the shared queue (its input as read by its front-end), made here."""
        async def work():
            image, input_uuid = await asyncio.to_thread(load_input, parsed, Sources(lookup=lambda image_uuid: None),
                                                        data)
            return await self.produce(parsed, image, input_uuid, owner, base_url, None)

        return await self._guard(work(), parsed.task_type, parsed.task_uuid)

    async def produce(self, parsed, image, input_uuid: str, owner: str, base_url: str, place: Place | None) -> dict:
        """Run one task on this process's model (in its queue ``place``) and store its output: the answer."""
        future = self.batcher.submit(parsed.batch_key(image), (parsed, image), place)
        try:
            output = await asyncio.wait_for(asyncio.shield(future), self.task_timeout)
        except asyncio.TimeoutError:
            future.cancel()  # the model stops at its next step when nobody else waits for the batch
            raise TaskError("timeoutProvider", f"the task took over {self.task_timeout:g} s: retry later or "
                            "with fewer steps") from None
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as error:  # the model's failure, not the client's
            log.error("task %s: the model failed (%s: %s)", parsed.task_uuid, type(error).__name__, error)
            raise TaskError("internalError", f"the model failed on this task ({error}): this is the server's "
                            "fault; see its log") from None
        ttl = min(parsed.ttl or self.store.ttl, self.store.ttl)

        def encode():
            data, suffix, mime = encode_output(output, parsed)
            image_uuid, name = self.store.put(data, suffix, mime, ttl, owner=owner)
            return response_item(parsed, data, mime, image_uuid, input_uuid, f"{base_url}/image/{name}")

        item = await asyncio.to_thread(encode)
        warnings = ignored_settings(self.upscaler, parsed)
        if warnings:
            item["warnings"] = warnings
        return {"data": [item]}

    async def _get_response(self, owner: str, task_uuid: str) -> dict:
        record = await self.records.get(owner, task_uuid)
        if record is None:
            raise TaskError("taskNotFound", f"no task {task_uuid} here (or it expired)", "taskUUID")
        if not record.keep:
            raise TaskError("taskNotFound", f"task {task_uuid} was delivered sync, on its own request: getResponse "
                            'serves tasks sent with "deliveryMethod": "async"', "taskUUID")
        if not record.done:
            return {"data": [{"taskType": record.task_type, "taskUUID": task_uuid, "status": "processing"}]}
        return await self.stored_answer(record, owner, task_uuid)

    async def stored_answer(self, record: Record, owner: str, task_uuid: str) -> dict:
        """A finished record's answer, its inline image read back from the store."""
        if record.image is None:
            return record.answer
        image_uuid, field_name, mime = record.image
        data = await asyncio.to_thread(self.store.read, image_uuid, owner)
        if data is None:
            raise TaskError("taskNotFound", f"the output of task {task_uuid} expired", "taskUUID")
        text = base64.b64encode(data).decode()
        return {"data": [{**record.answer["data"][0],
                          field_name: text if field_name == "imageBase64Data" else f"data:{mime};base64,{text}"}]}

    async def health(self) -> dict:
        """Counters; ``status`` is ``unavailable`` (and the shared counts null) while Redis is unreachable."""
        batcher = self.batcher
        try:
            (images, size), records = await asyncio.to_thread(self.store.stats), await self.records.count()
            status = "unavailable" if self.broken else "draining" if self.draining else "ok"
        except TaskError:
            images = size = records = None
            status = "unavailable"
        return {"status": status, "queued": len(batcher.jobs), "running": batcher.running,
                "inFlight": self.in_flight, "batches": batcher.batches, "tasksRun": batcher.done,
                "modelThreadRestarts": batcher.thread.restarts, "storedImages": images, "storedBytes": size,
                "records": records}

    async def drain(self, pending=lambda: 0, timeout: float = 60.0) -> None:
        """Refuse new tasks, then wait (at most ``timeout`` s) until every accepted one is answered and
        ``pending()`` (answers not yet delivered) is 0; then stop what still runs."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.in_flight or pending()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        jobs = list(self._background)
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=1.0)
        await asyncio.sleep(0)  # their callbacks start the answers of stopped claims: they are given before exit
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=2.0)
        self.batcher.close()
