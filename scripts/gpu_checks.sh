#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: an environment with vLLM (which brings its own CUDA build of
# torch, so it never shares the CPU environment), then the tests that skip without a GPU: vLLM's log-probs
# against the trainer's forward pass, before and after a weight sync (tests/test_vllm_sampler.py), training on
# the GPU (tests/test_trainer.py), and the diagnostics that the TRL integration computes on the accelerator's
# micro-batches (tests/test_diagnostics.py). A skipped GPU test fails the checks.
#
# Usage: bash scripts/gpu_checks.sh   (or make test-gpu)
#   GPU_VENV, GPU_PYTHON  the environment built (default .venv-gpu) and the Python that builds it (python3)
#   GPU_WHEELS=DIR        offline, on a machine without a package index: GPU_PYTHON's own CUDA torch and
#                         packages, plus the wheels in DIR installed without their dependencies (into
#                         GPU_VENV/site), and entrorl from src/; a module still missing is named with the
#                         version of Python and platform its wheel must be for
#   GPU_SKIP_VLLM=1       where vLLM cannot be installed: run the other GPU checks and say that vLLM's were not run
#   GPU_LOG               where pytest's output is kept (default gpu_checks.log)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_VENV=${GPU_VENV:-.venv-gpu}
GPU_PYTHON=${GPU_PYTHON:-python3}
GPU_WHEELS=${GPU_WHEELS:-}
GPU_SKIP_VLLM=${GPU_SKIP_VLLM:-0}
GPU_LOG=${GPU_LOG:-gpu_checks.log}

fail() {
    echo "gpu_checks: $1" >&2
    exit "${2:-1}"
}

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
    fail "no CUDA GPU here (nvidia-smi fails); nothing to check" 4
fi

if [ -n "$GPU_WHEELS" ]; then
    [ -d "$GPU_WHEELS" ] || fail "GPU_WHEELS=$GPU_WHEELS is not a folder"
    site="$GPU_VENV/site"
    rm -rf "$site"
    mkdir -p "$site"
    shopt -s nullglob
    wheels=("$GPU_WHEELS"/*.whl)
    shopt -u nullglob
    if [ "${#wheels[@]}" -gt 0 ]; then
        "$GPU_PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${wheels[@]}"
    fi
    export PYTHONPATH="$PWD/src:$(cd "$site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
    python=$GPU_PYTHON
else
    # built to the end once (the stamp is written last): a build that stopped midway is taken up again
    if [ ! -f "$GPU_VENV/.installed" ]; then
        "$GPU_PYTHON" -m venv "$GPU_VENV"
        "$GPU_VENV/bin/pip" install --quiet --upgrade pip
        if [ "$GPU_SKIP_VLLM" = 1 ]; then
            "$GPU_VENV/bin/pip" install --quiet torch
        else
            "$GPU_VENV/bin/pip" install --quiet "vllm>=0.10.2"
        fi
        # hold the torch installed above (vLLM's choice), so that entrorl's requirements cannot replace it
        "$GPU_VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$GPU_VENV/constraints.txt"
        "$GPU_VENV/bin/pip" install --quiet -c "$GPU_VENV/constraints.txt" -e ".[dev]"
        touch "$GPU_VENV/.installed"
    fi
    python="$GPU_VENV/bin/python"
fi

# every module the GPU tests import, so that a missing one is named before any test runs
rebuild=$([ -n "$GPU_WHEELS" ] || echo "; remove $GPU_VENV to build it again")
GPU_WHEELS="$GPU_WHEELS" "$python" - <<'PY' || fail "the environment is incomplete (above)$rebuild"
import importlib
import os
import platform
import sys

missing = []
for name in ("torch", "numpy", "yaml", "pydantic", "transformers", "tokenizers", "safetensors", "typer", "rich",
             "peft", "pytest", "pytest_timeout", "entrorl.trainer", "entrorl.trainer.diagnostics", "entrorl.rollout"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(f"{name} ({error})")
if missing:
    print("missing: " + "; ".join(missing), file=sys.stderr)
    if os.environ.get("GPU_WHEELS"):
        print(f"wheels must be for Python {sys.version_info.major}.{sys.version_info.minor} on {platform.machine()} "
              f"({sys.implementation.name})", file=sys.stderr)
    sys.exit(1)
import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} here sees no CUDA GPU")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY

if "$python" -c "import vllm; print('vllm', vllm.__version__)"; then
    vllm_here=1
elif [ "$GPU_SKIP_VLLM" = 1 ]; then
    vllm_here=0
else
    fail "vllm cannot be imported (above); GPU_SKIP_VLLM=1 runs the other GPU checks$rebuild"
fi

# -rA lists every test's outcome: each test that needs the GPU must be among the passed ones, not skipped
gpu_tests=(test_training_on_cuda_matches_the_cpu_step
           test_the_diagnostics_of_a_batch_on_cuda_equal_those_of_the_same_batch_on_the_cpu)
if [ "$vllm_here" = 1 ]; then
    gpu_tests+=(test_vllm_log_probs_match_the_trainer_forward_pass)
fi
# a log that cannot be written would read as GPU tests that did not pass
{ mkdir -p "$(dirname "$GPU_LOG")" && : > "$GPU_LOG"; } || fail "cannot write the log GPU_LOG=$GPU_LOG"
set +o pipefail  # pytest's own status, not tee's
"$python" -m pytest tests/test_vllm_sampler.py tests/test_trainer.py tests/test_diagnostics.py -k "vllm or cuda" \
    -rA --color=no -p no:cacheprovider | tee "$GPU_LOG"
pytest_status=${PIPESTATUS[0]}
set -o pipefail
for test in "${gpu_tests[@]}"; do
    grep -Eq "^PASSED .*::$test( |$)" "$GPU_LOG" || fail "$test did not pass on this GPU (see $GPU_LOG)" 3
done
[ "$pytest_status" -eq 0 ] || fail "the GPU tests passed but another selected test did not (pytest exit $pytest_status; see $GPU_LOG)"
if [ "$vllm_here" = 1 ]; then
    echo "gpu_checks: the ${#gpu_tests[@]} GPU tests passed, vLLM's comparison with the trainer included"
else
    echo "gpu_checks: the ${#gpu_tests[@]} GPU tests passed; vLLM's comparison with the trainer was NOT run (no vllm here)"
fi
