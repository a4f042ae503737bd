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


def test_a_dead_model_thread_is_restarted_and_reserved_places_count():
    """Issue 29.6: a call that kills the model thread (a BaseException) fails its batch only; the next batch runs on
    a new thread, counted in ``restarts`` (what /health reports). Issue 29.2: reserved places fill the queue."""

    def run(payloads):
        if payloads == ["die"]:
            raise SystemExit
        return [p * 10 for p in payloads]

    async def main():
        batcher = Batcher(run, max_queue=2, max_batch=1)
        worker = asyncio.ensure_future(batcher.run_forever())
        with pytest.raises(RuntimeError, match="model thread died"):
            await batcher.submit("a", "die")
        after = await batcher.submit("a", 4)
        first, second = batcher.reserve(), batcher.reserve()
        with pytest.raises(QueueFull):
            batcher.submit("a", 5)
        future = batcher.submit("a", 6, first)
        second.release()
        second.release()  # a place is given back once, however often asked
        first.release()  # taken by submit: nothing to give back
        assert batcher.reserved == 0
        result = await future
        worker.cancel()
        batcher.close()
        return after, result, batcher.thread.restarts

    assert asyncio.run(main()) == (40, 60, 1)
