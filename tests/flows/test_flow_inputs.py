"""What a flow run, a stage or texq track accepts before it writes anything: its folder inside the
worker's workspace root, its params file in the checkout, and the checkout it works in being the
one its code comes from (flows.workspace, flows.checkout). No server needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import ROOT
from texq.util.errors import TexqError


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXQ_WORKSPACES", str(tmp_path / "ws"))
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.mark.parametrize("out", [".", "..", "/etc", "runs", "params.yaml", "~", "", "a\0b"])
def test_a_flow_run_s_folder_outside_the_workspace_root_is_refused_naming_it(root, out):
    from flows.workspace import workspace_path

    with pytest.raises(TexqError, match=r"^out=") as err:
        workspace_path(out)
    assert len(str(err.value).splitlines()) == 1


def test_a_flow_run_s_folder_inside_the_root_is_taken_and_a_link_out_of_it_is_not(root, tmp_path, monkeypatch):
    from flows.workspace import params_path, workspace_path

    assert workspace_path(str(root / "grid" / "a")) == (root / "grid" / "a").resolve()
    (root / "escape").symlink_to(tmp_path)  # a link inside the root to a folder outside it
    with pytest.raises(TexqError, match="escape.*not inside"):
        workspace_path(str(root / "escape" / "x"))
    with pytest.raises(TexqError, match=r"^out=.*not inside .*ws"):
        workspace_path(str(root))  # the root itself is no run's folder
    monkeypatch.delenv("TEXQ_WORKSPACES")  # the default: runs/ of the checkout, paths relative to it
    assert workspace_path("runs/pipeline") == (ROOT / "runs" / "pipeline").resolve()
    assert params_path("params.yaml") == (ROOT / "params.yaml").resolve()
    with pytest.raises(TexqError, match=r"^base_params='/etc/passwd': resolves to /etc/passwd, not inside"):
        params_path("/etc/passwd")


def _other_checkout(tmp_path: Path) -> Path:
    other = tmp_path / "other-texq"
    (other / "flows").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "texq"\n')
    (other / "sub").mkdir()
    return other


def test_a_command_in_another_checkout_than_its_code_s_is_refused_in_one_line(tmp_path, monkeypatch):
    from flows.checkout import require_own_checkout, texq_checkout
    from flows.steps import enter_checkout

    other = _other_checkout(tmp_path)
    assert texq_checkout(other / "sub") == other.resolve() and texq_checkout(tmp_path) is None
    assert texq_checkout(ROOT / "tests") == ROOT.resolve()
    require_own_checkout(ROOT / "tests")  # its own checkout
    require_own_checkout(tmp_path)  # no checkout at all (a submitter's folder, a DVC workspace)
    with pytest.raises(TexqError) as err:
        require_own_checkout(other / "sub", "texq track sync")
    text = str(err.value)
    assert len(text.splitlines()) == 1 and str(other.resolve()) in text and str(ROOT) in text
    # a Prefect worker started in the other checkout: its flow runs are refused before they start
    monkeypatch.setenv("PWD", str(other))
    monkeypatch.chdir(tmp_path)  # where Prefect's process worker starts a flow run: a folder of its own
    with pytest.raises(TexqError, match="this worker runs in the texq checkout"):
        enter_checkout()
    assert Path.cwd() == tmp_path  # refused before it changed folder
    monkeypatch.setenv("PWD", str(tmp_path))  # a worker started outside every checkout
    assert enter_checkout() == {"directory": str(ROOT)} and Path.cwd() == ROOT


def test_a_stage_started_in_another_checkout_exits_2_with_one_line(tmp_path):
    other = _other_checkout(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flows.stage", "teacher", "--params", "params.yaml"],
                          cwd=other, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"texq: error: stage teacher runs in the texq checkout {other.resolve()}")
    assert not (other / "out").exists() and not (other / "mlflow.db").exists()
