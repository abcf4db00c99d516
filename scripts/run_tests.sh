#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) with the project's virtual environment.
# pytest exits 5 when it collected no test: that is neither a pass nor a test failure but a broken
# test selection, so it is reported as such and fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run_tests: pytest collected no tests (exit 5); the test selection is broken, failing the run" >&2
    exit 3
fi
exit "$status"
