"""The preprocess stage: a seeded, disjoint validation split; statistics from the training split only."""

import gzip
import json
import struct

import numpy as np
import pytest
from conftest import (
    MNIST_FILES,
    TINY_PARAMS,
    assert_one_line_error,
    run_stage_cli,
    update_params,
    write_synthetic_mnist,
)

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.idx import write_idx
from mnist_pipeline.prepared import load_split, split_indices
from stages import preprocess


def test_split_is_deterministic_disjoint_and_seed_dependent():
    train, val = split_indices(1000, 100, 0, seed=7)
    again_train, again_val = split_indices(1000, 100, 0, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    _, other_val = split_indices(1000, 100, 0, seed=8)
    assert set(other_val) != set(val)


def test_train_limit_subsamples_only_the_training_part():
    train, val = split_indices(1000, 100, 250, seed=7)
    full_train, full_val = split_indices(1000, 100, 0, seed=7)
    assert len(train) == 250 and set(train) <= set(full_train)
    np.testing.assert_array_equal(val, full_val)


@pytest.mark.parametrize(
    "val_size, limit, message",
    [
        (1000, 0, "val_size = 1000 is too large for the 1000 training images; expected at most 999"),
        (100, 901, "train_limit = 901 exceeds the 900"),
    ],
)
def test_impossible_split_sizes_are_clear_errors(val_size, limit, message):
    with pytest.raises(PipelineError, match=message):
        split_indices(1000, val_size, limit, seed=0)


def test_stage_writes_splits_and_metadata(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=300, test=100)
    preprocess.main([])
    meta = json.loads((workdir / "data/prepared/meta.json").read_text())
    train_images, train_labels = load_split("train")
    val_images, _ = load_split("val")
    test_images, _ = load_split("test")
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (28, 28) and train_labels.dtype == np.uint8
    assert meta["counts"] == {"train": len(train_images), "val": len(val_images), "test": len(test_images)}
    assert meta["image_size"] == [28, 28] and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["mean"] == pytest.approx(train_images.mean() / 255, abs=1e-6)
    assert meta["std"] == pytest.approx((train_images / 255).std(), abs=1e-6)


TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = (f"data/raw/{name}" for name in MNIST_FILES)
IDX_HEADER_3D = bytes([0, 0, 8, 3]) + struct.pack(">3I", 300, 28, 28)


@pytest.mark.parametrize(
    "path, content, message",
    [
        (
            TRAIN_IMAGES,
            gzip.compress(b"\x08\x03\x00\x00" + bytes(100)),
            f"{TRAIN_IMAGES} is not an IDX file: bad magic number 08030000",
        ),
        (
            TRAIN_IMAGES,
            np.zeros((300, 784)),
            f"{TRAIN_IMAGES} holds an array of shape (300, 784); expected (count, height, width)",
        ),
        (TRAIN_LABELS, np.zeros((300, 1)), f"{TRAIN_LABELS} holds an array of shape (300, 1); expected (count,)"),
        (
            TRAIN_IMAGES,
            gzip.compress(IDX_HEADER_3D + bytes(1000)),
            f"{TRAIN_IMAGES} is truncated: shape (300, 28, 28) needs 235200 bytes",
        ),
        (TRAIN_IMAGES, b"\x1f\x8b\x08\x00 cut short", f"{TRAIN_IMAGES} is corrupt: not a complete gzip file"),
        (TRAIN_LABELS, np.zeros(7), f"data/raw/{MNIST_FILES[0]} has 300 images but {TRAIN_LABELS} has 7 labels"),
        (TEST_LABELS, np.full(100, 10), f"{TEST_LABELS} has label 10; expected 0 to 9"),
        (
            TEST_IMAGES,
            np.zeros((100, 20, 20)),
            f"{TRAIN_IMAGES} holds 28x28 images but {TEST_IMAGES} holds 20x20; expected the same size",
        ),
        (TEST_LABELS, None, f"{TEST_LABELS} not found"),
    ],
    ids=[
        "wrong magic",
        "images 2-d",
        "labels 2-d",
        "too few bytes",
        "cut gzip",
        "count mismatch",
        "label 10",
        "sizes differ",
        "missing",
    ],
)
def test_bad_raw_file_is_a_clear_error_naming_it_and_nothing_is_written(workdir, path, content, message):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=300, test=100)
    if content is None:
        (workdir / path).unlink()
    elif isinstance(content, bytes):
        (workdir / path).write_bytes(content)
    else:
        write_idx(content, workdir / path)
    with pytest.raises(PipelineError) as raised:
        preprocess.main([])
    assert str(raised.value).startswith(message)
    assert not (workdir / "data/prepared").exists()


def test_val_size_larger_than_the_training_set_stops_before_writing(workdir):
    update_params(workdir / "params.yaml", {"preprocess": {"val_size": 300}})
    write_synthetic_mnist(workdir / "data/raw", train=300, test=100)
    with pytest.raises(
        PipelineError, match="preprocess.val_size = 300 is too large for the 300 training images; expected at most 299"
    ):
        preprocess.main([])
    assert not (workdir / "data/prepared").exists()


def test_stage_reports_a_bad_file_in_one_line_and_keeps_the_last_results(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=300, test=100)
    preprocess.main([])
    before = {path.name: path.read_bytes() for path in (workdir / "data/prepared").iterdir()}
    write_idx(np.full(100, 12), workdir / TEST_LABELS)
    result = run_stage_cli("preprocess")
    assert_one_line_error(result, f"{TEST_LABELS} has label 12; expected 0 to 9")
    assert "Traceback" not in result.stderr
    after = {path.name: path.read_bytes() for path in (workdir / "data/prepared").iterdir()}
    assert after == before, "a failed run changes none of the last good outputs, and leaves no temp file"
