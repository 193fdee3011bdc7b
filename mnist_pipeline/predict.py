"""mnist-predict: the exported ONNX model's answer for image files, directories, .npy arrays and IDX files, no PyTorch.

Only onnxruntime, numpy and Pillow run here, so the command starts in a fraction of the time PyTorch takes to import.
A real image is turned into what the model was trained on the way the MNIST database itself was made: grey levels,
light ink on a dark background, cropped to the ink, scaled to fit the central 20/28 of the image keeping its aspect
ratio, and centred by its centre of mass. mnist-serve prepares its images with the same functions.
"""

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from tqdm import tqdm

from mnist_pipeline.errors import PipelineError, gist, run_stage
from mnist_pipeline.idx import gunzip, parse_idx
from mnist_pipeline.onnx_io import INPUT_NAME, LOGITS, PROBABILITIES, inference_session

DEFAULT_MODEL = Path("models/model.onnx")
# The checkout this package was installed from (pip install -e), where `make repro` leaves its model.
CHECKOUT = Path(__file__).resolve().parents[1]
# An image this large would take gigabytes once decoded and converted; Pillow refuses to open one twice as large.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
BATCH = 256  # images per onnxruntime call
PROGRESS_FROM = 100  # files; fewer finish before a progress bar would say anything
IMAGE_FORMATS = "PNG, JPEG, BMP, GIF or TIFF"
# Ink must stand this many grey levels above the local background to count as a digit at all.
MIN_CONTRAST = 32
# A mark whose ink spans less than this share of the image's shorter side, both ways, is a speck, not a digit.
MIN_EXTENT = 1 / 12


class NoDigit(PipelineError):
    """A blank or nearly blank image: there is nothing to classify, and a guess would be noise."""


def default_model() -> Path:
    """models/model.onnx under the current directory, else in the checkout this package runs from."""
    places = [DEFAULT_MODEL, CHECKOUT / DEFAULT_MODEL]
    for place in places:
        if place.is_file():
            return place
    raise PipelineError(
        f"no model at {Path.cwd() / DEFAULT_MODEL} nor at {places[1]}: export one first "
        f"(dvc repro export), or name one with --model"
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    result = np.exp(logits - logits.max(1, keepdims=True))
    return result / result.sum(1, keepdims=True)


class Classifier:
    """An exported model: raw uint8 pixels (N, 1, H, W) in, class probabilities out, with its class names."""

    def __init__(self, path: Path | str, threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path} not found: export a model first (dvc repro export), or name one with --model")
        try:
            self.session = inference_session(path, threads)
        except Exception as error:  # onnxruntime's own types for a file that is no ONNX model
            raise PipelineError(f"{path} is not an ONNX model onnxruntime can run ({gist(error)})") from None
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        shape = inputs[0].shape
        names = self.session.get_modelmeta().custom_metadata_map.get("class_names", "")
        fixed_size = len(shape) == 4 and all(isinstance(side, int) for side in shape[2:])
        if inputs[0].name != INPUT_NAME or not fixed_size or LOGITS not in outputs or not names:
            raise PipelineError(
                f"{path} is not a model exported by this pipeline: it lacks the '{INPUT_NAME}' input "
                f"(N, 1, H, W), the '{LOGITS}' output or its class names"
            )
        self.class_names = names.split(",")
        self.image_size = (int(shape[2]), int(shape[3]))
        # Models exported before the probabilities output existed still work: softmax here instead.
        self.output = PROBABILITIES if PROBABILITIES in outputs else LOGITS

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        (result,) = self.session.run([self.output], {INPUT_NAME: pixels})
        return softmax(result) if self.output == LOGITS else result


def ink_levels(grey: np.ndarray) -> np.ndarray:
    """How much ink each pixel of a grey image (H, W) holds, 0-255, whatever the polarity and the lighting.

    The background is estimated locally, by a grey-level opening (or closing, for a light page) wider than any
    stroke. On a light page, ink is the share of the local paper's light it takes away: light falls on paper and
    ink alike, so a brightness gradient or a shadow neither counts as ink nor dims the digit. Light ink on a dark
    background (MNIST's own, a screen) is what stands above the local background. What is left of the
    background's noise (the level most pixels keep) is taken off too.
    """
    grey = grey.astype(np.float32)
    if min(grey.shape) >= 64:  # photos: a 3x3 median takes out specks without thinning strokes, which are wider
        grey = ndimage.median_filter(grey, size=3)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    window = max(3, min(grey.shape) // 4 | 1)  # strokes are narrower than a quarter of the image
    # Extended beyond its edges linearly (an odd reflection), a gradient stays a gradient up to the border, where
    # an opening would otherwise mistake it for ink.
    padded = np.pad(grey, window, mode="reflect", reflect_type="odd")
    light_page = float(np.median(border)) > 127.5
    morphology = ndimage.grey_closing if light_page else ndimage.grey_opening
    background = morphology(padded, size=(window, window))[window:-window, window:-window]
    if light_page:  # dark ink
        ink = 255.0 * (1.0 - grey / np.maximum(background, 1.0))
    else:
        ink = grey - background
    ink = np.clip(ink, 0, 255)
    median = float(np.median(ink))
    noise = median + 3 * 1.4826 * float(np.median(np.abs(ink - median)))
    return np.clip(ink - noise, 0, None)


def mnist_style(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grey image (H, W) of one digit, any size, polarity and lighting, as MNIST's makers prepared theirs.

    Ink becomes light on black; the ink's bounding box is scaled, aspect ratio kept, to fit 20x20 (for 28x28, the
    same share of other sizes) with anti-aliasing; its centre of mass lands on the centre of the output. A blank or
    nearly blank image raises NoDigit.
    """
    ink = ink_levels(grey)
    peak = float(ink.max())
    height, width = size
    if peak < MIN_CONTRAST:
        raise NoDigit("no digit found (a blank or nearly blank image)")
    strong_rows, strong_cols = np.nonzero(ink > peak * 0.5)
    extent = max(strong_rows.max() - strong_rows.min(), strong_cols.max() - strong_cols.min()) + 1
    if extent < min(ink.shape) * MIN_EXTENT:
        raise NoDigit("no digit found (only a speck of ink)")
    # The crop: the strokes (over a quarter of the peak) and the faint ink next to them (anti-aliasing, a light
    # touch); faint ink further off (JPEG ringing, what lighting left) neither widens the crop nor moves the centre.
    margin = max(2, round(min(ink.shape) * 0.03))
    strong_rows, strong_cols = np.nonzero(ink > peak * 0.25)
    top, left = max(0, strong_rows.min() - margin), max(0, strong_cols.min() - margin)
    ink = ink[top : strong_rows.max() + margin + 1, left : strong_cols.max() + margin + 1]
    rows, cols = np.nonzero(ink > peak * 0.1)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] * (255.0 / peak)
    box = (round(height * 20 / 28), round(width * 20 / 28))
    scale = min(box[0] / ink.shape[0], box[1] / ink.shape[1])
    scaled_size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))  # Pillow: (w, h)
    scaled = np.asarray(Image.fromarray(np.ascontiguousarray(ink)).resize(scaled_size, Image.Resampling.LANCZOS))
    scaled = np.clip(scaled, 0, 255)
    total = scaled.sum()
    ys, xs = np.indices(scaled.shape)
    centre_y, centre_x = (ys * scaled).sum() / total, (xs * scaled).sum() / total
    # Whole-pixel shifts, as MNIST's; kept inside the frame so that no ink is cut off.
    top = int(np.clip(round(height / 2 - 0.5 - centre_y), 0, height - scaled.shape[0]))
    left = int(np.clip(round(width / 2 - 0.5 - centre_x), 0, width - scaled.shape[1]))
    result = np.zeros(size, dtype=np.float32)
    result[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    return np.round(result).astype(np.uint8)


def grey_levels(image: Image.Image) -> np.ndarray:
    """Any Pillow image as grey levels 0-255 (H, W); transparent parts count as a white page."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float scans: stretch their range
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("L"))


def decode_image(source, name: str, max_pixels: int = MAX_PIXELS, also: str = "") -> np.ndarray:
    """The grey levels of an image file (a path or a binary file object); its size is checked before decoding.
    `also` names what else the caller would have taken, for the message about a file that is no image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it in one line
            image = Image.open(source)
        with image:
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {image.width}x{image.height} pixels is more than the {max_pixels:,} "
                    f"this command decodes (it would take too much memory)"
                )
            image.load()
            return grey_levels(image)
    except UnidentifiedImageError:
        raise NotAnImage(f"{name}: not an image ({IMAGE_FORMATS}){also}") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{name}: more than {max_pixels:,} pixels, which this command does not decode "
            f"(it would take too much memory)"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for damaged or truncated files
        raise NotAnImage(f"{name}: damaged or truncated image ({gist(error)})") from None


class NotAnImage(PipelineError):
    """Bytes Pillow cannot decode as an image."""


class ImageTooLarge(PipelineError):
    """An image with more pixels than the limit, refused before it is decoded."""


def read_image_file(path: Path) -> np.ndarray:
    return decode_image(path, str(path), also=", .npy array or IDX file")


def read_array_file(path: Path, data: bytes) -> np.ndarray:
    """A .npy array or an (optionally gzipped) IDX file of images: (H, W) or (N, H, W) or (N, 1, H, W)."""
    if data[:6] == b"\x93NUMPY":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise PipelineError(f"{path}: damaged .npy file ({gist(error)})") from None
    else:
        array = parse_idx(gunzip(data, str(path)) if data[:2] == b"\x1f\x8b" else data, str(path))
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (2, 3) or array.size == 0 or array.dtype.kind not in "uif" or array.dtype.itemsize > 8:
        raise PipelineError(
            f"{path} holds an array of shape {array.shape} and type {array.dtype}; "
            f"expected images: (H, W), (N, H, W) or (N, 1, H, W) numbers"
        )
    if array.dtype.kind == "f" and array.max(initial=0) <= 1:  # floats in 0-1, as ToTensor makes them
        array = array * 255
    return np.clip(np.round(array), 0, 255).astype(np.uint8) if array.dtype != np.uint8 else array


def is_array_file(data: bytes) -> bool:
    return data[:6] == b"\x93NUMPY" or data[:2] == b"\x1f\x8b" or data[:3] == b"\x00\x00\x08"


def model_inputs(path: Path, size: tuple[int, int]) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """(name, index within an array file or None, model input (H, W) uint8) for each image in one file.

    Images in array and IDX files that already have the model's size are taken as they are: such files hold a
    dataset's own images, prepared for it. Everything else is prepared the MNIST way (mnist_style).
    """

    def prepared(name: str, image: np.ndarray) -> np.ndarray:
        if image.shape == size and from_array:
            return image
        try:
            return mnist_style(image, size)
        except NoDigit as error:
            raise NoDigit(f"{name}: {error}") from None

    try:
        with path.open("rb") as file:
            head = file.read(8)
    except OSError as error:
        raise PipelineError(f"{path} cannot be read ({error.strerror or error})") from None
    from_array = is_array_file(head)
    if not from_array:
        yield str(path), None, prepared(str(path), read_image_file(path))
        return
    array = read_array_file(path, path.read_bytes())
    if array.ndim == 2:
        yield str(path), None, prepared(str(path), array)
        return
    for index, image in enumerate(array):
        yield f"{path}[{index}]", index, prepared(f"{path}[{index}]", image)


def expand(paths: list[str]) -> list[Path]:
    """The files named, and every file under the directories named (recursively, sorted, hidden ones skipped)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files


def top_classes(probabilities: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


def answer(ranked: list[tuple[str, float]]) -> dict:
    """The JSON answer for one image, as --json prints it and mnist-serve's /predict returns it."""
    return {
        "class": ranked[0][0],
        "probability": round(ranked[0][1], 6),
        "top": [{"class": c, "probability": round(p, 6)} for c, p in ranked],
    }


def format_row(name: str, index: int | None, ranked: list[tuple[str, float]], as_json: bool) -> str:
    if as_json:
        row = {"file": name if index is None else name.rsplit("[", 1)[0]}
        if index is not None:
            row["index"] = index
        return json.dumps({**row, **answer(ranked)})
    others = "  ".join(f"{c} {p:.3f}" for c, p in ranked[1:])
    return f"{name}\t{ranked[0][0]}\t{ranked[0][1]:.3f}" + (f"\t{others}" if others else "")


def predict(paths: list[str], model: Path | str | None, top: int, as_json: bool, threads: int = 0) -> int:
    """Print one row per image and one line per file that could not be read; returns how many files failed."""
    if threads < 0:
        raise PipelineError(f"--threads {threads} is not allowed; expected 0 (every core) or more")
    classifier = Classifier(default_model() if model is None else model, threads)
    if not 1 <= top <= len(classifier.class_names):
        raise PipelineError(
            f"--top {top} is not allowed; expected 1 to {len(classifier.class_names)} (the model's classes)"
        )
    files = expand(paths)
    failed = 0
    pending: list[tuple[str, int | None, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        pixels = np.stack([image for _, _, image in pending])[:, None]
        rows = [
            format_row(name, index, top_classes(p, classifier.class_names, top), as_json)
            for (name, index, _), p in zip(pending, classifier.probabilities(pixels), strict=True)
        ]
        tqdm.write("\n".join(rows), file=sys.stdout)
        pending.clear()

    with tqdm(files, unit="file", disable=None if len(files) >= PROGRESS_FROM else True, file=sys.stderr) as progress:
        for path in progress:
            try:
                if not path.exists():
                    raise PipelineError(f"{path} not found")
                for item in model_inputs(path, classifier.image_size):
                    pending.append(item)
                    if len(pending) == BATCH:
                        flush()
            except PipelineError as error:
                failed += 1
                flush()  # keep the rows in the order of the files
                tqdm.write(f"error: {error}", file=sys.stderr)
            except MemoryError:
                failed += 1
                flush()
                tqdm.write(f"error: {path}: too large to decode in the memory available", file=sys.stderr)
        flush()
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mnist-predict",
        description="Classify images with the exported ONNX model: one row per image (file, class, probability, "
        "the next classes). Reads PNG, JPEG, BMP, GIF and TIFF images, directories of them, .npy arrays and IDX files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, directories, .npy or IDX files")
    parser.add_argument(
        "--model",
        help=f"an exported ONNX model, fp32 or int8 (default: {DEFAULT_MODEL} here, "
        f"else in the checkout the command was installed from)",
    )
    parser.add_argument("--top", type=int, default=3, metavar="K", help="show the K most likely classes (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for onnxruntime (default 0: every core)")
    args = parser.parse_args(argv)
    # Exit status 1 when any file failed; a bad model or option is one line and status 1 too, as in every stage.
    run_stage(lambda: sys.exit(1 if predict(args.inputs, args.model, args.top, args.json, args.threads) else 0))


if __name__ == "__main__":
    main()
