#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included): tests/ in the project's virtual environment,
# then tests/verl/ in the verl environment (.venv-verl, `make install-verl`), where verl must import:
# ENTRORL_REQUIRE_VERL=1 turns a missing verl into a failure instead of a skip.
# Arguments are passed to the first pytest run only (which lists its 25 slowest tests); VERL_ONLY=1 runs just the
# verl tests. The first run spreads its tests over one process per CPU core (pytest-xdist; TEST_WORKERS=N sets how
# many, TEST_WORKERS=0 runs them in this process), each torch with one thread (OMP_NUM_THREADS, unless set), so that
# the workers and the processes the tests start do not compete for the cores.
# pytest exits 5 when it collected no test: that is neither a pass nor a test failure but a broken
# test selection, so it is reported as such and fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
VERL_PYTHON=${VERL_PYTHON:-.venv-verl/bin/python}

run_pytest() {
    local label=$1
    shift
    "$@"
    local status=$?
    if [ "$status" -eq 5 ]; then
        echo "run_tests: pytest collected no tests in the $label run (exit 5); the test selection is broken, failing the run" >&2
        return 3
    fi
    return "$status"
}

status=0
if [ "${VERL_ONLY:-0}" != "1" ]; then
    workers=${TEST_WORKERS:-auto}
    one_thread=() parallel=()
    if [ "$workers" != "0" ]; then
        one_thread=(env "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
        parallel=(-n "$workers" --dist worksteal)
    fi
    # ${a[@]+"${a[@]}"}: an empty array expands to nothing under set -u in bash before 4.4 too (macOS's /bin/bash)
    run_pytest main ${one_thread[@]+"${one_thread[@]}"} "$PYTHON" -m pytest --ignore=tests/verl --durations=25 \
        ${parallel[@]+"${parallel[@]}"} "$@"
    status=$?
fi
if [ ! -x "$VERL_PYTHON" ]; then
    echo "run_tests: $VERL_PYTHON not found; create the verl environment with 'make install-verl'" >&2
    exit 4
fi
ENTRORL_REQUIRE_VERL=1 run_pytest verl "$VERL_PYTHON" -m pytest tests/verl -p no:cacheprovider
verl_status=$?
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
exit "$verl_status"
