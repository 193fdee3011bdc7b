"""Training-time augmentation of uint8 batches: random shifts, rotations, zooms and elastic bends, from a generator."""

import math

import torch
import torch.nn.functional as F

from mnist_pipeline.params import TrainParams


def augments(params: TrainParams) -> bool:
    """Whether training changes the images it is fed (then no two epochs see the same inputs)."""
    return bool(params.shift_pixels or params.rotate_degrees or params.zoom_percent or params.elastic_pixels)


def augment(pixels: torch.Tensor, params: TrainParams, generator: torch.Generator) -> torch.Tensor:
    """The batch as train.rotate_degrees, train.zoom_percent and train.elastic_pixels change it, in one resampling,
    then as train.shift_pixels moves it."""
    if params.rotate_degrees or params.zoom_percent or params.elastic_pixels:
        pixels = random_warp(
            pixels,
            params.rotate_degrees,
            params.zoom_percent / 100,
            generator,
            elastic_pixels=params.elastic_pixels,
            elastic_sigma=params.elastic_sigma,
        )
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


def random_warp(
    pixels: torch.Tensor,
    max_degrees: float,
    max_zoom: float,
    generator: torch.Generator,
    *,
    elastic_pixels: float = 0.0,
    elastic_sigma: float = 4.0,
) -> torch.Tensor:
    """Rotate each image about its centre by a random angle in ±max_degrees, zoom it by a random factor in
    1 ± max_zoom and, with elastic_pixels, bend it by its own smooth random displacement field
    (elastic_displacements), all in one bilinear resampling, so that the strokes blur once; returns float pixels on
    the same 0-255 scale, black where the border shows.
    """
    n, _, height, width = pixels.shape
    device = pixels.device
    angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(max_degrees)
    zooms = 1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_zoom
    cos, sin, zero = angles.cos() / zooms, angles.sin() / zooms, torch.zeros(n, device=device)
    # theta maps each output pixel to where it samples the input: a rotation scaled by 1/zoom.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    if elastic_pixels:
        displacements = elastic_displacements(n, height, width, elastic_pixels, elastic_sigma, generator, device)
        grid = grid + displacements * torch.tensor([2 / width, 2 / height], device=device)  # in the grid's units
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_displacements(
    n: int,
    height: int,
    width: int,
    rms_pixels: float,
    sigma: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Simard, Steinkraus and Platt's elastic distortion (2003), for n images at once: uniform noise in [-1, 1] for
    each pixel and axis, smoothed by a Gaussian of standard deviation `sigma` pixels, and scaled so that along each
    axis pixels move by rms_pixels on average (root mean square). Returns (n, height, width, 2) displacements in
    pixels, x then y, as grid_sample orders them.

    A small sigma makes the field jitter from pixel to pixel, a large one turns it into a slow bend of whole strokes.
    """
    radius = math.ceil(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # Uniform noise with a margin of `radius` all round, smoothed without padding, so that the border bends like the
    # middle; each axis's smoothing is a product with a banded matrix, far faster on a CPU than a convolution this
    # wide. The kernel sums to 1, so smoothing noise on [0, 1] and then mapping it to [-1, 1] is the same.
    noise = torch.rand((n, 2, height + 2 * radius, width + 2 * radius), generator=generator, device=device)
    smooth = band_matrix(kernel, height) @ noise @ band_matrix(kernel, width).T
    # Noise on [-1, 1] has variance 1/3; a normalised separable kernel k scales it by (Σ k²)², every pixel alike.
    scale = rms_pixels / (math.sqrt(1 / 3) * kernel.square().sum().item())
    return ((2 * scale) * smooth - scale).permute(0, 2, 3, 1)


def band_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """The (size, size + len(kernel) - 1) matrix whose product with a column slides the kernel along it: row i
    holds the kernel from column i on, zeros elsewhere."""
    offsets = (
        torch.arange(size + len(kernel) - 1, device=kernel.device) - torch.arange(size, device=kernel.device)[:, None]
    )
    inside = (offsets >= 0) & (offsets < len(kernel))
    return torch.where(inside, kernel[offsets.clamp(0, len(kernel) - 1)], 0.0)
