"""The shared task queue, the accepting replica's side: an accepted upscale becomes an entry of one Redis stream
(read by every replica's model worker through one consumer group, ``redis_worker.py``) and the replica waits for its
claim to be answered, by whichever worker ran it: a note on its channel says so, and every tick it also looks at
the claims it waits for itself (the record is the truth; notes are hints). ``max_queue`` bounds the stream."""

import asyncio
import dataclasses
import json

import redis

from latentup.serve.redis_link import Link, guarded, key
from latentup.serve.tasks import TaskError, error_object

STREAM = key("tasks")
GROUP = "workers"


def create_group(link: Link) -> None:
    """The workers' consumer group of the stream (kept if there; read from the start if new)."""
    try:
        link.sync.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


class SharedQueue:
    def __init__(self, link: Link, max_queue: int, task_timeout: float):
        self.link, self.max_queue, self.task_timeout = link, max_queue, task_timeout
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}  # (owner, taskUUID) -> set once answered
        link.handlers["task"] = self._noted
        link.ticks.append(self._look)

    @guarded
    async def room(self) -> None:
        """A queueFull error when the stream holds ``max_queue`` tasks (waiting or running)."""
        if await self.link.aio.xlen(STREAM) >= self.max_queue:
            raise TaskError("queueFull", "the queue is full: retry in a moment")

    async def run(self, parsed, data: bytes, caller, ticket, accepted: asyncio.Future) -> dict:
        """Queue the task (its input ``data`` as read), set ``accepted`` once it is in Redis and wait until its
        claim is no longer running; returns what to answer if the claim then holds no answer (lost with Redis'
        state). A timeoutProvider error after ``task_timeout`` s."""
        waiting = (caller.key_id, ticket.task_uuid)
        self.waiters[waiting] = asyncio.get_running_loop().create_future()
        try:
            await self._add({"owner": caller.key_id, "uuid": ticket.task_uuid, "token": ticket.token,
                             "task": json.dumps(dataclasses.asdict(parsed)), "data": data, "base": caller.base_url,
                             "session": ticket.session or ""})
            ticket.queued = True
            accepted.set_result(None)
            await asyncio.wait_for(self.waiters[waiting], self.task_timeout)
        except asyncio.TimeoutError:
            raise TaskError("timeoutProvider", f"the task took over {self.task_timeout:g} s: retry later or with "
                            "fewer steps") from None
        finally:
            self.waiters.pop(waiting, None)
        return {"errors": [error_object(TaskError("serviceUnavailable", "the task was lost with the shared store's "
                                                  "state (Redis restarted empty): send it again"),
                                        ticket.task_type, ticket.task_uuid)]}

    @guarded
    async def _add(self, fields: dict) -> None:
        await self.link.aio.xadd(STREAM, fields)

    async def _noted(self, note: dict) -> None:
        waiter = self.waiters.get((note["owner"], note["uuid"]))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _look(self) -> None:
        """Wake the waiters whose claim is no longer running (answered, or lost with Redis' state)."""
        waiting = list(self.waiters.items())
        if not waiting:
            return
        pipe = self.link.aio.pipeline(transaction=False)
        for owner, task_uuid in (pair for pair, _ in waiting):
            pipe.hget(key("rec", owner, task_uuid), "state")
        for (_, waiter), state in zip(waiting, await pipe.execute()):
            if state != b"running" and not waiter.done():
                waiter.set_result(None)
