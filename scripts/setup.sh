#!/usr/bin/env bash
# Create (or bring up to date) the Python environment and install texq into it.
#   TEXQ_VENV  where the environment lives (default: .venv in the project)
#   PYTHON     the interpreter that creates it (default: python3, 3.11 or newer)
# The dependencies are reinstalled only when the dependency spec in pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TEXQ_VENV:-.venv}"
hash="$("$PYTHON" scripts/dep_hash.py)"
stamp="$VENV/.texq-deps-$hash"
pip_quiet=(--quiet --disable-pip-version-check)
if [ ! -f "$stamp" ]; then
    echo "setup: installing dependencies into $VENV (a few minutes the first time)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install "${pip_quiet[@]}" --upgrade pip "setuptools>=68" wheel
    "$VENV/bin/python" -m pip install "${pip_quiet[@]}" -e ".[test]"
    rm -f "$VENV"/.texq-deps-*
    touch "$stamp"
else
    # dependencies are current: (re)link this checkout only
    "$VENV/bin/python" -m pip install "${pip_quiet[@]}" --no-deps --no-build-isolation -e .
fi
# dvc plots show's page with its chart library inline (.dvc/config.local names it): charts offline
"$VENV/bin/python" -m flows.plots >/dev/null
echo "setup: ready ($VENV, dependency spec $hash)" >&2
