"""params.yaml validation: the shipped file is valid; a wrong value names the key, the value and what is allowed."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT, update_params
from stages.errors import PipelineError
from stages.params import load_params


def test_shipped_params_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.model.conv_channels == [16, 32] and params.model.fc_units == 128


def write_params(path, section, key, value):
    (path).write_text((REPO_ROOT / "params.yaml").read_text())
    update_params(path, {section: {key: value}})
    return path


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("train", "lr", -0.1, "a number in (0, 10]"),
        ("train", "epochs", 2.5, "an integer from 1 to 1000"),
        ("train", "optimizer", "adagrad", "one of adam, adamw, sgd"),
        ("train", "device", "tpu", "one of auto, cpu, cuda"),
        ("model", "activation", "gelu", "one of relu, leaky_relu, tanh, sigmoid"),
        ("model", "conv_channels", [16, 0], "a list of 1 to 4 items"),
        ("model", "dropout", 1.0, "a number in [0, 1)"),
        ("model", "batch_norm", "yes", "true or false"),
        ("preprocess", "val_size", 0, "an integer >= 1"),
        ("download", "mirrors", [], "a non-empty list"),
        ("export", "opset", 13, "an integer from 18 to 23"),
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


def test_unknown_and_missing_keys_are_named(tmp_path):
    with pytest.raises(PipelineError, match="unknown key train.learning_rate; the keys of 'train' are: device"):
        load_params(write_params(tmp_path / "params.yaml", "train", "learning_rate", 0.1))
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    del params["model"]["dropout"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="missing key model.dropout"):
        load_params(tmp_path / "params.yaml")


def test_unparseable_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_reports_a_bad_param_in_one_line_without_traceback(workdir):
    write_params(workdir / "params.yaml", "train", "lr", "fast")
    result = subprocess.run(
        [sys.executable, "-m", "stages.download"], capture_output=True, text=True, cwd=workdir,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr == "error: params.yaml: train.lr = 'fast' is not allowed; expected a number in (0, 10]\n"
    assert not (workdir / "data").exists(), "nothing may be written before the params are valid"
