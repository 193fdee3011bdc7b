"""The exported model's contract with its clients: input and output names, and the onnxruntime session that runs it."""

from pathlib import Path

import numpy as np
import onnxruntime

INPUT_NAME, LOGITS, PROBABILITIES = "pixels", "logits", "probabilities"
BATCH = 1000  # images per onnxruntime call when a whole split is run


def inference_session(
    path: Path | str | bytes, threads: int = 0, disabled_optimizers: tuple[str, ...] = ()
) -> onnxruntime.InferenceSession:
    """onnxruntime's fastest CPU set-up for these small models, measured by tests/benchmark.py: every graph
    optimisation (NCHWc convolutions, fused activations), one operator at a time, `threads` threads (0: every core).
    `path` may be the model's bytes instead; tests/benchmark.py --inference names optimisers to turn off."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        path if isinstance(path, bytes) else str(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )


def onnx_outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The logits and probabilities onnxruntime computes from the file, in batches, as a client runs it."""
    session = inference_session(path)
    batches = [
        session.run([LOGITS, PROBABILITIES], {INPUT_NAME: pixels[i : i + BATCH]}) for i in range(0, len(pixels), BATCH)
    ]
    logits, probabilities = (np.concatenate(parts) for parts in zip(*batches, strict=True))
    return logits, probabilities
