"""Named recipes, each a set of params.yaml overrides: the one place that defines `default`, `fast` and `best`, for
`mnist-seeds`, the benchmark and the `dvc exp run -S` lines of docs/performance.md (a test checks those lines)."""

import json

# One epoch, tuned for time to 99.0% test accuracy with the default (classic) architecture, in params.yaml's fp32.
# The benchmark trains it in the fastest honest precision for the machine: bf16 autocast where the CPU computes bf16
# natively (AVX512-BF16 or AMX; weights and optimiser state stay fp32), fp32 elsewhere, where bf16 is emulated, slower.
FAST = {
    "model": {"cnn": {"dropout": 0.0}},
    "train": {
        "epochs": 1,
        "batch_size": 256,
        "lr": 0.01,
        "betas": [0.8, 0.95],
        "warmup_fraction": 0.25,
        "shift_pixels": 0,
    },
}
# A bigger model for the last fraction of a percent: three blocks of two convolutions with batch norm, a wider hidden
# layer, rotations and zooms on top of the shifts, and validation and the kept model on a moving average of the
# weights. In fp32, so it trains the same way on every CPU; 20 epochs take about 590 s on 2 cores (docs/performance.md).
BEST = {
    "model": {"cnn": {"conv_channels": [16, 32, 64], "convs_per_block": 2, "batch_norm": True, "fc_units": 256}},
    "train": {"epochs": 20, "rotate_degrees": 10, "zoom_percent": 10, "ema_decay": 0.999},
}
PRESETS = {"default": {}, "fast": FAST, "best": BEST}


def flattened(preset: dict, prefix: str = "") -> dict:
    """{"section.key": value} of a preset; a model group ({"model": {"cnn": {...}}}) opens into "model.cnn.key"."""
    flat = {}
    for key, value in preset.items():
        if isinstance(value, dict) and (not prefix or prefix == "model."):
            flat.update(flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_options(preset: dict) -> list[str]:
    """The preset as `dvc exp run -S` values, `section.key=value`, each value in YAML's flow style (JSON is YAML),
    as docs/performance.md writes them: `model.cnn.conv_channels=[16,32,64]`, `model.cnn.batch_norm=true`."""
    return [f"{name}={json.dumps(value, separators=(',', ':'))}" for name, value in flattened(preset).items()]
