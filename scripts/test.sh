#!/usr/bin/env bash
# Run the test suite (sets up the environment first if needed). Extra arguments go to pytest.
# The test modules run in parallel processes (pytest-xdist, a module at a time per process: a
# module's tests share its servers and runs; the slowest modules first, tests/conftest.py): one per
# core, at most 4 (TEXQ_TEST_WORKERS=N to choose, 0 for one process). On a 2-core machine two
# processes took 37 minutes where one took 65 (docs/testing.md): most tests wait on one
# single-threaded subprocess at a time, so one process leaves a core idle.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${TEXQ_VENV:-.venv}"
n="${TEXQ_TEST_WORKERS:-auto}"
if [ "$n" = auto ]; then
    n=$(nproc 2>/dev/null || echo 1)
    n=$(( n > 4 ? 4 : (n < 2 ? 0 : n) ))  # 1 core: one process, no xdist
fi
workers=()
if [ "$n" != 0 ]; then
    workers=(-n "$n" --dist loadscope --no-loadscope-reorder)
fi
exec "$VENV/bin/python" -m pytest "${workers[@]}" "$@"
