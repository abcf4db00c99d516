"""scripts/gpu_checks.sh (``make test-gpu``) on a machine without a GPU: what it refuses, and how it names what an
offline GPU machine's Python still lacks before any test runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def _run(tmp_path: Path, *, nvidia_smi: bool, python: str = sys.executable, **variables: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'one pretend GPU'\n")
        fake.chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GPU_")}
    environment["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    environment.update(GPU_PYTHON=python, GPU_VENV=str(tmp_path / "gpu-env"), GPU_LOG=str(tmp_path / "log"),
                       **variables)
    return subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=300)


def _python_without(tmp_path: Path, module: str) -> str:
    """A Python launcher for this interpreter in which ``module`` cannot be imported (as on a machine lacking it)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc
        import sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == {module!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Missing())
    """))
    launcher = tmp_path / "python"
    launcher.write_text(f'#!/bin/sh\nPYTHONPATH="{blocker}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    return str(launcher)


@pytest.mark.skipif(shutil.which("nvidia-smi", path=f"/usr/bin{os.pathsep}/bin") is not None,
                    reason="this machine's own nvidia-smi is on the path the script is given")
def test_without_a_gpu_there_is_nothing_to_check(tmp_path):
    result = _run(tmp_path, nvidia_smi=False)
    assert result.returncode == 4
    assert "no CUDA GPU here" in result.stderr
    assert not (tmp_path / "gpu-env").exists()


def test_a_wheels_folder_that_does_not_exist_is_refused(tmp_path):
    result = _run(tmp_path, nvidia_smi=True, GPU_WHEELS=str(tmp_path / "no-such-folder"))
    assert result.returncode == 1
    assert "is not a folder" in result.stderr


def test_offline_a_missing_module_is_named_with_the_wheels_it_needs(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = _run(tmp_path, nvidia_smi=True, python=_python_without(tmp_path, "pydantic"), GPU_WHEELS=str(wheels))
    assert result.returncode == 1
    assert "missing: pydantic (No module named 'pydantic')" in result.stderr
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"wheels must be for Python {version}" in result.stderr
    assert "the environment is incomplete" in result.stderr
    assert not (tmp_path / "log").exists()  # no test ran


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal of a torch without CUDA")
def test_offline_a_torch_without_cuda_is_refused_before_any_test(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = _run(tmp_path, nvidia_smi=True, GPU_WHEELS=str(wheels))
    assert result.returncode == 1
    assert "sees no CUDA GPU" in result.stderr
    assert not (tmp_path / "log").exists()
