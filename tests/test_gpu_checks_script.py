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
    environment.update({"GPU_PYTHON": python, "GPU_VENV": str(tmp_path / "gpu-env"), "GPU_LOG": str(tmp_path / "log"),
                        **variables})
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


def _python_with_a_pretend_gpu(tmp_path: Path, test_file: Path) -> str:
    """A Python launcher that passes the module check as on a GPU machine, has no vllm, and runs pytest on
    ``test_file`` instead of the GPU tests, with every option the script gives."""
    launcher = tmp_path / "python"
    launcher.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        arguments = sys.argv[1:]
        if arguments[:1] == ["-"]:
            sys.stdin.read()
            print("torch x, pretend GPU")
            sys.exit(0)
        if arguments[:1] == ["-c"]:
            sys.exit(1)
        options = [a for a in arguments[2:] if not a.startswith("tests/")]
        os.execv({sys.executable!r}, [{sys.executable!r}, "-m", "pytest", {str(test_file)!r}, *options])
    """))
    launcher.chmod(0o755)
    return str(launcher)


@pytest.mark.parametrize("colour", ["0", "1"])
def test_the_gpu_tests_must_each_be_among_the_passed_ones(tmp_path, colour):
    """Stand-ins named as the GPU tests: both passing is a pass, even where pytest colours its output (PY_COLORS=1,
    as on many CI machines: the PASSED lines were then not found); one skipped fails the checks."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    stand_ins = tmp_path / "stand_ins" / "test_stand_ins.py"
    stand_ins.parent.mkdir()
    stand_ins.write_text("def test_training_on_cuda_matches_the_cpu_step():\n    pass\n\n\n"
                         "def test_the_diagnostics_of_a_batch_on_cuda_equal_those_of_the_same_batch_on_the_cpu():\n"
                         "    pass\n")
    python = _python_with_a_pretend_gpu(tmp_path, stand_ins)
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels), GPU_SKIP_VLLM="1",
                  PY_COLORS=colour)
    assert result.returncode == 0, result.stderr
    assert "the 2 GPU tests passed; vLLM's comparison with the trainer was NOT run" in result.stdout

    stand_ins.write_text(stand_ins.read_text().replace("def test_training", "import pytest\n\n\n"
                                                       "@pytest.mark.skip(reason='needs a CUDA GPU')\ndef test_training"))
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels), GPU_SKIP_VLLM="1",
                  PY_COLORS=colour)
    assert result.returncode == 3
    assert "test_training_on_cuda_matches_the_cpu_step did not pass on this GPU" in result.stderr


def test_without_vllm_and_without_leave_to_skip_it_nothing_runs(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    python = _python_with_a_pretend_gpu(tmp_path, tmp_path / "unused.py")
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels))
    assert result.returncode == 1
    assert "vllm cannot be imported" in result.stderr and "GPU_SKIP_VLLM=1" in result.stderr
    assert not (tmp_path / "log").exists()


def test_a_build_of_the_gpu_environment_that_stopped_midway_is_taken_up_again(tmp_path):
    """The environment was built only where its python was missing: a first build stopped after the venv was made
    (vLLM's install failing: no network, a full disk, Ctrl-C) left every later run without it, naming missing modules
    until the folder was deleted by hand. It is built until its last step has run."""
    pip_calls = tmp_path / "pip-calls"
    maker = tmp_path / "python3"

    def venvs_whose_pip(then: str) -> None:
        """``maker -m venv DIR`` makes a venv whose python is this one and whose pip logs its call, then ``then``."""
        pip = tmp_path / "pip"
        pip.write_text(f'#!/bin/sh\necho "pip $*" >> "{pip_calls}"\n{then}\n')
        pip.chmod(0o755)
        maker.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
                mkdir -p "$3/bin"
                printf '#!/bin/sh\\nexec "{sys.executable}" "$@"\\n' > "$3/bin/python"
                cp "{pip}" "$3/bin/pip"
                chmod +x "$3/bin/python" "$3/bin/pip"
                exit 0
            fi
            exec "{sys.executable}" "$@"
        """))
        maker.chmod(0o755)

    venvs_whose_pip('echo "pip: network unreachable" >&2; exit 1')  # as without a network
    for attempt in (1, 2):
        result = _run(tmp_path, nvidia_smi=True, python=str(maker))
        assert result.returncode != 0 and "network unreachable" in result.stderr
        assert pip_calls.read_text().count("\n") == attempt  # the second run tries to install again
    assert not (tmp_path / "gpu-env" / ".installed").exists()

    # once built to the end, it is not built again (and a module missing from it says how to build it again)
    venvs_whose_pip("exit 0")
    shutil.rmtree(tmp_path / "gpu-env")
    calls = []
    for _ in range(2):
        result = _run(tmp_path, nvidia_smi=True, python=str(maker), GPU_SKIP_VLLM="1")
        calls.append(pip_calls.read_text().count("\n"))
    assert calls[0] == 2 + 3 and calls[1] == calls[0] and (tmp_path / "gpu-env" / ".installed").exists()
    assert "sees no CUDA GPU" in result.stderr  # went on to its checks with the environment it has


def test_without_wheels_a_missing_module_says_how_to_build_the_environment_again(tmp_path):
    """Without GPU_WHEELS the environment is the script's own: a module missing from it is named with the way to
    build it again, not with the Python version wheels must be for (no wheels are used)."""
    venv = tmp_path / "gpu-env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(_python_without(tmp_path, "pydantic"))
    (venv / ".installed").touch()
    result = _run(tmp_path, nvidia_smi=True)
    assert result.returncode == 1 and "missing: pydantic" in result.stderr
    assert "wheels must be for" not in result.stderr
    assert f"the environment is incomplete (above); remove {venv} to build it again" in result.stderr


def test_a_gpu_test_that_fails_is_named_as_one_that_did_not_pass(tmp_path):
    """A failing GPU test (not a skipped one) ended the script through pytest's exit status, with nothing said; it
    is named as one that did not pass on this GPU, and another selected test that fails fails the checks too."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    stand_ins = tmp_path / "stand_ins" / "test_stand_ins.py"
    stand_ins.parent.mkdir()
    passing = ("def test_training_on_cuda_matches_the_cpu_step():\n    pass\n\n\n"
               "def test_the_diagnostics_of_a_batch_on_cuda_equal_those_of_the_same_batch_on_the_cpu():\n    pass\n")
    stand_ins.write_text(passing.replace("cpu_step():\n    pass", "cpu_step():\n    assert False, 'differs'"))
    python = _python_with_a_pretend_gpu(tmp_path, stand_ins)
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels), GPU_SKIP_VLLM="1")
    assert result.returncode == 3
    assert "test_training_on_cuda_matches_the_cpu_step did not pass on this GPU" in result.stderr
    stand_ins.write_text(passing + "\n\ndef test_cuda_something_else():\n    assert False\n")
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels), GPU_SKIP_VLLM="1")
    assert result.returncode == 1
    assert "the GPU tests passed but another selected test did not (pytest exit 1" in result.stderr

    # a log in a folder that is not there yet: made, not read as tests that did not pass
    stand_ins.write_text(passing)
    result = _run(tmp_path, nvidia_smi=True, python=python, GPU_WHEELS=str(wheels), GPU_SKIP_VLLM="1",
                  GPU_LOG=str(tmp_path / "logs" / "gpu.log"))
    assert result.returncode == 0, result.stderr
    assert "2 passed" in (tmp_path / "logs" / "gpu.log").read_text()
