"""A bounded queue in front of one model that runs compatible tasks as one batch.

Jobs wait in arrival order. The worker takes the oldest job plus up to ``max_batch - 1`` later ones with the same
key (same input size and settings), waits ``batch_wait`` seconds first if the batch is not full, and runs them in
its single model thread, so the event loop never blocks on the model and no two calls share it at once. While a
batch runs, new jobs queue up, so batches grow with the load without any waiting.

A place in the queue is reserved (:meth:`Batcher.reserve`) before a task's input is decoded, so a full queue costs
nothing. A job whose future was cancelled (its task timed out or its client left) is dropped before it runs; when
every job of the running batch is cancelled, :attr:`Batcher.abandoned` is set so the model can stop early. The model
thread is a daemon (a stuck batch never holds the process at exit) and is started again if it ever dies.
"""

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger("latentup.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs (reserved places included)."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: object
    future: asyncio.Future


class Place:
    """A reserved place in the queue: taken by ``submit`` or given back by ``release``, once either way (a task
    stopped before its work started gives its place back without knowing whether it was taken)."""

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher.reserved -= 1
            self._batcher = None


class ModelThread:
    """One daemon thread that runs calls in order (``await thread.call(fn)``); a thread that dies (a BaseException
    such as SystemExit escaped a call) starts its successor first and counts it in ``restarts``."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="latentup-model", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, loop, future = self._calls.get()
            if fn is None:
                return
            try:
                result, error = fn(), None
            except BaseException as failure:  # noqa: BLE001 - handed to the caller; a BaseException ends this thread
                result, error = None, failure
            with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile: nobody waits for it
                loop.call_soon_threadsafe(_settle, future, result, error)
            if error is not None and not isinstance(error, Exception):
                self.restarts += 1
                log.error("the model thread died (%s): started a new one (restart %d)", type(error).__name__,
                          self.restarts)
                self._start()
                return

    async def call(self, fn: Callable[[], object]):
        if self._thread is None:
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._calls.put((fn, asyncio.get_running_loop(), future))
        return await future

    def close(self) -> None:
        self._calls.put((None, None, None))


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error if isinstance(error, Exception) else RuntimeError(f"the model thread died "
                                                                                     f"({type(error).__name__})"))
    else:
        future.set_result(result)


class Batcher:
    """``run(payloads) -> results`` (one result or exception per payload) called from one model thread."""

    def __init__(self, run: Callable[[list], list], max_queue: int, max_batch: int, batch_wait: float = 0.0):
        self.run, self.max_queue, self.max_batch, self.batch_wait = run, max_queue, max_batch, batch_wait
        self.jobs: list[Job] = []
        self.reserved = 0  # places held by tasks whose input is being read
        self.running = 0  # jobs in the batch being run
        self.batches = self.done = 0  # counters since start
        self.abandoned = threading.Event()  # set while nobody waits for the running batch any more
        self.thread = ModelThread()
        self._current: list[Job] | None = None
        self._wakeup = asyncio.Event()

    def _prune(self) -> None:
        self.jobs = [job for job in self.jobs if not job.future.done()]

    def _used(self) -> int:
        self._prune()
        return len(self.jobs) + self.reserved

    def reserve(self) -> "Place":
        """Hold a place for a job submitted later (``submit(..., place)``) or given back (``place.release()``)."""
        if self._used() >= self.max_queue:
            raise QueueFull
        self.reserved += 1
        return Place(self)

    def submit(self, key: Hashable, payload, place: "Place | None" = None) -> asyncio.Future:
        """Queue a job (in its reserved ``place``, if any); its future gets the result. QueueFull when the queue is
        full."""
        if place is not None:
            place.release()
        elif self._used() >= self.max_queue:
            raise QueueFull
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self._wakeup.set()
        return job.future

    def _take(self) -> list[Job]:
        head = self.jobs[0]
        batch = [job for job in self.jobs if job.key == head.key][: self.max_batch]
        taken = set(map(id, batch))
        self.jobs = [job for job in self.jobs if id(job) not in taken]
        return batch

    async def run_forever(self) -> None:
        while True:
            self._prune()
            if not self.jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batch_wait and sum(job.key == self.jobs[0].key for job in self.jobs) < self.max_batch:
                await asyncio.sleep(self.batch_wait)
                self._prune()
                if not self.jobs:
                    continue
            await self._run_batch(self._take())

    async def _run_batch(self, batch: list[Job]) -> None:
        def watch(_):
            if self._current is batch and all(job.future.done() for job in batch):
                self.abandoned.set()

        self._current = batch
        self.abandoned.clear()
        for job in batch:
            job.future.add_done_callback(watch)
        self.running = len(batch)
        try:
            results = await self.thread.call(lambda: self.run([job.payload for job in batch]))
        except Exception as error:  # the model thread died under this batch: its jobs fail, the worker goes on
            results = [error] * len(batch)
        finally:
            self.running, self._current = 0, None
        self.batches += 1
        self.done += len(batch)
        for job, result in zip(batch, results):
            if job.future.done():  # timed out or abandoned meanwhile: already answered
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def close(self) -> None:
        for job in self.jobs:
            job.future.cancel()
        self.abandoned.set()
        self.thread.close()
