"""Where a model computes: the device a setting picks, and a model's logits in batches on its own device."""

import torch
from torch import nn

from mnist_pipeline.errors import PipelineError


def pick_device(setting: str, key: str) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key} = 'cuda' but PyTorch sees no CUDA device; use 'auto' or 'cpu'")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


@torch.no_grad()
def predict_logits(model: nn.Module, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for uint8 pixels (N, 1, H, W) in batches, on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    batches = [model(pixels[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(batches)
