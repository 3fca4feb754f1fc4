"""The offline plots page is a checkout's own setting: the committed config names no file that only
setup writes, and setup's step names it in .dvc/config.local."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_config_names_no_template_and_setup_names_it_locally(tmp_path):
    committed = configparser.ConfigParser()
    committed.read(ROOT / ".dvc" / "config")
    assert not committed.has_option("plots", "html_template")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    from flows.plots import configure

    dest = configure(tmp_path)
    local = configparser.ConfigParser()
    local.read(tmp_path / ".dvc" / "config.local")
    assert local.get("plots", "html_template") == dest.name == "plots-offline.html"
    assert "{plot_divs}" in dest.read_text() and dest.parent == tmp_path / ".dvc"
