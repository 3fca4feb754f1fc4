#!/usr/bin/env bash
# The main job: evaluate the CIFAR-10 ResNet-20 at full precision, then quantized to W8A8, W4A4
# and W3A3 with activation ranges from Gaussian noise (no data, no fine-tuning).
# Offline, it uses the shared assets ($TEXQ_ASSETS, default ../shared/assets); with internet and
# no assets, the published pytorchcv ResNet-20 and the torchvision CIFAR-10 test set.
# Results: one JSON per setting under ${TEXQ_OUT:-out/main}, and a summary table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEXQ_VENV:-.venv}"
OUT="${TEXQ_OUT:-out/main}"
ASSETS="${TEXQ_ASSETS:-../shared/assets}"
if [ -f "$ASSETS/cifar10/resnet20-12fca82f.th" ]; then
    src=(--model resnet20a_cifar10 --checkpoint "$ASSETS/cifar10/resnet20-12fca82f.th"
         --data "$ASSETS/cifar10/test_first1000.npz")
else
    echo "main: no shared assets at $ASSETS: using published weights and torchvision CIFAR-10" >&2
    src=(--model resnet20_cifar10 --pretrained --data cifar10)
fi
mkdir -p "$OUT"
for bits in 32 8 4 3; do
    "$VENV/bin/texq" eval "${src[@]}" --w-bits "$bits" --a-bits "$bits" --no-progress \
        --out "$OUT/w${bits}a${bits}.json" > /dev/null
done
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| bits | top-1 % | 95% interval | correct / n |")
print("| --- | --- | --- | --- |")
for bits in (32, 8, 4, 3):
    r = json.loads((Path(sys.argv[1]) / f"w{bits}a{bits}.json").read_text())
    name = "FP32" if bits == 32 else f"W{bits}A{bits}"
    lo, hi = r["top1_ci95"]
    print(f"| {name} | {r['top1']:.1f} | {lo:.1f}-{hi:.1f} | {r['correct']} / {r['n']} |")
PY
