"""The link of one replica to the Redis that every replica shares (``redis_url``): its clients, key names, what a
lost link means to a task, and the replica's own channel.

Each replica has an id and a pub/sub channel; whoever answers a task or fills a session publishes a small JSON note
there for the replica that waits (``{"kind": "task" | "session" | "takeover", ...}``). Notes are hints, never the
truth: what they point at is read back from Redis, and every :data:`TICK` the handlers also look for themselves, so
a note lost with the link (Redis restarted, a reconnect) delays an answer by a tick at most.
"""

import asyncio
import functools
import inspect
import json
import logging
import uuid

import redis
from redis import asyncio as aredis

from latentup.errors import ConfigError
from latentup.serve.tasks import TaskError

log = logging.getLogger("latentup.serve")
PREFIX = "latentup:"
TICK = 1.0  # seconds between a replica's own looks at what it waits for
DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)  # the link is lost (refused, reset, Redis loading)
OPTIONS = dict(socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)


def key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def unavailable() -> TaskError:
    return TaskError("serviceUnavailable", "the shared store (Redis) is unreachable: retry in a moment")


def guarded(method):
    """A method (async, or run in a worker thread) whose lost link is the client's ``serviceUnavailable`` error."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            result = method(*args, **kwargs)
        except DOWN:
            raise unavailable() from None
        return _guarded_await(result) if inspect.isawaitable(result) else result

    return wrapper


async def _guarded_await(awaitable):
    try:
        return await awaitable
    except DOWN:
        raise unavailable() from None


class Link:
    """Clients (``sync`` for worker threads, ``aio`` for the event loop), this replica's ``id`` and channel."""

    def __init__(self, url: str):
        self.url, self.id = url, uuid.uuid4().hex
        try:
            self.sync = redis.Redis.from_url(url, **OPTIONS)
            self.sync.ping()
        except (ValueError, *DOWN, redis.RedisError) as error:
            raise ConfigError(f"cannot reach Redis at {url} ({error}): start redis-server there or fix redis_url")
        self.aio = aredis.Redis.from_url(url, **OPTIONS)
        self.handlers: dict[str, object] = {}  # note kind -> async fn(note)
        self.ticks: list = []  # async fns called every TICK

    def channel(self, replica: str) -> str:
        return key("replica", replica)

    async def note(self, replica: str, **note) -> None:
        await self.aio.publish(self.channel(replica), json.dumps(note))

    async def _dispatch(self, data: bytes) -> None:
        try:
            note = json.loads(data)
            await self.handlers[note["kind"]](note)
        except (ValueError, KeyError, TypeError) as error:  # not a note of ours: the ticks still look
            log.warning("ignored a note on %s (%s: %s)", self.channel(self.id), type(error).__name__, error)

    async def listen(self) -> None:
        """Dispatch this replica's notes and call the ticks, reconnecting for as long as the server runs."""
        lost = False
        while True:
            pubsub = self.aio.pubsub()
            try:
                await pubsub.subscribe(self.channel(self.id))
                if lost:
                    log.warning("Redis is back")
                    lost = False
                while True:
                    got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=TICK)
                    if got is not None:
                        await self._dispatch(got["data"])
                    for tick in self.ticks:
                        await tick()
            except DOWN + (TaskError,) as error:
                if not lost:
                    log.warning("lost Redis (%s): retrying every %g s", error, TICK)
                    lost = True
                await asyncio.sleep(TICK)
            except Exception as error:  # never end the loop: log it and go on
                log.error("notes and ticks: %s: %s: retrying in %g s", type(error).__name__, error, TICK)
                await asyncio.sleep(TICK)
            finally:
                await pubsub.aclose()
