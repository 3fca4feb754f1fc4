#!/usr/bin/env bash
# The main job: the default pipeline (params.yaml: TexQ W4A4 on the CIFAR-10 ResNet-20, quick
# profile, seed 0) with `dvc repro`: teacher -> synthesize -> train -> evaluate, each run tracked in
# MLflow (mlflow.db in the project root). About 10 minutes on a 2-core CPU; a rerun with nothing
# changed does nothing. Extra arguments go to `dvc repro` (e.g. --force).
# Offline, the model and images come from $TEXQ_ASSETS (default ../shared/assets, when present);
# with internet and no assets, the published ResNet-20 weights and torchvision's CIFAR-10.
# Results: out/pipeline/metrics.json (and teacher.json), and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEXQ_VENV:-.venv}"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"   # dvc.yaml's commands run this venv's python
if [ -z "${TEXQ_ASSETS:-}" ] && [ -d ../shared/assets ]; then
    export TEXQ_ASSETS="$(cd ../shared/assets && pwd)"
fi
echo "main: dvc repro (params.yaml, profile $(python -c 'import yaml; print(yaml.safe_load(open("params.yaml"))["profile"])'))," \
     "assets: ${TEXQ_ASSETS:-none, downloading}" >&2
dvc repro "$@"
python - <<'PY'
import json
from pathlib import Path

m = json.loads(Path("out/pipeline/metrics.json").read_text())
lo, hi = m["top1_ci95"]
print(f"| model | top-1 % | 95% interval | correct / n |")
print(f"| --- | --- | --- | --- |")
print(f"| full precision | {m['fp_top1']:.1f} | | |")
print(f"| {m['method']} W{m['w_bits']}A{m['a_bits']} (seed {m['seed']}) | {m['top1']:.1f} "
      f"| {lo:.1f}-{hi:.1f} | {m['correct']} / {m['n']} |")
print("metrics: out/pipeline/metrics.json; runs: mlflow ui --backend-store-uri sqlite:///mlflow.db")
PY
