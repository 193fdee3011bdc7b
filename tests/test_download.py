"""The download stage: verified by content hash, retried, failing over between mirrors, never half-written."""

import dataclasses
import gzip

import pytest

from conftest import write_synthetic_mnist
from stages import download
from stages.errors import PipelineError
from stages.params import MNIST_FILES, load_params

NAME = MNIST_FILES[1]


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
    used = download.download_file(NAME, hashes[NAME], [urls["missing"], urls["corrupt"], urls["good"]], 5, 1)
    assert used == urls["good"] + NAME
    assert download.content_sha256(download.OUTPUT_DIR / NAME) == hashes[NAME]


def test_checksum_mismatch_fails_and_writes_nothing(mirrors):
    urls, hashes = mirrors
    with pytest.raises(PipelineError) as raised:
        download.download_file(NAME, hashes[NAME], [urls["corrupt"]], 5, 0)
    assert "content SHA-256 is" in str(raised.value) and f"expected {hashes[NAME]}" in str(raised.value)
    assert list(download.OUTPUT_DIR.iterdir()) == [], "no partial or temp file may be left behind"


def test_all_mirrors_failing_lists_each_and_explains_the_local_mirror(mirrors):
    urls, hashes = mirrors
    with pytest.raises(PipelineError) as raised:
        download.download_file(NAME, hashes[NAME], [urls["missing"], "http://127.0.0.1:9/"], 1, 1)
    message = str(raised.value)
    assert f"{urls['missing']}{NAME}: HTTP 404" in message
    assert f"http://127.0.0.1:9/{NAME}:" in message
    assert "MNIST_PIPELINE_MIRRORS=/path/to/mnist dvc repro" in message


def test_transient_failure_is_retried(mirrors, monkeypatch):
    urls, hashes = mirrors
    real_fetch, calls = download.fetch, []

    def flaky_fetch(url, destination, timeout):
        calls.append(url)
        if len(calls) == 1:
            raise download.DownloadFailed("connection reset", permanent=False)
        real_fetch(url, destination, timeout)

    monkeypatch.setattr(download, "fetch", flaky_fetch)
    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    assert download.download_file(NAME, hashes[NAME], [urls["good"]], 5, 1) == urls["good"] + NAME
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
    monkeypatch.setattr(download, "load_params", lambda: _params_with(hashes))
    download.main()
    assert sorted(p.name for p in download.OUTPUT_DIR.iterdir()) == sorted(MNIST_FILES)
    assert "verified, from file://" in capsys.readouterr().out


def _params_with(hashes, mirror_urls=("http://127.0.0.1:9/",)):
    """params.yaml with the download section pointed at test mirrors and synthetic hashes."""
    params = load_params()
    download_params = dataclasses.replace(params.download, mirrors=list(mirror_urls), sha256=hashes, timeout=1, retries=0)
    return dataclasses.replace(params, download=download_params)


def test_later_files_start_with_the_mirror_that_worked(mirrors, monkeypatch):
    urls, hashes = mirrors
    tried = []
    real_fetch = download.fetch

    def recording_fetch(url, destination, timeout):
        tried.append(url)
        real_fetch(url, destination, timeout)

    monkeypatch.setattr(download, "fetch", recording_fetch)
    monkeypatch.setattr(download, "load_params", lambda: _params_with(hashes, [urls["missing"], urls["good"]]))
    download.main()
    assert tried == [urls["missing"] + MNIST_FILES[0]] + [urls["good"] + name for name in MNIST_FILES]
