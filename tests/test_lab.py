"""The laboratory end to end: the base model is rebuilt identically from its seed; the quick preset runs the
whole matrix and writes a report whose numbers are the ones in the metrics files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entrorl.lab.base_model import BaseModelSpec, build_base_model
from entrorl.lab.presets import DEFAULT_METHODS, get_preset
from entrorl.trainer import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _weights_digest(directory: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def test_base_model_is_rebuilt_identically_from_its_seed(tmp_path):
    spec = BaseModelSpec(problems_per_task=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, steps=6, batch_size=8)
    first = build_base_model(spec, cache_dir=tmp_path / "a")
    second = build_base_model(spec, cache_dir=tmp_path / "b")
    assert _weights_digest(first) == _weights_digest(second)
    other = build_base_model(BaseModelSpec(**{**spec.__dict__, "seed": 1}), cache_dir=tmp_path / "a")
    assert _weights_digest(other) != _weights_digest(first)
    info = json.loads((first / "base.json").read_text())
    assert info["key"] == spec.key() and info["spec"]["steps"] == 6
    assert build_base_model(spec, cache_dir=tmp_path / "a") == first  # cached: not retrained


def test_presets_cover_the_issue_matrix():
    default = get_preset("default")
    for method in ("grpo", "dapo", "clip_cov", "kl_cov", "forking_tokens", "clip_b", "clip_v", "nsr", "w_reinforce",
                   "entropy_advantage", "adaptive_entropy", "sft", "rft"):
        assert method in default.methods
    assert default.methods == DEFAULT_METHODS and default.train_task != default.forgetting_task
    assert default.eval_n >= 64
    with pytest.raises(ValueError, match="unknown lab preset"):
        get_preset("huge")


@pytest.mark.slow
def test_rl_seed_changes_only_the_training_seed(tmp_path):
    from entrorl.lab.runner import _prepare_data, _trainer_config

    preset = get_preset("quick")
    reseeded = preset.model_copy(update={"rl_seed": 5})
    data = _prepare_data(tmp_path / "lab", preset)
    same = _trainer_config(preset, "grpo", tmp_path / "model", data, tmp_path / "runs" / "grpo")
    other = _trainer_config(reseeded, "grpo", tmp_path / "model", data, tmp_path / "runs" / "grpo")
    assert (same["seed"], other["seed"]) == (preset.seed, 5)
    assert {k: v for k, v in same.items() if k != "seed"} == {k: v for k, v in other.items() if k != "seed"}
    assert reseeded.base == preset.base  # the same cached base model


def test_resuming_with_other_settings_is_refused(tmp_path):
    from entrorl.lab.runner import run_lab

    out = tmp_path / "lab"
    out.mkdir()
    preset = get_preset("quick")
    (out / "lab.json").write_text(json.dumps({"preset": preset.model_dump(mode="json")}))
    with pytest.raises(ValueError, match=r"rl_seed: None there, 3 now.*same options"):
        run_lab("quick", out=out, rl_seed=3)
    changed = preset.model_copy(update={"steps": preset.steps + 1}).model_dump(mode="json")
    (out / "lab.json").write_text(json.dumps({"preset": changed}))
    with pytest.raises(ValueError, match=rf"steps: {preset.steps + 1} there, {preset.steps} now"):
        run_lab("quick", out=out, methods=["grpo"])


def test_quick_lab_end_to_end(tmp_path):
    out = tmp_path / "lab"
    env_cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "entrorl.cli", "lab", "--preset", "quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "ENTRORL_CACHE": str(env_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    preset = get_preset("quick")
    for method in preset.methods:
        run = out / "methods" / method
        assert (run / "final_eval.json").is_file(), (method, (run / "error.log").read_text() if (run / "error.log").exists() else "")
        assert [r["step"] for r in read_metrics(run)] == list(range(1, preset.steps + 1))
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "grpo" in markdown and "<img" in html
    # every number of the summary table is the one computed from the run's own files
    for method in preset.methods:
        final = json.loads((out / "methods" / method / "final_eval.json").read_text())
        (row,) = [r for r in report["summary"]["values"] if r["method"] == method]
        assert row["Pass@1"] == pytest.approx(final["pass_at_k"]["1"])
        assert row[f"Pass@{preset.eval_n}"] == pytest.approx(final["pass_at_k"][str(preset.eval_n)])
        (shown,) = [r for r in report["summary"]["rows"] if r["method"] == method]
        assert f"| {shown['Pass@1']} |" in markdown and shown["Pass@1"] in html
    assert report["section_errors"] in ({}, [], None)

    # re-running on the same directory resumes: nothing is retrained
    again = subprocess.run(
        [sys.executable, "-m", "entrorl.cli", "lab", "--preset", "quick", "--out", str(out), "--methods", "grpo"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "ENTRORL_CACHE": str(env_cache)},
    )
    assert again.returncode == 0 and "cached" in again.stderr
