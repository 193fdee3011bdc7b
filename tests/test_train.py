"""The training stage: shift augmentation, and reproducible training from params on a small synthetic set."""

import json

import pytest
import torch

from conftest import TINY_PARAMS, update_params, write_synthetic_mnist
from stages import preprocess, train
from stages.errors import PipelineError


def test_random_shift_moves_each_image_by_at_most_the_limit():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 14, 14] = 255
    shifted = train.random_shift(pixels, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == pixels.shape and shifted.dtype == torch.uint8
    rows, cols = (shifted[:, 0] == 255).nonzero()[:, 1], (shifted[:, 0] == 255).nonzero()[:, 2]
    assert len(rows) == 64, "each image keeps its one bright pixel"
    assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10, "offsets differ between images"


def test_random_shift_fills_with_black_and_never_flips():
    pixels = torch.arange(28 * 28, dtype=torch.int64).reshape(1, 1, 28, 28).remainder(250).add(1).to(torch.uint8)
    for seed in range(20):
        shifted = train.random_shift(pixels, 3, torch.Generator().manual_seed(seed))[0, 0]
        inside = shifted[3:-3, 3:-3]  # always inside the source image, whatever the offset
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(inside, pixels[0, 0, 3 + dy : 25 + dy, 3 + dx : 25 + dx])]
        assert len(found) == 1, "the result is the source translated, not mirrored or rotated"
        assert (shifted == 0).any() or found == [(0, 0)]


def test_training_is_reproducible_and_keeps_the_best_epoch(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main()
    train.main()
    first_bytes = (workdir / "models/model.pt").read_bytes()
    first = torch.load(workdir / "models/model.pt", weights_only=True)
    summary = json.loads((workdir / "metrics/train/metrics.json").read_text())
    train.main()
    assert (workdir / "models/model.pt").read_bytes() == first_bytes, "same params, same bytes: DVC sees no change"
    assert summary["best"]["epoch"] == first["epoch"] and summary["best"]["val_accuracy"] == pytest.approx(first["val_accuracy"], abs=1e-6)
    curve = (workdir / "metrics/train/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    assert len(curve) == 1 + TINY_PARAMS["train"]["epochs"]
    best_from_curve = max(float(line.split("\t")[1]) for line in curve[1:])
    assert first["val_accuracy"] == pytest.approx(best_from_curve, abs=1e-6)


def test_asking_for_cuda_without_one_is_a_clear_error(workdir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    update_params(workdir / "params.yaml", {**TINY_PARAMS, "train": {"device": "cuda"}})
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main()
    with pytest.raises(PipelineError, match="train.device = 'cuda' but PyTorch sees no CUDA device"):
        train.main()


def test_zero_rotation_and_zoom_is_the_identity():
    pixels = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    rotated = train.random_affine(pixels, 0, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotated, pixels.float(), atol=1e-3, rtol=0)


def test_rotation_stays_within_the_limit_and_varies_between_images():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 14, 4:24] = 255  # a horizontal bar through the centre, 20 pixels long
    rotated = train.random_affine(pixels, 10, 0, torch.Generator().manual_seed(0))
    assert rotated.dtype == torch.float32 and rotated.min() >= 0 and rotated.max() <= 255
    rows = [(image[0] > 100).nonzero()[:, 0] for image in rotated]
    # 10 pixels from the centre, a 10° turn moves the bar's end by 10·sin(10°) ≈ 1.7 rows
    assert all(r.min() >= 14 - 3 and r.max() <= 14 + 3 for r in rows)
    spreads = {int(r.max() - r.min()) for r in rows}
    assert len(spreads) > 1, "angles differ between images"


def test_zoom_scales_about_the_centre_within_the_limit():
    pixels = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    pixels[:, 0, 4:24, 4:24] = 255  # a 20-pixel square
    zoomed = train.random_affine(pixels, 0, 0.2, torch.Generator().manual_seed(0))
    sides = [(image[0, 14] > 127).sum().item() for image in zoomed]
    assert min(sides) >= 20 * 0.8 - 1 and max(sides) <= 20 * 1.2 + 1
    assert min(sides) < 19 and max(sides) > 21, "both zooming in and zooming out happen"
