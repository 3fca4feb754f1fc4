"""dvc.yaml's deps cover every texq module a stage runs: a change to any of them reruns the stage.

Each stage runs for real (tiny profile) in its own Python process, which then lists the texq
modules it has loaded (lazy imports included); each must be a dep of the stage or lie under one.
``flows/`` (MLflow tracking, Prefect glue) and ``texq/__init__.py`` (re-exports of the API) hold
no results code and are left out on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
from texq.pipeline import read_config, run_stage
run_stage(sys.argv[1], read_config(sys.argv[2], "cpu"), sys.argv[3], progress=False)
root = sys.argv[4]
files = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
print(json.dumps(sorted(f[len(root) + 1:] for f in files if f.startswith(root + "/texq/"))))
"""


def uncovered(modules: list[str], deps: list[str]) -> list[str]:
    """The module paths (relative to the project) that no dep names or contains."""
    return [m for m in modules if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)]


def test_uncovered_sees_a_missing_dep():
    deps = ["texq/pipeline", "texq/run/train.py"]
    assert uncovered(["texq/pipeline/stages.py", "texq/run/train.py"], deps) == []
    assert uncovered(["texq/pipeline/stages.py", "texq/run/runner.py", "texq/util/nn_utils.py"], deps) == [
        "texq/run/runner.py", "texq/util/nn_utils.py"]


@pytest.mark.integration
def test_every_module_a_stage_loads_is_a_dep_of_the_stage(tiny_params, tmp_path):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out, missing = tmp_path / "out", {}
    for name, spec in stages.items():  # dvc.yaml's order is the pipeline's
        proc = subprocess.run([sys.executable, "-c", SCRIPT, name, str(tiny_params), str(out), str(ROOT)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        assert "texq/pipeline/stages.py" in loaded  # the listing works
        gaps = uncovered([m for m in loaded if m != "texq/__init__.py"], spec["deps"])
        if gaps:
            missing[name] = gaps
    assert not missing, f"add to these stages' deps in dvc.yaml: {missing}"
