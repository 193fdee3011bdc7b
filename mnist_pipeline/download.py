"""Verified downloads: a file from the first mirror that serves it intact, bounded in size and time, renamed into place
only once its SHA-256 matches. The download stage fetches the dataset with it, the pretrained stage the weights."""

import contextlib
import gzip
import hashlib
import http.client
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from mnist_pipeline.errors import DISK_FAULTS, PipelineError
from mnist_pipeline.files import atomic_path, require_free_space

MIRRORS_ENV = "MNIST_PIPELINE_MIRRORS"
CHUNK = 1 << 20
MEGABYTE = 10**6  # download.max_megabytes counts these


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


def too_large(max_bytes: int) -> str:
    return f"more than {max_bytes / MEGABYTE:g} MB, the limit download.max_megabytes sets"


def stream_sha256(stream, max_bytes: int | None, too_large_words: str) -> str:
    """SHA-256 of what `stream` reads; past max_bytes it fails (a gzip bomb, an endless stream) before disks fill."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise DownloadFailed(f"{too_large_words} {too_large(max_bytes)}", permanent=True)
        digest.update(chunk)
    return digest.hexdigest()


def content_sha256(path: Path, max_bytes: int | None = None) -> str:
    """SHA-256 of the decompressed content: mirrors recompress, so the .gz bytes are not comparable."""
    try:
        with gzip.open(path, "rb") as stream:
            return stream_sha256(stream, max_bytes, "decompresses to")
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadFailed(f"not a complete gzip file ({error})", permanent=True) from None


def bounded_file_sha256(path: Path, max_bytes: int | None = None) -> str:
    """SHA-256 of the file's own bytes, for downloads that no mirror recompresses (model weights); past max_bytes
    it fails like a download that large (files.file_sha256 hashes a file this pipeline trusts, unbounded)."""
    with path.open("rb") as stream:
        return stream_sha256(stream, max_bytes, "is")


def past_deadline(deadline: float, received: int | None = None) -> DownloadFailed:
    progress = f" ({received} bytes received)" if received is not None else ""
    return DownloadFailed(f"not finished within download.deadline = {deadline:g} s{progress}", permanent=True)


@contextlib.contextmanager
def interrupted_after(deadline: float | None) -> Iterator[None]:
    """Raise past_deadline() in the main thread once `deadline` seconds have passed, whatever blocks it: a mirror
    can trickle its status line and headers too, which urllib reads before fetch sees a byte of the body, each
    read within the timeout. Off the main thread (signals reach only that one), fetch's own check must do."""
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise past_deadline(deadline)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fetch(url: str, destination: Path, timeout: float, *, max_bytes: int | None, deadline: float | None) -> None:
    """Stream a URL to a file with a progress bar; any network or HTTP failure becomes DownloadFailed.

    timeout bounds each wait for data; deadline (seconds) the whole transfer, headers included, so that a mirror
    trickling a byte at a time fails too (interrupted_after; the check after every read names the bytes received).
    No more than max_bytes are written, whatever Content-Length says. A failed write is the disk's fault, not the
    mirror's: it propagates (mnist_pipeline.errors.DISK_FAULTS), and the stage stops.
    """
    started = time.monotonic()
    try:
        with (
            interrupted_after(deadline),
            urllib.request.urlopen(url, timeout=timeout) as response,
            destination.open("wb") as out,
        ):
            size = int(response.headers.get("Content-Length") or 0) or None
            if size is not None and max_bytes is not None and size > max_bytes:
                raise DownloadFailed(f"announces {size} bytes, {too_large(max_bytes)}", permanent=True)
            if size is not None:
                require_free_space(destination.parent, size, "the download")
            name = url.rsplit("/", 1)[-1]
            received = 0
            with tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=None, leave=False) as bar:
                while chunk := response.read1(CHUNK):  # read1: what has arrived, so the deadline is checked often
                    received += len(chunk)
                    if max_bytes is not None and received > max_bytes:
                        raise DownloadFailed(f"sent {too_large(max_bytes)}", permanent=True)
                    out.write(chunk)
                    bar.update(len(chunk))
                    if deadline is not None and time.monotonic() - started > deadline:
                        raise past_deadline(
                            deadline, received
                        )  # permanent: a mirror this slow would take as long again
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
        if isinstance(error, OSError) and error.errno in DISK_FAULTS:  # writing our temp file failed
            raise
        raise DownloadFailed(f"{type(error).__name__}: {error}", permanent=False) from None


def download_verified(
    url: str,
    target: Path,
    expected_sha256: str,
    timeout: float,
    *,
    max_bytes: int | None,
    deadline: float | None,
    digest=content_sha256,
) -> None:
    """Download to a temp file and rename it to `target` only once its hash (`digest`) is the expected one.

    max_bytes bounds the download and what `digest` reads (the decompressed content); deadline, each transfer
    (see fetch).
    """
    with atomic_path(target) as temp:
        fetch(url, temp, timeout, max_bytes=max_bytes, deadline=deadline)
        actual = digest(temp, max_bytes)
        if actual != expected_sha256:
            raise DownloadFailed(f"content SHA-256 is {actual}, expected {expected_sha256}", permanent=True)


def download_file(
    name: str,
    expected_sha256: str,
    mirrors: list[str],
    timeout: float,
    retries: int,
    *,
    max_bytes: int | None,
    deadline: float | None,
    output_dir: Path,
    digest=content_sha256,
    offline_files: str = "the four MNIST .gz files",
) -> str:
    """Try each mirror in turn (each up to 1 + retries times); return the URL that worked.

    max_bytes and deadline bound each attempt (None: no bound); a mirror past either fails over at once.
    """
    target = output_dir / name
    failures = []
    for base in mirrors:
        url = base + name
        for attempt in range(retries + 1):
            try:
                download_verified(
                    url, target, expected_sha256, timeout, max_bytes=max_bytes, deadline=deadline, digest=digest
                )
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
        f"({MIRRORS_ENV} takes comma-separated directories, file:// or http(s):// base URLs, tried before "
        "params.yaml's download.mirrors.)"
    )


def already_verified(path: Path, expected_sha256: str, max_bytes: int | None, digest=content_sha256) -> bool:
    try:
        return path.is_file() and digest(path, max_bytes) == expected_sha256
    except DownloadFailed:
        return False
