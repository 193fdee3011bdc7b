"""The committed offline page template of `dvc plots`: configured in .dvc/config, and current with the pinned Vega."""

import configparser

import pytest
from conftest import REPO_ROOT

from mnist_pipeline import offline_plots


def test_dvc_config_points_plots_at_the_offline_template():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc/config")
    # DVC reads a relative plots.html_template from the .dvc directory.
    assert REPO_ROOT / ".dvc" / config["plots"]["html_template"] == REPO_ROOT / offline_plots.TEMPLATE_FILE


def test_committed_template_is_what_the_pinned_vl_convert_generates():
    pytest.importorskip("vl_convert")
    committed = (REPO_ROOT / offline_plots.TEMPLATE_FILE).read_text()
    assert committed == offline_plots.offline_template(), "stale: run `make plots-template` and commit the result"
    assert "{plot_divs}" in committed and "{scripts}" not in committed, "DVC would add its CDN scripts for {scripts}"
    assert "https://" not in committed.split("<script>", 1)[0], (
        "nothing before the inline bundle loads from the network"
    )


def test_plots_do_not_mislead():
    """Per-class scores are points on a labelled range (bars would have to start at zero); both confusion matrices
    put the true class on the rows; the curves are by epoch, training and validation told apart by colour."""
    import json

    import yaml

    plots = {
        name: spec
        for plot in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["plots"]
        if isinstance(plot, dict)
        for name, spec in plot.items()
    }
    confusions = [spec for name, spec in plots.items() if name.startswith("Confusion matrix")]
    assert len(confusions) == 2
    assert all(
        (spec["x"], spec["y"], spec["x_label"], spec["y_label"])
        == ("predicted", {"metrics/predictions.csv": "actual"}, "predicted class", "true class")
        for spec in confusions
    )

    per_class = json.loads((REPO_ROOT / ".dvc/plots/per_class_points.json").read_text())["spec"]
    x = per_class["encoding"]["x"]
    assert per_class["mark"]["type"] == "point" and "not from 0" in x["title"], "points, on a range the axis names"

    curves = [spec for name, spec in plots.items() if name.endswith("per epoch")]
    assert len(curves) == 2 and all(
        spec["template"] == "curves_by_epoch" and spec["x_label"] == "epoch" for spec in curves
    )
    template = json.loads((REPO_ROOT / ".dvc/plots/curves_by_epoch.json").read_text())
    assert template["mark"]["point"], "a single epoch still draws a point per curve"
    assert template["encoding"]["color"]["field"] == "split" and "'validation'" in template["transform"][0]["calculate"]
