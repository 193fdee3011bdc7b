"""The download stage: verified by content hash, retried, failing over between mirrors, never half-written."""

import contextlib
import gzip
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    MNIST_FILES,
    QuietHandler,
    dataset_files,
    run_stage_cli,
    serving,
    update_params,
    write_synthetic_mnist,
)

from mnist_pipeline import download, paths
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import Params, load_params
from stages import download as download_stage

NAME = MNIST_FILES[1]
# download.max_megabytes and download.deadline in these tests: synthetic files are a few hundred kB at most.
MAX_MEGABYTES, DEADLINE = 1, 2.0
LIMITS = {"max_bytes": MAX_MEGABYTES * download.MEGABYTE, "deadline": DEADLINE, "output_dir": paths.RAW_DIR}


@pytest.fixture
def mirrors(http_root, workdir):
    """A good HTTP mirror, one serving corrupt files, and the expected hashes."""
    root, url = http_root
    hashes = write_synthetic_mnist(root / "good")
    (root / "corrupt").mkdir()
    for name in MNIST_FILES:
        content = gzip.decompress((root / "good" / name).read_bytes())
        (root / "corrupt" / name).write_bytes(gzip.compress(content[:-1] + b"\x01"))
    return {"good": f"{url}/good/", "corrupt": f"{url}/corrupt/", "missing": f"{url}/missing/"}, hashes


def test_fails_over_from_broken_mirrors_to_a_good_one(mirrors, capsys):
    urls, hashes = mirrors
    used = download.download_file(NAME, hashes[NAME], [urls["missing"], urls["corrupt"], urls["good"]], 5, 1, **LIMITS)
    assert used == urls["good"] + NAME
    assert download.content_sha256(paths.RAW_DIR / NAME) == hashes[NAME]


def test_checksum_mismatch_fails_and_writes_nothing(mirrors):
    urls, hashes = mirrors
    with pytest.raises(PipelineError) as raised:
        download.download_file(NAME, hashes[NAME], [urls["corrupt"]], 5, 0, **LIMITS)
    assert "content SHA-256 is" in str(raised.value) and f"expected {hashes[NAME]}" in str(raised.value)
    assert list(paths.RAW_DIR.iterdir()) == [], "no partial or temp file may be left behind"


def test_all_mirrors_failing_lists_each_and_explains_the_local_mirror(mirrors):
    urls, hashes = mirrors
    with pytest.raises(PipelineError) as raised:
        download.download_file(NAME, hashes[NAME], [urls["missing"], "http://127.0.0.1:9/"], 1, 1, **LIMITS)
    message = str(raised.value)
    assert f"{urls['missing']}{NAME}: HTTP 404" in message
    assert f"http://127.0.0.1:9/{NAME}:" in message
    assert "MNIST_PIPELINE_MIRRORS=/path/to/mnist dvc repro" in message


def test_transient_failure_is_retried(mirrors, monkeypatch):
    urls, hashes = mirrors
    real_fetch, calls = download.fetch, []

    def flaky_fetch(url, destination, timeout, **limits):
        calls.append(url)
        if len(calls) == 1:
            raise download.DownloadFailed("connection reset", permanent=False)
        real_fetch(url, destination, timeout, **limits)

    monkeypatch.setattr(download, "fetch", flaky_fetch)
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    assert download.download_file(NAME, hashes[NAME], [urls["good"]], 5, 1, **LIMITS) == urls["good"] + NAME
    assert calls == [urls["good"] + NAME] * 2


def test_environment_mirrors_come_first_and_directories_become_file_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_PIPELINE_MIRRORS", f"{tmp_path}, file:///srv/mnist ,")
    assert download.mirrors_to_try(["https://example.org/mnist"]) == [
        tmp_path.as_uri() + "/",
        "file:///srv/mnist/",
        "https://example.org/mnist/",
    ]


def test_stage_downloads_all_four_files_from_a_local_directory(mirrors, http_root, monkeypatch, capsys):
    root, _ = http_root
    urls, hashes = mirrors
    monkeypatch.setenv("MNIST_PIPELINE_MIRRORS", str(root / "good"))
    monkeypatch.setattr(download_stage, "load_params", lambda: _params_with(hashes))
    download_stage.main([])
    assert sorted(p.name for p in paths.RAW_DIR.iterdir()) == sorted(MNIST_FILES)
    assert "verified, from file://" in capsys.readouterr().out


def _params_with(hashes, mirror_urls=("http://127.0.0.1:9/",)):
    """params.yaml with the download section pointed at test mirrors and synthetic hashes."""
    params = load_params().model_dump()
    params["download"] = {
        "mirrors": list(mirror_urls),
        "timeout": 1,
        "retries": 0,
        "deadline": DEADLINE,
        "max_megabytes": MAX_MEGABYTES,
    }
    params["dataset"].update(dataset_files(hashes))
    return Params.model_validate(params)  # validated, like every params the stages get


def test_later_files_start_with_the_mirror_that_worked(mirrors, monkeypatch):
    urls, hashes = mirrors
    tried = []
    real_fetch = download.fetch

    def recording_fetch(url, destination, timeout, **limits):
        tried.append(url)
        real_fetch(url, destination, timeout, **limits)

    monkeypatch.setattr(download, "fetch", recording_fetch)
    monkeypatch.setattr(download_stage, "load_params", lambda: _params_with(hashes, [urls["missing"], urls["good"]]))
    download_stage.main([])
    assert tried == [urls["missing"] + MNIST_FILES[0]] + [urls["good"] + name for name in MNIST_FILES]


# Each way a mirror can fail, and the words the error gives for it. "refused" is a port nobody listens on;
# the others are paths of FaultyHandler. Transient faults are worth retrying on the same mirror; the rest are not.
FAULTS = {
    "refused": ("Connection refused", "transient"),
    "timeout": ("timed out", "transient"),
    "404": ("HTTP 404", "permanent"),
    "500": ("HTTP 500", "transient"),
    "truncated": ("connection closed after", "transient"),
    "cut": ("not a complete gzip file", "permanent"),
    "wrong": ("content SHA-256 is", "permanent"),
    "notgzip": ("not a complete gzip file", "permanent"),
    "endless": (f"sent more than {MAX_MEGABYTES} MB, the limit download.max_megabytes sets", "permanent"),
    "liar": (f"announces {10 * LIMITS['max_bytes']} bytes, more than {MAX_MEGABYTES} MB", "permanent"),
    "understated": ("not a complete gzip file", "permanent"),
    "trickle": (f"not finished within download.deadline = {DEADLINE:g} s", "permanent"),
    "slowheaders": (f"not finished within download.deadline = {DEADLINE:g} s", "permanent"),
    "bomb": (f"decompresses to more than {MAX_MEGABYTES} MB", "permanent"),
}
TIMEOUT = 0.2  # download.timeout in these tests: the "timeout" mirror says nothing for STALL seconds
STALL = 1.0
TRICKLE = TIMEOUT / 4  # seconds between the bytes the "trickle" mirror sends: each read gets data in time


class FaultyHandler(QuietHandler):
    """Serves good/<name> as <fault>/<name>, failing in that fault's way; logs each path it is asked for."""

    requested: list[str]

    def do_GET(self):
        self.requested.append(self.path)
        fault, _, name = self.path.strip("/").partition("/")
        if fault == "good":
            return super().do_GET()
        good = (Path(self.directory) / "good" / name).read_bytes()
        if fault == "timeout":
            threading.Event().wait(STALL)  # then hang up without a word; not time.sleep, which tests stub out
            return
        if fault in ("404", "500"):
            self.send_error(int(fault))
            return
        if fault in ("endless", "liar", "understated"):  # zeros without end, until the client hangs up
            lengths = {"liar": 10 * LIMITS["max_bytes"], "understated": 1000}
            self.send_response(200)
            if fault in lengths:
                self.send_header("Content-Length", str(lengths[fault]))
            self.end_headers()
            with contextlib.suppress(ConnectionError):
                while True:
                    self.wfile.write(bytes(1 << 16))
        if fault == "slowheaders":  # a status line, then header bytes one at a time: urllib is still reading headers
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(int(10 * DEADLINE / TRICKLE)):  # ten deadlines' worth, then give up
                    self.wfile.write(b"a")
                    threading.Event().wait(TRICKLE)
            self.close_connection = True
            return
        if fault == "trickle":  # the right file, one byte at a time, each well within the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):
                for offset in range(len(good)):
                    self.wfile.write(good[offset : offset + 1])
                    threading.Event().wait(TRICKLE)
            return
        body = {
            "truncated": good,  # only half of it is sent, below
            "cut": good[: len(good) // 2],  # a complete response holding an incomplete gzip
            "wrong": (Path(self.directory) / "good" / sibling(name)).read_bytes(),  # another file of the set
            "notgzip": b"<html><body>This mirror has moved.</body></html>",
            "bomb": gzip.compress(bytes(2 * LIMITS["max_bytes"])),  # a few kB that decompress past the limit
        }[fault]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if fault == "truncated" else body)
        self.close_connection = True


def sibling(name: str) -> str:
    return MNIST_FILES[(MNIST_FILES.index(name) + 1) % len(MNIST_FILES)]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def faulty(tmp_path, workdir):
    """A server with one good mirror and one per fault; yields ({fault or 'good': base URL}, hashes, paths asked)."""
    root = tmp_path / "faulty"
    hashes = write_synthetic_mnist(root / "good")
    handler = type("Handler", (FaultyHandler,), {"requested": []})
    with serving(root, handler) as url:
        urls = {fault: f"{url}/{fault}/" for fault in [*FAULTS, "good"]}
        urls["refused"] = f"http://127.0.0.1:{unused_port()}/"
        yield urls, hashes, handler.requested


def files_in(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("fault", FAULTS)
def test_each_mirror_fault_is_detected_named_and_retried_only_if_transient(faulty, monkeypatch, fault):
    urls, hashes, requested = faulty
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    with pytest.raises(PipelineError) as raised:
        download.download_file(NAME, hashes[NAME], [urls[fault]], TIMEOUT, retries=1, **LIMITS)
    words, kind = FAULTS[fault]
    assert f"{urls[fault]}{NAME}: " in str(raised.value) and words in str(raised.value)
    if fault != "refused":
        assert len(requested) == (2 if kind == "transient" else 1)
    assert files_in(paths.RAW_DIR) == [], "no partial or temp file may be left behind"


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_mirror_is_skipped_and_only_the_verified_file_lands(faulty, fault):
    urls, hashes, _ = faulty
    assert (
        download.download_file(NAME, hashes[NAME], [urls[fault], urls["good"]], TIMEOUT, 0, **LIMITS)
        == urls["good"] + NAME
    )
    assert files_in(paths.RAW_DIR) == [NAME]
    assert download.content_sha256(paths.RAW_DIR / NAME) == hashes[NAME]


def test_stage_with_only_faulty_mirrors_fails_cleanly_and_leaves_no_file(faulty):
    urls, hashes, _ = faulty
    mirrors = [urls[fault] for fault in FAULTS]
    update_params(
        Path("params.yaml"),
        {
            "dataset": dataset_files(hashes),
            "download": {
                "mirrors": mirrors,
                "timeout": TIMEOUT,
                "retries": 0,
                "deadline": DEADLINE,
                "max_megabytes": MAX_MEGABYTES,
            },
        },
    )
    paths.RAW_DIR.mkdir(parents=True)
    (paths.RAW_DIR / f".{NAME}.x1y2z3.tmp").write_bytes(b"half a file from a killed run")
    result = run_stage_cli("download")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: could not download {MNIST_FILES[0]} from any mirror. Tried:\n")
    for fault, (words, _) in FAULTS.items():
        assert f"  {urls[fault]}{MNIST_FILES[0]}: " in result.stderr and words in result.stderr
    assert files_in(paths.RAW_DIR) == [], "neither a bad download nor an old temp file may remain"


def test_malformed_mirror_url_from_the_environment_is_a_clear_failure(workdir):
    with pytest.raises(PipelineError, match=r"http://\[::1/train-labels-idx1-ubyte.gz: not a valid URL"):
        download.download_file(NAME, "0" * 64, ["http://[::1/"], TIMEOUT, retries=1, **LIMITS)


@pytest.mark.parametrize("fault", ["endless", "liar", "trickle", "slowheaders"])
def test_an_endless_or_trickling_mirror_fails_over_within_the_deadline(faulty, fault):
    urls, hashes, _ = faulty
    started = time.monotonic()
    assert (
        download.download_file(NAME, hashes[NAME], [urls[fault], urls["good"]], TIMEOUT, 0, **LIMITS)
        == urls["good"] + NAME
    )
    # The trickle would take hours; the deadline ends it, overrun by at most one read timeout, plus slack for busy CPUs.
    assert time.monotonic() - started < DEADLINE + TIMEOUT + 3


def test_a_disk_that_cannot_hold_the_announced_size_stops_the_stage_instead_of_failing_over(faulty, monkeypatch):
    urls, hashes, requested = faulty
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(
        PipelineError, match=r"^data/raw: not enough free space: the download needs [\d.]+ MB there, 0.0 MB are free"
    ):
        download.download_file(NAME, hashes[NAME], [urls["good"], urls["good"]], TIMEOUT, 1, **LIMITS)
    assert len(requested) == 1 and files_in(paths.RAW_DIR) == []
