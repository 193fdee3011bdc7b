"""mnist-serve under load: requests/s and latency at several concurrencies, beside the raw onnxruntime call's rate.

A bounded load generator (asyncio and aiohttp, a fixed number of clients, each sending its next request when its
last is answered) sends single-image Open Inference Protocol requests to a real `mnist-serve` on 127.0.0.1 for a
fixed time per concurrency, with batching and without (--max-batch 1). In the same run, onnxruntime alone runs the
same model one image a call and 64 a call: the ceiling the server works against. Run after `make repro`:

    .venv/bin/python tests/load_serve.py [--model models/model.onnx] [--seconds 10] [--concurrency 1 8 64]

The client shares the CPU with the server: on 2 cores the figures are the pair's, not the server's alone.
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import mnist_serve  # noqa: E402


def onnxruntime_rate(model: str, batch: int, seconds: float) -> float:
    """Images/s of onnxruntime's own session.run on `batch` images a call (the server's session options)."""
    from mnist_pipeline.onnx_io import INPUT_NAME, inference_session

    session = inference_session(model)
    pixels = np.random.default_rng(0).integers(0, 256, size=(batch, 1, 28, 28), dtype=np.uint8)
    session.run(None, {INPUT_NAME: pixels})
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {INPUT_NAME: pixels})
        calls += 1
    return calls * batch / (time.perf_counter() - start)


async def load(url: str, concurrency: int, seconds: float) -> dict:
    import aiohttp

    pixels = np.random.default_rng(1).integers(0, 256, size=784).tolist()
    body = json.dumps(
        {
            "inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": pixels}],
            "outputs": [{"name": "probabilities"}],
        }
    )
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(session):
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(
                f"{url}/v2/models/mnist/infer", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))  # warm: one round first
        latencies.clear()
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    milliseconds = np.array(latencies) * 1000
    return {
        "rate": len(latencies) / elapsed,
        "p50": np.percentile(milliseconds, 50),
        "p99": np.percentile(milliseconds, 99),
        "errors": errors,
        "requests": len(latencies),
    }


def main() -> None:
    from mnist_pipeline.cpu import this_cpu

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load at each concurrency (default: 10)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-wait-ms", default="2")
    args = parser.parse_args()
    print(f"CPU: {this_cpu().describe()}")
    single, batched = (
        onnxruntime_rate(args.model, 1, args.seconds / 2),
        onnxruntime_rate(args.model, 64, args.seconds / 2),
    )
    print(
        f"onnxruntime alone: {single:,.0f} images/s one a call; {batched:,.0f} images/s 64 a call "
        f"({batched / single:.1f}x)"
    )
    for setting, options in (("batching", ["--max-wait-ms", args.max_wait_ms]), ("no batching", ["--max-batch", "1"])):
        with mnist_serve("--model", args.model, *options) as (url, _):
            for concurrency in args.concurrency:
                result = asyncio.run(load(url, concurrency, args.seconds))
                print(
                    f"mnist-serve, {setting:11s}, concurrency {concurrency:3d}: {result['rate']:7,.0f} requests/s, "
                    f"p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, {result['errors']} errors in "
                    f"{result['requests']:,} requests"
                )


if __name__ == "__main__":
    main()
