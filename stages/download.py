"""Stage 1, download: the dataset's four files from the first mirror that serves them intact, into data/raw/."""

from pathlib import Path

from mnist_pipeline.download import MEGABYTE, already_verified, download_file, mirrors_to_try
from mnist_pipeline.errors import run_stage
from mnist_pipeline.files import remove_stale_temp_files
from mnist_pipeline.params import load_params

OUTPUT_DIR = Path("data/raw")


def main() -> None:
    all_params = load_params()
    params = all_params.download
    mirrors = mirrors_to_try(params.mirrors)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(OUTPUT_DIR)  # of a run killed mid-download: first, so none survives a failed run either
    max_bytes = params.max_megabytes * MEGABYTE
    for name, expected in all_params.dataset.files().items():
        if already_verified(OUTPUT_DIR / name, expected, max_bytes):
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
            output_dir=OUTPUT_DIR,
        )
        print(f"{name}: verified, from {url}")
        working = url.removesuffix(name)
        mirrors = [working] + [m for m in mirrors if m != working]  # spare the next files the dead mirrors


if __name__ == "__main__":
    run_stage(main)
