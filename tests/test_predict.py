"""mnist-predict on real image files written with Pillow: every format and polarity becomes the same MNIST-style
input, bad files are one line each while the others are still predicted, and PyTorch is never imported."""

import json
import os
import re
import struct
import subprocess
import sys
import tomllib
import zlib

import numpy as np
import onnxruntime
import pytest
from conftest import REPO_ROOT, STAGE_ENV, TINY_PARAMS, update_params, write_synthetic_mnist
from PIL import Image, ImageDraw

from mnist_pipeline import predict
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.idx import write_idx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model trained on synthetic digits and exported, fp32 and int8, by the real stages."""
    from stages import export, preprocess, train

    folder = tmp_path_factory.mktemp("exported")
    (folder / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    update_params(folder / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(folder / "data/raw", train=400, test=100)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        preprocess.main([])
        train.main([])
        export.main([])
    finally:
        os.chdir(cwd)
    return folder / "models"


def glyph(size: int = 140) -> np.ndarray:
    """A hand-drawn-looking 7 with a bar, white on black: thick strokes, not centred, taller than wide."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    s = size / 140
    draw.line([(30 * s, 20 * s), (95 * s, 20 * s), (55 * s, 125 * s)], fill=255, width=round(12 * s), joint="curve")
    draw.line([(50 * s, 70 * s), (85 * s, 70 * s)], fill=255, width=round(10 * s))
    return np.asarray(image)


def write_variants(folder):
    """The same digit as a user might have it: each polarity, place, size, colour model and file format."""
    folder.mkdir(parents=True, exist_ok=True)
    ink = glyph()
    light_on_dark = Image.fromarray(ink)
    dark_on_light = Image.fromarray(255 - ink)
    page = Image.new("L", (420, 300), 235)  # an off-white page, the digit near its corner
    page.paste(dark_on_light.point(lambda v: min(v, 235)), (260, 150))
    light_on_dark.resize((28, 28), Image.Resampling.LANCZOS).save(folder / "small_light_on_dark.png")
    dark_on_light.save(folder / "dark_on_light.png")
    page.save(folder / "off_centre_large.jpg", quality=90)
    blue = np.stack([255 - ink // 2, 255 - ink // 2, np.full_like(ink, 255)], axis=-1)  # blue ink on white
    Image.fromarray(blue, "RGB").save(folder / "rgb.bmp")
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)  # black ink whose background is transparent black
    rgba[..., 3] = ink
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(blue, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.gif")
    light_on_dark.save(folder / "light_on_dark.tiff")
    return sorted(folder.iterdir())


def test_every_variant_becomes_the_same_mnist_style_input(tmp_path):
    files = write_variants(tmp_path / "images")
    reference = predict.mnist_style(glyph(), (28, 28))
    rows, cols = np.nonzero(reference)
    assert reference.dtype == np.uint8 and reference.max() == 255
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (20, 21), "the ink fits 20x20, as in MNIST"
    ys, xs = np.indices(reference.shape)
    centre = [(ys * reference).sum() / reference.sum(), (xs * reference).sum() / reference.sum()]
    assert np.allclose(centre, 13.5, atol=1.0), f"centred by its centre of mass, at {centre}"
    for path in files:
        ((name, index, image),) = predict.model_inputs(path, (28, 28))
        assert name == str(path) and index is None and image.shape == (28, 28) and image.dtype == np.uint8
        difference = np.abs(image.astype(int) - reference).mean()
        assert difference < 12, f"{path.name} differs from the reference by {difference:.1f} grey levels on average"


def test_images_of_another_size_and_arrays_are_read(tmp_path):
    assert predict.mnist_style(glyph(), (32, 32)).shape == (32, 32)
    with pytest.raises(predict.NoDigit, match="no digit found"):
        predict.mnist_style(np.full((50, 40), 200, dtype=np.uint8), (28, 28))
    images = np.stack([predict.mnist_style(glyph(), (28, 28))] * 3)
    np.save(tmp_path / "batch.npy", images)
    np.save(tmp_path / "floats.npy", images[0] / 255.0)
    write_idx(images, tmp_path / "images-idx3-ubyte.gz")
    read = list(predict.model_inputs(tmp_path / "batch.npy", (28, 28)))
    assert [(name, index) for name, index, _ in read] == [(f"{tmp_path}/batch.npy[{i}]", i) for i in range(3)]
    assert all((image == images[0]).all() for _, _, image in read), "dataset-sized arrays are taken as they are"
    ((_, _, image),) = predict.model_inputs(tmp_path / "floats.npy", (28, 28))
    assert (image == images[0]).all(), "floats in 0-1 are scaled to 0-255"
    assert len(list(predict.model_inputs(tmp_path / "images-idx3-ubyte.gz", (28, 28)))) == 3


def run_predict(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.predict", *map(str, args)], capture_output=True, text=True, env=STAGE_ENV
    )


def test_cli_predicts_the_good_files_and_names_each_bad_one(models, tmp_path):
    files = write_variants(tmp_path / "images")
    (tmp_path / "images/notes.txt").write_text("not an image\n")
    png = (tmp_path / "images/dark_on_light.png").read_bytes()
    (tmp_path / "images/truncated.png").write_bytes(png[: len(png) // 2])
    result = run_predict(tmp_path / "images", "--model", models / "model.onnx", "--top", 3)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: {tmp_path}/images/notes.txt: not an image (PNG, JPEG, BMP, GIF or TIFF)")
    assert errors[1].startswith(f"error: {tmp_path}/images/truncated.png: damaged or truncated image (")
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == [str(path) for path in files], "every good file, in order"
    session = onnxruntime.InferenceSession(str(models / "model.onnx"))
    names = session.get_modelmeta().custom_metadata_map["class_names"].split(",")
    for row in rows:
        assert len(row) == 4 and row[1] in names and 0 <= float(row[2]) <= 1
        assert [pair.split(" ")[0] for pair in row[3].split("  ")] != [row[1]] and len(row[3].split("  ")) == 2
    assert len({row[1] for row in rows}) == 1, "the same digit in every form gets the same answer"


def test_cli_json_rows_and_the_int8_model(models, tmp_path):
    files = write_variants(tmp_path / "images")
    outputs = {}
    for model in ["model.onnx", "model.int8.onnx"]:
        result = run_predict(*files[:3], "--model", models / model, "--top", 10, "--json")
        assert result.returncode == 0 and result.stderr == "", result.stderr
        outputs[model] = [json.loads(line) for line in result.stdout.splitlines()]
    for row, path in zip(outputs["model.onnx"], files[:3], strict=False):
        assert row["file"] == str(path) and row["class"] == row["top"][0]["class"]
        assert len(row["top"]) == 10 and sum(c["probability"] for c in row["top"]) == pytest.approx(1, abs=1e-4)
        assert [c["probability"] for c in row["top"]] == sorted((c["probability"] for c in row["top"]), reverse=True)
    assert len(outputs["model.int8.onnx"]) == 3


def test_cli_rejects_a_missing_model_and_a_bad_top_in_one_line(models, tmp_path):
    image = write_variants(tmp_path / "images")[0]
    result = run_predict(image, "--model", tmp_path / "nothing.onnx")
    assert result.returncode == 1 and result.stderr.startswith(f"error: {tmp_path}/nothing.onnx not found")
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    result = run_predict(image, "--model", tmp_path / "fake.onnx")
    assert result.returncode == 1 and result.stderr.startswith(f"error: {tmp_path}/fake.onnx is not an ONNX model")
    result = run_predict(image, "--model", models / "model.onnx", "--top", 11)
    assert (
        result.returncode == 1
        and result.stderr == "error: --top 11 is not allowed; expected 1 to 10 (the model's classes)\n"
    )
    with pytest.raises(PipelineError, match=r"^--threads -1 is not allowed; expected 0 \(every core\) or more$"):
        predict.predict([str(image)], models / "model.onnx", 3, as_json=False, threads=-1)
    result = run_predict(tmp_path / "missing.png", image, "--model", models / "model.onnx")
    assert result.returncode == 1 and result.stderr == f"error: {tmp_path}/missing.png not found\n"
    assert result.stdout.startswith(str(image))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and ends: enough for Pillow to open, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [9000, 100_000])  # above the limit; and twice above it, where Pillow itself refuses
def test_an_image_too_large_for_memory_is_one_line(models, tmp_path, side, capsys):
    (tmp_path / "huge.png").write_bytes(png_header(side, side))
    Image.fromarray(glyph()).save(tmp_path / "good.png")
    failed = predict.predict([str(tmp_path)], models / "model.onnx", 1, as_json=False)
    output = capsys.readouterr()
    assert failed == 1 and output.err.count("\n") == 1
    assert (
        output.err.startswith(f"error: {tmp_path}/huge.png: ") and "64,000,000" in output.err and "memory" in output.err
    )
    assert output.out.startswith(f"{tmp_path}/good.png\t")


def test_prediction_never_imports_torch(models, tmp_path):
    Image.fromarray(glyph()).save(tmp_path / "digit.png")
    code = (
        "import sys\nfrom mnist_pipeline.predict import main\n"
        f"try:\n    main([{str(tmp_path / 'digit.png')!r}, '--model', {str(models / 'model.onnx')!r}])\n"
        "except SystemExit as done:\n    assert done.code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=STAGE_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_mnist_predict_is_an_installed_command():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mnist-predict"] == "mnist_pipeline.predict:main"
    assert (
        "pillow"
        in " ".join(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).lower()
    )


def on_a_page(ink: np.ndarray, lighting: str) -> np.ndarray:
    """A white-on-black glyph as dark ink on a 300x300 page, off-centre, under `lighting`: even, a gradient
    from left to right, or a shadow over a corner that reaches under the digit."""
    page = np.full((300, 300), 235.0)
    page[120:260, 40:180] -= ink.astype(float) * (235 - 25) / 255
    ys, xs = np.indices(page.shape)
    if lighting == "gradient":
        page *= 0.35 + 0.65 * xs / 299
    elif lighting == "shadow":
        page *= np.where(np.hypot(xs, ys) < 230, 0.45, 1.0)
    return np.round(page).astype(np.uint8)


@pytest.mark.parametrize("lighting", ["even", "gradient", "shadow"])
def test_gradients_and_shadows_are_not_ink(lighting):
    reference = predict.mnist_style(glyph(), (28, 28)).astype(int)
    prepared = predict.mnist_style(on_a_page(glyph(), lighting), (28, 28)).astype(int)
    difference = np.abs(prepared - reference).mean()
    assert difference < 12, (
        f"under {lighting} light the prepared digit differs by {difference:.1f} grey levels on average"
    )


@pytest.mark.parametrize("lighting", ["even", "gradient", "shadow", "noise", "speck"])
def test_a_blank_page_is_no_digit(lighting):
    page = on_a_page(np.zeros((140, 140)), "even" if lighting in ("noise", "speck") else lighting)
    if lighting == "noise":
        page = np.clip(page + np.random.default_rng(0).normal(0, 10, page.shape), 0, 255).astype(np.uint8)
    if lighting == "speck":
        page[150:154, 150:154] = 20  # a fly-speck is no digit either
    with pytest.raises(predict.NoDigit, match="no digit found"):
        predict.mnist_style(page, (28, 28))


def test_cli_says_no_digit_found_in_one_line(models, tmp_path):
    Image.fromarray(np.full((100, 80), 250, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(255 - glyph()).save(tmp_path / "seven.png")
    result = run_predict(tmp_path / "blank.png", tmp_path / "seven.png", "--model", models / "model.onnx")
    assert result.returncode == 1 and result.stdout.startswith(f"{tmp_path}/seven.png\t")
    assert result.stderr == f"error: {tmp_path}/blank.png: no digit found (a blank or nearly blank image)\n"


def test_the_default_model_is_found_from_any_directory(models, tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "checkout"
    (checkout / "models").mkdir(parents=True)
    (checkout / "models/model.onnx").write_bytes((models / "model.onnx").read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(predict, "CHECKOUT", checkout)
    Image.fromarray(255 - glyph()).save("seven.png")
    with pytest.raises(SystemExit) as exit:
        predict.main(["seven.png"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("seven.png\t")
    monkeypatch.setattr(predict, "CHECKOUT", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit:
        predict.main(["seven.png"])
    error = capsys.readouterr().err
    assert exit.value.code == 1 and error.count("\n") == 1
    assert f"no model at {elsewhere}/models/model.onnx nor at {tmp_path}/nowhere/models/model.onnx" in error


def test_the_readmes_examples_exist():
    readme = (REPO_ROOT / "README.md").read_text() + (REPO_ROOT / "docs/using-the-model.md").read_text()
    named = set(re.findall(r"mnist-predict ((?:examples/\S+ ?)+)", readme))
    files = {name for line in named for name in line.split() if "*" not in name}
    assert files and all((REPO_ROOT / name).is_file() for name in files), files
    for path in (REPO_ROOT / "examples").iterdir():
        predict.read_image_file(path)  # each is an image mnist-predict reads
