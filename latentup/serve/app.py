"""The ASGI app (Starlette): REST and WebSocket on one port, as the hosted API (RUNWARE.md §1).

- ``POST /v1`` (and ``/``): a JSON array of tasks; the key as ``Authorization: Bearer KEY`` or a first
  ``authentication`` task; the answer is ``{"data": [...], "errors": [...]}`` once every task is answered.
- WebSocket ``/v1`` (and ``/``): the first message authenticates (``connectionSessionUUID`` resumes a session);
  then any number of task arrays, each task answered on its own as ``{"data": [item]}`` / ``{"errors": [error]}``,
  matched by taskUUID; answers that finish while the client is away wait in its session.
- ``GET /image/<imageUUID>.<suffix>``: stored uploads and outputs; ``GET /health``: queue and counters.
"""

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from latentup.serve.service import HTTP_STATUS, Service, message
from latentup.serve.sessions import Sessions
from latentup.serve.tasks import TaskError

AUTH_TIMEOUT = 30.0  # seconds a new socket may take to authenticate


class RequestError(Exception):
    """A request that is not an array of tasks at all (answered as a whole)."""

    def __init__(self, error: TaskError):
        self.error = error


def parse_request(text: bytes | str, max_tasks: int) -> list:
    try:
        tasks = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError(TaskError("invalidRequest", "the request is not valid JSON: send a JSON array of task "
                                     "objects")) from None
    if not isinstance(tasks, list) or not tasks:
        raise RequestError(TaskError("invalidRequest", 'the request must be a non-empty JSON array of tasks, e.g. '
                                     '[{"taskType": "ping", "ping": true}]'))
    if len(tasks) > max_tasks:
        raise RequestError(TaskError("invalidRequest", f"{len(tasks)} tasks in one request, over the cap of "
                                     f"{max_tasks}: split it"))
    return tasks


async def _receive(websocket: WebSocket) -> str | bytes:
    """The next text or binary frame; WebSocketDisconnect when the client left."""
    frame = await websocket.receive()
    if frame["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(frame.get("code", 1000))
    return frame.get("text") or frame.get("bytes") or b""


def _auth_error(task) -> TaskError:
    has_key = isinstance(task, dict) and task.get("apiKey")
    return TaskError("invalidApiKey" if has_key else "missingApiKey",
                     "invalid API key: pass a key the server was started with" if has_key else
                     "an API key is required: send Authorization: Bearer KEY or an authentication task first",
                     "apiKey")


def create_app(service: Service, sessions: Sessions, max_tasks: int, max_request_bytes: int, lifespan=None):
    answering: set[asyncio.Task] = set()  # WebSocket tasks being answered (they outlive their socket)

    async def rest(request: Request) -> JSONResponse:
        try:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_request_bytes:
                    raise RequestError(TaskError("requestTooLarge", f"the request is over {max_request_bytes} "
                                                 "bytes: send fewer or smaller images"))
            tasks = parse_request(bytes(body), max_tasks)
            first = tasks[0]
            authenticating = isinstance(first, dict) and first.get("taskType") == "authentication"
            header = request.headers.get("authorization", "")
            key = first.get("apiKey") if authenticating else header.removeprefix("Bearer ").strip() or None
            if service.key_id(key) is None:
                raise RequestError(_auth_error({"apiKey": key}))
        except RequestError as failure:
            return JSONResponse(message(failure.error, "authentication" if failure.error.parameter == "apiKey"
                                        else None), status_code=HTTP_STATUS.get(failure.error.code, 400))
        answers = await asyncio.gather(*(service.answer(task) for task in tasks[1 if authenticating else 0:]))
        data = [item for answer in answers for item in answer.get("data", [])]
        errors = [item for answer in answers for item in answer.get("errors", [])]
        if authenticating:
            data.insert(0, {"taskType": "authentication"})
        status = 200 if data or not errors else HTTP_STATUS.get(errors[0]["code"], 400)
        return JSONResponse({"data": data, **({"errors": errors} if errors else {})}, status_code=status)

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        session = None
        try:
            session = await _authenticate(websocket)
            if session is None:
                return
            while True:
                try:
                    tasks = parse_request(await _receive(websocket), max_tasks)
                except RequestError as failure:
                    await session.deliver(message(failure.error))
                    continue
                for task in tasks:
                    if isinstance(task, dict) and task.get("taskType") == "authentication":
                        await session.deliver({"data": [{"taskType": "authentication",
                                                         "connectionSessionUUID": session.uuid}]})
                        continue
                    job = asyncio.ensure_future(_answer(session, task))
                    answering.add(job)
                    job.add_done_callback(answering.discard)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                session.detach(websocket)

    async def _answer(session, task) -> None:
        await session.deliver(await service.answer(task))

    async def _authenticate(websocket: WebSocket):
        """The session the first message opens or resumes, else None after answering the error."""
        try:
            first = parse_request(await asyncio.wait_for(_receive(websocket), AUTH_TIMEOUT), max_tasks)[0]
        except (RequestError, asyncio.TimeoutError):
            first = None
        if not (isinstance(first, dict) and first.get("taskType") == "authentication"):
            error = TaskError("missingApiKey", 'the first message must be [{"taskType": "authentication", '
                              '"apiKey": "..."}]', "apiKey")
        else:
            key_id = service.key_id(first.get("apiKey"))
            if key_id is not None:
                resume = first.get("connectionSessionUUID")
                session = sessions.open(key_id, resume if isinstance(resume, str) else None)
                await websocket.send_json({"data": [{"taskType": "authentication",
                                                     "connectionSessionUUID": session.uuid}]})
                await session.attach(websocket)
                return session
            error = _auth_error(first)
        await websocket.send_json(message(error, "authentication"))
        await websocket.close(code=1008)
        return None

    async def image(request: Request):
        stem, _, suffix = request.path_params["name"].partition(".")
        found = service.store.get(stem)
        if found is None or found[0].name != request.path_params["name"]:
            error = TaskError("taskNotFound", "no such image here (or it expired)", "imageURL")
            return JSONResponse(message(error), status_code=404)
        return FileResponse(found[0], media_type=found[1])

    async def health(request: Request) -> JSONResponse:
        batcher = service.batcher
        return JSONResponse({"status": "draining" if service.draining else "ok", "queued": len(batcher.jobs),
                             "running": batcher.running, "inFlight": service.in_flight, "batches": batcher.batches,
                             "tasksRun": batcher.done, "storedImages": len(service.store)})

    routes = [Route(path, rest, methods=["POST"]) for path in ("/v1", "/")]
    routes += [WebSocketRoute(path, socket) for path in ("/v1", "/")]
    routes += [Route("/image/{name}", image), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)
