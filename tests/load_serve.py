"""mnist-serve under load: requests/s and latency at several concurrencies, beside the raw onnxruntime call's rate.

A bounded load generator (a fixed number of clients, each sending its next request when its last is answered) sends
single-image Open Inference Protocol requests to a real `mnist-serve` on 127.0.0.1 for a fixed time per
concurrency: with batching in one process, in one process per core (--workers), and without batching (--max-batch
1). Two generators, each on every setting: asyncio and aiohttp, a Python client as a service's callers often are,
and wrk (Debian's `wrk`, in C), which leaves the server more of the CPU they share. In the same run, onnxruntime
alone runs the same model one image a call and 64 a call: the ceiling the server works against. After `make repro`:

    .venv/bin/python tests/load_serve.py [--model models/model.onnx] [--seconds 10] [--concurrency 1 8 64]

The client shares the CPU with the server: on 2 cores the figures are the pair's, not the server's alone.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


PIXELS = np.random.default_rng(1).integers(0, 256, size=784).tolist()
BODY = json.dumps(
    {
        "inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": PIXELS}],
        "outputs": [{"name": "probabilities"}],
    }
)
INFER = "/v2/models/mnist/infer"

# wrk's script: every request the same single-image POST; at the end, its figures as one line of JSON.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("LOAD_BODY")):read("*a")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\n{"requests": %d, "seconds": %f, "p50": %f, "p99": %f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    e.status + e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_load(url: str, concurrency: int, seconds: float) -> dict:
    """The same load as `load`, from wrk: one thread of C, `concurrency` connections."""
    with tempfile.TemporaryDirectory() as folder:
        script, body = Path(folder, "infer.lua"), Path(folder, "body.json")
        script.write_text(WRK_SCRIPT)
        body.write_text(BODY)
        command = ["wrk", "-t1", f"-c{concurrency}", "-s", str(script), f"{url}{INFER}"]
        environment = os.environ | {"LOAD_BODY": str(body)}
        subprocess.run([*command, "-d1s"], env=environment, capture_output=True, check=True)  # warm-up
        output = subprocess.run(
            [*command, f"-d{seconds:g}s", "--timeout", "10s"],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return result | {"rate": result["requests"] / result["seconds"]}


async def load(url: str, concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(session):
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(
                f"{url}{INFER}", data=BODY, headers={"Content-Type": "application/json"}
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
    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {this_cpu().describe()}; {cores} cores for the server and the client together")
    single, batched = (
        onnxruntime_rate(args.model, 1, args.seconds / 2),
        onnxruntime_rate(args.model, 64, args.seconds / 2),
    )
    print(
        f"onnxruntime alone: {single:,.0f} images/s one a call; {batched:,.0f} images/s 64 a call "
        f"({batched / single:.1f}x)"
    )
    clients = {"aiohttp": lambda *a: asyncio.run(load(*a))}
    if shutil.which("wrk"):
        clients["wrk"] = wrk_load
    else:
        print("wrk is not installed (apt install wrk): the aiohttp client only")
    settings = {
        "batching, 1 process": ["--max-wait-ms", args.max_wait_ms],
        f"batching, {cores} processes": ["--max-wait-ms", args.max_wait_ms, "--workers", str(cores)],
        "no batching, 1 process": ["--max-batch", "1"],
    }
    for setting, options in settings.items():
        with mnist_serve("--model", args.model, *options) as (url, _):
            for client, run in clients.items():
                for concurrency in args.concurrency:
                    result = run(url, concurrency, args.seconds)
                    print(
                        f"mnist-serve, {setting:22s}, {client:7s} client, concurrency {concurrency:3d}: "
                        f"{result['rate']:7,.0f} requests/s, p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, "
                        f"{result['errors']} errors in {result['requests']:,} requests"
                    )


if __name__ == "__main__":
    main()
