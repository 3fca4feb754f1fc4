#!/usr/bin/env bash
# Run the test suite (sets up the environment first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${TEXQ_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest "$@"
