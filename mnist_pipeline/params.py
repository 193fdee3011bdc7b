"""The params.yaml schema: every key, its type and allowed values, validated in one place before any work."""

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

from mnist_pipeline.errors import PipelineError, gist

PARAMS_FILE = Path("params.yaml")

# The four files of an MNIST-format dataset, by the key that names each one in the dataset section.
DATASET_FILES = ("train_images", "train_labels", "test_images", "test_labels")

# The model keys each architecture reads (mnist_pipeline/model.py has one builder per name); the others are
# validated all the same, and ignored.
MODEL_KEYS_BY_ARCH = {
    "cnn": ("conv_channels", "convs_per_block", "kernel_size", "batch_norm", "fc_units", "activation", "dropout"),
    "resnet18": ("pretrained", "freeze", "input_size"),
}
PRETRAINED_ARCHS = ("resnet18",)  # the architectures with published ImageNet weights that the pipeline can fetch


@dataclass(frozen=True)
class Rule:
    """What a value must be: a predicate and the words that tell a user what is allowed."""

    allowed: str
    check: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int, high: int | None = None) -> Rule:
    words = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return Rule(words, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    return Rule(
        f"a number in {left}{low}, {high}{right}",
        lambda v: _is_number(v)
        and (v > low if low_open else v >= low)
        and (v < high if high_open else v <= high),
    )


def choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(options), lambda v: v in options)


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def list_of(item: Rule, min_len: int, max_len: int) -> Rule:
    return Rule(
        f"a list of {min_len} to {max_len} items, each {item.allowed}",
        lambda v: isinstance(v, list) and min_len <= len(v) <= max_len and all(item.check(i) for i in v),
    )


def _is_mirror(value: Any) -> bool:
    """A directory, or a URL that urllib can fetch: caught here, a typo such as htp:// would only show mid-download."""
    if not isinstance(value, str) or value.strip() == "":
        return False
    if "://" not in value:
        return True
    try:
        url = urlsplit(value)
        url.port  # raises ValueError for a port that is not a number
    except ValueError:
        return False
    return url.scheme == "file" or (url.scheme in ("http", "https") and bool(url.hostname))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_file_name(value: Any) -> bool:
    """A plain file name: it is joined to mirror URLs and to data/raw/, so no directories and no URL syntax."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) is not None


def _is_dataset_file(value: Any) -> bool:
    return isinstance(value, dict) and sorted(value) == ["file", "sha256"] and _is_file_name(value["file"]) and _is_sha256(value["sha256"])


def _are_class_names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 2 <= len(value) <= 256
        and all(isinstance(name, str) and name.strip() and not re.search(r"[,\n]", name) for name in value)
        and len(set(value)) == len(value)
    )


DATASET_FILE = Rule("{file: a gzipped IDX file name, sha256: 64 lowercase hex digits of its decompressed content}", _is_dataset_file)
MIRRORS = Rule(
    "a non-empty list of http(s):// or file:// base URLs or directories",
    lambda v: isinstance(v, list) and v != [] and all(map(_is_mirror, v)),
)


def rule(r: Rule):
    """A dataclass field carrying its validation rule."""
    return field(metadata={"rule": r})


@dataclass(frozen=True)
class DatasetParams:
    train_images: dict = rule(DATASET_FILE)
    train_labels: dict = rule(DATASET_FILE)
    test_images: dict = rule(DATASET_FILE)
    test_labels: dict = rule(DATASET_FILE)
    class_names: list = rule(
        Rule("a list of 2 to 256 different non-empty strings without commas (label 0 + label_offset first)", _are_class_names)
    )
    label_offset: int = rule(integer(0, 255))

    def files(self) -> dict[str, str]:
        """{file name: SHA-256 of its decompressed content}, in the order of DATASET_FILES."""
        return {getattr(self, key)["file"]: getattr(self, key)["sha256"] for key in DATASET_FILES}


@dataclass(frozen=True)
class DownloadParams:
    mirrors: list = rule(MIRRORS)
    timeout: float = rule(number(0, 600, low_open=True))
    retries: int = rule(integer(0, 10))
    deadline: float = rule(number(0, 86400, low_open=True))
    max_megabytes: int = rule(integer(1, 100000))


@dataclass(frozen=True)
class PreprocessParams:
    val_size: int = rule(integer(1))
    seed: int = rule(integer(0))
    train_limit: int = rule(integer(0))


@dataclass(frozen=True)
class ModelParams:
    arch: str = rule(choice(*MODEL_KEYS_BY_ARCH))
    conv_channels: list = rule(list_of(integer(1, 1024), 1, 4))
    convs_per_block: int = rule(integer(1, 4))
    kernel_size: int = rule(Rule("an odd integer from 1 to 7", lambda v: _is_int(v) and v in (1, 3, 5, 7)))
    batch_norm: bool = rule(boolean())
    fc_units: int = rule(integer(1, 8192))
    activation: str = rule(choice("relu", "leaky_relu", "tanh", "sigmoid"))
    dropout: float = rule(number(0, 1, high_open=True))
    pretrained: str = rule(choice("none", "imagenet"))
    freeze: bool = rule(boolean())
    input_size: int = rule(integer(32, 512))


@dataclass(frozen=True)
class WeightsParams:
    file: str = rule(Rule("a file name such as resnet18-f37072fd.pth", _is_file_name))
    sha256: str = rule(Rule("64 lowercase hex digits: the SHA-256 of the file's bytes", _is_sha256))
    mirrors: list = rule(MIRRORS)


@dataclass(frozen=True)
class TrainParams:
    device: str = rule(choice("auto", "cpu", "cuda"))
    mixed_precision: str = rule(choice("auto", "always", "never"))  # not on/off: YAML reads those as booleans
    threads: int = rule(integer(0, 1024))
    processes: int | str = rule(Rule("an integer from 1 to 1024, or auto", lambda v: v == "auto" or (_is_int(v) and 1 <= v <= 1024)))
    compile: bool = rule(boolean())
    seed: int = rule(integer(0))
    epochs: int = rule(integer(1, 1000))
    batch_size: int = rule(integer(1, 65536))
    optimizer: str = rule(choice("adam", "adamw", "sgd"))
    lr: float = rule(number(0, 10, low_open=True))
    betas: list = rule(list_of(number(0, 1, high_open=True), 2, 2))
    momentum: float = rule(number(0, 1, high_open=True))
    weight_decay: float = rule(number(0, 1))
    lr_schedule: str = rule(choice("onecycle", "cosine", "constant"))
    warmup_fraction: float = rule(number(0, 1, low_open=True, high_open=True))
    label_smoothing: float = rule(number(0, 1, high_open=True))
    shift_pixels: int = rule(integer(0, 8))
    rotate_degrees: float = rule(number(0, 30))
    zoom_percent: float = rule(number(0, 30))


@dataclass(frozen=True)
class EvaluateParams:
    device: str = rule(choice("auto", "cpu", "cuda"))
    batch_size: int = rule(integer(1, 65536))
    gallery_size: int = rule(integer(0, 1000))


@dataclass(frozen=True)
class ExportParams:
    opset: int = rule(integer(18, 23))
    tolerance: float = rule(number(0, 1, low_open=True))
    int8_max_accuracy_drop: float = rule(number(0, 1))
    calibration_images: int = rule(integer(1, 100000))
    seed: int = rule(integer(0))


@dataclass(frozen=True)
class Params:
    dataset: DatasetParams
    download: DownloadParams
    preprocess: PreprocessParams
    model: ModelParams
    weights: WeightsParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams


def _closest(word: str, names: list[str], spelling: bool = True) -> str | None:
    """The name a typo most likely meant: the same name in other case, a similar spelling (optimiser → optimizer),
    the initials of a spelled-out name (learning_rate → lr), or the one name it extends or begins
    (dropout_rate → dropout, shift → shift_pixels); None when nothing is that close."""
    word = word.lower()
    if word in names:
        return word
    similar = difflib.get_close_matches(word, names, n=1, cutoff=0.6) if spelling else []
    if similar:
        return similar[0]
    initials = "".join(part[0] for part in re.split(r"[\W_]+", word) if part)
    if len(initials) > 1 and initials in names:
        return initials
    related = [name for name in names if name.startswith(word + "_") or word.startswith(name + "_")]
    return related[0] if len(related) == 1 else None


def _keys_by_section() -> dict[str, list[str]]:
    return {s.name: [f.name for f in dataclasses.fields(s.type)] for s in dataclasses.fields(Params)}


def _did_you_mean(section: str, key: str) -> str:
    """' (did you mean section.key?)' for an unknown key, or '': the key as another section has it
    (train.val_size → preprocess.val_size), a close key of its own section, or a related key of another.
    Other sections get no spelling matches: across sections those suggest unrelated keys."""
    keys = _keys_by_section()
    others = [name for name in keys if name != section]
    guesses = [(name, key.lower()) for name in [section] + others if key.lower() in keys[name]]
    guesses += [(section, _closest(key, keys[section]))]
    guesses += [(name, _closest(key, keys[name], spelling=False)) for name in others]
    for name, guess in guesses:
        if guess:
            return f" (did you mean {name}.{guess}?)"
    return ""


def _section(cls: type, name: str, raw: Any, source: Path):
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: section '{name}' must be a mapping of keys to values, got {raw!r}")
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted((str(key), key) for key in raw if key not in known)  # str: YAML keys can be numbers or booleans
    if unknown:
        word, key = unknown[0]
        raise PipelineError(
            f"{source}: unknown key {name}.{word} = {raw[key]!r}{_did_you_mean(name, word)}; "
            f"the keys of '{name}' are: {', '.join(known)}"
        )
    values = {}
    for f in fields:
        key = f"{name}.{f.name}"
        if f.name not in raw:
            raise PipelineError(f"{source}: missing key {key} (expected {f.metadata['rule'].allowed})")
        value = raw[f.name]
        r: Rule = f.metadata["rule"]
        if not r.check(value):
            raise PipelineError(f"{source}: {key} = {value!r} is not allowed; expected {r.allowed}")
        values[f.name] = value
    return cls(**values)


def _check_model(model: ModelParams, source: Path) -> None:
    """The combinations of model keys that make no network: each names the keys at odds and a way out."""
    if model.pretrained != "none" and model.arch not in PRETRAINED_ARCHS:
        raise PipelineError(
            f"{source}: model.pretrained = {model.pretrained!r} is not allowed with model.arch = {model.arch!r}: "
            f"pretrained weights exist for {', '.join(PRETRAINED_ARCHS)} only; expected none"
        )
    if model.freeze and model.pretrained == "none":
        raise PipelineError(
            f"{source}: model.freeze = true is not allowed with model.pretrained = 'none': a frozen backbone that "
            f"was never trained stays random, and only the last layer would learn; set model.pretrained: imagenet, "
            f"or model.freeze: false"
        )


def _check_cuda(params: "Params", source: Path) -> None:
    """A device of 'cuda' must exist on this machine, or the first stage fails instead of the train stage."""
    devices = {"train.device": params.train.device, "evaluate.device": params.evaluate.device}
    wanted = [key for key, value in devices.items() if value == "cuda"]
    if not wanted:
        return
    import torch  # here, not at the top: the download stage need not import PyTorch when no one asks for CUDA

    if not torch.cuda.is_available():
        raise PipelineError(
            f"{source}: {wanted[0]} = 'cuda' is not allowed: PyTorch sees no CUDA device on this machine; "
            f"expected auto or cpu"
        )


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate the whole params file, so a mistake anywhere stops the first stage that runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stages from the repository root") from None
    except yaml.YAMLError as error:  # its own text spans several lines: keep where and what
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PipelineError(f"{path} is not valid YAML: {where}{problem or gist(error)}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must be a mapping of sections, got {raw!r}")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    unknown = sorted(str(name) for name in raw if name not in sections)
    if unknown:
        guess = _closest(unknown[0], list(sections))
        hint = f" (did you mean '{guess}'?)" if guess else ""
        raise PipelineError(f"{path}: unknown section '{unknown[0]}'{hint}; the sections are: {', '.join(sections)}")
    missing = [name for name in sections if name not in raw]
    if missing:
        raise PipelineError(f"{path}: missing section '{missing[0]}'")
    params = Params(**{name: _section(cls, name, raw[name], path) for name, cls in sections.items()})
    if len(params.dataset.files()) < len(DATASET_FILES):
        names = [getattr(params.dataset, key)["file"] for key in DATASET_FILES]
        raise PipelineError(f"{path}: dataset names a file twice ({', '.join(names)}); expected four different files")
    _check_model(params.model, path)
    _check_cuda(params, path)
    return params
