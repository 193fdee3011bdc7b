"""Stage 2, pretrained: fetch the ImageNet weights model.resnet18.pretrained asks for into --pretrained, or nothing.

The weights are an input like the data: the same mirrors logic ($MNIST_PIPELINE_MIRRORS first), bounds and
messages as the download stage, verified by the SHA-256 in params.yaml before they are renamed into place.
Torch hub's cache is never read. When no weights are needed, the directory holds only a note saying so:
DVC then still has an output to track, and a stale weights file never lingers.
"""

from mnist_pipeline.download import MEGABYTE, already_verified, bounded_file_sha256, download_file, mirrors_to_try
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import atomic_path, remove_stale_temp_files
from mnist_pipeline.params import load_params
from mnist_pipeline.paths import PRETRAINED_DIR, stage_paths
from mnist_pipeline.pretrained import weights_file

NONE_NOTE = "none.txt"


def main(argv: list[str] | None = None) -> None:
    output_dir = stage_paths(__doc__, argv, pretrained=PRETRAINED_DIR).pretrained
    params = load_params()
    target = weights_file(params, output_dir)
    none_note = output_dir / NONE_NOTE
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(output_dir)
    max_bytes = params.download.max_megabytes * MEGABYTE
    if target is None:
        with atomic_path(none_note) as temp:
            temp.write_text(
                "this run needs no pretrained weights (model.arch is not resnet18, or model.resnet18.pretrained is "
                "none)\n"
            )
        message = "no pretrained weights needed (model.arch: cnn, or model.resnet18.pretrained: none)"
    elif already_verified(target, params.weights.sha256, max_bytes, bounded_file_sha256):
        message = f"{target.name}: already present and verified"
    else:
        url = download_file(
            target.name,
            params.weights.sha256,
            mirrors_to_try(params.weights.mirrors),
            params.download.timeout,
            params.download.retries,
            max_bytes=max_bytes,
            deadline=params.download.deadline,
            output_dir=output_dir,
            digest=bounded_file_sha256,
            offline_files=target.name,
        )
        message = f"{target.name}: verified, from {url}"
    kept = target or none_note
    for leftover in output_dir.iterdir():  # what other params fetched: the directory holds what these ask for
        if leftover != kept and leftover.is_file():
            leftover.unlink()
    print(message)


if __name__ == "__main__":
    run_stage(main)
