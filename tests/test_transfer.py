"""Transfer learning and other datasets: ResNet-18 weights fetched and verified like the data, a frozen backbone
left bitwise alone, its features computed once, the ONNX export of a ResNet, and a 26-class dataset labelled 1-26."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import (
    MNIST_FILES,
    REPO_ROOT,
    STAGE_ENV,
    TINY_PARAMS,
    assert_one_line_error,
    run_stage_cli,
    update_params,
    write_synthetic_mnist,
)

from mnist_pipeline import describe_dataset, paths, training
from mnist_pipeline.checkpoint import load_checkpoint
from mnist_pipeline.distributed import Worker
from mnist_pipeline.download import content_sha256
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.files import file_sha256
from mnist_pipeline.idx import write_idx
from mnist_pipeline.model import ARCHITECTURES, architecture_for, build_model
from mnist_pipeline.params import DATASET_FILES, ModelParams, load_params
from stages import download, evaluate, export, preprocess, pretrained, train

WEIGHTS = "resnet18-test.pth"
FROZEN = {"arch": "resnet18", "resnet18": {"pretrained": "imagenet", "freeze": True, "input_size": 32}}
RESNET_PARAMS = {
    **TINY_PARAMS,
    "preprocess": {"val_size": 40},
    "model": FROZEN,
    "train": {**TINY_PARAMS["train"], "epochs": 2, "shift_pixels": 0},
}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """torchvision's ResNet-18, randomly initialised, its state dict saved as torchvision publishes weights."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / WEIGHTS
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture
def weights_mirror(http_root, weights_file, workdir):
    """The weights file on a 127.0.0.1 mirror, and params.yaml asking for a frozen ResNet-18 with it."""
    root, url = http_root
    (root / "good").mkdir()
    shutil.copy(weights_file, root / "good" / WEIGHTS)
    weights = {"file": WEIGHTS, "sha256": file_sha256(weights_file), "mirrors": [f"{url}/good/"]}
    update_params(
        workdir / "params.yaml", {**RESNET_PARAMS, "weights": weights, "download": {"timeout": 5, "retries": 0}}
    )
    return root, url


def test_every_architecture_has_a_builder_and_its_keys():
    assert set(ARCHITECTURES) == set(ModelParams.model_fields) - {"arch"}, "one group of keys per architecture"


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"arch": "resnet18", "resnet18": {"freeze": True}},
            "model.resnet18.freeze = true is not allowed with model.resnet18.pretrained = 'none': a frozen backbone "
            "that was never trained stays random",
        ),
        (
            {"arch": "cnn", "resnet18": {"freeze": True}},
            "model.resnet18.freeze = true is not allowed with model.resnet18.pretrained = 'none'",
        ),
        ({"arch": "vgg16"}, "model.arch = 'vgg16' is not allowed; expected one of cnn, resnet18"),
        (
            {"resnet18": {"input_size": 16}},
            "model.resnet18.input_size = 16 is not allowed; expected an integer from 32 to 512",
        ),
        (
            {"resnet18": {"pretrained": "yes"}},
            "model.resnet18.pretrained = 'yes' is not allowed; expected one of none, imagenet",
        ),
        (
            {"pretrained": "imagenet"},
            "unknown key model.pretrained = 'imagenet' (did you mean model.resnet18.pretrained",
        ),
    ],
)
def test_model_combinations_that_make_no_network_are_refused(workdir, model, message):
    update_params(workdir / "params.yaml", {"model": model})
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params()


@pytest.mark.parametrize(
    "dataset, message",
    [
        (
            {"class_names": ["a", "b", "a"]},
            "dataset.class_names = ['a', 'b', 'a'] is not allowed; expected a list of 2 to 256 different",
        ),
        ({"class_names": ["a,b", "c"]}, "without commas"),
        ({"label_offset": -1}, "dataset.label_offset = -1 is not allowed; expected an integer from 0 to 255"),
        ({"train_images": {"file": "../x.gz", "sha256": "0" * 64}}, "dataset.train_images = {'file': '../x.gz'"),
        ({"test_images": {"file": MNIST_FILES[0], "sha256": "0" * 64}}, "dataset names a file twice"),
    ],
)
def test_bad_dataset_params_are_refused(workdir, dataset, message):
    update_params(workdir / "params.yaml", {"dataset": dataset})
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_params()


def test_a_resnet_takes_raw_grey_pixels_and_resizes_them_inside():
    params = load_params(REPO_ROOT / "params.yaml")
    model_params = params.model.model_copy(
        update={"arch": "resnet18", "resnet18": params.model.resnet18.model_copy(update={"input_size": 32})}
    )
    model = build_model(architecture_for(model_params, 28, 26), 0.13, 0.31).eval()
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 26)
    assert model.prepare(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 3, 32, 32)


def test_the_pretrained_stage_fetches_verified_weights_only_when_asked(weights_mirror, weights_file, workdir):
    pretrained.main([])
    assert sorted(p.name for p in paths.PRETRAINED_DIR.iterdir()) == [WEIGHTS]
    assert (paths.PRETRAINED_DIR / WEIGHTS).read_bytes() == weights_file.read_bytes()

    # No weights asked for: nothing downloads (the only mirror refuses), the stale file goes, a note stays for DVC.
    update_params(
        workdir / "params.yaml",
        {
            "model": {"resnet18": {"pretrained": "none", "freeze": False}},
            "weights": {"mirrors": ["http://127.0.0.1:9/"]},
        },
    )
    pretrained.main([])
    assert sorted(p.name for p in paths.PRETRAINED_DIR.iterdir()) == ["none.txt"]


def test_wrong_weights_fail_over_to_the_next_mirror_then_fail_cleanly(weights_mirror, weights_file, workdir):
    root, url = weights_mirror
    (root / "other").mkdir()
    (root / "other" / WEIGHTS).write_bytes(weights_file.read_bytes()[:-1] + b"\x00")  # the same size, another file
    update_params(workdir / "params.yaml", {"weights": {"mirrors": [f"{url}/other/", f"{url}/good/"]}})
    assert run_stage_cli("pretrained").returncode == 0
    assert file_sha256(paths.PRETRAINED_DIR / WEIGHTS) == file_sha256(weights_file)

    (paths.PRETRAINED_DIR / WEIGHTS).unlink()
    update_params(workdir / "params.yaml", {"weights": {"sha256": "0" * 64}})
    result = run_stage_cli("pretrained")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: could not download {WEIGHTS} from any mirror. Tried:\n")
    for mirror in ["other", "good"]:
        assert f"  {url}/{mirror}/{WEIGHTS}: content SHA-256 is " in result.stderr
    assert f"put {WEIGHTS} in a directory and point MNIST_PIPELINE_MIRRORS at it" in result.stderr
    assert list(paths.PRETRAINED_DIR.iterdir()) == [], "neither the wrong file nor a temp file is left"


def test_weights_that_do_not_fit_the_network_are_a_clear_error(weights_mirror, workdir):
    paths.PRETRAINED_DIR.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(3)}, paths.PRETRAINED_DIR / WEIGHTS)
    write_synthetic_mnist(workdir / "data/raw", train=100, test=20)
    preprocess.main([])
    with pytest.raises(PipelineError, match=f"data/pretrained/{WEIGHTS} does not fit resnet18"):
        train.main([])
    assert not (workdir / "models/model.pt").exists()


@pytest.fixture
def frozen_workdir(weights_mirror, workdir):
    write_synthetic_mnist(workdir / "data/raw", train=160, test=40)
    pretrained.main([])
    preprocess.main([])
    return workdir


class CountingCalls:
    """A forward hook that counts the images a module sees."""

    def __init__(self, module):
        self.images = 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += len(inputs[0])


def test_frozen_features_are_computed_once_and_train_the_same_head(frozen_workdir, monkeypatch):
    params = load_params()
    heads, counts, build = {}, {}, training.build_model
    for cache in [True, False]:

        def counted_build(*args, cache=cache, **kwargs):
            model = build(*args, **kwargs)
            counts[cache] = CountingCalls(model.network.layer1)
            return model

        monkeypatch.setattr(training, "build_model", counted_build)
        model, _, _ = train.train(params, Worker(torch.device("cpu")), lambda result, model: None, cache_features=cache)
        heads[cache] = model.network.fc.weight.detach().clone()
    assert counts[True].images == 120 + 40, "once per image of the training and validation splits"
    assert counts[False].images == params.train.epochs * (120 + 40)
    torch.testing.assert_close(heads[True], heads[False], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_frozen_resnet_trains_only_its_head(frozen_workdir, weights_file):
    train.main([])
    checkpoint = torch.load(frozen_workdir / "models/model.pt", weights_only=True)
    published = torch.load(weights_file, weights_only=True)
    backbone = [name for name in checkpoint["state_dict"] if not name.startswith("fc.")]
    assert len(backbone) > 100 and all(torch.equal(checkpoint["state_dict"][n], published[n]) for n in backbone), (
        "every frozen weight and batch-norm statistic bitwise as published"
    )
    torch.manual_seed(load_params().train.seed)  # the head as training starts: the first draws after the seed
    untrained = build_model(checkpoint["architecture"], 0.0, 1.0).network.fc
    assert not torch.equal(checkpoint["state_dict"]["fc.weight"], untrained.weight), "the head learned"
    # Evaluated and exported (and the ONNX file verified against PyTorch) under dvc repro, in test_pipeline.
    model, _ = load_checkpoint(frozen_workdir / "models/model.pt")
    assert model.input_size == 32


def test_a_frozen_run_interrupted_resumes_to_the_same_bytes(frozen_workdir, monkeypatch):
    from test_train import interrupt_in_epoch, train_outputs

    update_params(frozen_workdir / "params.yaml", {"train": {"epochs": 3}})
    train.main([])
    uninterrupted = train_outputs(frozen_workdir)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_in_epoch(patch, 2)
        train.main([])
    assert (frozen_workdir / train.resume_file_of(paths.MODEL_FILE)).exists()
    train.main([])
    assert train_outputs(frozen_workdir) == uninterrupted


LETTERS = [chr(ord("a") + i) for i in range(26)]


def write_letters(directory, train: int = 520, test: int = 130) -> None:
    """A 26-class MNIST-format dataset labelled 1 to 26, as EMNIST letters is: class k is a bar at row k."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for count in (train, test):
        labels = rng.permutation(np.arange(count) % 26)
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for k in range(26):
            images[labels == k, 1 + k, 4:-4] = 255
        arrays += [images, (labels + 1).astype(np.uint8)]
    names = [
        "emnist-letters-train-images-idx3-ubyte.gz",
        "emnist-letters-train-labels-idx1-ubyte.gz",
        "emnist-letters-test-images-idx3-ubyte.gz",
        "emnist-letters-test-labels-idx1-ubyte.gz",
    ]
    for name, array in zip(names, arrays, strict=True):
        write_idx(array, directory / name)


def describe(directory) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.describe_dataset", str(directory)],
        capture_output=True,
        text=True,
        env=STAGE_ENV,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["dataset"]


def test_describe_prints_the_dataset_section_with_hashes_and_detected_offset(tmp_path):
    write_letters(tmp_path / "letters")
    section = describe(tmp_path / "letters")
    assert list(section) == [*DATASET_FILES, "class_names", "label_offset"]
    assert section["label_offset"] == 1 and section["class_names"] == [str(k) for k in range(1, 27)]
    assert section["test_labels"]["file"] == "emnist-letters-test-labels-idx1-ubyte.gz"
    for key in DATASET_FILES:
        assert section[key]["sha256"] == content_sha256(tmp_path / "letters" / section[key]["file"])

    hashes = write_synthetic_mnist(tmp_path / "mnist")
    section = describe(tmp_path / "mnist")
    assert section["label_offset"] == 0 and section["class_names"] == [str(d) for d in range(10)]
    assert {section[key]["file"]: section[key]["sha256"] for key in DATASET_FILES} == hashes


def test_describe_names_what_is_wrong_with_a_directory(tmp_path):
    write_synthetic_mnist(tmp_path)
    (tmp_path / MNIST_FILES[3]).unlink()
    with pytest.raises(PipelineError, match=f"{tmp_path} lacks the test labels file"):
        describe_dataset.describe(tmp_path)


@pytest.mark.slow
def test_a_26_class_dataset_labelled_from_1_trains_end_to_end_with_its_class_names(workdir, monkeypatch):
    write_letters(workdir / "letters")
    section = {**describe(workdir / "letters"), "class_names": LETTERS}
    update_params(
        workdir / "params.yaml", {**TINY_PARAMS, "dataset": section, "download": {"mirrors": ["http://127.0.0.1:9/"]}}
    )
    monkeypatch.setenv("MNIST_PIPELINE_MIRRORS", str(workdir / "letters"))
    for stage in [download, preprocess, train, evaluate, export]:
        stage.main([])
    metrics = json.loads((workdir / "metrics/eval.json").read_text())
    per_class = (workdir / "metrics/per_class.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in per_class] == LETTERS
    assert metrics["accuracy"] > 1 / 26
    metadata = {p.key: p.value for p in onnx.load(workdir / "models/model.onnx").metadata_props}
    assert metadata["class_names"] == ",".join(LETTERS)
    assert {row.split(",")[0] for row in (workdir / "metrics/predictions.csv").read_text().splitlines()[1:]} <= set(
        LETTERS
    )


def test_a_label_outside_the_classes_is_an_error_naming_the_file(workdir):
    write_letters(workdir / "data/raw")
    section = describe(workdir / "data/raw")
    update_params(workdir / "params.yaml", {"dataset": {**section, "label_offset": 0, "class_names": LETTERS}})
    result = run_stage_cli("preprocess")
    assert_one_line_error(result, "data/raw/emnist-letters-train-labels-idx1-ubyte.gz has label 26; expected 0 to 25")
