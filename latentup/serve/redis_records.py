"""The taskUUID table of ``records.py`` in Redis, shared by every replica, with the same rules and caps.

Per API key (its id): a hash per task ``rec:OWNER:UUID`` (state running | done | failed, claim token, task type,
keep, the replica that waits for it, the kept answer and where its inline image lives) and three sorted sets: every
remembered task (by expiry: the record cap), the finished ones (by expiry: the oldest make room) and the running ones
(by deadline: the in-flight cap; a claim whose replica died before answering it stops counting at its deadline).
Claim and finish are Lua scripts, so each is one atomic step however many replicas race: a reused taskUUID is a
conflict everywhere, and a claim is answered once (the first finish wins; a task run by two workers, or timed out
by its front-end while a worker finished it, has one answer). The finish that wins also puts the answer in the
task's WebSocket session, if it has one (a session Redis lost marks the record ``unsent``: its front-end delivers
it), and notes the waiting replica.
"""

import json
import time

from latentup.serve.limits import too_many_running
from latentup.serve.records import Record, conflict, kept, too_many_records
from latentup.serve.redis_link import Link, guarded, key
from latentup.serve.redis_sessions import PUSH, session_keys
from latentup.serve.sessions import overflow
from latentup.serve.wire import dumps

FAILED_TTL = 60  # seconds a sync task's error is kept for the replica that waits for it (its UUID is free at once)

CLAIM = """
local now = tonumber(ARGV[2])
for i = 2, 4 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'failed' then return 'conflict' end
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[4]) then return 'running' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not oldest then return 'full' end
  redis.call('ZREM', KEYS[3], oldest)
  redis.call('ZREM', KEYS[2], oldest)
  redis.call('DEL', ARGV[10] .. oldest)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'running', 'token', ARGV[5], 'type', ARGV[6], 'keep', ARGV[7], 'reply', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], now + ARGV[8], ARGV[1])
redis.call('ZADD', KEYS[4], now + ARGV[8], ARGV[1])
return 'ok'
"""

FINISH = PUSH + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[7] == '1' and redis.call('HGET', KEYS[1], 'keep') ~= '1' then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'answer', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[12])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[5], 'image', ARGV[6])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
end
local pushed = push(KEYS[5], KEYS[6], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[13])
if pushed == 0 and ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'unsent', '1') end
local owner = redis.call('HGET', KEYS[1], 'reply')
redis.call('PUBLISH', ARGV[11] .. owner, ARGV[14])
if pushed == 0 and ARGV[13] ~= '' then return 2 end
return 1
"""


class RedisRecords:
    def __init__(self, link: Link, max_per_key: int, max_inflight: int, running_ttl: float,
                 session_max_bytes: int):
        """``running_ttl``: seconds a claim may stay unanswered (its front-end died before the task was queued)."""
        self.link, self.max_per_key, self.max_inflight = link, max_per_key, max_inflight
        self.running_ttl, self.session_max_bytes = int(running_ttl) + 1, session_max_bytes
        self._claim = link.aio.register_script(CLAIM)
        self._finish = link.aio.register_script(FINISH)

    @staticmethod
    def _keys(owner: str, task_uuid: str) -> list[str]:
        return [key("rec", owner, task_uuid), key("recs", owner), key("done", owner), key("run", owner)]

    @guarded
    async def claim(self, owner: str, task_uuid: str, task_type: str, keep: bool) -> str:
        token = self.link.id + ":" + str(time.time_ns())
        result = await self._claim(self._keys(owner, task_uuid), [
            task_uuid, time.time(), self.max_per_key, self.max_inflight, token, task_type, int(keep),
            self.running_ttl, self.link.id, key("rec", owner, "")])
        if result == b"conflict":
            raise conflict(task_uuid)
        if result == b"running":
            raise too_many_running(self.max_inflight)
        if result == b"full":
            raise too_many_records(self.max_per_key)
        return token

    @guarded
    async def get(self, owner: str, task_uuid: str) -> Record | None:
        stored = await self.link.aio.hgetall(key("rec", owner, task_uuid))
        fields = {k.decode(): v.decode() for k, v in stored.items()}
        if not fields:
            return None
        image = json.loads(fields["image"]) if fields.get("image") else None
        answer = json.loads(fields["answer"]) if "answer" in fields else None
        return Record(fields["type"], fields["keep"] == "1", fields["state"] != "running", answer,
                      tuple(image) if image else None, token=fields["token"], unsent="unsent" in fields)

    @guarded
    async def finish(self, owner: str, task_uuid: str, token: str, message: dict, ttl: float,
                     session: str | None = None) -> int:
        """1 when this finish answered the claim, 2 when it did but its session was gone from Redis (the caller
        delivers it), 0 when the claim was answered already."""
        answer, image = kept(message)
        text = dumps(message)
        note = json.dumps({"kind": "task", "owner": owner, "uuid": task_uuid})
        won = await self._finish(self._keys(owner, task_uuid) + session_keys(session or "")[:2], [
            task_uuid, token, time.time(), ttl, dumps(answer), json.dumps(image) if image else "",
            int("errors" in message), text, overflow(text, message), self.session_max_bytes, key("replica", ""),
            FAILED_TTL, session or "", note])
        return int(won)

    async def purge(self) -> None:
        """Nothing to do: Redis expires records itself, and each claim trims its key's sets."""

    async def count(self) -> None:
        """Not counted: the table spans every replica and key (``/health`` shows null)."""
