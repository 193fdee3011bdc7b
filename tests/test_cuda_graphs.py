"""CUDA graphs of training steps: which steps qualify, and that capturing leaves no trace in the training state.
The capture itself needs a GPU: tests/gpu_check.sh trains with and without graphs there and compares."""

import pytest
import torch
from conftest import REPO_ROOT

from mnist_pipeline import training
from mnist_pipeline.cuda_graphs import TrainingState
from mnist_pipeline.distributed import Worker
from mnist_pipeline.params import load_params


def test_putting_the_state_back_undoes_the_warm_up_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    inputs = torch.randn(16, 4)

    def step():
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()

    step()  # a resumed run: the optimiser has state before the capture
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    moments = {key: value.clone() for key, value in optimizer.state[model[0].weight].items()}
    saved = TrainingState(model, optimizer)
    for _ in range(3):
        step()
    assert not torch.equal(model[0].weight, before["0.weight"])
    saved.restore()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert all(torch.equal(value, moments[key]) for key, value in optimizer.state[model[0].weight].items())


def test_a_fresh_optimisers_state_made_by_the_warm_ups_is_zeroed():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    saved = TrainingState(model, optimizer)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    saved.restore()
    assert all(not value.any() for value in optimizer.state[model.weight].values())


@pytest.fixture
def on_a_gpu(monkeypatch):
    """A CUDA worker, with a GPU that computes bf16 natively; nothing here touches the device."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return Worker(torch.device("cuda"))


def repo_params(cnn: dict | None = None, train: dict | None = None):
    params = load_params(REPO_ROOT / "params.yaml")
    model = params.model.model_copy(update={"cnn": params.model.cnn.model_copy(update=cnn or {})})
    return params.model_copy(update={"model": model, "train": params.train.model_copy(update=train or {})})


def test_the_fast_recipe_is_captured_and_random_draws_are_not(on_a_gpu):
    fast = {"cnn": {"dropout": 0.0}, "train": {"shift_pixels": 0}}
    assert training.graph_blocker(repo_params(**fast), on_a_gpu) == ""
    assert training.graph_blocker(repo_params(), on_a_gpu) == "the step draws random numbers: train's augmentation"
    assert "model.cnn.dropout" in training.graph_blocker(
        repo_params(cnn={"dropout": 0.3}, train={"shift_pixels": 0}), on_a_gpu
    )
    assert "sgd" in training.graph_blocker(repo_params(fast["cnn"], {**fast["train"], "optimizer": "sgd"}), on_a_gpu)
    assert training.graph_blocker(repo_params(**fast), Worker(torch.device("cpu"))) == "not on CUDA"
