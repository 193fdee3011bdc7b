"""The docs match the code: every param documented with its real default, the recipes as benchmarked, the commands
and modules they name exist, every relative link resolves, and the README stays short."""

import re
import tomllib
from pathlib import Path

import yaml
from conftest import REPO_ROOT

from mnist_pipeline.presets import flattened

DOCS = REPO_ROOT / "docs"
PARAMETERS_PAGE = DOCS / "parameters.md"
RECIPES_PAGE = DOCS / "performance.md"
README = REPO_ROOT / "README.md"
README_MAX_LINES = 250
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def documented_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+(?:\.[a-z_0-9]+)+)` \| (.+?) \|", PARAMETERS_PAGE.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_every_param_is_documented_with_its_default():
    documented = documented_defaults()
    params = flattened(PARAMS)
    for name, value in params.items():
        assert name in documented, f"{name} is missing from the params table of {PARAMETERS_PAGE.name}"
        if not isinstance(value, (dict, list)) or all(isinstance(v, (int, float)) for v in value):
            shown = yaml.safe_load(documented[name].strip("`"))
            assert shown == value, f"{PARAMETERS_PAGE.name}: {name} defaults to {shown!r}; params.yaml has {value!r}"
    assert set(documented) <= set(params), (
        f"{PARAMETERS_PAGE.name} documents unknown params: {set(documented) - set(params)}"
    )


def recipe(pattern: str) -> dict:
    """The -S overrides of the `dvc exp run` line matching `pattern` in the recipes page, as {"section.key": value}."""
    line = re.search(pattern, RECIPES_PAGE.read_text()).group(0)
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in re.findall(r"-S (\S+)", line))}


def test_documented_recipes_are_the_presets():
    from mnist_pipeline.presets import BEST, FAST, set_options

    assert recipe(r"dvc exp run -n best .+") == flattened(BEST)
    assert recipe(r"dvc exp run -S train\.epochs=1 -S .+") == flattened(FAST)
    assert " ".join(f"-S {option}" for option in set_options(BEST)) in RECIPES_PAGE.read_text(), (
        "as mnist-seeds queues it"
    )


def test_readme_is_short_and_names_the_test_command():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    assert "make test" in README.read_text()


def test_relative_links_resolve():
    """Every relative link and image of the README and docs/ names a file that exists, and a #fragment names one of
    that page's headings (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_commands_and_modules_named_in_the_docs_exist():
    """`python -m stages.<name>` names a stage of dvc.yaml, every mnist-* command is a console script of pyproject.toml,
    and every mnist_pipeline/ or stages/ module named is a file: the docs follow the code when it moves."""
    pipeline = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    stages = set(pipeline["stages"])
    scripts = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    other_names = set(pipeline["artifacts"])  # the model registry's names, spelled like commands
    wrong = []
    for page in pages():
        text = page.read_text()
        stage_commands = re.findall(r"python -m stages\.(\w+)", text)
        commands = re.findall(r"(?<![\w/#-])mnist-[a-z][a-z-]*[a-z]\b", text)
        modules = re.findall(r"\b(?:mnist_pipeline|stages|tests)/[\w/]+\.py\b", text)
        wrong += [f"{page.name}: python -m stages.{name}" for name in stage_commands if name not in stages]
        wrong += [
            f"{page.name}: {command}"
            for command in commands
            if command not in scripts | other_names and not command.startswith("mnist-pipeline")
        ]
        wrong += [f"{page.name}: {module}" for module in modules if not (REPO_ROOT / module).exists()]
    assert not wrong, "the docs name what does not exist:\n" + "\n".join(wrong)


def test_every_module_and_test_file_is_on_the_architecture_page():
    page = (REPO_ROOT / "docs/architecture.md").read_text()
    modules = [path.name for path in (REPO_ROOT / "mnist_pipeline").glob("*.py") if path.name != "__init__.py"]
    tests = [path.name for path in (REPO_ROOT / "tests").glob("*.py")] + ["gpu_check.sh"]
    assert [name for name in sorted(modules + tests) if f"`{name}`" not in page and f"/{name}`" not in page] == []
