#!/usr/bin/env bash
# Run the test suite (sets up the environment first if needed). Extra arguments go to pytest.
# TEXQ_TEST_WORKERS=N runs the test modules in N processes (pytest-xdist, a module at a time per
# process: a module's tests share its servers and runs; the slowest modules first, tests/conftest.py).
# The default is one process: on a 2-core machine two workers ran the suite slower than one (their
# servers, workers and stage processes compete for the same two cores), see docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${TEXQ_VENV:-.venv}"
workers=()
if [ "${TEXQ_TEST_WORKERS:-0}" != 0 ]; then
    workers=(-n "$TEXQ_TEST_WORKERS" --dist loadscope --no-loadscope-reorder)
fi
exec "$VENV/bin/python" -m pytest "${workers[@]}" "$@"
