"""A replica's model worker in Redis mode (``model_workers: 1``): it reads the shared stream through the consumer
group (as consumer = the replica's id), runs the tasks on this process's batcher (batching as in-process), answers
their claims (once: a claim already answered, or stopped by its front-end, is skipped) and acknowledges them. An
entry is acknowledged only once its answer is in Redis, so a worker that dies loses nothing: after
``claim_after`` seconds without an acknowledgement, another worker takes the entry over (XAUTOCLAIM) and runs it.
While this worker runs an entry it refreshes its claim, so a slow task is not taken over while it is alive.
"""

import asyncio
import json
import logging

import redis

from latentup.serve.redis_link import DOWN, TICK, Link
from latentup.serve.redis_queue import GROUP, STREAM
from latentup.serve.tasks import TaskError, UpscaleTask

log = logging.getLogger("latentup.serve")


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
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                await self.link.aio.xgroup_create(STREAM, GROUP, id="0", mkstream=True)  # a fresh (or emptied) Redis
            except DOWN as error:
                if not lost:
                    log.warning("model worker: lost Redis (%s): retrying every %g s", error, TICK)
                    lost = True
                await asyncio.sleep(TICK)

    async def _one(self, entry: bytes, fields: dict) -> None:
        text = {k.decode(): v.decode() for k, v in fields.items() if k != b"data"}
        owner, task_uuid, token = text["owner"], text["uuid"], text["token"]
        try:
            record = await self.service.records.get(owner, task_uuid)
            if record is not None and record.token == token and not record.done:
                parsed = UpscaleTask(**json.loads(text["task"]))
                answer = await self.service.run_queued(parsed, fields[b"data"], owner, text["base"])
                await self.service.records.finish(owner, task_uuid, token, answer, self.service.store.ttl,
                                                  text["session"] or None)
            async with self.link.aio.pipeline(transaction=True) as pipe:
                await pipe.xack(STREAM, GROUP, entry).xdel(STREAM, entry).execute()
        except (TaskError, *DOWN) as error:  # left unacknowledged: run again once Redis is back
            log.warning("task %s: not answered (%s): it stays queued", task_uuid, error)
        finally:
            self.held.discard(entry)

    async def _keep_fresh(self) -> None:
        """Reset the idle time of the entries held here, so no other worker takes them over while they run."""
        while True:
            await asyncio.sleep(self.claim_after / 3)
            if self.held:
                try:
                    await self.link.aio.xclaim(STREAM, GROUP, self.link.id, 0, list(self.held), justid=True)
                except DOWN:
                    pass
