"""A bounded queue in front of one model that runs compatible tasks as one batch.

Jobs wait in arrival order. The worker takes the oldest job plus up to ``max_batch - 1`` later ones with the same
key (same input size and settings), waits ``batch_wait`` seconds first if the batch is not full, and runs them in
its single model thread, so the event loop never blocks on the model and no two calls share it at once. While a
batch runs, new jobs queue up, so batches grow with the load without any waiting. A job whose future was cancelled
(its task timed out) is dropped before it runs.
"""

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: object
    future: asyncio.Future


class Batcher:
    """``run(payloads) -> results`` (one result or exception per payload) called from one worker thread."""

    def __init__(self, run: Callable[[list], list], max_queue: int, max_batch: int, batch_wait: float = 0.0):
        self.run, self.max_queue, self.max_batch, self.batch_wait = run, max_queue, max_batch, batch_wait
        self.jobs: list[Job] = []
        self.running = 0  # jobs in the batch being run
        self.batches = self.done = 0  # counters since start
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="latentup-model")

    def _prune(self) -> None:
        self.jobs = [job for job in self.jobs if not job.future.done()]

    def full(self) -> bool:
        self._prune()
        return len(self.jobs) >= self.max_queue

    def submit(self, key: Hashable, payload) -> asyncio.Future:
        """Queue a job; its future gets the result. QueueFull when the queue is full."""
        if self.full():
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
        loop = asyncio.get_running_loop()
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
            batch = self._take()
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run, [job.payload for job in batch])
            finally:
                self.running = 0
            self.batches += 1
            self.done += len(batch)
            for job, result in zip(batch, results):
                if job.future.done():  # timed out meanwhile: already answered
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
