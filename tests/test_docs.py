"""The README matches the code: every param documented with its real default, the `best` recipe as benchmarked."""

import re

import yaml

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def documented_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| (.+?) \|", README, flags=re.MULTILINE)
    return dict(rows)


def test_every_param_is_documented_with_its_default():
    documented = documented_defaults()
    for section, values in PARAMS.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            assert name in documented, f"{name} is missing from the README's params table"
            if not isinstance(value, (dict, list)) or all(isinstance(v, (int, float)) for v in value):
                shown = yaml.safe_load(documented[name].strip("`"))
                assert shown == value, f"README says {name} defaults to {shown!r}; params.yaml has {value!r}"
    params = {f"{section}.{key}" for section, values in PARAMS.items() for key in values}
    assert set(documented) <= params, f"README documents params that do not exist: {set(documented) - params}"


def recipe(pattern: str) -> dict:
    """The -S overrides of the README's `dvc exp run` line matching `pattern`, as {"section.key": value}."""
    line = re.search(pattern, README).group(0)
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in re.findall(r"-S (\S+)", line))}


def flattened(preset: dict) -> dict:
    return {f"{section}.{key}": value for section, values in preset.items() for key, value in values.items()}


def test_readme_recipes_are_the_ones_benchmarked():
    import benchmark

    assert recipe(r"dvc exp run -n best .+") == flattened(benchmark.BEST)
    assert recipe(r"dvc exp run -S train\.epochs=1 -S .+") == flattened(benchmark.FAST)
