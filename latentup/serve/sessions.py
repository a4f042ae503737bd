"""WebSocket sessions that outlive their connection (RUNWARE.md §1): a client that reconnects and authenticates
with its ``connectionSessionUUID`` within ``ttl`` seconds gets the answers it did not receive.

Delivery is acknowledged, not assumed: a message written to the socket stays owed (``unacked``) until the socket
outlived it by ``ack_after`` seconds (one keepalive round: a pong after it proves the client read it) or the client
closed the socket itself (code 1000 / 1001). A socket lost any other way gives its owed messages back to the
buffer, in order, for the resume (an answer may then come twice: match by taskUUID). A session holds at most
``max_bytes`` of waiting answers; one that does not fit is replaced by a short ``sessionBufferFull`` error for its
task. Sessions are bound to the API key that opened them; the same key may take a session over from a live socket
(a reconnecting client often comes back before its old connection is known dead), which then gets closed. The
tasks a session's connections sent and that still run for it (:meth:`Session.track`) are stopped when it expires.
``redis_sessions`` keeps sessions in Redis, for every replica; both have this async interface.
"""

import asyncio
import contextlib
import time
import uuid
from collections import deque

from latentup.serve.tasks import TaskError, error_object
from latentup.serve.wire import dumps

CLEAN_CLOSE = (1000, 1001)  # the client said goodbye: what it did not read, it did not want
TAKEN_OVER = 4000  # close code of a socket whose session another connection resumed


def overflow(text: str, message: dict) -> str:
    """What waits in a session instead of ``message`` (as ``text``) when it does not fit."""
    item = (message.get("data") or message.get("errors") or [{}])[0]
    error = TaskError("sessionBufferFull", f"an answer of {len(text)} bytes did not fit in the session's buffer "
                      "while the client was away: resume sooner, or ask for outputType URL")
    return dumps({"errors": [error_object(error, item.get("taskType"), item.get("taskUUID"))]})


class Session:
    def __init__(self, key_id: str, max_bytes: int, ack_after: float):
        self.uuid, self.key_id, self.max_bytes, self.ack_after = str(uuid.uuid4()), key_id, max_bytes, ack_after
        self.socket = None
        self.buffer: deque[str] = deque()  # messages waiting for a socket (JSON text)
        self.unacked: deque[tuple[float, str]] = deque()  # (time sent, message) written but not known received
        self.detached_at = time.monotonic()
        self.jobs: set[asyncio.Future] = set()  # tasks running for this session
        self._lock = asyncio.Lock()

    def track(self, job: asyncio.Future) -> None:
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)

    async def attach(self, socket) -> None:
        """Use ``socket`` from now on (closing one it replaces) and send what is owed."""
        async with self._lock:
            old, self.socket = self.socket, socket
            if old is not None and old is not socket:
                self._give_back()
                asyncio.ensure_future(_close(old))
            while self.buffer:
                text = self.buffer.popleft()
                if not await self._send(text):
                    self.buffer.appendleft(text)
                    break

    async def detach(self, socket, clean: bool = False) -> None:
        self._detach(socket, clean)

    def _detach(self, socket, clean: bool = False) -> None:
        if self.socket is socket:
            self.socket, self.detached_at = None, time.monotonic()
            if clean:
                self.unacked.clear()
            else:
                self._give_back()

    def _give_back(self) -> None:
        self.buffer.extendleft(text for _, text in reversed(self.unacked))
        self.unacked.clear()

    async def deliver(self, message: dict) -> None:
        text = dumps(message)
        async with self._lock:
            if not await self._send(text):
                self._keep(text, message)

    def _keep(self, text: str, message: dict) -> None:
        if self.buffered_bytes() + len(text) > self.max_bytes:
            text = overflow(text, message)
        self.buffer.append(text)

    def buffered_bytes(self) -> int:
        return sum(map(len, self.buffer))

    async def _send(self, text: str) -> bool:
        if self.socket is None:
            return False
        now = time.monotonic()
        while self.unacked and (self.unacked[0][0] < now - self.ack_after or
                                sum(len(t) for _, t in self.unacked) > self.max_bytes):
            self.unacked.popleft()
        try:
            await self.socket.send_text(text)
        except Exception:  # the connection went away mid-send: keep the message for a resume
            self._detach(self.socket)
            return False
        self.unacked.append((now, text))
        return True

    def owed(self) -> int:
        """Messages not yet written to a socket, while one is attached (a drain waits for them)."""
        return len(self.buffer) if self.socket is not None else 0


async def _close(socket) -> None:
    with contextlib.suppress(Exception):
        await socket.close(code=TAKEN_OVER)


class Sessions:
    shared = False  # sessions live in this process: answers are delivered by whoever made them

    def __init__(self, ttl: float, max_bytes: int = 2**62, ack_after: float = 40.0):
        self.ttl, self.max_bytes, self.ack_after = ttl, max_bytes, ack_after
        self._sessions: dict[str, Session] = {}

    async def open(self, key_id: str, resume: str | None = None) -> Session:
        """The session ``resume`` opened with the same key, else a new one."""
        await self.purge()
        session = self._sessions.get(resume) if resume else None
        if session is None or session.key_id != key_id:
            session = Session(key_id, self.max_bytes, self.ack_after)
            self._sessions[session.uuid] = session
        return session

    async def purge(self) -> None:
        """Forget sessions detached for longer than ``ttl`` (their undelivered results with them) and stop the tasks
        still running for them."""
        limit = time.monotonic() - self.ttl
        for key in [k for k, s in self._sessions.items() if s.socket is None and s.detached_at < limit]:
            for job in self._sessions.pop(key).jobs:
                job.cancel()

    def owed(self) -> int:
        return sum(s.owed() for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)
