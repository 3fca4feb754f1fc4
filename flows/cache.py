"""What a pipeline stage's result depends on, as Prefect task inputs (results cached by inputs).

``dvc.yaml`` is the one statement of each stage's inputs: the params keys it reads, its deps (code
and upstream outs) and its outs. The Prefect flow passes a stage task the *content* those name:
the values of its params keys, a hash of its deps' bytes and the folder it writes. A task whose
inputs are unchanged since a completed run returns that run's cached result without running
(Prefect shows it as Cached); a change to one train key reruns train and evaluate, as under DVC.
A cached result is only used while the stage's outs are still on disk as that run left them
(``may_use_cache``); otherwise the flow refreshes the cache, which reruns the stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from flows import ROOT
from texq.errors import TexqError

DVC_OUT = "out/pipeline"  # the folder dvc.yaml's stages write; a flow run maps it to its own


def stage_spec(name: str, dvc_file: str | Path = ROOT / "dvc.yaml") -> dict:
    """The ``dvc.yaml`` entry of stage ``name``: {'params': [...], 'deps': [...], 'outs': [...]}."""
    stages = yaml.safe_load(Path(dvc_file).read_text()).get("stages") or {}
    if name not in stages:
        raise TexqError(f"{dvc_file}: no stage {name!r} (stages: {', '.join(stages)})")
    entry = stages[name]
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots") for o in entry.get(key) or []]
    return {"params": list(entry.get("params") or []), "deps": list(entry.get("deps") or []),
            "outs": outs}


def _map(path: str, out: Path) -> Path:
    """A dvc.yaml path: under ``out/pipeline`` -> under the flow run's ``out``; else the project."""
    if path == DVC_OUT or path.startswith(DVC_OUT + "/"):
        return out / path[len(DVC_OUT):].lstrip("/")
    return ROOT / path


def params_subset(keys: list[str], params: dict, source: str = "params.yaml") -> dict[str, Any]:
    """{dotted key: value} for the keys a stage reads (a key may name a whole section)."""
    from texq.keys import lookup

    return {key: lookup(params, key, f"key (the stage reads it) of {source}") for key in keys}


def content_hash(paths: list[Path]) -> str:
    """sha256 over the bytes (and relative names) of files and folders; a missing path hashes as
    missing, so it cannot match a hash taken while it existed."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"\0{path.name}\0".encode())
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        else:
            files = [path] if path.is_file() else []
        if not files:
            h.update(b"<missing>")
        for f in files:
            h.update(f"{f.relative_to(path) if f != path else ''}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def stage_inputs(name: str, params_file: str | Path, out: str | Path) -> dict[str, Any]:
    """Everything stage ``name`` reads, by content: the task's cache-relevant inputs."""
    from texq.pipeline import load_params

    spec = stage_spec(name)
    out = Path(out).resolve()
    return {"params": params_subset(spec["params"], load_params(params_file), str(params_file)),
            "deps_sha256": content_hash([_map(d, out) for d in spec["deps"]]),
            "out": str(out)}


def outs_hash(name: str, out: str | Path) -> str:
    return content_hash([_map(o, Path(out).resolve()) for o in stage_spec(name)["outs"]])


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _record_file(out: str | Path) -> Path:
    return Path(out) / ".prefect-stages.json"


def _records(out: str | Path) -> dict[str, dict]:
    try:
        return json.loads(_record_file(out).read_text())
    except (OSError, ValueError):
        return {}


def may_use_cache(name: str, out: str | Path, inputs: dict) -> bool:
    """True when ``out`` still holds the outs a completed run of this stage with these inputs
    wrote (so its cached result describes them); else the flow refreshes the cache."""
    rec = _records(out).get(name) or {}
    return rec.get("inputs") == _key(inputs) and rec.get("outs_sha256") == outs_hash(name, out)


def record(name: str, out: str | Path, inputs: dict) -> None:
    """After stage ``name`` completed (ran or cached): its inputs and the outs it left."""
    from texq.io import write_json

    recs = _records(out)
    recs[name] = {"inputs": _key(inputs), "outs_sha256": outs_hash(name, out)}
    write_json(_record_file(out), recs)
