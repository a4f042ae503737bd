"""WebSocket sessions that outlive their connection (RUNWARE.md §1): a client that reconnects and authenticates
with its ``connectionSessionUUID`` within ``ttl`` seconds gets the results that finished while it was away.

A message is sent on the session's socket when one is attached and the send succeeds; otherwise it is buffered and
sent, in order, when the session resumes. Sessions are bound to the API key that opened them.
"""

import asyncio
import time
import uuid


class Session:
    def __init__(self, key_id: str):
        self.uuid, self.key_id = str(uuid.uuid4()), key_id
        self.socket = None
        self.buffer: list[dict] = []
        self.detached_at = time.monotonic()
        self._lock = asyncio.Lock()

    async def attach(self, socket) -> None:
        """Use ``socket`` from now on (replacing an older one) and send what was buffered."""
        async with self._lock:
            self.socket = socket
            pending, self.buffer = self.buffer, []
            for position, message in enumerate(pending):
                if not await self._send(message):
                    self.buffer = pending[position:] + self.buffer
                    break

    def detach(self, socket) -> None:
        if self.socket is socket:
            self.socket, self.detached_at = None, time.monotonic()

    async def deliver(self, message: dict) -> None:
        async with self._lock:
            if not await self._send(message):
                self.buffer.append(message)

    async def _send(self, message: dict) -> bool:
        if self.socket is None:
            return False
        try:
            await self.socket.send_json(message)
            return True
        except Exception:  # the connection went away mid-send: keep the message for a resume
            self.detach(self.socket)
            return False


class Sessions:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}

    def open(self, key_id: str, resume: str | None = None) -> Session:
        """The live session ``resume`` opened with the same key, else a new one."""
        self.purge()
        session = self._sessions.get(resume) if resume else None
        if session is None or session.key_id != key_id:
            session = Session(key_id)
            self._sessions[session.uuid] = session
        return session

    def purge(self) -> None:
        """Forget sessions detached for longer than ``ttl`` (their undelivered results with them)."""
        limit = time.monotonic() - self.ttl
        for key in [k for k, s in self._sessions.items() if s.socket is None and s.detached_at < limit]:
            del self._sessions[key]

    def buffered(self) -> int:
        return sum(len(s.buffer) for s in self._sessions.values())
