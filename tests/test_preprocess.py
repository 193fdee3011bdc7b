"""The preprocess stage: a seeded, disjoint validation split; statistics from the training split only."""

import json

import numpy as np
import pytest

from conftest import TINY_PARAMS, update_params, write_synthetic_mnist
from stages import preprocess
from stages.errors import PipelineError
from stages.idx import write_idx
from stages.params import MNIST_FILES
from stages.prepared import load_split


def test_split_is_deterministic_disjoint_and_seed_dependent():
    train, val = preprocess.split_indices(1000, 100, 0, seed=7)
    again_train, again_val = preprocess.split_indices(1000, 100, 0, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    _, other_val = preprocess.split_indices(1000, 100, 0, seed=8)
    assert set(other_val) != set(val)


def test_train_limit_subsamples_only_the_training_part():
    train, val = preprocess.split_indices(1000, 100, 250, seed=7)
    full_train, full_val = preprocess.split_indices(1000, 100, 0, seed=7)
    assert len(train) == 250 and set(train) <= set(full_train)
    np.testing.assert_array_equal(val, full_val)


@pytest.mark.parametrize("val_size, limit, message", [(1000, 0, "val_size = 1000 must be smaller"), (100, 901, "train_limit = 901 exceeds the 900")])
def test_impossible_split_sizes_are_clear_errors(val_size, limit, message):
    with pytest.raises(PipelineError, match=message):
        preprocess.split_indices(1000, val_size, limit, seed=0)


def test_stage_writes_splits_and_metadata(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=300, test=100)
    preprocess.main()
    meta = json.loads((workdir / "data/prepared/meta.json").read_text())
    train_images, train_labels = load_split("train")
    val_images, _ = load_split("val")
    test_images, _ = load_split("test")
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (28, 28) and train_labels.dtype == np.uint8
    assert meta["counts"] == {"train": len(train_images), "val": len(val_images), "test": len(test_images)}
    assert meta["image_size"] == [28, 28] and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["mean"] == pytest.approx(train_images.mean() / 255, abs=1e-6)
    assert meta["std"] == pytest.approx((train_images / 255).std(), abs=1e-6)


def test_mismatched_image_and_label_counts_are_a_clear_error(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw")
    write_idx(np.zeros(7, dtype=np.uint8), workdir / "data/raw" / MNIST_FILES[1])
    with pytest.raises(PipelineError, match="has 300 images but train-labels-idx1-ubyte.gz has 7 labels"):
        preprocess.main()
    assert not (workdir / "data/prepared/meta.json").exists()
