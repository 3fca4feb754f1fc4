#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and torch + torchvision (>= 2.4) but possibly no internet
# and no pip: runs texq from this source tree (PYTHONPATH), no install. In about 5 minutes:
#   1. the tests marked `cuda` (every method on CUDA, CUDA vs CPU, graph replay vs eager steps,
#      same seed same run) and the placement/augmentation tests;
#   2. bench/train_speed.py: FP vs W4A4 step ratio, step 1 and steps 2-3 ms per iteration, the
#      projected paper-protocol minutes (float32, then TF32), concurrent runs (1, 2, 4);
#   3. one quick-profile run (TexQ W4A4, seed 0) on the GPU, to set beside the CPU's figure.
# Then one summary. Results go to $TEXQ_CHECK_OUT (default out/gpu_check). The real model and images
# come from $TEXQ_ASSETS (default ../shared/assets); without them step 3 is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${TEXQ_CHECK_OUT:-out/gpu_check}"
mkdir -p "$out"
assets="${TEXQ_ASSETS:-../shared/assets}"
py="${PYTHON:-python3}"
step() { echo "== $1 ($(date +%T))" >&2; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
"$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' | tee -a "$out/device.txt"

step "cuda tests"
TEXQ_ASSETS="$assets" timeout 300 "$py" -m pytest -q -p no:cacheprovider \
    tests/run/test_cuda.py tests/method/test_placement.py tests/method/test_augment.py 2>&1 | tee "$out/tests.log" | tail -5
tests_rc=${PIPESTATUS[0]}

step "benchmark (float32, CUDA graphs; then TF32)"
timeout 360 "$py" bench/train_speed.py --device cuda --imagenet --concurrency "${TEXQ_CHECK_CONCURRENCY-1,2,4}" \
    --seconds 10 2>"$out/bench.err" | tee "$out/bench.log" | grep -v '^{'
timeout 120 "$py" bench/train_speed.py --device cuda --tf32 2>>"$out/bench.err" | tee "$out/bench_tf32.log" | grep -v '^{'

quick_rc=skipped
if [ -f "$assets/cifar10/resnet20-12fca82f.th" ]; then
    step "quick profile on the GPU (TexQ W4A4, seed 0)"
    rm -rf "$out/quick"
    timeout 600 "$py" -m texq.cli run --model resnet20a_cifar10 \
        --checkpoint "$assets/cifar10/resnet20-12fca82f.th" --data "$assets/cifar10/test_first1000.npz" \
        --w-bits 4 --a-bits 4 --method texq --profile quick --seed 0 --device cuda --no-progress \
        --out "$out/quick" >"$out/quick.log" 2>&1
    quick_rc=$?
fi

step "summary"
"$py" - "$out" "$tests_rc" "$quick_rc" <<'PY'
import json, sys
from pathlib import Path
out, tests_rc, quick_rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print("device:", " | ".join((out / "device.txt").read_text().split("\n")[:2]))
tail = (out / "tests.log").read_text().strip().splitlines()
print("tests:", tail[-1] if tail else "no output", f"(rc {tests_rc})")
for name, label in (("bench.log", "float32"), ("bench_tf32.log", "TF32")):
    lines = (out / name).read_text().strip().splitlines() if (out / name).exists() else []
    if lines and lines[-1].startswith("{"):  # the benchmark's own summary lines
        print(f"{label}:", *[f"  {ln}" for ln in lines if not ln.startswith("{")], sep="\n")
    else:
        print(f"{label} benchmark failed: see", out / "bench.err")
m = out / "quick" / "metrics.json"
if m.exists():
    r = json.loads(m.read_text())
    print(f"quick profile on {r['device']}: top-1 {r['top1']:.1f} ({r['correct']}/{r['n']}), "
          f"FP {r['fp_top1']:.1f}, {r['seconds']:.0f} s")
else:
    print("quick profile:", "skipped (no assets)" if quick_rc == "skipped" else f"failed (rc {quick_rc})")
PY
