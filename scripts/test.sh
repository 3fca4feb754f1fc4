#!/usr/bin/env bash
# Run the test suite (sets up the environment first if needed). Extra arguments go to pytest.
# Tests run in parallel (pytest-xdist): TEXQ_TEST_WORKERS processes (default: one per CPU core),
# each taking one test module at a time (a module's tests share its servers and runs), the slowest
# modules first (tests/conftest.py). TEXQ_TEST_WORKERS=0 runs them in this one process; a later
# -n in the arguments wins.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${TEXQ_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -n "${TEXQ_TEST_WORKERS:-auto}" --dist loadscope --no-loadscope-reorder "$@"
