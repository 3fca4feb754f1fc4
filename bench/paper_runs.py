"""Table 1's CIFAR-10 runs at the paper's protocol, carried across short GPU windows.

``run``: runs the named runs in order (a name is ``<method>-w<bits>a<bits>-s<seed>``, e.g.
``texq-w4a4-s0``; ``real-...`` fine-tunes on $TEXQ_ASSETS/cifar10/train_jpeg_10k.npz), each in
``<dir>/<name>`` with ``texq run --profile paper``, until ``--seconds`` have passed. A run whose
folder exists resumes where its last epoch's checkpoint left it (texq's own resume); a run with
a committed result in ``bench/results/paper/<name>/metrics.json`` is skipped. At the deadline the
running run is stopped (SIGTERM; at most the epoch in progress is lost) and every run this call
touched is packed as ``<out>/<name>.tar.gz`` (its whole folder: finished results, or the
checkpoint to carry to the next window), with ``<out>/summary.txt``.

``unpack``: back on the project machine, unpacks those archives into ``<dir>`` (to carry to the
next window) and copies each finished run's ``metrics.json`` and ``history.jsonl`` to
``bench/results/paper/<name>/``.

    python bench/paper_runs.py run --seconds 480 --out $OUT [--dir out/gpu_paper] [names...]
    python bench/paper_runs.py unpack FOLDER_OF_ARCHIVES [--dir out/gpu_paper]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from texq.run.layout import Layout, train_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "paper"
#: Table 1's order of work (issue: TexQ W4A4, W3A3 seed 0, then seeds 1, 2, then GDFQ, then real)
DEFAULT_RUNS = ("texq-w4a4-s0", "texq-w3a3-s0", "texq-w4a4-s1", "texq-w3a3-s1", "texq-w4a4-s2",
                "texq-w3a3-s2", "gdfq-w4a4-s0", "gdfq-w3a3-s0", "real-w4a4-s0", "real-w3a3-s0")
NAME = re.compile(r"^(texq|gdfq|real)-w([2-8])a([2-8])-s(\d+)$")
MAX_FILES = 8  # what one GPU window brings back


def command(name: str, folder: Path, assets: Path, profile: str, device: str,
            extra: list[str]) -> list[str]:
    m = NAME.match(name)
    if not m:
        raise SystemExit(f"paper_runs: run name {name!r}: expected <texq|gdfq|real>-w<bits>a<bits>-s<seed>")
    method, w, a, seed = m.groups()
    cmd = [sys.executable, "-m", "texq.cli", "run", "--model", "resnet20a_cifar10",
           "--checkpoint", str(assets / "cifar10" / "resnet20-12fca82f.th"),
           "--data", str(assets / "cifar10" / "test_first1000.npz"), "--method", method,
           "--w-bits", w, "--a-bits", a, "--seed", seed, "--profile", profile, "--device", device,
           "--no-progress", "--out", str(folder)]
    if method == "real":
        cmd += ["--train-data", str(assets / "cifar10" / "train_jpeg_10k.npz")]
    for setting in extra:
        cmd += ["--set", setting]
    return cmd


def progress(folder: Path) -> str:
    """'finished: top-1 ...' or how many of steps 2-3's epochs the folder holds."""
    metrics = Layout(folder).metrics
    if metrics.exists():
        r = json.loads(metrics.read_text())
        return f"finished: top-1 {r['top1']:.1f} ({r['correct']}/{r['n']}), FP {r['fp_top1']:.1f}, " \
               f"train {r.get('train_seconds', 0) / 60:.1f} min"
    history = next(iter(sorted(folder.rglob(train_file(Path(), "history").name))), None)  # train/ or .work/
    epochs = len(history.read_text().splitlines()) if history else 0
    return f"unfinished: {epochs} epochs of steps 2-3 checkpointed"


def pack(folder: Path, out: Path) -> Path:
    """``folder`` as ``out/<name>.tar.gz``, written atomically."""
    target = out / f"{folder.name}.tar.gz"
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    tmp.replace(target)
    return target


def wait(proc: subprocess.Popen, deadline: float) -> int | None:
    """The run's exit status, or None when ``deadline`` (time.monotonic) came first."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def cmd_run(args) -> int:
    deadline = time.monotonic() + args.seconds
    out, runs_dir, assets = Path(args.out), Path(args.dir), Path(args.assets)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    extra = [s for s in os.environ.get("TEXQ_PAPER_SET", "").split() if s] + args.set
    touched, lines = [], []
    for name in args.names or DEFAULT_RUNS:
        if Layout(RESULTS / name).metrics.exists():
            continue  # committed already
        left = deadline - time.monotonic()
        if left < args.min_seconds or len(touched) >= args.max_files - 1:
            break
        folder = runs_dir / name
        cmd = command(name, folder, assets, args.profile, args.device, extra)
        print(f"== {name}: {int(left)} s left", flush=True)
        log = open(runs_dir / f"{name}.log", "a")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        touched.append(folder)
        try:
            rc = wait(proc, deadline)
            if rc is None:
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped (paused) run takes it only when woken
                proc.wait()
                lines.append(f"{name}: stopped at the deadline; {progress(folder)}")
                break
        finally:
            log.close()
        lines.append(f"{name}: rc {rc}; {progress(folder)}")
        if rc != 0:
            tail = (runs_dir / f"{name}.log").read_text().splitlines()[-3:]
            lines += [f"  {t}" for t in tail]
    for folder in touched:
        if folder.exists():
            shutil.copy(runs_dir / f"{folder.name}.log", folder / "paper_runs.log")
            size = pack(folder, out).stat().st_size
            lines.append(f"{folder.name}.tar.gz: {size / 2**20:.1f} MiB")
    (out / "summary.txt").write_text("\n".join(lines or ["nothing to run"]) + "\n")
    print(*lines, sep="\n")
    return 0


def cmd_unpack(args) -> int:
    runs_dir = Path(args.dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for archive in sorted(Path(args.folder).glob("*.tar.gz")):
        name = archive.name.removesuffix(".tar.gz")
        if not NAME.match(name):
            continue
        with tarfile.open(archive) as tar:
            tmp = runs_dir / f".{name}.unpack"
            shutil.rmtree(tmp, ignore_errors=True)
            tar.extractall(tmp, filter="data")
        shutil.rmtree(runs_dir / name, ignore_errors=True)
        (tmp / name).replace(runs_dir / name)
        shutil.rmtree(tmp)
        folder = runs_dir / name
        run = Layout(folder)
        if run.metrics.exists():
            dest = Path(args.results) / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in (run.metrics, run.history, run.config):
                if f.exists():
                    shutil.copy(f, dest / f.name)
        print(f"{name}: {progress(folder)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="*", help=f"runs in order (default: {' '.join(DEFAULT_RUNS)})")
    r.add_argument("--seconds", type=float, default=480)
    r.add_argument("--min-seconds", type=float, default=60, help="start no run with less left")
    r.add_argument("--out", default=os.environ.get("OUT", "out/gpu_paper_out"))
    r.add_argument("--dir", default="out/gpu_paper")
    r.add_argument("--assets", default=os.environ.get("TEXQ_ASSETS", "../shared/assets"))
    r.add_argument("--profile", default="paper")
    r.add_argument("--device", default="cuda")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--max-files", type=int, default=MAX_FILES, help="files to write at most (summary included)")
    u = sub.add_parser("unpack")
    u.add_argument("folder")
    u.add_argument("--dir", default="out/gpu_paper")
    u.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_unpack(args)


if __name__ == "__main__":
    sys.exit(main())
