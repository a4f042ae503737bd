"""The taskUUID table: what is known of each accepted task, scoped by the API key (its id) that sent it.

A taskUUID is claimed when its task is accepted: a second claim by the same key is refused (``conflictTaskUUID``);
another key's UUIDs are invisible (no conflict, no ``getResponse``). A task that failed sync is forgotten at once,
so its UUID can be retried; a finished one is remembered until its ``expires`` (async answers: what
``getResponse`` returns, without an inline image, which is read back from the store). Each key holds at most
``max_per_key`` records: the oldest finished ones make room. A Redis table keeps the same keys and TTLs.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

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


class Records:
    def __init__(self, max_per_key: int):
        self.max_per_key = max_per_key
        self._tables: dict[str, OrderedDict[str, Record]] = {}

    def claim(self, owner: str, task_uuid: str, task_type: str, keep: bool) -> Record:
        table = self._tables.setdefault(owner, OrderedDict())
        self._purge(table)
        if task_uuid in table:
            raise TaskError("conflictTaskUUID", f"taskUUID {task_uuid} was already used: give each task a new UUID",
                            "taskUUID")
        if len(table) >= self.max_per_key:
            finished = next((key for key, record in table.items() if record.done), None)
            if finished is None:
                raise TaskError("rateLimitExceeded", f"{len(table)} tasks of this key are running: wait for some")
            del table[finished]
        record = table[task_uuid] = Record(task_type, keep)
        return record

    def get(self, owner: str, task_uuid: str) -> Record | None:
        record = self._tables.get(owner, {}).get(task_uuid)
        return record if record is not None and record.expires >= time.monotonic() else None

    def finish(self, owner: str, task_uuid: str, failed: bool, ttl: float) -> None:
        """Mark a task answered: remembered for ``ttl`` s, or forgotten when it failed sync."""
        table = self._tables.get(owner, {})
        record = table.get(task_uuid)
        if record is None:
            return
        if failed and not record.keep:
            del table[task_uuid]
            return
        record.done, record.expires = True, time.monotonic() + ttl

    @staticmethod
    def _purge(table: OrderedDict) -> None:
        now = time.monotonic()
        for key in [k for k, r in table.items() if r.expires < now]:
            del table[key]

    def purge(self) -> None:
        for owner in list(self._tables):
            self._purge(self._tables[owner])
            if not self._tables[owner]:
                del self._tables[owner]

    def __len__(self) -> int:
        return sum(map(len, self._tables.values()))
