"""Stage 1, download: the dataset's four files from the first mirror that serves them intact, into --raw."""

from mnist_pipeline.download import MEGABYTE, already_verified, download_file, mirrors_to_try
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import remove_stale_temp_files
from mnist_pipeline.params import load_params
from mnist_pipeline.paths import RAW_DIR, stage_paths


def main(argv: list[str] | None = None) -> None:
    output_dir = stage_paths(__doc__, argv, raw=RAW_DIR).raw
    all_params = load_params()
    params = all_params.download
    mirrors = mirrors_to_try(params.mirrors)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(output_dir)  # of a run killed mid-download: first, so none survives a failed run either
    max_bytes = params.max_megabytes * MEGABYTE
    for name, expected in all_params.dataset.files().items():
        if already_verified(output_dir / name, expected, max_bytes):
            print(f"{name}: already present and verified")
            continue
        url = download_file(
            name,
            expected,
            mirrors,
            params.timeout,
            params.retries,
            max_bytes=max_bytes,
            deadline=params.deadline,
            output_dir=output_dir,
        )
        print(f"{name}: verified, from {url}")
        working = url.removesuffix(name)
        mirrors = [working] + [m for m in mirrors if m != working]  # spare the next files the dead mirrors


if __name__ == "__main__":
    run_stage(main)
