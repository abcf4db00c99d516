#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: an environment with vLLM (which brings its own CUDA build of
# torch, so it never shares the CPU environment), then the tests that skip without a GPU: vLLM's log-probs
# against the trainer's forward pass, before and after a weight sync and with LoRA adapters' merged weights
# (tests/test_vllm_sampler.py), training on the GPU (tests/test_trainer.py), and the diagnostics that the TRL
# integration computes on the accelerator's micro-batches (tests/test_diagnostics.py).
# Usage: bash scripts/gpu_checks.sh   (or make test-gpu); GPU_VENV and GPU_PYTHON choose the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_VENV=${GPU_VENV:-.venv-gpu}
GPU_PYTHON=${GPU_PYTHON:-python3}

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
    echo "gpu_checks: no CUDA GPU here (nvidia-smi fails); nothing to check" >&2
    exit 4
fi
if [ ! -x "$GPU_VENV/bin/python" ]; then
    "$GPU_PYTHON" -m venv "$GPU_VENV"
    "$GPU_VENV/bin/pip" install --quiet --upgrade pip
    "$GPU_VENV/bin/pip" install --quiet "vllm>=0.10.2"
    # hold the torch that vLLM chose, so that entrorl's requirements cannot replace it
    "$GPU_VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$GPU_VENV/constraints.txt"
    "$GPU_VENV/bin/pip" install --quiet -c "$GPU_VENV/constraints.txt" -e ".[dev]"
fi
"$GPU_VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(); print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())"
# -rs lists skipped tests: on a GPU machine the vLLM test must run, so a skip here is a failure
"$GPU_VENV/bin/python" -m pytest tests/test_vllm_sampler.py tests/test_trainer.py tests/test_diagnostics.py -k "vllm or cuda" -rs -p no:cacheprovider | tee "${OUT:-.}/gpu_checks.log"
if grep -Eq "SKIPPED.*needs (vllm and )?a CUDA GPU" "${OUT:-.}/gpu_checks.log"; then
    echo "gpu_checks: a GPU test was skipped on a GPU machine" >&2
    exit 3
fi
