#!/usr/bin/env bash
# The candidate speed-ups of steps 2-3 on a GPU, in one command of at most ~9 minutes, for a machine
# with a CUDA GPU and torch + torchvision but possibly no internet and no pip (texq runs from this
# source tree). Six small files come back in $TEXQ_CHECK_OUT (default out/gpu_speedups; $OUT when set):
#   device.txt    the GPU, driver, torch;
#   tests.log     the CUDA tests of the speed-ups (graph replay = eager steps for each) and of graphs;
#   speed.log     bench/speedups.py: ms per iteration and projected paper-protocol minutes for each
#                 speed-up alone and all together, and runs per hour with 1, 2, 4 runs per process;
#   quick.jsonl   quick-profile runs (TexQ W4A4, seeds 0..N-1) with the base settings and with the
#                 speed-ups that change numbers (bf16 + bounded; compile is speed only): does
#                 accuracy move beyond run-to-run noise? As many seeds as the deadline allows;
#                 TEXQ_CHECK_PHASES=quick runs this phase alone (n = 3 in one window).
#   summary.txt   the figures above in a few lines;
#   speed.err     the last 200 lines of the benchmark's stderr (compiler warnings, a failure's reason);
#   paper/        with TEXQ_CHECK_PHASES=...,paper: bench/paper_runs.py in the time left (Table 1's runs
#                 in order, $TEXQ_PAPER_RUNS to choose): its summary.txt and one <run>.tar.gz to carry on.
# Each phase has a time limit and the script stops starting phases after TEXQ_CHECK_DEADLINE seconds
# (default 500), so the command ends within a 9-minute window with its files written.
# TEXQ_DEVICE=cpu runs the same phases on the CPU with the tiny profile (the tests' check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${TEXQ_CHECK_OUT:-${OUT:-out/gpu_speedups}}"
mkdir -p "$out"
assets="${TEXQ_ASSETS:-../shared/assets}"
py="${PYTHON:-python3}"
device="${TEXQ_DEVICE:-cuda}"
deadline=$(( $(date +%s) + ${TEXQ_CHECK_DEADLINE:-500} ))
seeds="${TEXQ_CHECK_SEEDS:-3}"
phases=",${TEXQ_CHECK_PHASES:-tests,speed,quick},"   # which phases run (device and summary always do)
want() { [[ "$phases" == *",$1,"* ]]; }
if [ "$device" = cuda ]; then
    profile=quick paper_profile=paper bench_args=(--iters 40 --seconds 10 --streams "${TEXQ_CHECK_STREAMS-1,2,4}")
    variants="${TEXQ_CHECK_VARIANTS:-base,bf16,bounded,compile,tf32,bf16-nhwc,all}"
else
    profile=tiny paper_profile=tiny bench_args=(--iters 2 --seconds 1 --streams 1,2 --device cpu --backend aot_eager
                             --model resnet8a_cifar10 --batch 8)
    variants="${TEXQ_CHECK_VARIANTS:-base,bounded,all}"
fi
left() { echo $(( deadline - $(date +%s) )); }
step() { echo "== $1 ($(date +%T), $(left) s left)" >&2; }

step "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi ($device)"
  "$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
} > "$out/device.txt"
cat "$out/device.txt"

if [ "$device" = cuda ] && want tests; then
    step "cuda tests of the speed-ups"
    timeout "$(( $(left) < 150 ? $(left) : 150 ))" "$py" -m pytest -q -p no:cacheprovider tests/run/test_cuda.py \
        -k "speedups or graph_replay" > "$out/tests.log" 2>&1
    echo "rc $?" >> "$out/tests.log"
else
    echo "skipped: $(want tests && echo "no CUDA device" || echo "not among TEXQ_CHECK_PHASES")" > "$out/tests.log"
fi
tail -2 "$out/tests.log"

: > "$out/speed.log"; : > "$out/speed.err"
if want speed; then
    step "speed table"
    timeout "$(( $(left) < 240 ? $(left) : 240 ))" "$py" bench/speedups.py --variants "$variants" "${bench_args[@]}" \
        > "$out/speed.log" 2>"$out/speed.err"
    echo "rc $?" >> "$out/speed.log"
fi
grep -v '^{' "$out/speed.log"
tail -n 200 "$out/speed.err" > "$out/speed.err.tmp" && mv "$out/speed.err.tmp" "$out/speed.err"

step "quick-profile runs: base vs bf16 + bounded"
: > "$out/quick.jsonl"
mkdir -p "$out/.runs"
if ! want quick; then
    echo "quick-profile runs: not among TEXQ_CHECK_PHASES" >&2
elif [ -f "$assets/cifar10/resnet20-12fca82f.th" ]; then
    for seed in $(seq 0 $(( seeds - 1 ))); do
        for variant in base all; do
            [ "$(left)" -gt 45 ] || { echo "deadline: seed $seed $variant not run" >&2; continue; }
            set_args=()
            [ "$variant" = all ] && set_args=(--set precision=bf16 --set finetune.mix_slots=bounded)
            [ "$variant" = all ] && [ "$device" != cuda ] && set_args=(--set finetune.mix_slots=bounded)
            run_dir="$out/.runs/$variant-$seed"
            rm -rf "$run_dir"
            timeout "$(( $(left) - 5 ))" "$py" -m texq.cli run --model resnet20a_cifar10 \
                --checkpoint "$assets/cifar10/resnet20-12fca82f.th" --data "$assets/cifar10/test_first1000.npz" \
                --w-bits 4 --a-bits 4 --method texq --profile "$profile" --seed "$seed" --device "$device" \
                --no-progress --out "$run_dir" "${set_args[@]}" > "$out/.runs/$variant-$seed.log" 2>&1
            "$py" - "$run_dir" "$variant" "$seed" $? >> "$out/quick.jsonl" <<'PY'
import json, sys
from pathlib import Path
run, variant, seed, rc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = run / "metrics.json"
row = {"variant": variant, "seed": seed, "rc": rc}
if m.exists():
    r = json.loads(m.read_text())
    row.update({k: r[k] for k in ("profile", "device", "top1", "correct", "n", "fp_top1", "train_seconds")})
print(json.dumps(row))
PY
            tail -1 "$out/quick.jsonl"
        done
    done
else
    echo "skipped: no $assets/cifar10/resnet20-12fca82f.th" >&2
fi
rm -rf "$out/.runs"

if want paper; then
    step "paper protocol in the time left"
    read -r -a paper_runs <<< "${TEXQ_PAPER_RUNS:-}"
    "$py" bench/paper_runs.py run "${paper_runs[@]}" --seconds "$(( $(left) > 0 ? $(left) : 0 ))" \
        --out "$out/paper" --assets "$assets" --device "$device" --profile "$paper_profile" --max-files 2
fi

step "summary"
"$py" - "$out" > "$out/summary.txt" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("device:", " | ".join((out / "device.txt").read_text().split("\n")[:2]))
tail = [ln for ln in (out / "tests.log").read_text().splitlines() if ln.strip()]
print("tests:", " / ".join(tail[-2:]) if tail else "no output")
lines = (out / "speed.log").read_text().splitlines()
rows = [ln for ln in lines if ln and not ln.startswith("{")]
print("speed:", *[f"  {ln}" for ln in rows], sep="\n")
paper = out / "paper" / "summary.txt"
if paper.exists():
    print("paper protocol:", *[f"  {ln}" for ln in paper.read_text().splitlines()], sep="\n")
quick = [json.loads(ln) for ln in (out / "quick.jsonl").read_text().splitlines() if ln.strip()]
for variant in ("base", "all"):  # all: bf16 + bounded
    done = [r for r in quick if r["variant"] == variant and "top1" in r]
    if done:
        tops = [r["top1"] for r in done]
        sd = statistics.stdev(tops) if len(tops) > 1 else float("nan")
        secs = statistics.mean(r["train_seconds"] for r in done)
        print(f"quick profile {variant}: top-1 {statistics.mean(tops):.2f} +- {sd:.2f} "
              f"(n={len(tops)}, seeds {[r['seed'] for r in done]}), train {secs:.0f} s a run")
    failed = [r for r in quick if r["variant"] == variant and "top1" not in r]
    if failed:
        print(f"quick profile {variant}: {len(failed)} run(s) failed or were cut off "
              f"(seeds {[r['seed'] for r in failed]})")
PY
cat "$out/summary.txt"
