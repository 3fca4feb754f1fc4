#!/usr/bin/env bash
# Create (or bring up to date) the Python environment and install texq into it.
#   TEXQ_VENV  where the environment lives (default: .venv in the project)
#   PYTHON     the interpreter that creates it (default: python3, 3.11 or newer)
#   TEXQ_PIP=1 install with pip instead of uv
# The dependencies are reinstalled only when the dependency spec in pyproject.toml changes. They
# are installed with uv (PyPI's uv wheel, put into the environment first): the same resolution
# as pip's, in about a minute instead of several; pip does it where uv cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TEXQ_VENV:-.venv}"
hash="$("$PYTHON" scripts/dep_hash.py)"
stamp="$VENV/.texq-deps-$hash"
pip_quiet=(--quiet --disable-pip-version-check)
install() {  # install ARGS... into the environment, with uv where it is there
    if [ -x "$VENV/bin/uv" ] && [ "${TEXQ_PIP:-0}" != 1 ]; then
        "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" "$@"
    else
        "$VENV/bin/python" -m pip install "${pip_quiet[@]}" "$@"
    fi
}
if [ ! -f "$stamp" ]; then
    echo "setup: installing dependencies into $VENV (about a minute the first time with uv)" >&2
    "$PYTHON" -m venv "$VENV"
    if [ "${TEXQ_PIP:-0}" != 1 ] && ! "$VENV/bin/python" -m pip install "${pip_quiet[@]}" uv; then
        echo "setup: uv could not be installed: installing with pip (several minutes)" >&2
    fi
    [ -x "$VENV/bin/uv" ] || install --upgrade pip "setuptools>=68" wheel
    install -e ".[test]"
    rm -f "$VENV"/.texq-deps-*
    touch "$stamp"
else
    # dependencies are current: (re)link this checkout only
    install --no-deps -e .
fi
# dvc plots show's page with its chart library inline (.dvc/config.local names it): charts offline
"$VENV/bin/python" -m flows.plots >/dev/null
echo "setup: ready ($VENV, dependency spec $hash)" >&2
