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
# A bigger model for the last fraction of a percent: three blocks of two convolutions with batch norm (16, 48 and 96
# channels), a wider hidden layer, rotations (±15°) and zooms (±15%) on top of ±3-pixel shifts, a gentler peak learning
# rate than the default's (0.003, not 0.004), and a moving average of the weights over about the last 2,000 steps, kept
# at the last of a fixed 18 epochs. In bf16 where the CPU computes it natively (AVX512-BF16, AMX), fp32 elsewhere,
# where it is over the 600 s goal on 2 cores (1,046 to 1,123 s a run, 99.68% over 5 seeds, on an AVX2-only AMD EPYC
# Milan). Each run's time and the accuracy over seeds, with what each change bought, are in docs/performance.md.
BEST = {
    "model": {"cnn": {"conv_channels": [16, 48, 96], "convs_per_block": 2, "batch_norm": True, "fc_units": 256}},
    "train": {
        "epochs": 18,
        "lr": 0.003,
        "rotate_degrees": 15,
        "zoom_percent": 15,
        "shift_pixels": 3,
        "ema_decay": 0.9995,
        "keep": "last",
        "mixed_precision": "native",
    },
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
    as docs/performance.md writes them: `model.cnn.conv_channels=[16,48,96]`, `model.cnn.batch_norm=true`, and a
    word as itself, `train.keep=last`, as YAML reads a plain word (the presets use no word YAML reads otherwise)."""
    return [
        f"{name}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
        for name, value in flattened(preset).items()
    ]
