"""Training steps captured once as CUDA graphs and replayed: on a GPU, a small model's step costs one launch instead
of about a hundred, and for MNIST it is the launches, not the arithmetic, that set the pace.

A step can be captured when it draws no random numbers, reads nothing back to the host, and updates its tensors
(weights, optimiser state, learning rate) in place; training.graph_blocker says which steps qualify.
"""

import time
from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # the rows of a batch in, the step's outputs out
WARM_UPS = 3  # eager runs before a capture: cuDNN picks its kernels and the optimiser makes its state on these


class CapturedSteps:
    """step(batch), as one CUDA graph per batch size (an epoch's last batch is often smaller), replayed.

    Capturing runs the step WARM_UPS times on real rows; those runs would train the model, so the weights, the
    batch-norm statistics and the optimiser state are put back as they were afterwards, and training goes on
    exactly as the eager steps would have it."""

    def __init__(self, step: Step, batch_sizes: set[int], model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        started = time.perf_counter()
        device = next(model.parameters()).device
        saved = TrainingState(model, optimizer)
        self.graphs = {size: capture(step, torch.arange(size, device=device)) for size in sorted(batch_sizes)}
        saved.restore()
        torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - started

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step's outputs for these rows: tensors that the next replay overwrites, so read them before it."""
        graph, rows, outputs = self.graphs[len(batch)]
        rows.copy_(batch)
        graph.replay()
        return outputs


def capture(step: Step, rows: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A graph of step(rows), after the warm-ups that torch's documentation asks for (on a side stream, so that
    their memory stays out of the graph's pool); rows is the tensor each replay reads its batch from."""
    side = torch.cuda.Stream(rows.device)
    side.wait_stream(torch.cuda.current_stream(rows.device))
    with torch.cuda.stream(side):
        for _ in range(WARM_UPS):
            step(rows)
    torch.cuda.current_stream(rows.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Detached, so that the outputs kept for the replays do not keep this step's autograd graph alive: the
        # next capture's warm-ups would meet its gradient accumulators, made on another stream (torch warns).
        outputs = tuple(output.detach() for output in step(rows))
    return graph, rows, outputs


class TrainingState:
    """A copy of what a training step changes, to put back in place: the graphs hold the tensors' addresses."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        self.moments = {
            parameter: {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
            for parameter, state in optimizer.state.items()
        }

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)  # copies into the existing tensors
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if parameter in self.moments:
                    value.copy_(self.moments[parameter][key])
                else:  # made by the warm-ups: a fresh optimiser's state is zeros (Adam's moments and step count)
                    value.zero_()
