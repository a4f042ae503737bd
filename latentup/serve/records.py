"""The taskUUID table: what is known of each accepted task, scoped by the API key (its id) that sent it.

A taskUUID is claimed when its task is accepted: a second claim by the same key is refused (``conflictTaskUUID``);
another key's UUIDs are invisible (no conflict, no ``getResponse``). A claim returns a token that names this claim:
only its holder answers it (:meth:`Records.finish`, once: a second finish of the same claim is a no-op, so a task
run twice is answered once). A task that failed sync is forgotten at once, so its UUID can be retried; a finished
one is remembered until its ``expires`` (async answers: what ``getResponse`` returns, without an inline image, which
is read back from the store). Per key, at most ``max_inflight`` tasks are unanswered (``rateLimitExceeded``) and at
most ``max_per_key`` are remembered: the oldest finished ones make room. ``redis_state.RedisRecords`` keeps the
same table in Redis, for every replica; both have this async interface.
"""

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from latentup.serve.limits import InFlight
from latentup.serve.tasks import TaskError


@dataclass
class Record:
    """One accepted task. ``answer`` (async only) is None while it runs; ``image`` names where its inline image
    lives: (imageUUID, the answer's field, MIME type)."""

    task_type: str
    keep: bool = False
    done: bool = False
    answer: dict | None = None
    image: tuple[str, str, str] | None = None
    expires: float = float("inf")
    token: str = ""
    unsent: bool = False  # answered, but its WebSocket session was gone (Redis restarted empty): not delivered


def conflict(task_uuid: str) -> TaskError:
    return TaskError("conflictTaskUUID", f"taskUUID {task_uuid} was already used: give each task a new UUID",
                     "taskUUID")


def too_many_records(count: int) -> TaskError:
    return TaskError("rateLimitExceeded", f"{count} tasks of this key are remembered and none has finished: wait "
                     "for some")


def kept(message: dict) -> tuple[dict, tuple[str, str, str] | None]:
    """(what getResponse keeps of an answer, where its inline image lives): the inline image is dropped and read
    back from the store on demand."""
    item = (message.get("data") or [{}])[0]
    field = next((f for f in ("imageBase64Data", "imageDataURI") if f in item), None)
    if field is None:
        return message, None
    mime = item[field][5:].partition(";")[0] if field == "imageDataURI" else ""
    return {"data": [{k: v for k, v in item.items() if k != field}]}, (item["imageUUID"], field, mime)


class Records:
    def __init__(self, max_per_key: int, max_inflight: int = 2**62):
        self.max_per_key = max_per_key
        self._tables: dict[str, OrderedDict[str, Record]] = {}
        self._running = InFlight(max_inflight, "API key")

    async def claim(self, owner: str, task_uuid: str, task_type: str, keep: bool) -> str:
        """The token of a new claim of ``task_uuid``, or a TaskError (nothing claimed)."""
        table = self._tables.setdefault(owner, OrderedDict())
        self._purge(table)
        if task_uuid in table:
            raise conflict(task_uuid)
        self._running.acquire(owner)
        if len(table) >= self.max_per_key:
            finished = next((key for key, record in table.items() if record.done), None)
            if finished is None:
                self._running.release(owner)
                raise too_many_records(len(table))
            del table[finished]
        token = str(uuid.uuid4())
        table[task_uuid] = Record(task_type, keep, token=token)
        return token

    async def get(self, owner: str, task_uuid: str) -> Record | None:
        record = self._tables.get(owner, {}).get(task_uuid)
        return record if record is not None and record.expires >= time.monotonic() else None

    async def finish(self, owner: str, task_uuid: str, token: str, message: dict, ttl: float,
                     session: str | None = None) -> bool:
        """Answer the claim ``token`` with ``message`` (an error message fails it); False when it was answered
        already (or is gone). Remembered for ``ttl`` s, or forgotten when it failed sync. ``session``: only the
        shared table delivers to sessions."""
        table = self._tables.get(owner, {})
        record = table.get(task_uuid)
        if record is None or record.token != token or record.done:
            return False
        self._running.release(owner)
        if "errors" in message and not record.keep:
            del table[task_uuid]
            return True
        if record.keep:
            record.answer, record.image = kept(message)
        record.done, record.expires = True, time.monotonic() + ttl
        return True

    @staticmethod
    def _purge(table: OrderedDict) -> None:
        now = time.monotonic()
        for key in [k for k, r in table.items() if r.expires < now]:
            del table[key]

    async def purge(self) -> None:
        for owner in list(self._tables):
            self._purge(self._tables[owner])
            if not self._tables[owner]:
                del self._tables[owner]

    async def count(self) -> int:
        return sum(map(len, self._tables.values()))
