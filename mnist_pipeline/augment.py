"""Training-time augmentation of uint8 pixel batches: random shifts, rotations and zooms from a given generator."""

import math

import torch
import torch.nn.functional as F

from mnist_pipeline.params import TrainParams


def augments(params: TrainParams) -> bool:
    """Whether training changes the images it is fed (then no two epochs see the same inputs)."""
    return bool(params.shift_pixels or params.rotate_degrees or params.zoom_percent)


def augment(pixels: torch.Tensor, params: TrainParams, generator: torch.Generator) -> torch.Tensor:
    """The batch as train.rotate_degrees, train.zoom_percent and train.shift_pixels change it, in that order."""
    if params.rotate_degrees or params.zoom_percent:
        pixels = random_affine(pixels, params.rotate_degrees, params.zoom_percent / 100, generator)
    if params.shift_pixels:
        pixels = random_shift(pixels, params.shift_pixels, generator)
    return pixels


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]² pixels, filling with black.

    Never a flip, and rotations stay small (train.rotate_degrees): either can turn a digit into another.
    The generator lives on the pixels' device, so on a GPU the augmentation never touches the host.
    """
    n, _, height, width = pixels.shape
    device = pixels.device
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator, device=device)
    rows = offsets[0] + torch.arange(height, device=device)  # (n, height)
    cols = offsets[1] + torch.arange(width, device=device)  # (n, width)
    padded = F.pad(pixels[:, 0], (max_shift,) * 4)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def random_affine(
    pixels: torch.Tensor, max_degrees: float, max_zoom: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate each image about its centre by a random angle in ±max_degrees and zoom it by a random factor
    in 1 ± max_zoom, bilinearly; returns float pixels on the same 0-255 scale, black where the border shows.
    """
    n, device = len(pixels), pixels.device
    angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(max_degrees)
    zooms = 1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_zoom
    cos, sin, zero = angles.cos() / zooms, angles.sin() / zooms, torch.zeros(n, device=device)
    # theta maps each output pixel to where it samples the input: a rotation scaled by 1/zoom.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
