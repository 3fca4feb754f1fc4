"""A pipeline run's folder as a DVC workspace, so that DVC alone decides what reruns.

A ``texq-pipeline`` flow run lays its folder out as the project root is laid out for ``dvc repro``:

    params.yaml     the base params plus the run's overrides (file paths made absolute)
    dvc.yaml        a copy of the project's (the same stages, params keys, deps and outs)
    texq            a link to the project's package (the code deps dvc.yaml names)
    .dvc/           a DVC repository without git (its cache and run cache are the folder's)
    dvc.lock        written by DVC: params values, deps' and outs' hashes of each stage's last run
    out/pipeline/   the stages' outs

Each Prefect task runs ``dvc repro --single-item STAGE`` there: DVC's ``dvc.lock`` is the one
judge of staleness, for a flow run as for ``dvc repro`` in the project (a changed train key reruns
train and evaluate, a deleted out reruns its stage, a changed texq module reruns the stages whose
deps name it). The stage command is dvc.yaml's own (``python -m flows.stage NAME``); the flow run's
context (MLflow tracking URI and parent run, the Prefect flow run, the device) reaches it in the
environment of that one process, as DVC's own ``DVC_*`` variables do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows import ROOT
from texq.util.errors import TexqError

OUT = Path("out/pipeline")  # where dvc.yaml's stages write, relative to the workspace
WORKSPACES_ENV = "TEXQ_WORKSPACES"  # the folder every flow run's workspace lies under (default <checkout>/runs)
REMOTE_ENV = "TEXQ_DVC_REMOTE"  # a DVC remote (a folder on shared storage, s3://, ssh://) for outs and run cache
REMOTE = "texq"  # its name in each workspace's .dvc/config
PATH_KEYS = ("checkpoint", "data", "train_data")  # params whose value may be a file path
_ERROR = "texq: error: "  # how flows.stage reports a bad input (one line, exit status 2)


class StageFailed(RuntimeError):
    """A stage's command failed for a reason other than its input (worth a retry)."""


def absolute_paths(params: dict, root: Path = ROOT) -> dict:
    """``params`` with each relative path among :data:`PATH_KEYS` that names an existing file or
    folder under ``root`` made absolute: the workspace runs its stages from its own folder, and
    params.yaml's paths are relative to the project root. A name (``cifar10-test1000``) stays."""
    fixed = dict(params)
    for key in PATH_KEYS:
        value = fixed.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (root / value).exists():
            fixed[key] = str((root / value).resolve())
    return fixed


def workspaces_root() -> Path:
    """The folder this worker's flow runs write under: ``$TEXQ_WORKSPACES``, else ``runs/`` of its
    checkout."""
    return Path(os.environ.get(WORKSPACES_ENV) or ROOT / "runs").resolve()


def inside(value: Any, name: str, root: Path, what: str) -> Path:
    """Flow parameter ``name``'s path ``value`` (relative to the worker's checkout) resolved, links
    followed; TexqError naming it unless it lies strictly under ``root``: a flow run, started by
    whoever reaches the Prefect server, reads and writes only there."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise TexqError(f"{name}={value!r}: expected a path")
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else ROOT / path).resolve()
    if root not in path.parents:
        raise TexqError(f"{name}={value!r}: resolves to {path}, not inside {root} ({what})")
    return path


def workspace_path(out: Any, name: str = "out") -> Path:
    """A flow run's folder ``out`` checked before anything is written (:func:`inside` the
    workspace root); the root itself, the checkout and its files are never a workspace."""
    return inside(out, name, workspaces_root(), f"this worker's workspace root: a flow run writes only "
                  f"in a folder under it; {WORKSPACES_ENV} on the worker moves it")


def params_path(base_params: Any, name: str = "base_params") -> Path:
    """A flow's params file: under the worker's checkout or its workspace root (read only)."""
    root = workspaces_root()
    try:
        return inside(base_params, name, ROOT.resolve(), "the worker's checkout")
    except TexqError:
        return inside(base_params, name, root, f"the worker's checkout {ROOT} or workspace root")


def prepare(folder: str | Path, params: dict) -> Path:
    """Lay ``folder`` out as a DVC workspace running ``params`` (see the module's docstring);
    idempotent: an existing workspace keeps its dvc.lock and outs, so DVC reruns only what
    changed since."""
    import yaml

    from texq.util.io import atomic_path

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("params.yaml", yaml.safe_dump(absolute_paths(params), sort_keys=False)),
                       ("dvc.yaml", workspace_dvc_yaml())):
        dest = folder / name
        if not dest.is_file() or dest.read_text() != text:
            with atomic_path(dest) as tmp:
                tmp.write_text(text)
    link = folder / "texq"
    if not (link.is_symlink() and link.resolve() == (ROOT / "texq").resolve()):
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            raise TexqError(f"{link}: a folder where the workspace links the project's texq package")
        link.symlink_to(ROOT / "texq", target_is_directory=True)
    if not (folder / ".dvc").is_dir():
        _dvc(folder, "init", "--no-scm", "--quiet")
        _dvc(folder, "config", "core.analytics", "false")
    if remote():
        _dvc(folder, "remote", "add", "--default", "--force", REMOTE, remote())
    return folder


def workspace_dvc_yaml() -> str:
    """The project's dvc.yaml with every out cached: the project keeps its small results
    (``teacher.json``, ``metrics.json``, the plots' JSON) in git (``cache: false``), a workspace keeps
    them in DVC's cache, so that a stage's run-cache entry, pushed to a lab remote, carries all of
    its outs and restores the stage on another machine (DVC pushes no uncached out)."""
    import yaml

    def cached(out):  # {path: {cache: false, ...}} -> path, its other options kept
        if not isinstance(out, dict):
            return out
        ((path, options),) = out.items()
        options = {k: v for k, v in (options or {}).items() if k != "cache"}
        return {path: options} if options else path

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            if kind in stage:
                stage[kind] = [cached(o) for o in stage[kind]]
    return "# the project's dvc.yaml, every out cached (flows/workspace.py)\n" + yaml.safe_dump(spec, sort_keys=False)


def remote() -> str | None:
    """The lab's DVC remote (``$TEXQ_DVC_REMOTE``): a stage computed on one machine is pushed
    there with its run cache, and restored from it, not recomputed, on any other."""
    return os.environ.get(REMOTE_ENV) or None


def stage_env(device: str = "auto", parent_run_id: str = "", flow_run_id: str = "",
              run_name: str = "") -> dict[str, str]:
    """The environment of a stage's process: this one's, plus where and under which MLflow run
    it records, its name and this process's id (``flows.stage`` reads these), this interpreter's environment first
    on ``PATH`` (dvc.yaml's ``python``) and the project on ``PYTHONPATH``."""
    from flows.bookkeeping.pipeline_run import RUN_NAME_ENV
    from flows.bookkeeping.store import tracking_uri

    def joined(first: str, var: str) -> str:
        return os.pathsep.join(p for p in (first, os.environ.get(var, "")) if p)

    from flows.stage import FLOW_PID_ENV

    return dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri(), TEXQ_DEVICE=device,
                **{FLOW_PID_ENV: str(os.getpid())},  # the stage stops if this process dies
                TEXQ_PARENT_RUN_ID=parent_run_id, TEXQ_FLOW_RUN_ID=flow_run_id, **{RUN_NAME_ENV: run_name},
                PATH=joined(str(Path(sys.executable).parent), "PATH"),
                PYTHONPATH=joined(str(ROOT), "PYTHONPATH"))


def repro(folder: str | Path, name: str, env: dict[str, str] | None = None,
          log: logging.Logger | logging.LoggerAdapter | None = None) -> bool:
    """``dvc repro --single-item NAME`` in the workspace, each output line logged as it comes;
    True if DVC ran the stage, False if it found it up to date or restored it from its run cache.
    With a lab remote (:func:`remote`), DVC first pulls what is missing (outs, run-cache entries)
    and a stage that ran is pushed with its run cache. A stage that failed on its input raises
    TexqError with the stage's own message (the same every time: not retried), any other failure
    :class:`StageFailed` with the end of its output."""
    log = log or logging.getLogger("texq")
    pull = ["--pull"] if remote() else []  # missing outs and run-cache entries from the remote first
    proc = subprocess.Popen([*_dvc_cmd(), "repro", "--single-item", *pull, name], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            log.info("%s", line)
    if proc.wait() != 0:
        errors = [ln[ln.index(_ERROR) + len(_ERROR):] for ln in lines if _ERROR in ln]
        if errors:
            raise TexqError(f"stage {name} ({folder}): {errors[-1]}")
        raise StageFailed(f"dvc repro {name} in {folder} failed:\n" + "\n".join(lines[-20:]))
    ran = any(ln.startswith(f"Running stage '{name}'") for ln in lines)
    if ran and remote():  # the outs and the run-cache entry, for every other machine
        _dvc(Path(folder), "push", "--run-cache", "--quiet")
        log.info("pushed %s's outs and run cache to %s", name, remote())
    return ran


def result(folder: str | Path, name: str) -> dict[str, Any]:
    """What a stage left for the flow: evaluate's metrics, teacher's score, else its name."""
    from texq.run.layout import Layout

    layout = Layout(Path(folder) / OUT)
    files = {"teacher": layout.teacher, "evaluate": layout.metrics, "train": layout.summary}
    if name in files and files[name].is_file():
        data = json.loads(files[name].read_text())
        return data if name != "train" else {"stage": name, "seconds": data.get("seconds")}
    return {"stage": name}


def _dvc_cmd() -> list[str]:
    """DVC's command line, from this interpreter's environment."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [shutil.which("dvc") or "dvc"]


def _dvc(folder: Path, *args: str) -> None:
    proc = subprocess.run([*_dvc_cmd(), *args], cwd=folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"dvc {' '.join(args)} in {folder}: {(proc.stderr or proc.stdout).strip()}")
