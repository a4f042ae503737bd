"""Load test for `python -m latentup.serve`: N WebSocket clients x M upscale tasks each, on loopback, against one
running server or against replicas it starts itself beside a redis-server of its own.

    python -m latentup.serve weights=... port=8765 &
    python benchmarks/serve_load.py --url ws://127.0.0.1:8765/v1 --clients 8 --tasks 25 --steps 4
    python benchmarks/serve_load.py --spawn 2 --weights W                    # two replicas sharing one Redis
    python benchmarks/serve_load.py --spawn 2 --weights W --kill-after 5     # SIGKILL replica 0 five seconds in
    python benchmarks/serve_load.py --spawn 1 --weights W --no-redis         # one replica, everything in process

Each client authenticates (clients are spread over the replicas), keeps one task in flight at a time and times it
from send to answer. When its replica goes away it resumes its session on the next one (``connectionSessionUUID``)
and sends the task it waits for again: a ``conflictTaskUUID`` then says the first send was accepted, and the answer
comes through the session. Printed: a Markdown table with throughput (answered tasks / wall time), p50 / p95 latency,
the batch count over the run (from every live replica's /health), and the exactly-once check: every taskUUID got
one answer (one imageUUID; a resume may deliver that same answer again, counted as ``redelivered``), nothing
answered that was not asked. Exit status 1 when that check fails.
"""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict

import httpx
import numpy as np
import websockets
from PIL import Image

GRACE = 1.0  # seconds to keep listening after the last answer, to catch duplicates
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_base64(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Tally:
    """Per taskUUID: the answers (imageUUID or error code) received, and the clients' latencies and errors."""

    def __init__(self):
        self.answers: dict[str, list[str]] = defaultdict(list)
        self.asked: set[str] = set()
        self.latencies: list[float] = []
        self.errors: list[dict] = []

    def take(self, message: dict) -> str | None:
        """The taskUUID a message answers (None for a conflict: the task was accepted by an earlier send)."""
        item = (message.get("data") or message.get("errors"))[0]
        if item.get("code") == "conflictTaskUUID":
            return None
        if "errors" in message:
            self.errors.append(item)
        self.answers[item.get("taskUUID")].append(item.get("imageUUID") or item.get("code"))
        return item.get("taskUUID")


async def connect(url: str, key: str, session: str | None):
    ws = await websockets.connect(url, max_size=None)
    auth = {"taskType": "authentication", "apiKey": key, **({"connectionSessionUUID": session} if session else {})}
    await ws.send(json.dumps([auth]))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert "data" in reply, f"authentication failed: {reply}"
    return ws, reply["data"][0]["connectionSessionUUID"]


async def client(args, index: int, urls: list[str], tally: Tally) -> None:
    image, at, ws, session = image_base64(args.size, index), index % len(urls), None, None
    for number in range(args.tasks):
        task_uuid = str(uuid.uuid4())
        tally.asked.add(task_uuid)
        task = {"taskType": "upscale", "taskUUID": task_uuid, "model": "runware:502@1", "inputs": {"image": image},
                "settings": {"steps": args.steps, "seed": number}, "outputType": "URL", "outputFormat": "PNG"}
        start, sent, deadline = time.perf_counter(), False, time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                if ws is None:
                    ws, session = await connect(urls[at], args.key, session)
                if not sent:
                    await ws.send(json.dumps([task]))
                    sent = True
                if tally.take(json.loads(await asyncio.wait_for(ws.recv(), args.timeout))) == task_uuid:
                    tally.latencies.append(time.perf_counter() - start)
                    break
            except (websockets.ConnectionClosed, OSError):  # the replica went away: resume on the next one
                ws, sent, at = None, False, (at + 1) % len(urls)
                await asyncio.sleep(0.2)
    with contextlib.suppress(asyncio.TimeoutError, websockets.ConnectionClosed, OSError):
        while ws is not None:  # anything more (a duplicate) within the grace period
            tally.take(json.loads(await asyncio.wait_for(ws.recv(), GRACE)))
    if ws is not None:
        await ws.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def spawned(args):
    """(WebSocket URLs, processes) of ``args.spawn`` replicas, beside a redis-server of their own unless
    ``--no-redis``; everything is stopped at the end."""
    processes, env = [], {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as folder:
        try:
            redis = []
            if not args.no_redis:
                port = free_port()
                processes.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                                   "--dir", folder, "--save", ""], stdout=subprocess.DEVNULL))
                time.sleep(0.5)
                redis = [f"redis_url=redis://127.0.0.1:{port}/0", f"redis_claim_after={args.claim_after}"]
            replicas = [subprocess.Popen([sys.executable, "-m", "latentup.serve", "port=0", f"weights={args.weights}",
                                          f"device={args.device}", "max_queue=256", "max_inflight_per_key=256",
                                          *redis], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                        for _ in range(args.spawn)]
            processes += replicas
            urls = []
            for replica in replicas:
                line = replica.stdout.readline()
                assert line.startswith("serving on "), f"a replica did not start: {line!r}"
                urls.append(line.split()[2].replace("http", "ws") + "/v1")
            yield urls, replicas
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)


def batches(urls: list[str]) -> int:
    total = 0
    for url in urls:
        with contextlib.suppress(httpx.HTTPError):
            total += httpx.get(url.replace("ws", "http", 1).rsplit("/v1", 1)[0] + "/health").json()["batches"]
    return total


async def run(args, urls: list[str], replicas: list) -> int:
    tally = Tally()
    before = batches(urls)

    async def kill():
        await asyncio.sleep(args.kill_after)
        replicas[0].send_signal(signal.SIGKILL)
        print(f"killed replica 0 ({urls[0]}) at {args.kill_after:g} s", file=sys.stderr)

    killer = asyncio.ensure_future(kill()) if args.kill_after is not None else None
    start = time.perf_counter()
    await asyncio.gather(*(client(args, i, urls, tally) for i in range(args.clients)))
    wall = time.perf_counter() - start - GRACE
    if killer is not None:
        killer.cancel()
    done = batches(urls) - before  # the killed replica's batches are not counted
    expected = args.clients * args.tasks
    distinct = {task: set(found) for task, found in tally.answers.items()}
    once = (set(distinct) == tally.asked and len(tally.asked) == expected
            and all(len(found) == 1 for found in distinct.values()))
    redelivered = sum(len(found) for found in tally.answers.values()) - len(tally.answers)
    p50, p95 = np.percentile(tally.latencies, [50, 95]) if tally.latencies else (float("nan"),) * 2
    mode = "in process" if args.no_redis or not args.spawn else "Redis"
    kill = f", replica 0 killed at {args.kill_after:g} s" if args.kill_after is not None else ""
    print("| replicas | clients x tasks | answered | exactly once | redelivered | errors | wall s | tasks/s | p50 s | "
          "p95 s | batches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(urls)} ({mode}{kill}) | {args.clients} x {args.tasks} | {len(distinct)} | "
          f"{'yes' if once else 'NO'} | "
          f"{redelivered} | {len(tally.errors)} | {wall:.1f} | {len(tally.latencies) / wall:.2f} | {p50:.2f} | "
          f"{p95:.2f} | {done} |")
    for item in tally.errors[:3]:
        print(f"error: {item.get('code')}: {item.get('message')}", file=sys.stderr)
    return 0 if once and not tally.errors else 1


def main(args) -> int:
    if not args.spawn:
        return asyncio.run(run(args, args.url.split(","), []))
    with spawned(args) as (urls, replicas):
        return asyncio.run(run(args, urls, replicas))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1", help="running server(s), comma-separated")
    parser.add_argument("--key", default="", help="an API key of the server (none needed without api_keys)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=25, help="tasks per client")
    parser.add_argument("--size", type=int, default=64, help="input side in px (the output is twice that)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for one answer")
    parser.add_argument("--spawn", type=int, default=0, help="start this many replicas (instead of --url)")
    parser.add_argument("--weights", default="", help="the spawned replicas' weights (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each spawned replica")
    parser.add_argument("--no-redis", action="store_true", help="spawn one replica without Redis")
    parser.add_argument("--claim-after", type=float, default=5, help="redis_claim_after of spawned replicas")
    parser.add_argument("--kill-after", type=float, help="SIGKILL spawned replica 0 this many seconds in")
    main_args = parser.parse_args()
    if main_args.weights == "":
        main_args.weights = "null"
    sys.exit(main(main_args))
