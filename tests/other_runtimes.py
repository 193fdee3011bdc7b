"""Whether runtimes other than onnxruntime compute the exported files as defined: each file's logits on the first
1,000 test images in OpenCV's DNN module and in onnxruntime-web (WASM, in headless Chromium), against onnxruntime's.

Neither runtime is a dependency of the pipeline; bring the ones to check. Run after `make repro` (it reads
data/prepared/ and models/):

    pip install --target /tmp/cv opencv-python-headless     # any version; PYTHONPATH=/tmp/cv picks it
    (cd /tmp/w && npm install onnxruntime-web)               # its dist/ folder is served to Chromium on 127.0.0.1
    PYTHONPATH=/tmp/cv .venv/bin/python tests/other_runtimes.py --opencv --web /tmp/w/node_modules/onnxruntime-web/dist

Each line says how often the runtime gives onnxruntime's class, how many images get onnxruntime's logits bit for bit,
and the largest logit difference; or the runtime's one-line error where it cannot load a file.
"""

import argparse
import functools
import http.server
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS, onnx_outputs  # noqa: E402

FILES = ("models/model.onnx", "models/model.int8.onnx")
IMAGES = 1000
# Every name resolves nowhere but 127.0.0.1: the page may fetch nothing from the network.
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
PAGE = """<!doctype html><script src="ort.min.js"></script><script>
async function logits(file, count) {
  ort.env.wasm.numThreads = 1;
  const pixels = new Uint8Array(await (await fetch("images.u8")).arrayBuffer());
  const session = await ort.InferenceSession.create(file, {executionProviders: ["wasm"]});
  const out = [];
  for (let i = 0; i < count; i += 100) {
    const batch = new ort.Tensor("uint8", pixels.slice(i * 784, (i + 100) * 784), [100, 1, 28, 28]);
    out.push(...(await session.run({INPUT: batch}))["LOGITS"].data);
  }
  return out;
}
</script>""".replace("INPUT", INPUT_NAME).replace("LOGITS", LOGITS)


def compared(name: str, theirs: np.ndarray, ours: np.ndarray, labels: np.ndarray) -> str:
    return (
        f"{name}: onnxruntime's class for {(theirs.argmax(1) == ours.argmax(1)).sum()} of {len(ours)}, "
        f"accuracy {(theirs.argmax(1) == labels).mean():.4f} (onnxruntime {(ours.argmax(1) == labels).mean():.4f}), "
        f"bit for bit on {(theirs == ours).all(1).sum()}, max |logit difference| {np.abs(theirs - ours).max():.2g}"
    )


def opencv_logits(path: str, pixels: np.ndarray) -> np.ndarray:
    import cv2

    network = cv2.dnn.readNetFromONNX(path)
    batches = []
    for start in range(0, len(pixels), 100):
        network.setInput(pixels[start : start + 100])
        batches.append(network.forward(LOGITS))
    return np.concatenate(batches)


def web_logits(dist: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Each file's logits from onnxruntime-web's WASM backend in headless Chromium, served from a folder on
    127.0.0.1 that holds the page, onnxruntime-web's dist files, the models and the images."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        site = Path(folder)
        for item in dist.glob("ort*"):
            shutil.copy(item, site)
        for path in FILES:
            shutil.copy(path, site)
        pixels.tofile(site / "images.u8")
        (site / "index.html").write_text(PAGE)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
        handler.func.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=OFFLINE)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
                version = json.loads((dist.parent / "package.json").read_text())["version"]
                print(f"onnxruntime-web {version} (WASM) in Chromium {browser.version}")
                found = {
                    path: np.array(page.evaluate(f"logits('{Path(path).name}', {len(pixels)})"), np.float32).reshape(
                        len(pixels), -1
                    )
                    for path in FILES
                }
                browser.close()
        finally:
            server.shutdown()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opencv", action="store_true", help="check OpenCV's DNN module (import cv2)")
    parser.add_argument("--web", type=Path, metavar="DIST", help="onnxruntime-web's dist/ folder, to check in Chromium")
    args = parser.parse_args()
    test = np.load("data/prepared/test.npz")
    pixels, labels = test["images"][:IMAGES, None], test["labels"][:IMAGES]
    ours = {path: onnx_outputs(Path(path), pixels)[0] for path in FILES}
    if args.opencv:
        import cv2

        print(f"OpenCV {cv2.__version__} DNN")
        for path in FILES:
            try:
                print(compared(path, opencv_logits(path, pixels), ours[path], labels))
            except cv2.error as error:
                print(f"{path}: OpenCV cannot run it: {str(error).strip().splitlines()[-1]}")
    if args.web:
        for path, theirs in web_logits(args.web, pixels).items():
            print(compared(path, theirs, ours[path], labels))


if __name__ == "__main__":
    main()
