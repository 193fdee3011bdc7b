"""The params.yaml schema: every key, its type and allowed values, as pydantic models validated before any work."""

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator

from mnist_pipeline.errors import PipelineError, gist
from mnist_pipeline.params_messages import describe_problem, rank

PARAMS_FILE = Path("params.yaml")

# The four files of an MNIST-format dataset, by the key that names each one in the dataset section.
DATASET_FILES = ("train_images", "train_labels", "test_images", "test_labels")


def _as_written(value: Any, validate) -> Any:
    """Check a number against its float schema but keep it as the YAML wrote it: 0 stays the int 0, since
    models/model.pt records model.cnn.dropout and its bytes must not change with pydantic's float conversion."""
    validate(value)
    return value


def number(**bounds: float) -> Any:
    """A YAML int or float within `bounds` (pydantic's gt, ge, lt, le)."""
    return Annotated[float, Field(**bounds), WrapValidator(_as_written)]


def _mirror(value: str) -> str:
    """A directory, or a URL that urllib can fetch: caught here, a typo such as htp:// would only show mid-download."""
    if value.strip() == "":
        raise ValueError("empty")
    if "://" in value:
        url = urlsplit(value)
        _ = url.port  # raises ValueError for a port that is not a number
        if not (url.scheme == "file" or (url.scheme in ("http", "https") and url.hostname)):
            raise ValueError("not an http(s):// or file:// URL")
    return value


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("even")
    return value


def _different(names: list[str]) -> list[str]:
    if len(set(names)) < len(names):
        raise ValueError("a name is repeated")
    return names


# A plain file name: it is joined to mirror URLs and to data/raw/, so no directories and no URL syntax.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Mirrors = Annotated[
    list[Annotated[str, AfterValidator(_mirror)]],
    Field(min_length=1, description="a non-empty list of http(s):// or file:// base URLs or directories"),
]
Device = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    """A section of params.yaml: every key required, no other key, values of exactly their type (no "0.01" for a
    number, no true for an integer), read-only once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DatasetFile(Section):
    file: FileName
    sha256: Sha256


DatasetFileEntry = Annotated[
    DatasetFile,
    Field(description="{file: a gzipped IDX file name, sha256: 64 lowercase hex digits of its decompressed content}"),
]


class DatasetParams(Section):
    train_images: DatasetFileEntry
    train_labels: DatasetFileEntry
    test_images: DatasetFileEntry
    test_labels: DatasetFileEntry
    class_names: Annotated[
        list[Annotated[str, Field(pattern=r"^[^,\n]*[^,\s][^,\n]*$")]],  # not blank, no commas or newlines: CSV cells
        Field(
            min_length=2,
            max_length=256,
            description="a list of 2 to 256 different non-empty strings without commas (label 0 + label_offset first)",
        ),
        AfterValidator(_different),
    ]
    label_offset: Annotated[int, Field(ge=0, le=255)]

    def files(self) -> dict[str, str]:
        """{file name: SHA-256 of its decompressed content}, in the order of DATASET_FILES."""
        return {getattr(self, key).file: getattr(self, key).sha256 for key in DATASET_FILES}

    @model_validator(mode="after")
    def _four_different_files(self):
        if len(self.files()) < len(DATASET_FILES):
            names = ", ".join(getattr(self, key).file for key in DATASET_FILES)
            raise ValueError(f"dataset names a file twice ({names}); expected four different files")
        return self


class DownloadParams(Section):
    mirrors: Mirrors
    timeout: number(gt=0, le=600)
    retries: Annotated[int, Field(ge=0, le=10)]
    deadline: number(gt=0, le=86400)
    max_megabytes: Annotated[int, Field(ge=1, le=100000)]


class PreprocessParams(Section):
    val_size: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0)]
    train_limit: Annotated[int, Field(ge=0)]


class CnnParams(Section):
    """model.cnn: the classic small CNN of mnist_pipeline/model.py."""

    conv_channels: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=4)]
    convs_per_block: Annotated[int, Field(ge=1, le=4)]
    kernel_size: Annotated[int, Field(ge=1, le=7, description="an odd integer from 1 to 7"), AfterValidator(_odd)]
    batch_norm: bool
    fc_units: Annotated[int, Field(ge=1, le=8192)]
    activation: Literal["relu", "leaky_relu", "tanh", "sigmoid"]
    dropout: number(ge=0, lt=1)


class Resnet18Params(Section):
    """model.resnet18: torchvision's ResNet-18, from scratch or from ImageNet weights."""

    pretrained: Literal["none", "imagenet"]
    freeze: bool
    input_size: Annotated[int, Field(ge=32, le=512)]

    @model_validator(mode="after")
    def _trains_something(self):
        if self.freeze and self.pretrained == "none":
            raise ValueError(
                "model.resnet18.freeze = true is not allowed with model.resnet18.pretrained = 'none': "
                "a frozen backbone that was never trained stays random, and only the last layer would learn; "
                "set model.resnet18.pretrained: imagenet, or model.resnet18.freeze: false"
            )
        return self


class ModelParams(Section):
    """One group of keys per architecture; model.arch picks the one that builds the network, and the train stage
    depends on that group only (dvc.yaml: model.${model.arch}), so the other's keys change nothing."""

    arch: Literal["cnn", "resnet18"]
    cnn: Annotated[CnnParams, Field(description="a mapping of the CNN's keys")]
    resnet18: Annotated[Resnet18Params, Field(description="a mapping of ResNet-18's keys")]

    @property
    def chosen(self) -> CnnParams | Resnet18Params:
        """The group of the architecture model.arch names."""
        return getattr(self, self.arch)

    @property
    def pretrained(self) -> str:
        """The pretrained weights the chosen architecture starts from: none, or imagenet."""
        return self.resnet18.pretrained if self.arch == "resnet18" else "none"


class WeightsParams(Section):
    file: Annotated[FileName, Field(description="a file name such as resnet18-f37072fd.pth")]
    sha256: Annotated[Sha256, Field(description="64 lowercase hex digits: the SHA-256 of the file's bytes")]
    mirrors: Mirrors


class TrainParams(Section):
    device: Device
    mixed_precision: Literal["auto", "native", "always", "never"]  # not on/off: YAML reads those as booleans
    threads: Annotated[int, Field(ge=0, le=1024)]
    processes: Annotated[
        Annotated[int, Field(ge=1)] | Literal["auto"],
        Field(description="an integer >= 1, or auto (one per visible GPU)"),
    ]
    compile: bool
    cuda_graphs: bool
    seed: Annotated[int, Field(ge=0)]
    epochs: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=65536)]
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: number(gt=0, le=10)
    betas: Annotated[list[number(ge=0, lt=1)], Field(min_length=2, max_length=2)]
    momentum: number(ge=0, lt=1)
    weight_decay: number(ge=0, le=1)
    lr_schedule: Literal["onecycle", "cosine", "constant"]
    warmup_fraction: number(gt=0, lt=1)
    label_smoothing: number(ge=0, lt=1)
    ema_decay: number(ge=0, lt=1)
    keep: Literal["best", "last"]
    shift_pixels: Annotated[int, Field(ge=0, le=8)]
    rotate_degrees: number(ge=0, le=30)
    zoom_percent: number(ge=0, le=30)
    elastic_pixels: number(ge=0, le=4)
    elastic_sigma: number(ge=1, le=10)


class EvaluateParams(Section):
    device: Device
    batch_size: Annotated[int, Field(ge=1, le=65536)]
    gallery_size: Annotated[int, Field(ge=0, le=1000)]


class ExportParams(Section):
    opset: Annotated[int, Field(ge=18, le=23)]
    tolerance: number(gt=0, le=1)
    int8_max_accuracy_drop: number(ge=0, le=1)
    calibration_images: Annotated[int, Field(ge=1, le=100000)]
    seed: Annotated[int, Field(ge=0)]


class Params(Section):
    dataset: DatasetParams
    download: DownloadParams
    preprocess: PreprocessParams
    model: ModelParams
    weights: WeightsParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Params.model_fields.items()}
# The sections and the groups inside one (model's, one per architecture) by dotted name, as the messages name them.
GROUPS = {
    **SECTIONS,
    **{f"model.{name}": field.annotation for name, field in ModelParams.model_fields.items() if name != "arch"},
}


def _check_cuda(params: Params, source: Path) -> None:
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


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats, as DVC (ruamel.yaml) reads params.yaml for `dvc params diff` and
    `-S`: `1e-3` is a number, where YAML 1.1, PyYAML's, wants a dot (`1.0e-3`) and reads it as a string."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate the whole params file, so a mistake anywhere stops the first stage that runs."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stages from the repository root") from None
    except yaml.YAMLError as error:  # its own text spans several lines: keep where and what
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PipelineError(f"{path} is not valid YAML: {where}{problem or gist(error)}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must be a mapping of sections, got {raw!r}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as invalid:
        problem = min(invalid.errors(), key=functools.partial(rank, GROUPS))
        raise PipelineError(f"{path}: {describe_problem(GROUPS, problem, raw)}") from None
    _check_cuda(params, path)
    return params
