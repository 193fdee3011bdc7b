"""mnist-kserve: what KServe needs to serve the exported model on Triton, speaking the same v2 protocol as mnist-serve.

It writes a Triton model repository (the model as `mnist/1/model.onnx`, and `mnist/config.pbtxt` with its input,
outputs, bounded dynamic batching and class names) and a KServe InferenceService manifest whose predictor runs it on
KServe's Triton runtime with the v2 protocol. Upload the repository where the cluster can read it and name that
place with --storage-uri. Nothing here talks to a cluster.
"""

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from mnist_pipeline.errors import PipelineError, run_stage
from mnist_pipeline.files import atomic_directory
from mnist_pipeline.onnx_io import INPUT_NAME
from mnist_pipeline.predict import Classifier, default_model

MODEL_NAME = "mnist"  # as mnist-serve names it, so the same requests work against both


def triton_config(classifier: Classifier, max_batch: int, max_wait_ms: float) -> str:
    """config.pbtxt for Triton's onnxruntime backend: the shapes without the batch dimension, which Triton adds."""
    height, width = classifier.image_size
    outputs = [o.name for o in classifier.session.get_outputs()]
    output_entries = ",\n".join(
        f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {len(classifier.class_names)} ] }}' for name in outputs
    )
    return (
        f'name: "{MODEL_NAME}"\n'
        f'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch}\n"
        f'input [\n  {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ 1, {height}, {width} ] }}\n]\n'
        f"output [\n{output_entries}\n]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(max_wait_ms * 1000)} }}\n"
        f'parameters {{ key: "class_names" value: {{ string_value: "{",".join(classifier.class_names)}" }} }}\n'
    )


def inference_service(storage_uri: str) -> dict:
    """KServe's InferenceService for the repository at `storage_uri`, on its Triton runtime, with the v2 protocol."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": MODEL_NAME},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "onnx"},
                    "runtime": "kserve-tritonserver",
                    "protocolVersion": "v2",
                    "storageUri": storage_uri,
                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                }
            }
        },
    }


def write(out: Path, model: Path | None, storage_uri: str, max_batch: int, max_wait_ms: float) -> None:
    model = default_model() if model is None else Path(model)
    classifier = Classifier(model)  # a file that is no model of this pipeline stops here, before anything is written
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out} is not empty: name a new directory with --out")
    with atomic_directory(out) as temp:  # all of it or nothing
        repository = temp / "model-repository" / MODEL_NAME
        (repository / "1").mkdir(parents=True)
        shutil.copyfile(model, repository / "1" / "model.onnx")
        (repository / "config.pbtxt").write_text(triton_config(classifier, max_batch, max_wait_ms))
        (temp / "inferenceservice.yaml").write_text(yaml.safe_dump(inference_service(storage_uri), sort_keys=False))
    repository = out / "model-repository" / MODEL_NAME
    print(
        f"wrote {repository}/ and {out / 'inferenceservice.yaml'}: upload {out / 'model-repository'} to "
        f"{storage_uri}, then kubectl apply -f {out / 'inferenceservice.yaml'}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-kserve", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new directory for the model repository and the manifest")
    parser.add_argument("--model", help="the exported ONNX model (default: found as mnist-predict finds it)")
    parser.add_argument(
        "--storage-uri",
        default="s3://your-bucket/mnist/model-repository",
        help="where the cluster will read the model repository (default: a placeholder)",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="Triton's max_batch_size (default: 64)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="Triton's batching delay in ms (default: 2)")
    args = parser.parse_args(argv)
    run_stage(lambda: write(Path(args.out), args.model, args.storage_uri, args.max_batch, args.max_wait_ms))


if __name__ == "__main__":
    main()
