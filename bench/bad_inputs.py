"""The bad-input battery: every case a user can cause or meet, run black box through the installed
command line, each checked for exit status 2, exactly one ``texq: error:`` line, no traceback,
nothing written at its destination and no temporary file left. As root it also fills a 100 kB
tmpfs mid-run: there a run may keep the whole files it wrote first (its resume state), and every
file left must read back. Prints one row per case and the count; exits 1 if any case fails.

    python bench/bad_inputs.py [--keep DIR] [--only SUBSTRING]

About 7 minutes on 2 CPU cores (a process per case, one tiny run to damage: 415 s measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bad_input_files import files  # bench/ is the script's folder: on sys.path

ROOT = Path(__file__).resolve().parents[1]


def cases(f: dict, d: Path, run_dir: Path) -> list[tuple[str, list, str, dict]]:
    """(name, argv, expected text in the line, extra environment)."""
    r8 = ["--model", "resnet8_cifar10"]
    ev = ["eval", *r8, "--checkpoint", str(f["ckpt"]), "--no-progress"]
    evd = [*ev, "--data", str(f["npz"])]
    info = ["--num-classes", "10", "--input-size", "32", "--mean", "0", "0", "0", "--std", "1", "1", "1"]
    fac = lambda name: ["eval", "--model", f"{name}:build", *info, "--data", str(f["npz"]), "--no-progress"]  # noqa: E731
    run = ["run", *r8, "--checkpoint", str(f["ckpt"]), "--data", str(f["npz"]), "--profile", "tiny",
           "--device", "cpu", "--no-progress"]
    out_run = ["--out", str(d / "out-run")]
    ex = ["export", str(run_dir)]
    c = [
        ("eval: checkpoint missing", ["eval", *r8, "--checkpoint", str(d / "gone.pt"), "--data", str(f["npz"])], "not found", {}),
        ("eval: checkpoint truncated", ["eval", *r8, "--checkpoint", str(f["trunc"]), "--data", str(f["npz"])], "truncated", {}),
        ("eval: checkpoint of random bytes", ["eval", *r8, "--checkpoint", str(f["random"]), "--data", str(f["npz"])], "random.pt", {}),
        ("eval: checkpoint with pickled code", ["eval", *r8, "--checkpoint", str(f["pickled"]), "--data", str(f["npz"])], "weights_only", {}),
        ("eval: checkpoint of another architecture", ["eval", *r8, "--checkpoint", str(f["other"]), "--data", str(f["npz"])], "does not fit", {}),
        ("eval: checkpoint with another class count", ["eval", *r8, "--checkpoint", str(f["classes"]), "--data", str(f["npz"])], "class", {}),
        ("eval: a NaN weight", ["eval", *r8, "--checkpoint", str(f["nan"]), "--data", str(f["npz"])], "non-finite", {}),
        ("eval: an infinite weight", ["eval", *r8, "--checkpoint", str(f["inf"]), "--data", str(f["npz"])], "non-finite", {}),
        ("eval: a negative running variance", ["eval", *r8, "--checkpoint", str(f["negvar"]), "--data", str(f["npz"])], "negative running variance", {}),
        ("eval: a NaN running variance", ["eval", *r8, "--checkpoint", str(f["nanvar"]), "--data", str(f["npz"])], "running_var", {}),
        ("eval: no weights given", ["eval", *r8, "--data", str(f["npz"])], "--checkpoint", {}),
        ("eval: unknown model", ["eval", "--model", "resnet21_cifar10", "--checkpoint", str(f["ckpt"]), "--data", str(f["npz"])], "resnet21", {}),
        *[(f"eval: .npz {k}", [*ev, "--data", str(f[k])], f[k].name, {})
          for k in ("grey", "float", "chw", "noy", "labels", "neglabel", "empty", "small", "count", "notnpz")],
        ("eval: image folder without class folders", [*ev, "--data", str(f["flat"])], "class", {}),
        ("eval: image folder with 9 classes", [*ev, "--data", str(f["nine"])], "9 class folders", {}),
        ("eval: a corrupt image in a folder", [*ev, "--data", str(f["photos"])], "bad.jpg: not a readable image", {}),
        ("eval: data not found", [*ev, "--data", str(d / "none.npz")], "not found", {}),
        ("eval: data of another kind", [*ev, "--data", str(f["afile"])], "afile.txt", {}),
        ("eval: w_bits 9", [*evd, "--w-bits", "9"], "w_bits=9", {}),
        ("eval: a_bits 1", [*evd, "--a-bits", "1"], "a_bits=1", {}),
        ("eval: first layer bits 40", [*evd, "--first-layer-bits", "40"], "first_layer_bits=40", {}),
        ("eval: batch size 0", [*evd, "--batch-size", "0"], "--batch-size", {}),
        ("eval: batch size -3", [*evd, "--batch-size", "-3"], "--batch-size", {}),
        ("eval: workers -1", [*evd, "--workers", "-1"], "--workers", {}),
        ("eval: calibration batches 0", [*evd, "--calib-batches", "0"], "--calib-batches", {}),
        ("eval: seed -1", [*evd, "--seed", "-1"], "--seed", {}),
        ("eval: --out is a folder", [*evd, "--out", str(d)], "is a folder", {}),
        ("eval: --out under a file", [*evd, "--out", str(f["afile"] / "r.json")], "is a file", {}),
        ("eval: factory with a syntax error", fac("syntax"), "SyntaxError", {}),
        ("eval: factory with a failing import", fac("badimport"), "no_such_pkg_xyz", {}),
        ("eval: factory that raises", fac("raises"), "RuntimeError: boom", {}),
        ("eval: factory that returns no module", fac("notmodule"), "returned int", {}),
        ("eval: factory without BatchNorm", ["run", "--model", "nobn:build", "--data", str(f["npz"]), "--profile", "tiny", *out_run], "BatchNorm", {}),
        ("eval: factory needing arguments", fac("args"), "without arguments", {}),
        ("eval: factory not found", fac("no_such_module"), "no module named", {}),
        ("eval: factory without texq_info", ["eval", "--model", "noinfo:build", "--data", str(f["npz"])], "texq_info", {}),
        ("eval: --num-classes 0", [*fac("noinfo")[:-1], "--num-classes", "0"], "--num-classes", {}),
        ("run: finetune.lr=-0.1", [*run, *out_run, "--set", "finetune.lr=-0.1"], "positive", {}),
        ("run: finetune.lr=inf", [*run, *out_run, "--set", "finetune.lr=.inf"], "finite", {}),
        ("run: finetune.lr=abc", [*run, *out_run, "--set", "finetune.lr=abc"], "finetune.lr='abc'", {}),
        ("run: finetune.epochs=0", [*run, *out_run, "--set", "finetune.epochs=0"], "finetune.epochs=0", {}),
        ("run: finetune.batch_size=0", [*run, *out_run, "--set", "finetune.batch_size=0"], "batch_size=0", {}),
        ("run: calibration.iters=-1", [*run, *out_run, "--set", "calibration.iters=-1"], "iters=-1", {}),
        ("run: calibration.warmup_iters > iters", [*run, *out_run, "--set", "calibration.warmup_iters=99"], "warmup_iters", {}),
        ("run: kd_temperature=0", [*run, *out_run, "--set", "finetune.kd_temperature=0"], "kd_temperature", {}),
        ("run: mixup_p=2", [*run, *out_run, "--set", "finetune.mixup_p=2"], "mixup_p", {}),
        ("run: crop scale [0, 1]", [*run, *out_run, "--set", "finetune.calib_crop_scale=[0, 1]"], "calib_crop_scale", {}),
        ("run: crop scale reversed", [*run, *out_run, "--set", "finetune.calib_crop_scale=[0.9, 0.5]"], "smaller crop area first", {}),
        ("run: act_calib_epochs > warmup", [*run, *out_run, "--set", "finetune.act_calib_epochs=9"], "act_calib_epochs", {}),
        ("run: generator.beta1=1", [*run, *out_run, "--set", "generator.beta1=1"], "beta1", {}),
        ("run: laws.k=20", [*run, *out_run, "--set", "calibration.laws.k=20"], "laws.k=20", {}),
        ("run: quant.act_momentum=1", [*run, *out_run, "--set", "quant.act_momentum=1"], "act_momentum", {}),
        ("run: unknown key", [*run, *out_run, "--set", "finetune.alpha7=1"], "alpha7", {}),
        ("run: --set without =", [*run, *out_run, "--set", "finetune.lr"], "KEY=VALUE", {}),
        ("run: --set a key twice", [*run, *out_run, "--set", "finetune.lr=abc", "--set", "finetune.lr=0.001"],
         "given twice", {}),
        ("run: --set bytes not UTF-8", [*run, *out_run, "--set", b"finetune.lr=\xff"], "not UTF-8", {}),
        *([("run: --device cuda without CUDA", [*run[:run.index("--device")], *run[run.index("--device") + 2:],
                                                 *out_run, "--device", "cuda"], "no CUDA device", {})]
          if not torch.cuda.is_available() else []),
        ("compare: a SQLite store that does not exist", ["compare"], "no MLflow store",
         {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'none.db'}"}),
        ("track sync: a folder without pipeline results", ["track", "sync", str(f["flat"]), "--params",
                                                           str(f["p_ok"])], "holds none of a pipeline's results",
         {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'sync.db'}"}),
        ("run: --set unclosed list", [*run, *out_run, "--set", "finetune.calib_crop_scale=[0.5, 1"],
         "not a value", {}),
        ("run: seed -1", [*run, *out_run, "--seed", "-1"], "seed=-1", {}),
        ("run: --seed 2**64", [*run, *out_run, "--seed", str(2**64)], f"seed={2**64}", {}),
        ("run: --set seed=2**70", [*run, *out_run, "--set", f"seed={2**70}"], f"seed={2**70}", {}),
        ("eval: --seed 2**64", [*evd, "--seed", str(2**64)], "--seed", {}),
        ("run: finetune.batch_size=2**32", [*run, *out_run, "--set", f"finetune.batch_size={2**32}"],
         "finetune.batch_size", {}),
        ("run: images_per_class=2**62", [*run, *out_run, "--set", f"calibration.images_per_class={2**62}"],
         "images_per_class", {}),
        ("eval: --batch-size 2**40", [*evd, "--batch-size", str(2**40)], "--batch-size", {}),
        ("run: a misspelled key", [*run, *out_run, "--set", "finetune.alhpa6=3"], "did you mean finetune.alpha6", {}),
        ("run: a misspelled section", [*run, *out_run, "--set", "finetun.lr=0.1"], "did you mean finetune.lr", {}),
        ("run: a setting used as a section", [*run, *out_run, "--set", "finetune.lr.x=1"], "finetune.lr={'x': 1}: expected a number", {}),
        ("run: --w-bits given twice", [*run, *out_run, "--w-bits", "4", "--w-bits", "3"],
         "--w-bits given twice (4 and 3)", {}),
        ("run: a flag and --set of one key", [*run, *out_run, "--w-bits", "3", "--set", "w_bits=4"],
         "--w-bits 3 and --set w_bits=4 set one key twice", {}),
        ("eval: --data given twice", [*evd, "--data", str(f["grey"])], "--data given twice", {}),
        ("export: a file, not a run folder", ["export", str(f["afile"]), "--onnx", str(d / "x.onnx")],
         "afile.txt: is a file, not a run folder", {}),
        ("track sync: a file, not a folder", ["track", "sync", str(f["afile"]), "--params", str(f["p_ok"])],
         "afile.txt: a file, not a folder", {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'sync.db'}"}),
        *([("run: a disk that fills mid-write", [*run, "--out", str(f.get("full", d) / "run")], "No space left on device", {})]
          if f.get("full") else []),
        ("run: method unknown", [*run, *out_run, "--method", "foo"], "--method", {}),
        ("run: method real without train_data", [*run, *out_run, "--method", "real"], "train_data", {}),
        ("run: training data = test data", [*run, *out_run, "--method", "real", "--train-data", str(f["npz"])], "test images", {}),
        ("run: --out is a file", [*run, "--out", str(f["afile"])], "is a file", {}),
        ("run: --out where nothing can be made", [*run, "--out", "/proc/texq-run"], "/proc/texq-run", {}),
        ("run: folder of another configuration", [*run, "--out", str(run_dir), "--seed", "5"], "(seed 0 vs 5)", {}),
        ("run: folder with an unreadable config.json", [*run, "--out", str(d / "badcfg")], "config.json: not valid JSON", {}),
        ("run: a busy folder", [*run, "--out", str(d / "busy")], "is in use by process", {}),
        ("run: finished folder, qmodel.pt damaged", [*run, "--out", str(d / "dmg-q")], "qmodel.pt: damaged", {}),
        ("run: finished folder, generator.pt truncated", [*run, "--out", str(d / "dmg-g")], "generator.pt: damaged", {}),
        ("run: finished folder, step1.pt truncated", [*run, "--out", str(d / "dmg-s")], "step1.pt: damaged", {}),
        ("run: finished folder, metrics.json not JSON", [*run, "--out", str(d / "dmg-m")], "metrics.json", {}),
        ("export: no such folder", ["export", str(d / "none"), "--onnx", str(d / "x.onnx")], "not found", {}),
        ("export: folder without a model", ["export", str(d), "--onnx", str(d / "x.onnx")], "qmodel.pt not found", {}),
        ("export: damaged model", ["export", str(d / "dmg-q"), "--onnx", str(d / "x.onnx")], "qmodel.pt: damaged", {}),
        ("export: --check-images 0", [*ex, "--onnx", str(d / "x.onnx"), "--check-images", "0"], "--check-images", {}),
        ("export: --onnx is a folder", [*ex, "--onnx", str(d)], "is a folder", {}),
        ("export: bad check data", [*ex, "--onnx", str(d / "x.onnx"), "--check-data", str(f["grey"])], "grey.npz", {}),
        *[(f"stage: params {k[2:]}", ["stage", "teacher", "--params", str(f[k]), "--out", str(d / "out-stage")], w, {})
          for k, w in (("p_neg_lr", "finetune.lr=-0.1"), ("p_nan", "finite"), ("p_unknown", "alpha7"),
                       ("p_epochs0", "epochs=0"), ("p_bits", "w_bits=5.5"), ("p_dup", "given twice"),
                       ("p_syntax", "not valid YAML"), ("p_list", "mapping"),
                       ("p_bytes", "can't decode byte 0xff"))],
        ("stage: params file missing", ["stage", "teacher", "--params", str(d / "none.yaml")], "not found", {}),
        ("compare: a store that is not a database", ["compare"], "cannot be read", {"MLFLOW_TRACKING_URI": f"sqlite:///{f['notdb']}"}),
        ("compare: a server that does not answer", ["compare"], "http://127.0.0.1:9", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                                                                                       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
    ]
    return c


def mount_full_disk() -> Path | None:
    """A 100 kB tmpfs outside the work folder, so a run's files fill it mid-write (root only; None
    where it cannot be mounted, and the case is left out)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    where = Path(tempfile.mkdtemp(prefix="texq-full-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        where.rmdir()
        return None
    return where


def left_whole(folder: Path) -> list[str]:
    """What a failed write left half-done under ``folder``: a temporary file, or a JSON or torch file
    that does not read back (the files a run writes before the disk fills are its resume state)."""
    bad = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            assert not p.name.endswith(".tmp")
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                torch.load(p, weights_only=True)
        except Exception:  # noqa: BLE001 - any failure to read back is the finding
            bad.append(str(p))
    return bad


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", help="work in this folder and keep it")
    p.add_argument("--only", help="run only the cases whose name holds this text")
    args = p.parse_args()
    d = Path(args.keep or tempfile.mkdtemp(prefix="texq-bad-"))
    d.mkdir(parents=True, exist_ok=True)
    f = files(d)
    full = mount_full_disk()
    if full:
        f["full"] = full
    env = dict(os.environ, PYTHONPATH=f"{f['fac']}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    texq = [sys.executable, "-m", "texq.cli"]
    run_dir = d / "finished"  # a finished tiny run, then damaged copies of it
    done = subprocess.run([*texq, "run", "--model", "resnet8_cifar10", "--checkpoint", str(f["ckpt"]), "--data",
                           str(f["npz"]), "--profile", "tiny", "--device", "cpu", "--no-progress", "--out", str(run_dir)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, damage in (("dmg-q", "train/qmodel.pt"), ("dmg-g", "train/generator.pt"), ("dmg-s", "step1.pt"),
                         ("dmg-m", "metrics.json")):
        shutil.copytree(run_dir, d / name)
        target = d / name / damage
        if damage == "train/qmodel.pt":
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        else:
            target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.json").write_text("{not json")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom texq.util.lock import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(3600)\n",
                               str(d / "busy")], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    rows, failed = [], 0
    try:
        for name, argv, needle, extra in cases(f, d, run_dir):
            if args.only and args.only not in name:
                continue
            before = snapshot(d)
            t0 = time.time()
            proc = subprocess.run([*texq, *argv], env={**env, **extra}, capture_output=True, text=True,
                                  cwd=d, timeout=600)
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("texq: error:")]
            after = snapshot(d)
            written = sorted(set(after) - set(before)) + sorted(k for k in before if k in after and after[k] != before[k])
            written = [w for w in written if not w.endswith(("__pycache__", ".pyc")) and "__pycache__" not in w]
            if full and str(full) in " ".join(map(str, argv)):
                written += left_whole(full)
            ok = (proc.returncode == 2 and len(lines) == 1 and needle in lines[0]
                  and "Traceback" not in proc.stderr and not written)
            failed += not ok
            rows.append((name, proc.returncode, len(lines), ok, time.time() - t0,
                         lines[0] if lines else proc.stderr.strip().splitlines()[-1:], written))
            print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {proc.returncode}, {len(lines)} line(s) "
                  f"{'' if ok else proc.stderr[-600:]} {written if written else ''}\n     {lines[0] if lines else ''}",
                  flush=True)
    finally:
        holder.kill()
        holder.wait()
        if full:
            subprocess.run(["umount", str(full)], capture_output=True)
            shutil.rmtree(full, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    print(f"\n{len(rows) - failed} of {len(rows)} cases: exit 2, one line, no traceback, nothing written")
    print(json.dumps({"cases": len(rows), "ok": len(rows) - failed, "failed": [r[0] for r in rows if not r[3]]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
