"""The benchmark's measuring code, run on tiny synthetic data so that `make bench` cannot rot unnoticed."""

import benchmark
import pytest

from conftest import TINY_PARAMS, update_params, write_synthetic_mnist
from stages import export, preprocess, train
from stages.model import CNN
from stages.params import MODEL_KEYS_BY_ARCH, load_params


@pytest.fixture
def trained_workdir(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main()
    train.main()
    export.main()
    return workdir


def test_training_runs_are_measured_with_time_to_99_and_flops(trained_workdir):
    params = load_params()
    run = benchmark.timed_training("tiny", params.model, params.train)
    assert run.images == 340 * params.train.epochs and 0 < run.step_seconds <= run.seconds
    assert run.time_to_99 is None or run.time_to_99 <= run.seconds
    network = CNN(**{"image_size": 28, "num_classes": 10, **{key: getattr(params.model, key) for key in MODEL_KEYS_BY_ARCH["cnn"]}})
    assert run.flops_per_image == benchmark.flops_per_training_image(network)
    reference = benchmark.reference_loop(epochs=1)
    assert reference.images == 400 and 0 <= reference.accuracy <= 1


def test_the_classic_cnn_costs_7_08_mflop_per_training_image():
    flops = benchmark.flops_per_training_image(benchmark.TutorialCNN())
    assert flops == pytest.approx(7.08e6, rel=1e-3)  # the figure the README quotes


def test_inference_compares_onnxruntime_with_eager(trained_workdir, capsys):
    speedup = benchmark.inference()
    output = capsys.readouterr().out
    assert speedup > 0 and "onnxruntime" in output and "median latency" in output
