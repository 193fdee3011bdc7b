"""mnist-serve: the exported model over HTTP, on the Open Inference Protocol (KServe v2), with a draw-a-digit page.

FastAPI on uvicorn, onnxruntime underneath. Concurrent requests are batched into one onnxruntime call (a bounded
wait, a bounded batch); with --workers, each of several processes batches its own, and /metrics sums them. Images
sent to /predict and drawn on the page are prepared by mnist-predict's own code (mnist_pipeline.predict), so the
server and the command give the same answer for the same file. Every asset, the OpenAPI docs' included, is served
by the app itself: nothing is fetched from a CDN.
"""

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import swagger_ui_bundle
import uvicorn
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS, PROBABILITIES
from mnist_pipeline.predict import (
    Classifier,
    ImageTooLarge,
    NoDigit,
    answer,
    decode_image,
    default_model,
    mnist_style,
    softmax,
    top_classes,
)

STATIC = Path(__file__).with_name("static")
MODEL_NAME = "mnist"
MAX_BODY = 8 * 1024 * 1024  # bytes of any request: a photo or a v2 batch of a thousand images fits
MAX_PIXELS = 4096 * 4096  # pixels of an uploaded image, checked from its header before it is decoded
MAX_REQUEST_IMAGES = 1024  # images in one v2 request
TOP = 3
# The Open Inference Protocol's binary tensor extension (Triton's, which tritonclient uses by default).
HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}


class Batcher:
    """Concurrent requests' images, run as one onnxruntime call.

    A call starts as soon as the first images arrive and no more than `max_wait` seconds later, with at most
    `max_batch` images (a larger request runs alone); requests that arrive while a call runs wait for the next one.
    It waits only while other requests are being handled (`active()` counts them), so a lone request never does.
    onnxruntime runs in one thread of its own, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, session, max_batch: int, max_wait: float, batch_sizes: Histogram, active=lambda: 0):
        self.session, self.max_batch, self.max_wait, self.batch_sizes = session, max_batch, max_wait, batch_sizes
        self.active = active
        self.output_names = [o.name for o in session.get_outputs()]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.serve())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model for these images (N, 1, H, W), by name."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, future))
        return await future

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        held = None  # a request that did not fit in the last batch goes first in the next
        while True:
            first = held or await self.queue.get()
            held, batch, count = None, [first], len(first[0])
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self.active() <= len(batch):  # nobody else could join
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                if count + len(item[0]) > self.max_batch:
                    held = item
                    break
                batch.append(item)
                count += len(item[0])
            pixels = np.concatenate([p for p, _ in batch]) if len(batch) > 1 else batch[0][0]
            self.batch_sizes.observe(len(pixels))
            try:
                outputs = await loop.run_in_executor(self.executor, self.session.run, None, {INPUT_NAME: pixels})
            except Exception as error:  # onnxruntime refused the batch: each request hears why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for images, future in batch:
                if not future.done():  # its client may have gone
                    rows = slice(start, start + len(images))
                    future.set_result(
                        {name: output[rows] for name, output in zip(self.output_names, outputs, strict=True)}
                    )
                start += len(images)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several). Under
    several workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, which main sets before it
    starts them) keeps each worker's values in a file, and /metrics reports their sums, whichever worker answers."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("mnist_requests", "HTTP requests answered", ["path", "status"], registry=self.registry)
        self.errors = Counter(
            "mnist_errors",
            "HTTP requests answered with a 4xx or 5xx status",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnist_request_seconds",
            "Time to answer a request",
            ["path"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        self.batch_sizes = Histogram(
            "mnist_batch_images",
            "Images per onnxruntime call",
            registry=self.registry,
            buckets=sorted({*(s for s in sizes if s < max_batch), max_batch, MAX_REQUEST_IMAGES}),
        )

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: this process's, or every worker's summed."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)
        return generate_latest(every_worker)


class ServedModel:
    """The model file, loaded or not: a server whose model is missing or corrupt stays live, not ready, and says why."""

    def __init__(self, path: Path | None, threads: int = 0):
        self.classifier: Classifier | None = None
        try:
            self.path = default_model() if path is None else Path(path)
            self.classifier = Classifier(self.path, threads)
            self.reason = ""
        except PipelineError as error:
            self.path, self.reason = path, str(error)


# The Open Inference Protocol's request, for validation and for the OpenAPI docs.
class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(None, ge=0)
    binary_data: bool | None = None


class InferInput(BaseModel):
    name: str
    shape: list[int] = Field(max_length=8)
    datatype: str
    data: list[Any] | None = None
    parameters: TensorParameters | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: TensorParameters | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class Ranked(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class")
    probability: float


class PredictAnswer(BaseModel):
    """mnist-predict --json's answer for one image; for a blank image, no class and a message instead."""

    model_config = ConfigDict(populate_by_name=True)
    class_: str | None = Field(alias="class")
    probability: float | None
    top: list[Ranked]
    message: str | None = None


class ErrorAnswer(BaseModel):
    error: str


def inline_refs(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs written in place, as an OpenAPI requestBody takes it."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


ERRORS = {code: {"model": ErrorAnswer} for code in (400, 404, 413, 503)}


def error(status: int, message: str) -> HTTPException:
    return HTTPException(status, message)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413, from its Content-Length before it is read,
    or as soon as a chunked body passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is over the limit of {self.limit:,} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await JSONResponse({"error": too_large}, 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise error(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


class Measure:
    """ASGI middleware: every request counted, timed and, if it failed, counted as an error, by route template;
    `active` holds how many are being handled. (Pure ASGI: Starlette's BaseHTTPMiddleware costs more a request.)"""

    def __init__(self, app, metrics: Metrics, active: list[int]):
        self.app, self.metrics, self.active = app, metrics, active

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # a bug's traceback never reaches send: Starlette answers 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.active[0] += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            self.active[0] -= 1
            path = getattr(scope.get("route"), "path", "other")  # templates only: fuzzed paths make no new series
            self.metrics.requests.labels(path, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def create_app(
    model: Path | str | None = None, max_batch: int = 64, max_wait_ms: float = 2.0, threads: int = 0
) -> FastAPI:
    """The service for one model file (None: the default model, found as mnist-predict finds it), its onnxruntime
    calls on `threads` threads (0: every core)."""
    served = ServedModel(None if model is None else Path(model), threads)
    metrics = Metrics(max_batch)
    active = [0]  # requests being handled now
    batcher = (
        Batcher(served.classifier.session, max_batch, max_wait_ms / 1000, metrics.batch_sizes, lambda: active[0])
        if served.classifier
        else None
    )

    @asynccontextmanager
    async def lifespan(_app):
        if batcher:
            batcher.start()
        yield
        if batcher:
            await batcher.stop()

    app = FastAPI(
        title="mnist-serve",
        version=metadata.version("mnist-pipeline"),
        lifespan=lifespan,
        description="The exported MNIST model on the Open Inference Protocol (KServe v2), with `/predict` "
        "for image files and a draw-a-digit page at `/`.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.served, app.state.metrics = served, metrics
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.add_middleware(Measure, metrics=metrics, active=active)
    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse(
            {"error": f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")}, 400
        )

    def classifier() -> Classifier:
        if served.classifier is None:
            raise error(503, f"the model is not ready: {served.reason}")
        return served.classifier

    def check_name(name: str) -> Classifier:
        model = classifier()
        if name != MODEL_NAME:
            raise error(404, f"no model named {name!r}; this server serves {MODEL_NAME!r}")
        return model

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="mnist-serve API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    @app.get("/metrics", summary="Prometheus metrics: requests, errors, latency, batch sizes")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata():
        return {"name": "mnist-serve", "version": app.version, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Whether the server runs")
    async def live():
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        summary="Whether the model is loaded; 503 with the reason when not",
        responses={503: {"model": ErrorAnswer}},
    )
    async def ready():
        classifier()
        return {"ready": True}

    @app.get("/v2/models/{name}/ready", summary="Whether the model is ready", responses=ERRORS)
    async def model_ready(name: str):
        check_name(name)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}", summary="The model's metadata: its input and outputs", responses=ERRORS)
    async def model_metadata(name: str):
        model = check_name(name)
        height, width = model.image_size
        outputs = [o.name for o in model.session.get_outputs()]
        return {
            "name": MODEL_NAME,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 1, height, width]}],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, len(model.class_names)]} for n in outputs],
            "parameters": {"class_names": model.class_names},
        }

    infer_body = {
        "required": True,
        "content": {
            "application/json": {"schema": inline_refs(InferRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the binary tensor extension: JSON, then the tensors' bytes, "
                f"the JSON's length in the {HEADER_LENGTH} header",
            },
        },
    }

    @app.post(
        "/v2/models/{name}/infer",
        summary="Inference on tensors (Open Inference Protocol)",
        openapi_extra={"requestBody": infer_body},
        responses=ERRORS,
    )
    async def infer(name: str, request: Request):
        model = check_name(name)
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise error(400, f"the {HEADER_LENGTH} header is not a length within the body")
            header, binary = body[: int(header_length)], body[int(header_length) :]
        else:
            header, binary = body, b""
        if not header:
            raise error(400, "empty request: expected an inference request in JSON")
        try:
            infer_request = InferRequest.model_validate_json(header)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise error(400, f"not an inference request: {where + ': ' if where else ''}{first['msg']}") from None
        pixels = request_pixels(infer_request, binary, model)
        wanted, binary_default = requested_outputs(infer_request, model)
        outputs = await batcher(pixels)
        return infer_response(infer_request, outputs, wanted, binary_default)

    def request_pixels(infer_request: InferRequest, binary: bytes, model: Classifier) -> np.ndarray:
        height, width = model.image_size
        if len(infer_request.inputs) != 1 or infer_request.inputs[0].name != INPUT_NAME:
            names = [i.name for i in infer_request.inputs]
            raise error(400, f"expected one input, {INPUT_NAME!r}; got {names}")
        tensor = infer_request.inputs[0]
        if tensor.datatype != "UINT8":
            raise error(400, f"input {INPUT_NAME!r} is UINT8 (raw pixels 0-255); got {tensor.datatype!r}")
        shape = tensor.shape
        if len(shape) != 4 or shape[1:] != [1, height, width] or not 1 <= shape[0] <= MAX_REQUEST_IMAGES:
            raise error(
                400,
                f"input {INPUT_NAME!r} has shape [N, 1, {height}, {width}] with N from 1 to "
                f"{MAX_REQUEST_IMAGES}; got {shape}",
            )
        count = int(np.prod(shape))
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is not None:
            if tensor.data is not None:
                raise error(400, f"input {INPUT_NAME!r} has both JSON data and binary_data_size")
            if size != count or len(binary) != size:
                raise error(
                    400,
                    f"input {INPUT_NAME!r} of shape {shape} takes {count} bytes of binary data; "
                    f"binary_data_size says {size}, and {len(binary)} follow the JSON",
                )
            return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
        if tensor.data is None:
            raise error(400, f"input {INPUT_NAME!r} has no data")
        try:
            data = np.asarray(tensor.data)
        except ValueError:
            data = np.asarray([], dtype=object)
        if data.dtype.kind not in "iu" or data.size != count:
            raise error(
                400,
                f"input {INPUT_NAME!r} of shape {shape} takes {count} integers; "
                f"got {data.size} values of type {data.dtype.name}",
            )
        if data.min() < 0 or data.max() > 255:
            raise error(400, f"input {INPUT_NAME!r} holds pixels 0-255; got values from {data.min()} to {data.max()}")
        return data.astype(np.uint8).reshape(shape)

    def requested_outputs(infer_request: InferRequest, model: Classifier) -> tuple[dict[str, bool | None], bool]:
        available = [o.name for o in model.session.get_outputs()]
        binary_default = bool((infer_request.parameters or {}).get("binary_data_output", False))
        if not infer_request.outputs:
            return {name: None for name in available}, binary_default
        wanted = {}
        for output in infer_request.outputs:
            if output.name not in available:
                raise error(400, f"no output named {output.name!r}; the model's outputs are {available}")
            wanted[output.name] = output.parameters.binary_data if output.parameters else None
        return wanted, binary_default

    def infer_response(
        infer_request: InferRequest,
        outputs: dict[str, np.ndarray],
        wanted: dict[str, bool | None],
        binary_default: bool,
    ) -> Response:
        described, chunks = [], []
        for name, binary in wanted.items():
            values = np.ascontiguousarray(outputs[name], dtype=np.float32)
            entry = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
            if binary if binary is not None else binary_default:
                chunks.append(values.tobytes())
                entry["parameters"] = {"binary_data_size": len(chunks[-1])}
            else:
                entry["data"] = values.ravel().tolist()
            described.append(entry)
        head = {"model_name": MODEL_NAME, "model_version": "1", "outputs": described}
        if infer_request.id is not None:
            head["id"] = infer_request.id
        text = json.dumps(head).encode()
        if not chunks:
            return Response(text, media_type="application/json")
        return Response(
            text + b"".join(chunks), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))}
        )

    @app.post(
        "/predict",
        summary="The class of an image file, prepared as mnist-predict prepares it",
        response_model=PredictAnswer,
        response_model_exclude_none=False,
        responses=ERRORS,
    )
    async def predict_image(file: UploadFile = File(description="an image: PNG, JPEG, BMP, GIF or TIFF")):
        model = classifier()
        data = await file.read()
        if not data:
            raise error(400, "the file is empty: expected an image (PNG, JPEG, BMP, GIF or TIFF)")
        name = file.filename or "the file"
        try:
            pixels = await run_in_threadpool(prepare, data, name, model.image_size)
        except NoDigit as exc:
            return {"class": None, "probability": None, "top": [], "message": str(exc).split(": ", 1)[-1]}
        except ImageTooLarge as exc:
            raise error(413, str(exc)) from None
        except PipelineError as exc:
            raise error(400, str(exc)) from None
        except MemoryError:
            raise error(413, f"{name}: too large to decode in the memory available") from None
        outputs = await batcher(pixels[None, None])
        probabilities = outputs[PROBABILITIES][0] if PROBABILITIES in outputs else softmax(outputs[LOGITS])[0]
        return answer(top_classes(probabilities, model.class_names, min(TOP, len(model.class_names))))

    return app


def prepare(data: bytes, name: str, size: tuple[int, int]) -> np.ndarray:
    """An uploaded image file as the model's input (H, W), exactly as mnist-predict prepares a file."""
    return mnist_style(decode_image(io.BytesIO(data), name, MAX_PIXELS), size)


APP_SETTINGS = "MNIST_SERVE_APP"  # how main hands create_app's arguments to worker processes, as JSON


def app_from_environment() -> FastAPI:
    """create_app with the arguments main left in the environment: the app factory each worker process calls."""
    return create_app(**json.loads(os.environ[APP_SETTINGS]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the exported ONNX model over HTTP: the Open Inference Protocol (KServe v2) under /v2, "
        "POST /predict for image files, a draw-a-digit page at /, Prometheus metrics at /metrics, docs at /docs.",
    )
    parser.add_argument(
        "--model",
        help="an exported ONNX model (default: models/model.onnx here, else in the "
        "checkout the command was installed from)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images in one onnxruntime call (default: 64)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="longest wait for more requests to batch with the first, in ms (default: 2)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port, each batching its own requests and running onnxruntime on its "
        "share of the cores (default: 1; one per core serves the most requests, see docs/performance.md)",
    )
    args = parser.parse_args(argv)
    if args.max_batch < 1 or not 0 <= args.max_wait_ms <= 100 or args.workers < 1:
        print("error: --max-batch and --workers must be 1 or more, and --max-wait-ms from 0 to 100", file=sys.stderr)
        sys.exit(1)
    cores = len(os.sched_getaffinity(0))
    settings = {
        "model": args.model,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        # Workers that each took every core would fight over them: each gets its share.
        "threads": 0 if args.workers == 1 else max(1, cores // args.workers),
    }
    app = create_app(**settings) if args.workers == 1 else None
    served = app.state.served if app else ServedModel(None if args.model is None else Path(args.model))
    if served.classifier is None:
        print(f"warning: not ready: {served.reason}", file=sys.stderr)
    else:
        workers = f" by {args.workers} worker processes" if args.workers > 1 else ""
        print(f"serving {served.path} as {MODEL_NAME!r}{workers} on http://{args.host}:{args.port}/", file=sys.stderr)
    if app:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return
    with tempfile.TemporaryDirectory(prefix="mnist-serve-metrics-") as metrics_dir:
        # Both are read by the worker processes, which uvicorn starts afresh: prometheus_client picks its
        # multiprocess mode at import, from the environment.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[APP_SETTINGS] = json.dumps(settings)
        uvicorn.run(
            "mnist_pipeline.serve:app_from_environment",
            factory=True,
            workers=args.workers,
            host=args.host,
            port=args.port,
            log_level="warning",
        )


if __name__ == "__main__":
    main()
