"""params.yaml validation: the shipped file is valid; a wrong value names the key, the value and what is allowed."""

import pytest
import torch
import yaml
from conftest import REPO_ROOT, run_stage_cli, update_params

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import GROUPS, load_params
from mnist_pipeline.params_messages import allowed_for
from stages import evaluate, train


def test_shipped_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.model.cnn.conv_channels == [16, 32] and params.model.cnn.fc_units == 128


def write_params(path, section, key, value):
    (path).write_text((REPO_ROOT / "params.yaml").read_text())
    update_params(path, {section: {key: value}})
    return path


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("train", "lr", -0.1, "a number in (0, 10]"),
        ("train", "lr", 0, "a number in (0, 10]"),
        ("train", "lr", "0.01", "a number in (0, 10]"),
        ("train", "batch_size", 0, "an integer from 1 to 65536"),
        ("evaluate", "device", "gpu", "one of auto, cpu, cuda"),
        ("train", "epochs", 2.5, "an integer from 1 to 1000"),
        ("train", "optimizer", "adagrad", "one of adam, adamw, sgd"),
        ("train", "device", "tpu", "one of auto, cpu, cuda"),
        ("model.cnn", "activation", "gelu", "one of relu, leaky_relu, tanh, sigmoid"),
        ("model.cnn", "conv_channels", [16, 0], "a list of 1 to 4 items"),
        ("model.cnn", "dropout", 1.0, "a number in [0, 1)"),
        ("model.cnn", "dropout", -0.1, "a number in [0, 1)"),
        ("model.cnn", "batch_norm", "yes", "true or false"),
        ("preprocess", "val_size", 0, "an integer >= 1"),
        ("download", "mirrors", [], "a non-empty list"),
        ("download", "mirrors", ["htp://example.org/mnist/"], "http(s):// or file:// base URLs or directories"),
        ("download", "mirrors", ["http://127.0.0.1:port/"], "http(s):// or file:// base URLs or directories"),
        ("export", "opset", 13, "an integer from 18 to 23"),
        ("download", "deadline", 0, "a number in (0, 86400]"),
        ("download", "max_megabytes", 0.5, "an integer from 1 to 100000"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, section, key, value, allowed):
    path = write_params(tmp_path / "params.yaml", section, key, value)
    with pytest.raises(PipelineError) as raised:
        load_params(path)
    message = str(raised.value)
    assert f"{section}.{key} = {value!r}" in message and allowed in message


def test_true_is_not_accepted_as_an_integer(tmp_path):
    with pytest.raises(PipelineError, match="train.epochs = True"):
        load_params(write_params(tmp_path / "params.yaml", "train", "epochs", True))


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("train", "learning_rat", "train.lr"),  # the initials of a spelled-out name
        ("train", "optimiser", "train.optimizer"),  # a close spelling
        ("train", "batchsize", "train.batch_size"),
        ("train", "dropout", "model.cnn.dropout"),  # a key of another section
        ("model", "dropout", "model.cnn.dropout"),  # a key of the old flat model section: now in a group
        ("train", "val_size", "preprocess.val_size"),
        ("model.cnn", "dropout_rate", "model.cnn.dropout"),  # a key with a suffix
        ("train", "shift", "train.shift_pixels"),  # a key cut short
    ],
)
def test_unknown_key_suggests_the_closest_valid_key(tmp_path, section, key, suggestion):
    with pytest.raises(PipelineError) as raised:
        load_params(write_params(tmp_path / "params.yaml", section, key, 0.1))
    assert str(raised.value).startswith(
        f"{tmp_path / 'params.yaml'}: unknown key {section}.{key} = 0.1 (did you mean {suggestion}?); "
        f"the keys of '{section}' are: "
    )


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown key train.colour = 'red'; the keys of 'train' are: device, "):
        load_params(write_params(tmp_path / "params.yaml", "train", "colour", "red"))


def test_non_string_keys_are_reported_not_crashed_on(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text() + "  7: x\n  true: y\n")
    with pytest.raises(PipelineError, match=r"unknown key export.7 = 'x'; the keys of 'export' are"):
        load_params(tmp_path / "params.yaml")


def test_unknown_section_suggests_the_closest(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["trian"] = params.pop("train")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(
        PipelineError, match=r"unknown section 'trian' \(did you mean 'train'\?\); the sections are: dataset, download,"
    ):
        load_params(tmp_path / "params.yaml")


def test_missing_key_is_named_with_what_is_expected(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    del params["model"]["cnn"]["dropout"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=r"missing key model.cnn.dropout \(expected a number in \[0, 1\)\)"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("section", ["train", "evaluate"])
def test_cuda_without_a_cuda_device_is_refused_before_any_work(tmp_path, monkeypatch, section):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_params(tmp_path / "params.yaml", section, "device", "cuda")
    with pytest.raises(PipelineError) as raised:
        load_params(path)
    assert str(raised.value) == (
        f"{path}: {section}.device = 'cuda' is not allowed: PyTorch sees no CUDA device on this machine; "
        f"expected auto or cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert getattr(load_params(path), section).device == "cuda"


def test_unparseable_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(PipelineError) as raised:
        load_params(tmp_path / "params.yaml")
    assert str(raised.value) == (
        f"{tmp_path / 'params.yaml'} is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"
    )


def test_stage_reports_a_bad_param_in_one_line_without_traceback(workdir):
    write_params(workdir / "params.yaml", "train", "lr", "fast")
    result = run_stage_cli("download")
    assert result.returncode == 1
    assert result.stderr == "error: params.yaml: train.lr = 'fast' is not allowed; expected a number in (0, 10]\n"
    assert not (workdir / "data").exists(), "nothing may be written before the params are valid"


@pytest.mark.parametrize("stage, main", [("train", train.main), ("evaluate", evaluate.main)])
def test_stage_asked_for_missing_cuda_stops_before_any_work(workdir, monkeypatch, stage, main):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    update_params(workdir / "params.yaml", {stage: {"device": "cuda"}})
    before = sorted(workdir.rglob("*"))
    with pytest.raises(PipelineError, match=f"{stage}.device = 'cuda' is not allowed: PyTorch sees no CUDA device"):
        main([])
    assert sorted(workdir.rglob("*")) == before, "nothing written, not even the training logs"


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True, None])
def test_processes_is_a_positive_integer_or_auto(tmp_path, value):
    with pytest.raises(PipelineError) as raised:
        load_params(write_params(tmp_path / "params.yaml", "train", "processes", value))
    assert str(raised.value) == (
        f"{tmp_path / 'params.yaml'}: train.processes = {value!r} is not allowed; "
        f"expected an integer >= 1, or auto (one per visible GPU)"
    )


@pytest.mark.parametrize("value", [1, 4, "auto"])
def test_processes_accepts_counts_and_auto(tmp_path, value):
    assert load_params(write_params(tmp_path / "params.yaml", "train", "processes", value)).train.processes == value


def test_every_key_says_what_it_allows():
    for _section, model in GROUPS.items():
        for key in model.model_fields:
            assert allowed_for(model, key).startswith(("a ", "an ", "one of ", "true or false", "64 ", "{file: "))


def test_numbers_keep_the_type_yaml_gave_them(tmp_path):
    """models/model.pt records model.cnn.dropout: a dropout of 0 must stay the int it was written as, not become 0.0."""
    path = write_params(tmp_path / "params.yaml", "model.cnn", "dropout", 0)
    update_params(path, {"train": {"lr": 1, "weight_decay": 0.0}})
    params = load_params(path)
    assert [
        (value, type(value)) for value in (params.model.cnn.dropout, params.train.lr, params.train.weight_decay)
    ] == [(0, int), (1, int), (0.0, float)]


@pytest.mark.parametrize(
    "written, number", [("1e-3", 0.001), ("5E-4", 0.0005), ("+2e-1", 0.2), ("1.5e-3", 0.0015), (".5e1", 5.0)]
)
def test_a_number_in_exponent_notation_is_a_number_as_dvc_reads_it(tmp_path, written, number):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 (DVC's ruamel.yaml, and `dvc exp run -S`) as a float."""
    path = write_params(tmp_path / "params.yaml", "train", "lr", 0.25)
    path.write_text(path.read_text().replace("lr: 0.25", f"lr: {written}"))
    assert load_params(path).train.lr == number
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}, "what PyYAML alone reads"


@pytest.mark.parametrize("sha256", ["0" * 63 + "\n", "A" * 64, "0" * 65])
def test_a_dataset_hash_is_exactly_64_lowercase_hex_digits(tmp_path, sha256):
    path = write_params(tmp_path / "params.yaml", "dataset", "train_labels", {"file": "labels.gz", "sha256": sha256})
    with pytest.raises(
        PipelineError,
        match=r"dataset.train_labels = \{'file': 'labels.gz', 'sha256': .* is not allowed; expected \{file: ",
    ):
        load_params(path)


def test_the_first_problem_in_file_order_is_reported(tmp_path):
    """Section by section, and in a section its keys in order; the rules across keys only once every key is valid."""
    path = write_params(tmp_path / "params.yaml", "export", "opset", 1)
    update_params(path, {"model.resnet18": {"freeze": True}, "train": {"lr": 0, "epochs": 0}})
    with pytest.raises(PipelineError, match=r"train.epochs = 0 is not allowed"):
        load_params(path)


@pytest.mark.parametrize(
    "override, changed", [("train.epochs=3", ["  epochs: 3"]), ("model.cnn.conv_channels=[32,64]", ["    - 64"])]
)
def test_dvc_exp_run_s_rewrites_only_the_lines_of_the_value_it_sets(tmp_path, override, changed):
    """`dvc exp run -S` loads params.yaml, applies the override and writes the whole file back with its own YAML
    style (dvc.utils.hydra.apply_overrides, the code it runs); written in that style, the file changes where the
    value does only, so that `git diff` shows the experiment's change and nothing else."""
    import difflib

    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    original = (REPO_ROOT / "params.yaml").read_text()
    path.write_text(original)
    apply_overrides(path, [override])
    added = [
        line[1:]
        for line in difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), lineterm="", n=0)
        if line.startswith("+") and not line.startswith("+++")
    ]
    assert [line.split("#")[0].rstrip() for line in added] == changed, "\n".join(added)
