"""Stage 1, download: fetch the dataset's four files from the first mirror that serves them intact, into data/raw/.

The pretrained stage fetches model weights with the same functions."""

import gzip
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from stages.errors import PipelineError, run_stage
from stages.files import atomic_path, remove_stale_temp_files
from stages.params import load_params

OUTPUT_DIR = Path("data/raw")
MIRRORS_ENV = "MNIST_PIPELINE_MIRRORS"
CHUNK = 1 << 20


class DownloadFailed(Exception):
    """One attempt at one URL failed; `permanent` says whether retrying the same URL is pointless."""

    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.permanent = permanent


def mirror_base_url(mirror: str) -> str:
    """A mirror as a base URL ending in '/': http(s):// and file:// URLs as given, a directory as file://."""
    if "://" in mirror:
        return mirror.rstrip("/") + "/"
    return Path(mirror).expanduser().resolve().as_uri() + "/"


def mirrors_to_try(configured: list[str]) -> list[str]:
    """The environment's mirrors first, so offline users need not edit tracked params, then params.yaml's."""
    from_env = [m.strip() for m in os.environ.get(MIRRORS_ENV, "").split(",") if m.strip()]
    return [mirror_base_url(m) for m in from_env + configured]


def content_sha256(path: Path) -> str:
    """SHA-256 of the decompressed content: mirrors recompress, so the .gz bytes are not comparable."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadFailed(f"not a complete gzip file ({error})", permanent=True) from None
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, for files that no mirror recompresses (model weights)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, destination: Path, timeout: float) -> None:
    """Stream a URL to a file with a progress bar; any network or HTTP failure becomes DownloadFailed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, destination.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            name = url.rsplit("/", 1)[-1]
            received = 0
            with tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=None, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if size is not None and received != size:
                raise DownloadFailed(f"connection closed after {received} of {size} bytes", permanent=False)
    except urllib.error.HTTPError as error:
        raise DownloadFailed(f"HTTP {error.code} {error.reason}", permanent=400 <= error.code < 500) from None
    except urllib.error.URLError as error:
        # file:// URLs report a missing file this way; retrying will not make it appear.
        permanent = isinstance(error.reason, FileNotFoundError)
        raise DownloadFailed(str(error.reason), permanent=permanent) from None
    except (ValueError, http.client.InvalidURL) as error:  # a malformed URL in MNIST_PIPELINE_MIRRORS
        raise DownloadFailed(f"not a valid URL ({error})", permanent=True) from None
    except (OSError, http.client.HTTPException, TimeoutError) as error:
        raise DownloadFailed(f"{type(error).__name__}: {error}", permanent=False) from None


def download_verified(url: str, target: Path, expected_sha256: str, timeout: float, digest=content_sha256) -> None:
    """Download to a temp file and rename it to `target` only once its hash (`digest`) is the expected one."""
    with atomic_path(target) as temp:
        fetch(url, temp, timeout)
        actual = digest(temp)
        if actual != expected_sha256:
            raise DownloadFailed(f"content SHA-256 is {actual}, expected {expected_sha256}", permanent=True)


def download_file(
    name: str,
    expected_sha256: str,
    mirrors: list[str],
    timeout: float,
    retries: int,
    output_dir: Path = OUTPUT_DIR,
    digest=content_sha256,
    offline_files: str = "the four MNIST .gz files",
) -> str:
    """Try each mirror in turn (each up to 1 + retries times); return the URL that worked."""
    target = output_dir / name
    failures = []
    for base in mirrors:
        url = base + name
        for attempt in range(retries + 1):
            try:
                download_verified(url, target, expected_sha256, timeout, digest)
                return url
            except DownloadFailed as failure:
                reason = str(failure)
                if failure.permanent or attempt == retries:
                    break
                time.sleep(min(2**attempt, 5))
        failures.append(f"  {url}: {reason}")
    raise PipelineError(
        f"could not download {name} from any mirror. Tried:\n"
        + "\n".join(failures)
        + f"\nTo work offline, put {offline_files} in a directory and point {MIRRORS_ENV} at it:\n"
        f"  {MIRRORS_ENV}=/path/to/mnist dvc repro\n"
        f"({MIRRORS_ENV} takes comma-separated directories, file:// or http(s):// base URLs, tried before params.yaml's download.mirrors.)"
    )


def already_verified(path: Path, expected_sha256: str, digest=content_sha256) -> bool:
    try:
        return path.is_file() and digest(path) == expected_sha256
    except DownloadFailed:
        return False


def main() -> None:
    all_params = load_params()
    params = all_params.download
    mirrors = mirrors_to_try(params.mirrors)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(OUTPUT_DIR)  # of a run killed mid-download: first, so none survives a failed run either
    for name, expected in all_params.dataset.files().items():
        if already_verified(OUTPUT_DIR / name, expected):
            print(f"{name}: already present and verified")
            continue
        url = download_file(name, expected, mirrors, params.timeout, params.retries)
        print(f"{name}: verified, from {url}")
        working = url.removesuffix(name)
        mirrors = [working] + [m for m in mirrors if m != working]  # spare the next files the dead mirrors


if __name__ == "__main__":
    run_stage(main)
