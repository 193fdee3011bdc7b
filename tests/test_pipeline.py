"""End to end: the repository copied into a throw-away git+DVC repo, `dvc repro` on synthetic data over local HTTP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from conftest import REPO_ROOT, TINY_PARAMS, dataset_files, update_params, write_synthetic_mnist
from stages.model import load_checkpoint
from stages.params import DATASET_FILES

pytestmark = pytest.mark.slow

STAGES = ["download", "pretrained", "preprocess", "train", "evaluate", "export"]
TRACKED = ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "stages"]


def run(args: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    env.pop("MNIST_PIPELINE_MIRRORS", None)  # the params' mirrors, served on 127.0.0.1, are what is tested
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The pipeline run once, end to end, on synthetic MNIST behind one broken and one good HTTP mirror."""
    import functools
    import http.server
    import threading

    from conftest import QuietHandler

    base = tmp_path_factory.mktemp("e2e")
    www, repo = base / "www", base / "repo"
    hashes = write_synthetic_mnist(www / "good", train=600, test=200)
    (www / "broken").mkdir()
    for name in hashes:  # same names, wrong content: the checksum must reject it
        shutil.copy(www / "good" / name, www / "broken" / name)
        (www / "broken" / name).write_bytes((www / "broken" / name).read_bytes()[:-9])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    repo.mkdir()
    for path in TRACKED:
        source, target = REPO_ROOT / path, repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    update_params(
        repo / "params.yaml",
        {**TINY_PARAMS, "dataset": dataset_files(hashes), "download": {"mirrors": [f"{url}/broken/", f"{url}/good/"], "timeout": 5, "retries": 0}},
    )
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)
    output = run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    yield repo, output
    server.shutdown()
    server.server_close()


def test_first_repro_runs_every_stage_and_fails_over_to_the_good_mirror(project):
    repo, output = project
    assert ran_stages(output) == STAGES
    assert "/good/train-images-idx3-ubyte.gz" in output
    dataset = yaml.safe_load((repo / "params.yaml").read_text())["dataset"]
    assert sorted(p.name for p in (repo / "data/raw").iterdir()) == sorted(dataset[key]["file"] for key in DATASET_FILES)
    assert (repo / "data/pretrained/none.txt").is_file(), "model.pretrained: none fetches nothing, and says so"
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["counts"] == {"train": 540, "val": 60, "test": 200}


def test_metrics_have_every_key_in_range(project):
    repo, _ = project
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    for key in ["accuracy", "precision_macro", "recall_macro", "f1_macro"]:
        assert 0.0 <= metrics[key] <= 1.0 and metrics[key] == round(metrics[key], 4)
    assert metrics["accuracy"] > 0.5, "the synthetic digits are easy; a working pipeline learns them"
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["test_images"] == 200
    assert np.array(metrics["confusion_matrix"]).sum() == 200 and metrics["device"] == "cpu"
    rows = (repo / "metrics/predictions.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 201

    exported = json.loads((repo / "metrics/export.json").read_text())
    assert exported["opset"] >= 18 and exported["max_abs_diff"] <= 1e-4 and exported["predictions_identical"]
    assert exported["onnx_accuracy"] == metrics["accuracy"]
    assert exported["size_bytes"] == (repo / "models/model.onnx").stat().st_size
    assert sorted(p.name for p in (repo / "models").iterdir()) == [".gitignore", "model.onnx", "model.pt"], (
        "the ONNX model is one self-contained file, with no external weights beside it"
    )

    summary = json.loads((repo / "metrics/train/metrics.json").read_text())
    assert 1 <= summary["best"]["epoch"] <= TINY_PARAMS["train"]["epochs"]
    for curve in ["train/loss", "train/accuracy", "val/loss", "val/accuracy"]:
        assert len((repo / f"metrics/train/plots/metrics/{curve}.tsv").read_text().splitlines()) == 1 + TINY_PARAMS["train"]["epochs"]


def test_onnx_model_answers_a_batch_of_seven_raw_images(project):
    repo, _ = project
    session = onnxruntime.InferenceSession(str(repo / "models/model.onnx"), providers=["CPUExecutionProvider"])
    with np.load(repo / "data/prepared/test.npz") as test:
        pixels, labels = test["images"][:7, None], test["labels"][:7]
    (logits,) = session.run(None, {"pixels": pixels})
    assert logits.shape == (7, 10) and np.isfinite(logits).all()
    assert str(repo).encode() not in (repo / "models/model.onnx").read_bytes(), "no local paths in a shipped model"
    assert session.get_inputs()[0].shape[0] not in (1, 7), "the batch dimension is dynamic"
    model, _ = load_checkpoint(repo / "models/model.pt")
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert (logits.argmax(1) == labels).sum() >= 4, "the synthetic digits are easy; most are recognised"


def test_second_repro_runs_nothing(project):
    repo, _ = project
    output = run(["dvc", "repro"], repo)
    assert ran_stages(output) == [] and "up to date" in output


def out_hashes(repo: Path) -> dict[str, str]:
    """Every stage output's hash, as dvc.lock records it."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out.get("md5") for stage in lock["stages"].values() for out in stage["outs"]}


def test_forced_reruns_give_the_same_hashes_for_every_output(project):
    repo, _ = project
    first = out_hashes(repo)
    for _ in range(2):
        assert ran_stages(run(["dvc", "repro", "-f"], repo)) == STAGES
        assert out_hashes(repo) == first, "same params, same machine: same model, metrics and plots"
    assert {"models/model.pt", "models/model.onnx", "metrics/eval.json", "metrics/train"} <= set(first)


def test_param_change_shows_in_params_diff_and_reruns_only_downstream_stages(project):
    repo, _ = project
    update_params(repo / "params.yaml", {"train": {"lr": 0.02}})
    diff = run(["dvc", "params", "diff"], repo)
    assert "train.lr" in diff and "0.01" in diff and "0.02" in diff
    output = run(["dvc", "repro"], repo)
    assert ran_stages(output) == ["train", "evaluate", "export"]
    metrics_diff = run(["dvc", "metrics", "diff", "--all"], repo)
    assert "metrics/eval.json" in metrics_diff and "accuracy" in metrics_diff
    plots = run(["dvc", "plots", "show", "-o", str(repo / "plots_html")], repo)
    assert (repo / "plots_html/index.html").exists(), plots


def test_switching_to_a_frozen_pretrained_resnet_fetches_its_weights_and_reruns_what_depends_on_them(project):
    import torchvision

    from stages.download import file_sha256

    repo, _ = project
    server = yaml.safe_load((repo / "params.yaml").read_text())["download"]["mirrors"][-1].removesuffix("good/")
    weights = repo.parent / "www/weights/resnet18-test.pth"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    update_params(repo / "params.yaml", {
        "model": {"arch": "resnet18", "pretrained": "imagenet", "freeze": True, "input_size": 32},
        "train": {"epochs": 1, "shift_pixels": 0},
        "weights": {"file": weights.name, "sha256": file_sha256(weights), "mirrors": [f"{server}weights/"]},
    })
    output = run(["dvc", "repro"], repo)
    assert ran_stages(output) == ["pretrained", "train", "evaluate", "export"]
    assert [p.name for p in (repo / "data/pretrained").iterdir()] == [weights.name]
    assert json.loads((repo / "metrics/export.json").read_text())["predictions_identical"]
    assert ran_stages(run(["dvc", "repro"], repo)) == []


def test_bad_param_fails_in_one_line_and_keeps_the_last_results(project):
    repo, _ = project
    kept = {path: (repo / path).read_bytes() for path in ["models/model.pt", "models/model.onnx", "metrics/eval.json", "metrics/train/metrics.json"]}
    update_params(repo / "params.yaml", {"train": {"dropout_rate": 0.5}})
    result = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0
    assert "error: params.yaml: unknown key train.dropout_rate = 0.5 (did you mean model.dropout?); the keys of 'train' are:" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for path, content in kept.items():
        assert (repo / path).read_bytes() == content, f"{path} was lost to a failed run"
