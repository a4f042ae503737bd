"""A replica's model worker in Redis mode (``model_workers: 1``): it reads the shared stream through the consumer
group (as consumer = the replica's id), runs the tasks on this process's batcher (batching as in-process), answers
their claims (once: a claim already answered is skipped) and acknowledges them; an entry it cannot read is answered
with ``internalError`` and acknowledged, never taken over again and again. Its loops log errors and go on. An
entry is acknowledged only once its answer is in Redis, so a worker that dies loses nothing: after
``claim_after`` seconds without an acknowledgement, another worker takes the entry over (XAUTOCLAIM) and runs it.
While this worker runs an entry it refreshes its claim, so a slow task is not taken over while it is alive.
"""

import asyncio
import contextlib
import json
import logging

import redis

from latentup.serve.redis_link import DOWN, TICK, Link
from latentup.serve.redis_queue import GROUP, STREAM
from latentup.serve.tasks import TaskError, UpscaleTask, error_object

log = logging.getLogger("latentup.serve")


class Malformed(Exception):
    """A stream entry that no worker can run (not written by a front-end of this version)."""


class Worker:
    def __init__(self, link: Link, service, claim_after: float):
        self.link, self.service, self.claim_after = link, service, claim_after
        self.room = min(2 * service.batcher.max_batch, service.batcher.max_queue)  # one batch runs, one fills
        self.held: set[bytes] = set()  # entries read and not yet acknowledged
        self._jobs: set[asyncio.Future] = set()

    async def run_forever(self) -> None:
        fresh = asyncio.ensure_future(self._keep_fresh())
        try:
            await self._read_forever()
        finally:
            fresh.cancel()

    async def _read_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_claim, lost = 0.0, False
        while True:
            try:
                if len(self.held) >= self.room or self.service.draining:  # draining: finish what is held only
                    await asyncio.sleep(0.02)
                    continue
                entries = []
                if loop.time() >= next_claim:  # entries of a worker that died (or lost its link) meanwhile
                    _, entries, *_ = await self.link.aio.xautoclaim(STREAM, GROUP, self.link.id,
                                                                    int(self.claim_after * 1000),
                                                                    count=self.room - len(self.held))
                    next_claim = loop.time() + min(TICK, self.claim_after / 2)
                if not entries:
                    got = await self.link.aio.xreadgroup(GROUP, self.link.id, {STREAM: ">"},
                                                         count=self.room - len(self.held), block=int(TICK * 1000))
                    entries = got[0][1] if got else []
                lost = False
                for entry, fields in entries:
                    if fields and entry not in self.held:
                        self.held.add(entry)
                        job = asyncio.ensure_future(self._one(entry, fields))
                        self._jobs.add(job)
                        job.add_done_callback(self._jobs.discard)
            except DOWN as error:
                if not lost:
                    log.warning("model worker: lost Redis (%s): retrying every %g s", error, TICK)
                    lost = True
                await asyncio.sleep(TICK)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    log.error("model worker: %s: retrying in %g s", error, TICK)
                    await asyncio.sleep(TICK)
                    continue
                with contextlib.suppress(redis.ResponseError):  # a fresh (or emptied) Redis; another replica's race
                    await self.link.aio.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            except Exception as error:  # never end the loop: log it and go on
                log.error("model worker: %s: %s: retrying in %g s", type(error).__name__, error, TICK)
                await asyncio.sleep(TICK)

    async def _one(self, entry: bytes, fields: dict) -> None:
        text, task_uuid = {}, "?"
        try:
            text = {k.decode(): v.decode() for k, v in fields.items() if k != b"data"}
            owner, task_uuid, token = text["owner"], text["uuid"], text["token"]
            record = await self.service.records.get(owner, task_uuid)
            if record is not None and record.token == token and not record.done:
                try:
                    parsed, data = UpscaleTask(**json.loads(text["task"])), fields[b"data"]
                except (KeyError, ValueError, TypeError) as error:
                    raise Malformed(error) from None
                answer = await self.service.run_queued(parsed, data, owner, text["base"])
                await self.service.records.finish(owner, task_uuid, token, answer, self.service.store.ttl,
                                                  text.get("session") or None)
            await self._done(entry)
        except (TaskError, *DOWN) as error:  # left unacknowledged: run again once Redis is back
            log.warning("task %s: not answered (%s): it stays queued", task_uuid, error)
        except (Malformed, KeyError, ValueError, TypeError) as error:  # never runs: answered and acknowledged
            log.error("stream entry %s is malformed (%s: %s): answered with an error and acknowledged",
                      entry.decode(), type(error).__name__, error)
            await self._refuse(entry, text)
        finally:
            self.held.discard(entry)

    async def _done(self, entry: bytes) -> None:
        async with self.link.aio.pipeline(transaction=True) as pipe:
            await pipe.xack(STREAM, GROUP, entry).xdel(STREAM, entry).execute()

    async def _refuse(self, entry: bytes, text: dict) -> None:
        """Answer a malformed entry's claim (if it names one) with internalError, and acknowledge it."""
        error = TaskError("internalError", "the server could not read this queued task: send it again")
        with contextlib.suppress(TaskError, *DOWN):
            if {"owner", "uuid", "token"} <= set(text):
                answer = {"errors": [error_object(error, None, text["uuid"])]}
                await self.service.records.finish(text["owner"], text["uuid"], text["token"], answer,
                                                  self.service.store.ttl, text.get("session") or None)
            await self._done(entry)

    async def _keep_fresh(self) -> None:
        """Reset the idle time of the entries held here, so no other worker takes them over while they run."""
        while True:
            await asyncio.sleep(self.claim_after / 3)
            if self.held:
                try:
                    await self.link.aio.xclaim(STREAM, GROUP, self.link.id, 0, list(self.held), justid=True)
                except (redis.RedisError, OSError) as error:  # the next round
                    log.warning("model worker: claims not refreshed (%s)", error)
