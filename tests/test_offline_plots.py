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
    assert "https://" not in committed.split("<script>", 1)[0], "nothing before the inline bundle loads from the network"
