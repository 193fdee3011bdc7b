"""The benchmark's measuring code, run on tiny synthetic data so that `make bench` cannot rot unnoticed."""

import time

import benchmark
import pytest
import torch
import torch.distributed as dist
from conftest import TINY_PARAMS, update_params, write_synthetic_mnist

from mnist_pipeline.cpu import Cpu
from mnist_pipeline.model import CNN
from mnist_pipeline.params import load_params
from stages import export, preprocess, train


@pytest.fixture
def trained_workdir(workdir):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw", train=400, test=100)
    preprocess.main([])
    train.main([])
    export.main([])
    return workdir


def test_training_runs_are_measured_with_time_to_99_and_flops(trained_workdir):
    params = load_params()
    run = benchmark.timed_training("tiny", params)
    assert run.images == 340 * params.train.epochs and 0 < run.step_seconds <= run.seconds
    assert run.time_to_99 is None or run.time_to_99 <= run.seconds
    network = CNN(**{"image_size": 28, "num_classes": 10, **params.model.cnn.model_dump()})
    assert run.flops_per_image == benchmark.flops_per_training_image(network)
    reference = benchmark.reference_loop(epochs=1)
    assert reference.images == 400 and 0 <= reference.accuracy <= 1


def test_the_classic_cnn_costs_7_08_mflop_per_training_image():
    flops = benchmark.flops_per_training_image(benchmark.TutorialCNN())
    assert flops == pytest.approx(7.08e6, rel=1e-3)  # the figure docs/performance.md quotes


def test_inference_compares_eager_onnxruntime_fp32_and_int8_at_batch_1000_and_1(trained_workdir, capsys):
    summary = benchmark.inference(rounds=1)
    output = capsys.readouterr().out
    assert float(summary["ort_speedup"]) > 0 and float(summary["int8_speedup"]) > 0
    for batch in [1000, 1]:
        for name in [
            "PyTorch eager, as loaded",
            "PyTorch eager, channels-last",
            "onnxruntime fp32",
            "onnxruntime int8",
        ]:
            assert f"batch {batch}: {name}" in output
    assert "x channels-last eager" in output and "x fp32" in output and "ms per image" in output


def test_inference_steps_print_fp32_against_int8_and_what_each_step_bought(trained_workdir, capsys):
    summary = benchmark.int8_steps(rounds=1)
    output = capsys.readouterr().out
    assert set(summary) == {"int8_speedup_1000", "int8_speedup_1", "int8_accuracy_drop_points"}
    for batch in [1000, 1]:
        assert f"batch {batch}: + raw uint8 pixels into the first conv" in output
        assert f"batch {batch}: + first conv depthwise on 16 copies" in output
    assert output.count("the step before") == 6 and output.count("test accuracy: ") == 5


@pytest.mark.parametrize(
    "machine, precision",
    [
        (Cpu("AVX2", frozenset({"avx2"})), "fp32"),
        (Cpu("AVX-512", frozenset({"avx2", "avx512f", "avx512_bf16"})), "bf16"),
    ],
)
def test_the_fast_recipe_trains_in_bf16_only_where_the_cpu_has_it(monkeypatch, machine, precision):
    monkeypatch.setattr(benchmark, "this_cpu", lambda: machine)
    assert benchmark.fastest_precision(torch.device("cpu"))[0] == precision


class RecordingClock(benchmark.WallClock):
    """Host seconds, noting for each mark whether the all-reduce it may end has finished."""

    def __init__(self):
        self.marks = []

    def mark(self) -> float:
        self.marks.append(time.perf_counter())
        return self.marks[-1]


def test_the_all_reduce_timer_marks_each_bucket_from_its_start_to_the_end_of_its_reduction():
    """CUDA events replace the host clock on a GPU (tests/gpu_check.sh runs that); here, with gloo, the hook's
    bookkeeping: a start mark per bucket, an end mark taken in the reduction's callback, summed by the clock."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        clock = RecordingClock()
        timer = benchmark.AllReduceTimer(clock)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
        )
        model.register_comm_hook(None, timer.hook)
        model(torch.randn(8, 64)).sum().backward()
        totals = timer.take()
    finally:
        dist.destroy_process_group()
    assert totals["calls"] >= 1 and len(clock.marks) == 2 * totals["calls"]
    assert totals["bytes"] == 4 * (64 * 64 + 64 + 64 * 2 + 2)
    assert (
        0
        < totals["seconds"]
        == pytest.approx(sum(end - start for start, end in zip(clock.marks[::2], clock.marks[1::2], strict=True)))
    )
    assert timer.take() == {"seconds": 0, "calls": 0, "bytes": 0}
