"""The server's queue (latentup/serve/batcher.py): bounded, batches by key in arrival order, skips timed-out jobs."""

import asyncio
import threading

import pytest

from latentup.serve.batcher import Batcher, QueueFull


def test_batches_by_key_bounded_and_skips_cancelled():
    calls, release = [], threading.Event()

    def run(payloads):
        calls.append(list(payloads))
        release.wait(10)  # the first batch holds the model thread while the rest queues up
        return [p * 10 if p != "bad" else ValueError(p) for p in payloads]

    async def main():
        batcher = Batcher(run, max_queue=5, max_batch=2)
        worker = asyncio.ensure_future(batcher.run_forever())
        first = batcher.submit("a", 1)
        while not calls:
            await asyncio.sleep(0.01)
        futures = [batcher.submit(key, p) for key, p in (("a", 2), ("b", 3), ("a", 4), ("a", 5), ("b", "bad"))]
        with pytest.raises(QueueFull):
            batcher.submit("a", 6)
        futures[3].cancel()  # a timed-out task frees its place and never runs
        later = batcher.submit("c", 7)
        release.set()
        results = await asyncio.gather(first, *futures[:3], later, return_exceptions=True)
        with pytest.raises(ValueError):
            await futures[4]
        worker.cancel()
        batcher.close()
        return results

    results = asyncio.run(main())
    assert results == [10, 20, 30, 40, 70]
    assert calls == [[1], [2, 4], [3, "bad"], [7]]  # oldest first, same keys together, at most max_batch
