"""The ASGI app (Starlette): REST and WebSocket on one port, as the hosted API (RUNWARE.md §1).

- ``POST /v1`` (and ``/``): a JSON array of tasks; the key as ``Authorization: Bearer KEY`` (checked before the body
  is read) or a first ``authentication`` task (then the body may hold at most ``max_auth_bytes`` and must arrive
  within ``auth_timeout`` s; a server without keys takes ``max_request_bytes`` from anyone); the answer is
  ``{"data": [...], "errors": [...]}`` once every task is answered. A client that leaves takes its tasks with it.
- WebSocket ``/v1`` (and ``/``): the first message authenticates within ``auth_timeout`` s and ``max_auth_bytes``
  (``connectionSessionUUID`` resumes a session; tasks beside it in that message are answered too); then any number
  of task arrays, each task answered on its own as ``{"data": [item]}`` / ``{"errors": [error]}``, matched by
  taskUUID; answers that finish while the client is away wait in its session. A connection with ``max_pending``
  answers not yet made or delivered (a client that does not read them) is not read until some are.
- ``GET /image/<imageUUID>.<suffix>``: stored uploads and outputs (``nosniff``); ``GET /health``: queue and counters.

Without ``public_url``, imageURLs start with the request's own ``Host`` (when it is a plain host[:port]), else
``fallback_url``.
"""

import asyncio
import contextlib
import json
import logging
import os
import re

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from latentup.serve.service import HTTP_STATUS, Caller, Service, message
from latentup.serve.sessions import CLEAN_CLOSE, Sessions
from latentup.serve.tasks import TaskError
from latentup.serve.wire import JSONResponse, dumps

log = logging.getLogger("latentup.serve")
HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")


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


def _auth_error(key) -> TaskError:
    return TaskError("invalidApiKey" if key else "missingApiKey",
                     "invalid API key: pass a key the server was started with" if key else
                     "an API key is required: send Authorization: Bearer KEY or an authentication task first",
                     "apiKey")


def _is_auth(task) -> bool:
    return isinstance(task, dict) and task.get("taskType") == "authentication"


async def _read_body(request: Request, limit: int, deadline: float | None = None) -> bytes:
    """The body, at most ``limit`` bytes, arrived within ``deadline`` s (None: no deadline)."""
    try:
        return await asyncio.wait_for(_read_all(request, limit), deadline)
    except asyncio.TimeoutError:
        raise RequestError(TaskError("requestTimeout", f"the request body did not arrive within {deadline:g} s: "
                                     "send it at once (or authenticate with Authorization: Bearer KEY)")) from None
    except asyncio.CancelledError:  # a shutdown's grace period ended while the body still arrived
        raise RequestError(TaskError("serverShuttingDown", "the server shut down while the request arrived: send "
                                     "it to another server or retry later")) from None


async def _read_all(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(TaskError("requestTooLarge", f"the request is over {limit} bytes: send fewer or "
                                         "smaller images (or authenticate with Authorization: Bearer KEY)"))
    return bytes(body)


async def _until_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: Service, sessions: Sessions, max_tasks: int, max_request_bytes: int, lifespan=None, *,
               max_auth_bytes: int = 256 * 2**10, auth_timeout: float = 5.0, public_url: str = "",
               fallback_url: str = "", max_pending: int = 116):
    """``max_pending``: answers of one WebSocket connection being made or delivered before its next message is
    read (backpressure)."""
    answering: set[asyncio.Task] = set()  # WebSocket answers being made or delivered (they outlive their socket)

    def base_url(scope) -> str:
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if public_url or not HOST.match(host):
            return (public_url or fallback_url).rstrip("/")
        return f"{'https' if scope['scheme'] in ('https', 'wss') else 'http'}://{host}"

    async def rest(request: Request) -> Response:
        try:
            header = request.headers.get("authorization")
            if header is not None:  # the key first: nothing of the body is read for a wrong one
                scheme, _, key = header.partition(" ")
                key = key.strip() if scheme.lower() == "bearer" else None
                if key is None:
                    raise RequestError(TaskError("invalidApiKey", "the Authorization header must be 'Bearer KEY'",
                                                 "apiKey"))
                if service.key_id(key) is None:
                    raise RequestError(_auth_error(key))
                tasks = parse_request(await _read_body(request, max_request_bytes), max_tasks)
                authenticating = _is_auth(tasks[0])
            else:  # unauthenticated until the body says otherwise: a small body, soon (unless no key is needed)
                body = await (_read_body(request, max_auth_bytes, auth_timeout) if service.keys else
                              _read_body(request, max_request_bytes))
                tasks = parse_request(body, max_tasks)
                authenticating = _is_auth(tasks[0])
                key = tasks[0].get("apiKey") if authenticating else None
                if service.key_id(key) is None:
                    raise RequestError(_auth_error(key))
        except RequestError as failure:
            return JSONResponse(message(failure.error, "authentication" if failure.error.parameter == "apiKey"
                                        else None), status_code=HTTP_STATUS.get(failure.error.code, 400))
        except ClientDisconnect:
            log.warning("a client left during its upload (%s)", request.client.host if request.client else "?")
            return Response(status_code=400)
        caller = Caller(service.key_id(key), base_url(request.scope))
        work = asyncio.gather(*(service.answer(task, caller) for task in tasks[1 if authenticating else 0:]),
                              return_exceptions=True)
        gone = asyncio.ensure_future(_until_gone(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():  # nobody will receive the answers: stop their work
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            log.info("a REST client left before its answer: its %d task(s) stopped", len(tasks))
            return Response(status_code=499)
        stopped = message(TaskError("serverShuttingDown", "the server shut down before this task was done: retry"))
        answers = [stopped if isinstance(answer, BaseException) else answer for answer in work.result()]
        data = [item for answer in answers for item in answer.get("data", [])]
        errors = [item for answer in answers for item in answer.get("errors", [])]
        if authenticating:
            data.insert(0, {"taskType": "authentication"})
        status = 200 if data or not errors else HTTP_STATUS.get(errors[0]["code"], 400)
        return JSONResponse({"data": data, **({"errors": errors} if errors else {})}, status_code=status)

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        session, clean = None, False
        try:
            session, tasks = await _authenticate(websocket)
            if session is None:
                return
            caller = Caller(session.key_id, base_url(websocket.scope), connection=websocket,
                            session=session.uuid if sessions.shared else None)
            mine: set[asyncio.Future] = set()  # this connection's answers not yet made or delivered
            while True:
                for task in tasks:
                    if _is_auth(task):
                        await session.deliver({"data": [{"taskType": "authentication",
                                                         "connectionSessionUUID": session.uuid}]})
                        continue
                    job = asyncio.ensure_future(_answer(session, task, caller))
                    session.track(job)
                    for jobs in (answering, mine):
                        jobs.add(job)
                        job.add_done_callback(jobs.discard)
                while len(mine) >= max_pending:  # a client that does not read its answers is not read either
                    await asyncio.wait(set(mine), return_when=asyncio.FIRST_COMPLETED)
                try:
                    tasks = parse_request(await _receive(websocket), max_tasks)
                except RequestError as failure:
                    await session.deliver(message(failure.error))
                    tasks = []
        except WebSocketDisconnect as left:
            clean = left.code in CLEAN_CLOSE
        finally:
            if session is not None:
                await session.detach(websocket, clean)

    async def _answer(session, task, caller) -> None:
        answer = await service.answer(task, caller)
        if answer is not None:  # else it went to the shared session already
            await session.deliver(answer)

    async def _authenticate(websocket: WebSocket):
        """(the session the first message opens or resumes, the other tasks of that message), else (None, [])
        after answering the error."""
        try:
            tasks = parse_request(await asyncio.wait_for(_receive(websocket), auth_timeout), max_tasks)
        except (RequestError, asyncio.TimeoutError):
            tasks = [None]
        first = tasks[0]
        if not _is_auth(first):
            error = TaskError("missingApiKey", 'the first message must be [{"taskType": "authentication", '
                              f'"apiKey": "..."}}] within {auth_timeout:g} s', "apiKey")
        else:
            key_id = service.key_id(first.get("apiKey"))
            if key_id is not None:
                resume = first.get("connectionSessionUUID")
                try:
                    session = await sessions.open(key_id, resume if isinstance(resume, str) else None)
                except TaskError as error:  # the shared sessions are unreachable
                    await websocket.send_text(dumps(message(error, "authentication")))
                    await websocket.close(code=1013)  # try again later
                    return None, []
                await websocket.send_text(dumps({"data": [{"taskType": "authentication",
                                                           "connectionSessionUUID": session.uuid}]}))
                await session.attach(websocket)
                return session, tasks[1:]
            error = _auth_error(first.get("apiKey"))
        await websocket.send_text(dumps(message(error, "authentication")))
        await websocket.close(code=1008)
        return None, []

    async def image(request: Request):
        stem, _, suffix = request.path_params["name"].partition(".")
        try:
            found = await asyncio.to_thread(service.store.get, stem)
        except TaskError as error:  # the shared store is unreachable
            return JSONResponse(message(error), status_code=HTTP_STATUS[error.code])
        gone = TaskError("taskNotFound", "no such image here (or it expired)", "imageURL")
        if found is None or found.name != request.path_params["name"]:
            return JSONResponse(message(gone), status_code=404)
        headers = {"X-Content-Type-Options": "nosniff"}
        if found.data is not None:
            return Response(found.data, media_type=found.mime, headers=headers)
        try:  # the open file outlives an eviction from now on
            handle = await asyncio.to_thread(open, found.path, "rb")
        except FileNotFoundError:  # evicted since
            return JSONResponse(message(gone), status_code=404)

        async def chunks():
            with handle:
                while chunk := await asyncio.to_thread(handle.read, 2**20):
                    yield chunk

        headers["Content-Length"] = str(os.fstat(handle.fileno()).st_size)
        return StreamingResponse(chunks(), media_type=found.mime, headers=headers)

    async def health(request: Request) -> JSONResponse:
        found = await service.health()
        return JSONResponse({**found, "sessions": len(sessions)}, status_code=503 if found["status"] ==
                            "unavailable" else 200)

    routes = [Route(path, rest, methods=["POST"]) for path in ("/v1", "/")]
    routes += [WebSocketRoute(path, socket) for path in ("/v1", "/")]
    routes += [Route("/image/{name}", image), Route("/health", health)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.pending = lambda: sessions.owed() + len(answering)  # answers a drain waits for
    return app
