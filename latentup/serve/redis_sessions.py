"""The WebSocket sessions of ``sessions.py`` in Redis: a client may resume its session on any replica, and gets what
it did not receive, once, wherever it was made.

A session is a hash (API key id, the replica holding its socket, byte counts) with two lists: ``buf``, answers
waiting for a socket, and ``sent``, answers written to a socket and not yet known received (``time text``).
Whoever makes an answer pushes it to ``buf`` (at most ``max_bytes``, held by a socket or not, though a held session
takes one answer of any size into an empty ``buf``: beyond, the short ``sessionBufferFull`` error in its place) and
notes the holder, whose pump moves it to the socket and to ``sent``.
Delivery is acknowledged as in ``sessions.py``: ``sent`` forgets a message once the socket outlived it by
``ack_after`` seconds; a clean close forgets them all; any other loss, and any resume (on this replica or another,
even after this one was killed), gives them back to the head of ``buf``. A resume elsewhere tells the old holder to
close its socket. The holder keeps the keys alive, and recreates a hash Redis lost (restarted empty, evicted) at its
next tick or answer; a detached session expires ``ttl`` seconds later, and the tasks still running for it here are
stopped. The scripts are atomic, so two replicas never both send one message.
"""

import asyncio
import contextlib
import logging
import time
import uuid

from latentup.serve.redis_link import DOWN, Link, guarded, key
from latentup.serve.sessions import TAKEN_OVER, overflow
from latentup.serve.wire import dumps

log = logging.getLogger("latentup.serve")

PUSH = """
local function push(hash, buf, text, spill, max, prefix, sid)
  if redis.call('EXISTS', hash) == 0 then return 0 end
  local holder = redis.call('HGET', hash, 'holder')
  local bytes = tonumber(redis.call('HGET', hash, 'bytes'))
  if bytes + #text > tonumber(max) and (holder == '' or bytes > 0) then text = spill end
  redis.call('RPUSH', buf, text)
  redis.call('HINCRBY', hash, 'bytes', #text)
  local ttl = redis.call('PTTL', hash)
  if ttl > 0 then redis.call('PEXPIRE', buf, ttl) end
  if holder ~= '' then redis.call('PUBLISH', prefix .. holder, cjson.encode({kind = 'session', session = sid})) end
  return 1
end
"""
GIVE_BACK = """
local function give_back(hash, buf, sent)
  local texts = redis.call('LRANGE', sent, 0, -1)
  for i = #texts, 1, -1 do
    local text = string.sub(texts[i], string.find(texts[i], ' ') + 1)
    redis.call('LPUSH', buf, text)
    redis.call('HINCRBY', hash, 'bytes', #text)
  end
  redis.call('DEL', sent)
  redis.call('HSET', hash, 'sentbytes', 0)
end
local function expire(ms) for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ms) end end
"""
DELIVER = PUSH + "return push(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])"
ATTACH = GIVE_BACK + """
local old = redis.call('HGET', KEYS[1], 'holder')
if not old then return false end
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
give_back(KEYS[1], KEYS[2], KEYS[3])
expire(ARGV[2])
return old
"""
DETACH = GIVE_BACK + """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'holder', '')
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[1], 'sentbytes', 0)
else
  give_back(KEYS[1], KEYS[2], KEYS[3])
end
expire(ARGV[3])
return 1
"""
POP = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return false end
local now, sb = tonumber(ARGV[2]), tonumber(redis.call('HGET', KEYS[1], 'sentbytes'))
while true do
  local head = redis.call('LINDEX', KEYS[3], 0)
  if not head then break end
  local cut = string.find(head, ' ')
  if tonumber(string.sub(head, 1, cut - 1)) >= now - tonumber(ARGV[3]) and sb <= tonumber(ARGV[4]) then break end
  redis.call('LPOP', KEYS[3])
  sb = sb - (#head - cut)
end
local text = redis.call('LPOP', KEYS[2])
if text then
  redis.call('HINCRBY', KEYS[1], 'bytes', -#text)
  redis.call('RPUSH', KEYS[3], ARGV[2] .. ' ' .. text)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  sb = sb + #text
end
redis.call('HSET', KEYS[1], 'sentbytes', sb)
return text
"""


def session_keys(sid: str) -> list[str]:
    return [key("session", sid), key("session", sid, "buf"), key("session", sid, "sent")]


class RedisSession:
    def __init__(self, sessions: "RedisSessions", sid: str, key_id: str):
        self.sessions, self.uuid, self.key_id, self.keys = sessions, sid, key_id, session_keys(sid)
        self.socket = None
        self.jobs: set[asyncio.Future] = set()  # tasks running for this session on this replica
        self._lock = asyncio.Lock()

    def track(self, job: asyncio.Future) -> None:
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)

    async def attach(self, socket) -> None:
        """Hold the session here (telling a replica that held it to close its socket) and send what is owed."""
        old_socket, self.socket = self.socket, socket
        if old_socket is not None and old_socket is not socket:
            asyncio.ensure_future(_close(old_socket))
        link = self.sessions.link
        try:
            old = await self.sessions.scripts["attach"](self.keys, [link.id, self.sessions.refresh_ms])
            if old and old.decode() not in ("", link.id):
                await link.note(old.decode(), kind="takeover", session=self.uuid)
        except DOWN as error:  # answers are sent directly until Redis is back
            log.warning("session %s: attached without Redis (%s)", self.uuid, error)
        await self.pump()

    async def detach(self, socket, clean: bool = False) -> None:
        if self.socket is not socket:
            return
        self.socket = None
        with contextlib.suppress(*DOWN):  # without Redis, what was sent stays owed until the session expires
            await self.sessions.scripts["detach"](self.keys, [self.sessions.link.id, int(clean),
                                                              self.sessions.ttl_ms])

    async def deliver(self, message: dict) -> None:
        text = dumps(message)
        push = self.sessions.scripts["deliver"]
        arguments = [text, overflow(text, message), self.sessions.max_bytes, key("replica", ""), self.uuid]
        try:
            if not await push(self.keys, arguments) and self.socket is not None:  # Redis lost it (restarted empty)
                await self.sessions.create(self, self.sessions.link.id)
                await push(self.keys, arguments)
        except DOWN:  # Redis is away: straight to the socket, if there is one
            if self.socket is not None:
                with contextlib.suppress(Exception):
                    await self.socket.send_text(text)
            return
        await self.pump()

    async def pump(self) -> None:
        """Move waiting answers to the socket, while this replica holds the session."""
        async with self._lock:
            while self.socket is not None:
                try:
                    text = await self.sessions.scripts["pop"](self.keys, [self.sessions.link.id, time.time(),
                                                                          self.sessions.ack_after,
                                                                          self.sessions.max_bytes])
                except DOWN:
                    return  # the next tick tries again
                if text is None:
                    return
                try:
                    await self.socket.send_text(text.decode())
                except Exception:  # the connection went away mid-send: the message is given back for a resume
                    await self.detach(self.socket)
                    return


async def _close(socket) -> None:
    with contextlib.suppress(Exception):
        await socket.close(code=TAKEN_OVER)


class RedisSessions:
    shared = True  # answers go to the session in Redis, whichever replica makes them

    def __init__(self, link: Link, ttl: float, max_bytes: int, ack_after: float, refresh: float):
        """``refresh``: seconds between this replica's renewals of the sessions it holds."""
        self.link, self.max_bytes, self.ack_after = link, max_bytes, ack_after
        self.ttl_ms, self.refresh_ms = int(ttl * 1000), int((ttl + 2 * refresh) * 1000)
        self.scripts = {name: link.aio.register_script(text) for name, text in
                        (("deliver", DELIVER), ("attach", ATTACH), ("detach", DETACH), ("pop", POP))}
        self._local: dict[str, RedisSession] = {}  # sessions with a socket or tasks on this replica
        link.handlers["session"] = self._news
        link.handlers["takeover"] = self._taken_over
        link.ticks.append(self._pump_all)

    @guarded
    async def open(self, key_id: str, resume: str | None = None) -> RedisSession:
        """The session ``resume`` opened with the same key, else a new one."""
        if resume and await self.link.aio.hget(key("session", resume), "key") == key_id.encode():
            session = self._local.get(resume) or RedisSession(self, resume, key_id)
        else:
            session = RedisSession(self, str(uuid.uuid4()), key_id)
            await self.create(session, "")
        self._local[session.uuid] = session
        return session

    async def create(self, session: RedisSession, holder: str) -> None:
        """(Re)create the session's hash, held by ``holder`` ('' for none), with its TTL in one transaction."""
        async with self.link.aio.pipeline(transaction=True) as pipe:
            pipe.hset(session.keys[0], mapping={"key": session.key_id, "holder": holder, "bytes": 0, "sentbytes": 0})
            pipe.pexpire(session.keys[0], self.refresh_ms if holder else self.ttl_ms)
            await pipe.execute()

    async def _news(self, note: dict) -> None:
        session = self._local.get(note["session"])
        if session is not None:
            await session.pump()

    async def _taken_over(self, note: dict) -> None:
        session = self._local.get(note["session"])
        if session is not None and session.socket is not None:
            socket, session.socket = session.socket, None
            await _close(socket)

    async def _pump_all(self) -> None:
        """Every tick: recreate the hashes Redis lost (restarted empty, evicted) of the sessions held here, so the
        answers made elsewhere reach them again; then send what waits."""
        held = [session for session in self._local.values() if session.socket is not None]
        if held:
            pipe = self.link.aio.pipeline(transaction=False)
            for session in held:
                pipe.exists(session.keys[0])
            for session, exists in zip(held, await pipe.execute()):
                if not exists and session.socket is not None:
                    await self.create(session, self.link.id)
        for session in list(self._local.values()):
            await session.pump()

    async def purge(self) -> None:
        """Keep the sessions held here alive; forget the others here once they expired in Redis, stopping the
        tasks still running for them."""
        for sid, session in list(self._local.items()):
            if session.socket is not None:
                for name in session.keys:
                    await self.link.aio.pexpire(name, self.refresh_ms)
            elif not await self.link.aio.exists(session.keys[0]):
                for job in self._local.pop(sid).jobs:
                    job.cancel()
            elif not session.jobs:
                del self._local[sid]

    def owed(self) -> int:
        """Nothing is owed by this replica alone: undelivered answers wait in Redis for a resume anywhere."""
        return 0

    def __len__(self) -> int:
        return len(self._local)
