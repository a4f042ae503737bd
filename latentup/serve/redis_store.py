"""The image store of ``store.py`` in Redis: uploads and outputs as bytes with their TTL, so any replica serves
``GET /image/...`` and reads any replica's uploads (still only for the API key that made them).

Each image is a hash ``image:UUID`` (bytes, MIME type, owner, file name) that expires by itself; a sorted set (by
expiry) and a size table index them, so the store holds at most ``max_bytes``: the images closest to expiry make
room, in the same Lua step that adds one. Used from worker threads (the synchronous client), as ``ImageStore``.
"""

import time
import uuid

from latentup.serve.redis_link import Link, guarded, key
from latentup.serve.store import Entry
from latentup.serve.tasks import TaskError

# KEYS: index (uuid -> expiry), sizes (uuid -> bytes), total bytes; ARGV: prefix, now[, uuid, data, mime, owner,
# name, ttl, max bytes]
FORGET = """
local function forget(name)
  redis.call('DECRBY', KEYS[3], redis.call('HGET', KEYS[2], name) or 0)
  redis.call('HDEL', KEYS[2], name)
  redis.call('ZREM', KEYS[1], name)
  redis.call('DEL', ARGV[1] .. name)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
for _, name in ipairs(expired) do forget(name) end
"""
PURGE = FORGET + "return #expired"
PUT = FORGET + """
local size = #ARGV[4]
while tonumber(redis.call('GET', KEYS[3]) or 0) + size > tonumber(ARGV[9]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest then break end
  forget(oldest)
end
local name = ARGV[1] .. ARGV[3]
redis.call('HSET', name, 'data', ARGV[4], 'mime', ARGV[5], 'owner', ARGV[6], 'name', ARGV[7])
redis.call('PEXPIRE', name, math.ceil(ARGV[8] * 1000))
redis.call('ZADD', KEYS[1], ARGV[2] + ARGV[8], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], size)
redis.call('INCRBY', KEYS[3], size)
return 1
"""
INDEX = [key("images"), key("images", "sizes"), key("images", "bytes")]


class RedisStore:
    def __init__(self, link: Link, ttl: float, max_bytes: int):
        self.link, self.ttl, self.max_bytes = link, ttl, max_bytes
        self._put = link.sync.register_script(PUT)
        self._purge = link.sync.register_script(PURGE)

    @guarded
    def put(self, data: bytes, suffix: str, mime: str, ttl: float | None = None, owner: str = "") -> tuple[str, str]:
        """Store ``data`` for ``ttl`` seconds (at most the store's); returns (imageUUID, file name)."""
        if len(data) > self.max_bytes:
            raise TaskError("invalidParameter", f"the image is {len(data)} bytes, over the store's cap of "
                            f"{self.max_bytes}: send a smaller one")
        image_uuid = str(uuid.uuid4())
        name = f"{image_uuid}.{suffix}"
        self._put(INDEX, [key("image", ""), time.time(), image_uuid, data, mime, owner, name,
                          min(ttl or self.ttl, self.ttl), self.max_bytes])
        return image_uuid, name

    @guarded
    def get(self, image_uuid: str) -> Entry | None:
        """The entry of a live image (with its bytes), else None."""
        data, mime, owner, name = self.link.sync.hmget(key("image", image_uuid), "data", "mime", "owner", "name")
        if data is None:
            return None
        expires = float("inf")  # Redis deletes it when it expires
        return Entry(None, mime.decode(), expires, len(data), owner.decode(), name.decode(), data)

    def read(self, image_uuid: str, owner: str = "") -> bytes | None:
        """The bytes of a live image of ``owner``, else None."""
        entry = self.get(image_uuid)
        return entry.data if entry is not None and entry.owner == owner else None

    @guarded
    def purge(self) -> int:
        """Drop expired images from the index (Redis already deleted their bytes); returns how many."""
        return self._purge(INDEX, [key("image", ""), time.time()])

    @guarded
    def stats(self) -> tuple[int, int]:
        """(images, bytes) held by every replica."""
        count, size = self.link.sync.zcard(INDEX[0]), self.link.sync.get(INDEX[2])
        return count, int(size or 0)
