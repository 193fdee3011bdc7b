"""mnist-serve over real HTTP on 127.0.0.1: tritonclient (a client nobody here wrote) on the Open Inference Protocol,
/predict against mnist-predict, batching and metrics, hostile input, a missing or corrupt model, schema fuzzing."""

import concurrent.futures
import io
import json
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import onnxruntime
import pytest
import requests
from conftest import mnist_serve, write_linear_model
from PIL import Image
from test_predict import glyph

from mnist_pipeline import serve

CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    weights = np.random.default_rng(0).normal(size=(28 * 28, 10))
    return write_linear_model(tmp_path_factory.mktemp("model") / "model.onnx", weights, CLASSES)


@pytest.fixture(scope="module")
def server(model):
    with mnist_serve("--model", str(model)) as (url, process):
        yield url, process


def reference(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = ["logits", "probabilities"]
    return dict(zip(names, session.run(names, {"pixels": pixels}), strict=True))


def test_tritonclient_speaks_to_it_unchanged(server, model):
    import tritonclient.http as triton

    url, _ = server
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    assert client.get_server_metadata()["name"] == "mnist-serve"
    meta = client.get_model_metadata("mnist")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]

    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
    expected = reference(model, pixels)
    for binary in (True, False):  # the binary tensor extension (tritonclient's default) and plain JSON
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
        result = client.infer("mnist", [tensor], outputs=outputs, request_id="r1")
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-5, atol=1e-6)
        assert result.get_response()["id"] == "r1"
    result = client.infer("mnist", [tensor])  # no outputs named: every output, in binary
    assert result.as_numpy("probabilities").shape == (5, 10)
    with pytest.raises(triton.InferenceServerException, match="no model named 'letters'"):
        client.infer("letters", [tensor])


def test_predict_gives_mnist_predicts_answer(server, model, tmp_path):
    url, _ = server
    image = tmp_path / "seven.png"
    Image.fromarray(255 - glyph()).save(image)
    command = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.predict", str(image), "--model", str(model), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(command.stdout)
    with image.open("rb") as file:
        answer = requests.post(f"{url}/predict", files={"file": ("seven.png", file, "image/png")}, timeout=30)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["class"] == expected["class"] and got["top"] == expected["top"] and len(got["top"]) == 3


def test_a_blank_image_gets_no_guess(server):
    url, _ = server
    for blank in (np.full((200, 200), 240, np.uint8), np.full((200, 200), 12, np.uint8)):
        answer = requests.post(f"{url}/predict", files={"file": ("blank.png", png(blank))}, timeout=30)
        assert answer.status_code == 200 and answer.json()["class"] is None and answer.json()["top"] == []
        assert "no digit found" in answer.json()["message"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_requests_are_batched_and_measured(server, model):
    url, _ = server
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(48, 1, 28, 28), dtype=np.uint8)
    expected = reference(model, images)["probabilities"]

    def infer(i):
        body = {
            "inputs": [
                {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": images[i].ravel().tolist()}
            ],
            "outputs": [{"name": "probabilities"}],
        }
        answer = requests.post(f"{url}/v2/models/mnist/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return np.array(answer.json()["outputs"][0]["data"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(infer, range(len(images))))
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-5, atol=1e-6)  # each its own answer
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    for name in (
        "mnist_requests_total",
        "mnist_errors_total",
        "mnist_request_seconds_bucket",
        "mnist_batch_images_bucket",
    ):
        assert name in metrics
    counts = {float(le): float(n) for le, n in re.findall(r'mnist_batch_images_bucket\{le="([^"]+)"\} (\S+)', metrics)}
    calls = float(re.search(r"mnist_batch_images_count (\S+)", metrics).group(1))
    assert counts[1.0] < calls, "some onnxruntime calls held more than one request"
    assert counts[64.0] == calls, "no call held more than --max-batch images"


def test_several_workers_share_the_port_and_their_metrics_add_up(model):
    """--workers 2: two processes accept on one port, each batching its own requests; /metrics, whichever worker
    answers it, counts every request of both (each connection here is new, so both workers take some)."""
    images = np.random.default_rng(3).integers(0, 256, size=(40, 1, 28, 28), dtype=np.uint8)
    expected = reference(model, images)["probabilities"]
    with mnist_serve("--model", str(model), "--workers", "2") as (url, _):

        def infer(i):
            tensor = {
                "name": "pixels",
                "shape": [1, 1, 28, 28],
                "datatype": "UINT8",
                "data": images[i].ravel().tolist(),
            }
            answer = requests.post(f"{url}/v2/models/mnist/infer", json={"inputs": [tensor]}, timeout=30)
            assert answer.status_code == 200, answer.text
            return np.array(answer.json()["outputs"][1]["data"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(infer, range(len(images))))
        np.testing.assert_allclose(np.stack(results), expected, rtol=1e-5, atol=1e-6)
        for _ in range(3):
            metrics = requests.get(f"{url}/metrics", timeout=30).text
            answered = re.search(
                r'mnist_requests_total\{path="/v2/models/\{name\}/infer",status="200"\} (\S+)', metrics
            )
            assert float(answered.group(1)) == len(images)
            assert float(re.search(r"mnist_batch_images_sum (\S+)", metrics).group(1)) == len(images)


def test_bad_worker_counts_are_refused_before_anything_starts(model):
    finished = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.serve", "--model", str(model), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 1
    assert finished.stderr.strip() == (
        "error: --max-batch and --workers must be 1 or more, and --max-wait-ms from 0 to 100"
    )


def decompression_bomb() -> bytes:
    """A valid PNG header for 30000 x 30000 grey pixels, whose few kilobytes would decode to 900 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 30000
    rows = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # only the first rows: the header is what is checked
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )


NOISE = np.random.default_rng(3).integers(0, 256, size=(100, 100), dtype=np.uint8)
V2 = {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
HOSTILE = [
    ("predict", {"files": {"file": ("a.png", b"this is not an image")}}, 400, "not an image"),
    ("predict", {"files": {"file": ("a.png", b"")}}, 400, "the file is empty"),
    ("predict", {"files": {"file": ("a.png", png(NOISE)[:2000])}}, 400, "damaged or truncated"),
    ("predict", {"files": {"file": ("big.png", b"\0" * (serve.MAX_BODY + 1))}}, 413, "over the limit"),
    ("predict", {"files": {"file": ("bomb.png", decompression_bomb())}}, 413, f"more than {serve.MAX_PIXELS:,} pixels"),
    ("predict", {"data": b""}, 400, "file: Field required"),
    ("predict", {"data": b"\x00garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, ""),
    ("infer", {"data": b""}, 400, "empty request"),
    ("infer", {"data": b"{not json"}, 400, "not an inference request"),
    ("infer", {"json": {"inputs": []}}, 400, "inputs"),
    ("infer", {"json": {"inputs": [{**V2, "name": "image"}]}}, 400, "expected one input, 'pixels'"),
    ("infer", {"json": {"inputs": [V2, V2]}}, 400, "expected one input"),
    ("infer", {"json": {"inputs": [{**V2, "datatype": "FP32"}]}}, 400, "is UINT8"),
    ("infer", {"json": {"inputs": [{**V2, "shape": [1, 28, 28]}]}}, 400, "has shape [N, 1, 28, 28]"),
    ("infer", {"json": {"inputs": [{**V2, "shape": [0, 1, 28, 28], "data": []}]}}, 400, "has shape"),
    ("infer", {"json": {"inputs": [{**V2, "shape": [100000, 1, 28, 28]}]}}, 400, "with N from 1 to 1024"),
    ("infer", {"json": {"inputs": [{**V2, "data": [0] * 783}]}}, 400, "takes 784 integers; got 783"),
    ("infer", {"json": {"inputs": [{**V2, "data": ["a"] * 784}]}}, 400, "takes 784 integers"),
    ("infer", {"json": {"inputs": [{**V2, "data": [[0, 1], [2]]}]}}, 400, "takes 784 integers"),
    ("infer", {"json": {"inputs": [{**V2, "data": [0.5] * 784}]}}, 400, "takes 784 integers"),
    ("infer", {"json": {"inputs": [{**V2, "data": [256] * 784}]}}, 400, "pixels 0-255"),
    ("infer", {"json": {"inputs": [{**V2, "data": None}]}}, 400, "has no data"),
    ("infer", {"json": {"inputs": [V2], "outputs": [{"name": "softmax"}]}}, 400, "no output named 'softmax'"),
    (
        "infer",
        {
            "data": json.dumps({"inputs": [{**V2, "data": None, "parameters": {"binary_data_size": 784}}]}).encode()
            + b"\0" * 10,
            "headers": {"Inference-Header-Content-Length": "95"},
        },
        400,
        "",
    ),
    ("infer", {"data": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}, 400, "not a length within"),
    ("wrong_model", {"json": {"inputs": [V2]}}, 404, "no model named"),
]


@pytest.mark.parametrize(
    "endpoint,request_options,status,message", HOSTILE, ids=[f"{e}-{i}" for i, (e, *_) in enumerate(HOSTILE)]
)
def test_hostile_input_is_one_clear_4xx_and_the_server_stays_up(server, endpoint, request_options, status, message):
    url, process = server
    target = {"predict": "/predict", "infer": "/v2/models/mnist/infer", "wrong_model": "/v2/models/nine/infer"}[
        endpoint
    ]
    answer = requests.post(f"{url}{target}", timeout=60, **request_options)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert isinstance(error, str) and "\n" not in error and "Traceback" not in error and message in error, error
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200 and process.poll() is None


@pytest.mark.parametrize("content", [None, b"not an onnx model", b""], ids=["missing", "corrupt", "empty"])
def test_a_missing_or_corrupt_model_leaves_it_live_but_not_ready(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with mnist_serve("--model", str(path)) as (url, _):
        assert requests.get(f"{url}/v2/health/live", timeout=30).status_code == 200
        ready = requests.get(f"{url}/v2/health/ready", timeout=30)
        assert ready.status_code == 503
        reason = ready.json()["error"]
        assert str(path) in reason and ("not found" in reason if content is None else "not an ONNX model" in reason)
        answer = requests.post(f"{url}/predict", files={"file": ("a.png", png(255 - glyph()))}, timeout=30)
        assert answer.status_code == 503 and "not ready" in answer.json()["error"]
        assert requests.get(f"{url}/", timeout=30).status_code == 200, "the page still loads"


def test_docs_and_page_need_no_other_host(server):
    url, _ = server
    for page in ("/docs", "/"):
        html = requests.get(f"{url}{page}", timeout=30).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("/") or s.startswith("data:") for s in sources), sources
        for source in sources:
            if source.startswith("/") and source != "/docs":
                assert requests.get(f"{url}{source}", timeout=30).status_code == 200, source


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Fuzzing every operation of the OpenAPI schema: no 5xx, however strange the request."""
    url, process = server
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "100",
            "--seed",
            "1",
            "--workers",
            "1",
            "--report",
            "json",
            "--report-json-path",
            str(report),
            "--warnings",
            "off",
            "--phases",
            "examples,coverage,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    summary = re.search(r"(\d+) generated", result.stdout)
    print(result.stdout[-1500:])
    assert summary and int(summary.group(1)) >= 100, result.stdout[-2000:]
    assert process.poll() is None


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    url, process = server
    chunk = b"\0" * (1024 * 1024)

    def body():  # no Content-Length: requests sends it chunked
        for _ in range(serve.MAX_BODY // len(chunk) + 2):
            yield chunk

    answer = requests.post(f"{url}/v2/models/mnist/infer", data=body(), timeout=60)
    assert answer.status_code == 413 and "over the limit" in answer.json()["error"]
    assert requests.get(f"{url}/v2/health/live", timeout=30).status_code == 200 and process.poll() is None
