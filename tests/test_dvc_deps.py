"""dvc.yaml's code deps are exact: each stage depends on precisely the project modules its command imports, directly
or through other modules, so that `dvc status` sees every code change that can change an output, and no other."""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

PACKAGES = ("stages", "mnist_pipeline")


def module_file(name: str) -> Path | None:
    """The repository file of a dotted module name of ours, or None for anything else (the standard library, torch)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO_ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every module an import in `path` names, at any depth of the file (imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    return names


def import_closure(module: str) -> set[str]:
    """The repository files a module loads, itself included, as paths relative to the repository root.

    A package's __init__.py runs before any of its modules, so it is part of the closure too."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is None or not path.is_file() or path in seen:
                continue
            seen.add(path)
            pending.extend(imported_modules(path))
    return {path.relative_to(REPO_ROOT).as_posix() for path in seen}


def stage_module(command: str) -> str:
    words = command.split()
    assert words[:2] == ["python", "-m"] and len(words) >= 3, f"a stage runs as `python -m stages.NAME`: {command}"
    return words[2]


def command_paths(command: str) -> dict[str, str]:
    """The `--option path` pairs after `python -m stages.NAME`."""
    words = command.split()[3:]
    assert len(words) % 2 == 0 and all(word.startswith("--") for word in words[::2]), command
    return dict(zip(words[::2], words[1::2], strict=True))


def declared_outputs(stage: dict) -> set[str]:
    """Every path under the stage's outs, metrics and plots, each an entry or the key of one with options."""
    entries = [entry for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_depends_on_exactly_the_code_it_imports(name):
    stage = STAGES[name]
    declared = {dep for dep in stage["deps"] if dep.endswith(".py")}
    needed = import_closure(stage_module(stage["cmd"]))
    assert declared == needed, f"{name}: missing {sorted(needed - declared)}, not imported {sorted(declared - needed)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_command_names_every_data_file_it_reads_and_writes(name):
    """dvc.yaml's commands show the data flow: each names its data deps and its outputs, and nothing else."""
    stage = STAGES[name]
    data = {dep for dep in stage["deps"] if not dep.endswith(".py")} | declared_outputs(stage)
    assert sorted(command_paths(stage["cmd"]).values()) == sorted(data)


def test_the_closure_follows_imports_inside_functions_and_packages():
    """The checker itself: the train stage reaches the params schema only through other modules."""
    closure = import_closure("stages.train")
    assert {"stages/__init__.py", "mnist_pipeline/__init__.py", "mnist_pipeline/params.py"} <= closure
    assert "mnist_pipeline/predict.py" not in import_closure("stages.export"), "no stage imports a command"
