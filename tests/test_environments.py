"""The command line where users and clusters run it: a locale that is not UTF-8, file and folder names that are not
UTF-8 (copied from a Latin-1 system), a closed stdout (a daemon, ``>&-``), an output whose reader has gone (``| head
-1``), an 80-column terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entrorl.trainer import Trainer, load_config

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
# a locale whose text files are not UTF-8, without generating one: the C locale with Python's UTF-8 mode and its
# locale coercion off (what a Latin-1 locale, or a site exporting PYTHONUTF8=0, gives)
NARROW_LOCALE = {**ENVIRONMENT, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def entrorl(*args, environment=ENVIRONMENT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrorl.cli", *map(str, args)], capture_output=True,
                          env=environment, timeout=300)


def latin1_name(folder: Path, name: bytes) -> Path:
    """``folder / name`` where ``name`` holds bytes that are not UTF-8 (Python keeps them as surrogates)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return path


def settings(model: Path, train: Path) -> dict:
    return {"seed": 1, "torch_threads": 1, "model": {"path": str(model)}, "data": {"train": str(train)},
            "reward": {"name": "exact_match"}, "method": "grpo", "optim": {"steps": 1},
            "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3}, "logging": {"progress": False},
            "checkpoint": {"every": 1}}


def test_every_command_runs_with_stdout_closed(tmp_path, tiny_model_dir):
    """`entrorl report RUN >&-` without COLUMNS (a daemon, a cron job): main() asked sys.stdout, which is None, whether
    it is a terminal, and every command died with an AttributeError; so did those that print their result after
    writing it to --out (eval, methods --json)."""
    environment = {key: value for key, value in ENVIRONMENT.items() if key != "COLUMNS"}
    data, summary = prompts(tmp_path / "data.jsonl"), tmp_path / "summary.json"
    for command in (f'eval --model "{tiny_model_dir}" --data "{data}" --n 1 --max-new-tokens 2 --out "{summary}"',
                    "methods grpo --json", "methods"):
        result = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m entrorl.cli {command} >&-'],
                                capture_output=True, text=True, env=environment, timeout=300)
        assert "Traceback" not in result.stderr and result.returncode == 0, result.stderr[-1500:]
    assert json.loads(summary.read_text())["n_problems"] == 4
    missing = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m entrorl.cli report "{tmp_path / "missing"}" >&-'],
                             capture_output=True, text=True, env=environment, timeout=300)
    assert missing.returncode == 2 and "no run directory" in missing.stderr


def test_eval_and_the_data_audit_write_their_files_when_the_reader_of_their_output_has_gone(tmp_path, tiny_model_dir):
    """`entrorl eval ... 2>&1 | head -1`: once the reader has gone, rich ended the process (exit 1, nothing said) at
    the first print after the sampling (the progress bar's last one), before --out, --samples or the audit's folder
    were written: the whole evaluation was lost. A pipe whose reader has already gone is that race made certain."""
    data = prompts(tmp_path / "data.jsonl")
    common = ["--model", tiny_model_dir, "--data", data, "--n", "2", "--max-new-tokens", "2", "--reward", "exact_match"]
    for command, files in ((["eval", *common, "--out", tmp_path / "e.json", "--samples", tmp_path / "s.jsonl"],
                            [tmp_path / "e.json", tmp_path / "s.jsonl"]),
                           (["data", "audit", *common, "--out", tmp_path / "audit"], [tmp_path / "audit" / "summary.json"])):
        reading, writing = os.pipe()
        os.close(reading)
        try:
            subprocess.run([sys.executable, "-m", "entrorl.cli", *map(str, command)], stdout=writing, stderr=writing,
                           env=ENVIRONMENT, timeout=300)
        finally:
            os.close(writing)
        assert [path.name for path in files if not path.is_file()] == [], command[:2]
    assert len(json.loads((tmp_path / "e.json").read_text())["sources"]) == 4


def test_eval_and_the_data_audit_of_a_file_whose_name_is_not_utf8_write_their_outputs(tmp_path, tiny_model_dir):
    """The samples' "source" (file:line) and the audit's figure title carry the file's name: encoding it (strict
    UTF-8, matplotlib's text) failed after all the sampling, and nothing was written. A name's bytes that are not
    UTF-8 are written as JSON escapes that read back to the same name."""
    data = prompts(latin1_name(tmp_path, b"donn\xe9es.jsonl"))
    samples, summary = tmp_path / "samples.jsonl", tmp_path / "eval.json"
    evaluated = entrorl("eval", "--model", tiny_model_dir, "--data", data, "--n", "1", "--max-new-tokens", "2",
                        "--reward", "exact_match", "--samples", samples, "--out", summary)
    assert evaluated.returncode == 0, evaluated.stderr.decode("utf-8", "replace")[-1500:]
    first = json.loads(samples.read_text(encoding="utf-8").splitlines()[0])
    assert os.fsencode(first["source"]) == os.fsencode(data) + b":1" and summary.is_file()
    audited = entrorl("data", "audit", "--model", tiny_model_dir, "--data", data, "--n", "2", "--max-new-tokens", "2",
                      "--reward", "exact_match", "--out", tmp_path / "audit")
    assert audited.returncode == 0, audited.stderr.decode("utf-8", "replace")[-1500:]
    assert (tmp_path / "audit" / "summary.json").is_file() and (tmp_path / "audit" / "pass_rate_histogram.png").is_file()


def test_a_run_or_model_directory_whose_name_is_not_utf8_is_refused_before_any_work(tmp_path, tiny_model_dir):
    """The tokenizers library opens and saves by UTF-8 names only: a run directory so named trained every step, then
    lost them at its first checkpoint; a model directory so named failed with "'utf-8' codec can't encode character
    '\\udce8'", naming no folder. Both are refused up front, naming them with their bytes; so is the lab's --out."""
    train = prompts(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=r"the run directory .*run-\\xe9 has a name that is not UTF-8, where the "
                                         r"tokenizers library .* rename it"):
        Trainer(load_config(settings(tiny_model_dir, train)), run_dir=latin1_name(tmp_path, b"run-\xe9"))
    assert not latin1_name(tmp_path, b"run-\xe9").exists()
    model = latin1_name(tmp_path, b"mod\xe8le")
    shutil.copytree(tiny_model_dir, model)
    result = entrorl("eval", "--model", model, "--data", train, "--n", "1", "--max-new-tokens", "2")
    assert result.returncode == 2
    assert b"the model directory " + os.fsencode(tmp_path) + b"/mod\\xe8le has a name that is not UTF-8" in result.stderr
    lab = entrorl("lab", "--preset", "quick", "--methods", "grpo", "--out", latin1_name(tmp_path, b"lab\xe9"))
    assert lab.returncode == 2 and b"lab\\xe9 has a name that is not UTF-8" in lab.stderr


def test_a_laboratory_cache_whose_name_is_not_utf8_is_refused_before_the_base_model_is_trained(tmp_path):
    """ENTRORL_CACHE so named: the base model was trained, then its tokenizer's save failed, naming no folder."""
    from entrorl.lab.base_model import BaseModelSpec, build_base_model

    spec = BaseModelSpec(tasks=("sum_chain",), problems_per_task=20, hidden_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64, steps=2, batch_size=4)
    steps = []
    with pytest.raises(ValueError, match=r"the laboratory's cache \(ENTRORL_CACHE\) .*cache-\\xe9/lab has a name that"):
        build_base_model(spec, cache_dir=latin1_name(tmp_path, b"cache-\xe9"),
                         progress=lambda step, total, loss: steps.append(step))
    assert steps == []


def test_a_report_of_a_run_directory_renamed_to_a_name_that_is_not_utf8_is_written(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    Trainer(load_config(settings(tiny_model_dir, prompts(tmp_path / "train.jsonl"))), run_dir=run).train()
    renamed = latin1_name(tmp_path, b"essai-\xe9")
    run.rename(renamed)
    result = entrorl("report", renamed, "--no-figures")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-1500:]
    assert "essai-\\udce9" in (renamed / "report" / "report.md").read_text(encoding="utf-8")


def test_a_reward_error_the_locale_cannot_encode_is_kept_in_utf8(tmp_path, tiny_model_dir):
    """Under a locale that is not UTF-8, eval without --out kept the first reward traceback in a temporary file opened
    in the locale's encoding: "→" in the message crashed the command after sampling, and no summary came."""
    (tmp_path / "odd_reward.py").write_text("def score(prompt, completion, answer, **meta):\n"
                                            "    if prompt.startswith('0'):\n"
                                            "        raise ValueError('r\\u00e9ponse \\u2192 0')\n"
                                            "    return 0.0\n")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = entrorl("eval", "--model", tiny_model_dir, "--data", prompts(tmp_path / "data.jsonl"), "--n", "1",
                     "--max-new-tokens", "2", "--reward", "odd_reward:score",
                     environment={**NARROW_LOCALE, "PYTHONPATH": str(tmp_path), "TMPDIR": str(temporary)})
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-1500:]
    assert "avg_at_n" in json.loads(result.stdout)
    (log,) = temporary.glob("entrorl-reward-errors-*.log")
    assert "r\u00e9ponse \u2192 0" in log.read_text(encoding="utf-8")


def test_a_laboratory_method_s_error_the_locale_cannot_encode_is_kept_in_utf8(tmp_path):
    """A failed method's error.log was written in the locale's encoding, inside a clause that suppressed OSError only:
    the worker died of a second error, and the method's own was lost ("exited with status 1 before returning an
    outcome")."""
    script = textwrap.dedent(f"""
        import json
        from entrorl.lab import runner
        runner._warm_up_process = lambda job: None
        def failing(job):
            raise RuntimeError("entropie \\u2192 NaN")
        runner._train_and_evaluate = failing
        print(json.dumps(runner._run_method({{"method": "grpo", "run_dir": {str(tmp_path / "grpo")!r}}})))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=NARROW_LOCALE, timeout=300)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-1500:]
    assert json.loads(result.stdout)["status"] == "failed"
    assert "RuntimeError: entropie \u2192 NaN" in (tmp_path / "grpo" / "error.log").read_text(encoding="utf-8")


def test_the_methods_are_listed_readably_on_an_80_column_terminal():
    """Three columns that do not wrap took some 60 of 80 columns, leaving the description and the paper two or three
    characters a line ("ar|Xi|v"): below 120 columns each method is a block of its own."""
    narrow = entrorl("methods", environment={**ENVIRONMENT, "COLUMNS": "80"}).stdout.decode()
    assert "adaptive_entropy: entropy bonus only while H < target" in narrow
    assert "  paper: arXiv 2505.22312" in narrow and "  loss aggregation: token-mean" in narrow
    wide = entrorl("methods", environment={**ENVIRONMENT, "COLUMNS": "160"}).stdout.decode()
    assert "┃ method" in wide and "arXiv 2505.22312" in wide


def test_the_commands_keep_their_help_and_say_why_models_cannot_load_under_python_oo(tmp_path, tiny_model_dir):
    """`python -OO` (PYTHONOPTIMIZE=2) strips docstrings: the commands' help came from theirs, so `entrorl --help`
    listed them without a word; and transformers cannot import a model's code then, which `eval`, `train` and `data
    audit` reported as "No `Args` or `Parameters` section is found in the docstring of ...", naming no cause."""
    def under_oo(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-OO", "-m", "entrorl.cli", *map(str, args)], capture_output=True,
                              text=True, env=ENVIRONMENT, timeout=300)

    listed = under_oo("--help").stdout
    assert "Train a local Hugging Face model" in listed and "Avg@n, unbiased Pass@k" in listed
    assert "docs/configuration.md" in under_oo("train", "--help").stdout
    assert "separate hard prompts from ones whose reference looks wrong" in under_oo("data", "--help").stdout
    evaluated = under_oo("eval", "--model", tiny_model_dir, "--data", prompts(tmp_path / "data.jsonl"), "--n", "1",
                         "--max-new-tokens", "2")
    assert evaluated.returncode == 2
    assert ("transformers cannot import the model's code when Python strips docstrings (python -OO, PYTHONOPTIMIZE=2): "
            "run without them") in " ".join(evaluated.stderr.split())


def test_no_text_file_of_a_run_is_read_in_the_locale_s_encoding(tmp_path, tiny_model_dir):
    """`-X warn_default_encoding`: a resume read reward_errors.log (written in UTF-8) in the locale's encoding."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "reward_errors.log").write_text("step 1, Traceback ...\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(settings(tiny_model_dir, prompts(tmp_path / "train.jsonl"))))
    done = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-m", "entrorl.cli", "train", str(config),
                           "--run-dir", str(run)], capture_output=True, text=True, env=ENVIRONMENT, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert not [line for line in done.stderr.splitlines() if "EncodingWarning" in line and "entrorl" in line]


def test_the_oo_note_is_only_for_transformers_docstring_checks(tmp_path, tiny_model_dir):
    """A ValueError of another cause whose message names a folder called docstring_study (here a config.json without
    model_type) was said to come from -OO."""
    model = tmp_path / "docstring_study"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-OO", "-c", "import sys\nfrom entrorl.modeling import load_causal_lm\n"
                           "load_causal_lm(sys.argv[1])", str(model)], capture_output=True, text=True, env=ENVIRONMENT,
                          timeout=300)
    assert done.returncode == 1 and "ValueError" in done.stderr, done.stderr[-1500:]
    assert "strips docstrings" not in done.stderr
