"""The reliability table: faults injected into real pipeline runs (``dvc repro`` of this project's
dvc.yaml, tiny profile, the pretrained CIFAR-10 ResNet-20 and the 1000 lossless test images from
``$TEXQ_ASSETS``), each followed by what a user is told to do, and what that leaves: finished work
kept, epochs trained twice, the MLflow runs' final states, runs left RUNNING, metrics equal to the
run without faults, wall time. The scenarios are those of tests/flows/faults.py (the integration
test asserts a subset of them); this prints every one as the table of docs/reliability.md.

    TEXQ_ASSETS=../shared/assets python bench/faults.py [--epochs 6] [--only SUBSTRING]

About 12 minutes on 2 CPU cores. The disk-full scenario mounts a tmpfs (root only; else skipped).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "flows"))

from faults import (  # noqa: E402  (the test helpers: one definition of each scenario)
    HEADER,
    MlflowServer,
    Project,
    can_mount_tmpfs,
    disk_full,
    killed,
    no_fault,
    server_down,
    sqlite_locked,
)
from servers import free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6, help="finetune.epochs of the tiny profile")
    ap.add_argument("--only", default="", help="run the scenarios whose name holds this text")
    args = ap.parse_args()
    if not os.environ.get("TEXQ_ASSETS"):
        ap.error("set TEXQ_ASSETS to the folder holding cifar10/resnet20-12fca82f.th (no downloads here)")
    base = Path(tempfile.mkdtemp(prefix="texq-faults-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "tiny"
    params_file = base / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    n = iter(range(100))

    def project(uri: str | None = None) -> Project:
        return Project(base / f"p{next(n)}", params_file, args.epochs, uri)

    server = MlflowServer(base, free_port())
    scenarios = [
        ("sqlite start", lambda ref: sqlite_locked(project(), ref, args.epochs, "start")),
        ("sqlite middle", lambda ref: sqlite_locked(project(), ref, args.epochs, "middle to end")),
        ("server start", lambda ref: server_down(project(server.uri), ref, args.epochs, "start", server)),
        ("server middle", lambda ref: server_down(project(server.uri), ref, args.epochs, "middle to end", server)),
        ("killed", lambda ref: killed(project(), ref, args.epochs)),
    ]
    if can_mount_tmpfs(base / "probe"):
        scenarios.append(("disk full", lambda ref: disk_full(project(), ref, args.epochs)))
    else:
        print("disk full: skipped (mounting a tmpfs needs root)", file=sys.stderr)
    t0 = time.perf_counter()
    first = project()
    rows = [no_fault(first, {}, args.epochs)]
    reference = first.metrics()
    try:
        server.start()
        for name, scenario in scenarios:
            if args.only in name:
                print(f"faults: {name} ...", file=sys.stderr, flush=True)
                rows.append(scenario(reference))
    finally:
        server.stop()
    print(HEADER)
    for row in rows:
        print(row.row())
    lost = sum(not r.kept for r in rows)
    twice = sum(len(set(r.recomputed) - set(r.unfinished)) for r in rows)
    running = sum(r.running for r in rows)
    wrong = sum(not r.same_metrics for r in rows)
    print(f"\n{len(rows)} scenarios, {time.perf_counter() - t0:.0f} s on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores): finished work lost in {lost}, finished epochs recomputed {twice}, "
          f"runs left RUNNING {running}, metrics unlike the run without faults in {wrong}")
    return 1 if lost or twice or running or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
