"""Load test for a running `python -m latentup.serve`: N WebSocket clients x M upscale tasks each, on loopback.

    python -m latentup.serve weights=... port=8765 &
    python benchmarks/serve_load.py --url ws://127.0.0.1:8765/v1 --clients 8 --tasks 25 --steps 4

Each client authenticates, keeps one task in flight at a time and times it from send to answer. Printed: a
Markdown table with throughput (answered tasks / wall time), p50 / p95 latency, the server's batch count over the
run (from /health), and the exactly-once check: every taskUUID answered once, nothing answered that was not asked.
Exit status 1 when that check fails.
"""

import argparse
import asyncio
import base64
import io
import json
import sys
import time
import uuid
from collections import Counter

import httpx
import numpy as np
import websockets
from PIL import Image

GRACE = 1.0  # seconds to keep listening after the last answer, to catch duplicates


def image_base64(size: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def client(args, index: int, answers: Counter, latencies: list, errors: list, unknown: list) -> None:
    image = image_base64(args.size, index)
    async with websockets.connect(args.url, max_size=None) as ws:
        await ws.send(json.dumps([{"taskType": "authentication", "apiKey": args.key}]))
        assert "data" in json.loads(await ws.recv()), "authentication failed: pass --key"
        asked = set()
        for number in range(args.tasks):
            task_uuid = str(uuid.uuid4())
            asked.add(task_uuid)
            task = {"taskType": "upscale", "taskUUID": task_uuid, "model": "runware:502@1", "inputs": {"image": image},
                    "settings": {"steps": args.steps, "seed": number}, "outputType": "URL", "outputFormat": "PNG"}
            start = time.perf_counter()
            await ws.send(json.dumps([task]))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), args.timeout))
                item = (message.get("data") or message.get("errors"))[0]
                answers[item.get("taskUUID")] += 1
                if item.get("taskUUID") not in asked:
                    unknown.append(item)
                if "errors" in message:
                    errors.append(item)
                if item.get("taskUUID") == task_uuid:
                    latencies.append(time.perf_counter() - start)
                    break
        try:  # anything more (a duplicate) within the grace period
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), GRACE))
                item = (message.get("data") or message.get("errors"))[0]
                answers[item.get("taskUUID")] += 1
        except asyncio.TimeoutError:
            pass


async def main(args) -> int:
    health = args.url.replace("ws", "http", 1).rsplit("/v1", 1)[0] + "/health"
    before = httpx.get(health).json()
    answers, latencies, errors, unknown = Counter(), [], [], []
    start = time.perf_counter()
    await asyncio.gather(*(client(args, i, answers, latencies, errors, unknown) for i in range(args.clients)))
    wall = time.perf_counter() - start - GRACE
    after = httpx.get(health).json()
    expected = args.clients * args.tasks
    once = len(answers) == expected and set(answers.values()) == {1} and not unknown
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (float("nan"),) * 2
    print("| clients x tasks | answered | exactly once | errors | wall s | tasks/s | p50 s | p95 s | batches |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} x {args.tasks} | {sum(answers.values())} | {'yes' if once else 'NO'} | {len(errors)} | "
          f"{wall:.1f} | {len(latencies) / wall:.2f} | {p50:.2f} | {p95:.2f} | "
          f"{after['batches'] - before['batches']} |")
    for item in errors[:3]:
        print(f"error: {item.get('code')}: {item.get('message')}", file=sys.stderr)
    return 0 if once and not errors else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1")
    parser.add_argument("--key", default="", help="an API key of the server (none needed without api_keys)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=25, help="tasks per client")
    parser.add_argument("--size", type=int, default=64, help="input side in px (the output is twice that)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for one answer")
    sys.exit(asyncio.run(main(parser.parse_args())))
