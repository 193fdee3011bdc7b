"""Disks and file systems that refuse a write: every stage stops in one line naming the path, keeps its last outputs
and leaves no partial file; stages that write a lot check the free space first."""

import csv
import ctypes
import errno
import os
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    MNIST_FILES,
    REPO_ROOT,
    STAGE_ENV,
    TINY_PARAMS,
    assert_one_line_error,
    dataset_files,
    run_stage_cli,
    update_params,
    write_synthetic_mnist,
)

from mnist_pipeline.errors import PipelineError, run_stage
from stages import download, evaluate, export, preprocess, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A working directory where every stage has run once on tiny synthetic data, from a local mirror."""
    work = tmp_path_factory.mktemp("finished")
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    hashes = write_synthetic_mnist(work / "mirror")
    update_params(
        work / "params.yaml",
        {**TINY_PARAMS, "dataset": dataset_files(hashes), "download": {"mirrors": [str(work / "mirror")]}},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("MNIST_PIPELINE_MIRRORS", raising=False)
        for stage in (download, preprocess, train, evaluate, export):
            stage.main([])
    return work


@pytest.fixture
def work(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "work", symlinks=True))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes: a failed stage must change none and add none, temp files included."""
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def file_size_limit(limit: int):
    """A preexec_fn: the child may grow no file past `limit` bytes, as on a disk that is full; its writes then fail
    with EFBIG instead of the SIGXFSZ that would kill it."""

    def limit_child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_child


# Per stage: a file size limit below its first output's size, and that output.
FULL_DISK = {
    "download": (1_000, f"data/raw/{MNIST_FILES[0]}"),
    "preprocess": (64_000, "data/prepared/train.npz"),
    "train": (8_000, "models/train_state.pt"),  # torch.save reports a failed write as a RuntimeError
}


@pytest.mark.parametrize("stage", FULL_DISK)  # evaluate's and export's writers: the next test
def test_a_full_disk_stops_a_stage_in_one_line_and_keeps_its_last_outputs(work, stage):
    limit, path = FULL_DISK[stage]
    if stage == "download":
        (work / path).unlink()  # the others are present and verified: only this one is fetched
    before = snapshot(work)
    # No bytecode: Python would write a .pyc cut short at the limit into the repository, and never notice.
    result = run_stage_cli(
        stage, work, preexec_fn=file_size_limit(limit), env={**STAGE_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
    )
    assert_one_line_error(result, f"{path}: file too large for the file system or for this process's file size limit; ")
    assert "(ulimit -f)" in result.stderr
    assert snapshot(work) == before, "outputs unchanged, no temp file left"


def full_disk_at(monkeypatch, owner, name: str, call: int) -> None:
    """Make the writer owner.name fail at its call-th call as on a full disk: OSError ENOSPC, with no file name."""
    real, calls = getattr(owner, name), []

    def writer(*args, **kwargs):
        calls.append(name)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, writer)


@pytest.mark.parametrize(
    "stage, owner, writer, call, path",
    [
        # The second split: the first is written by then, and must not replace the old one alone.
        (preprocess, np, "savez", 2, "data/prepared/val.npz"),
        (evaluate, csv, "writer", 1, "metrics/per_class.csv"),  # after eval.json, which must not replace the old one
        (export, onnx, "save_model", 1, "models/model.onnx"),
    ],
    ids=["preprocess", "evaluate", "export"],
)
def test_no_space_left_names_the_file_and_keeps_every_previous_output(
    work, monkeypatch, capsys, stage, owner, writer, call, path
):
    monkeypatch.chdir(work)
    before = snapshot(work)
    full_disk_at(monkeypatch, owner, writer, call)
    with pytest.raises(SystemExit) as exited:
        run_stage(lambda: stage.main([]))
    assert exited.value.code == 1
    directory = os.path.dirname(path)
    assert capsys.readouterr().err.endswith(
        f"error: {path}: no space left on the device; free some space (df -h {directory}) and run the stage again\n"
    )
    assert snapshot(work) == before


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24  # from linux/capability.h and linux/prctl.h


def without_root_privileges():
    """A preexec_fn: root writes through any file mode; without these two capabilities the stage it runs obeys the
    modes like any other user. (Switching to another user would not do: the interpreter may live under /root.)"""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_output_directory_is_one_line_naming_it(work):
    prepared = work / "data/prepared"
    before = snapshot(work)
    prepared.chmod(0o555)
    try:
        result = run_stage_cli("preprocess", work, preexec_fn=without_root_privileges)
    finally:
        prepared.chmod(0o755)
    assert_one_line_error(
        result, "data/prepared/train.npz: permission denied; make it and data/prepared readable and writable for you"
    )
    assert snapshot(work) == before


def test_a_directory_where_an_output_file_should_be_is_one_line_and_no_other_output_changes(work):
    (work / "data/prepared/meta.json").unlink()
    (work / "data/prepared/meta.json").mkdir()
    before = snapshot(work)
    result = run_stage_cli("preprocess", work)
    assert_one_line_error(
        result, "data/prepared/meta.json: is a directory where a file should be; move that directory away"
    )
    assert snapshot(work) == before, "the splits written before meta.json failed replace nothing"


def tiny_disk(path):
    return shutil._ntuple_diskusage(total=10**9, used=10**9 - 1000, free=1000)


def test_preprocess_checks_free_space_before_writing(workdir, monkeypatch):
    update_params(workdir / "params.yaml", TINY_PARAMS)
    write_synthetic_mnist(workdir / "data/raw")
    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    with pytest.raises(PipelineError) as raised:
        preprocess.main([])
    assert str(raised.value) == (
        "data/prepared: not enough free space: preprocess needs 1.4 MB there, 0.0 MB are free; "
        "free some space (df -h data) and run the stage again"
    )
    assert not (workdir / "data/prepared").exists()


def test_train_checks_free_space_for_its_state_before_the_first_epoch(work, monkeypatch):
    monkeypatch.chdir(work)
    before = snapshot(work)
    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    with pytest.raises(
        PipelineError, match=r"^models: not enough free space: train needs [\d.]+ MB there, 0\.0 MB are free"
    ):
        train.main([])
    assert snapshot(work) == before, "metrics/train keeps the last run's logs"


def test_disk_faults_wrapped_by_a_library_are_one_line_and_other_errors_keep_their_traceback(capsys):
    def torch_save_on_a_full_disk():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "models/model.pt")
        except OSError:  # torch's writer raises its own error while the OSError is handled: an implicit context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    with pytest.raises(SystemExit):
        run_stage(torch_save_on_a_full_disk)
    assert capsys.readouterr().err.startswith("error: models/model.pt: no space left on the device; ")
    with pytest.raises(FileNotFoundError):  # a missing file that no stage reported is a bug
        run_stage(lambda: open("no/such/file"))
    with pytest.raises(ZeroDivisionError):
        run_stage(lambda: 1 / 0)


@pytest.mark.parametrize("path", ["models/model.pt", "data/prepared/test.npz"])
def test_an_unreadable_input_is_a_permission_problem_not_a_corrupt_file(work, path):
    (work / path).chmod(0o200)
    result = run_stage_cli("evaluate", work, preexec_fn=without_root_privileges)
    assert_one_line_error(
        result, f"{path}: permission denied; make it and {os.path.dirname(path)} readable and writable for you"
    )
