"""LoRA in the trainer (model.lora): only the adapters train, the reference is the base model with the adapters
off, a checkpoint holds the merged model (a plain Hugging Face directory) and peft's adapter files, and a resumed run
equals an uninterrupted one."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")

from entrorl.modeling import load_causal_lm  # noqa: E402
from entrorl.trainer import ConfigError, Trainer, load_config, read_metrics  # noqa: E402
from entrorl.trainer.loop import TrainingInterrupted  # noqa: E402

from test_trainer import PARITY_REWARD, make_config, prune_step_2_while_it_loads  # noqa: E402

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture
def parity_reward(tmp_path, monkeypatch) -> str:
    """A reward that varies between the samples of a random-init model, so that every step has advantages."""
    (tmp_path / "parity_reward.py").write_text(PARITY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "parity_reward:score"


def lora_config(model_dir, train, reward, **sections) -> dict:
    """test_trainer's configuration, with rank-4 adapters, the parity reward and two steps at lr 1e-2."""
    settings = {"model": {"device": "cpu", "lora": LORA}, "reward": {"name": reward}, "optim": {"steps": 2, "lr": 1e-2}}
    for key, value in sections.items():
        settings[key] = {**settings[key], **value} if isinstance(settings.get(key), dict) else value
    return make_config(model_dir, train, None, **settings)


def test_eval_of_a_lora_run_that_prunes_the_adapters_it_loads_takes_the_next_newest(
        tmp_path, tiny_model_dir, arithmetic_files, parity_reward, monkeypatch):
    """With model.lora.merged: last, a run's checkpoint holds adapters on the base model, which is never pruned: the
    adapters (and tokenizer) eval was loading, pruned by the training run, are replaced by the newest checkpoint's."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    config = load_config(lora_config(tiny_model_dir, arithmetic_files[0], parity_reward, optim={"steps": 3},
                                     checkpoint={"every": 1, "keep": 3}, model={"lora": {**LORA, "merged": "last"}}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        trainer.train(should_stop=lambda: trainer.step == 2)
    checkpoints = tmp_path / "run" / "checkpoints"
    loads = prune_step_2_while_it_loads(checkpoints, monkeypatch, "adapters")
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run"), "--data", str(arithmetic_files[1]),
                                      "--n", "1", "--max-prompts", "2", "--max-new-tokens", "2", "--reward", "exact_match"])
    assert result.exit_code == 0, result.output
    assert loads == [checkpoints / "step_000002" / "adapter", checkpoints / "step_000003" / "adapter"]
    assert f"{checkpoints / 'step_000002' / 'adapter'} was removed while it loaded" in " ".join(result.output.split())


def test_training_from_a_lora_checkpoint_without_its_merged_model_names_the_adapters_and_the_last_checkpoint(
        tmp_path, tiny_model_dir, arithmetic_files, parity_reward):
    """model.lora.merged: last leaves the checkpoints before the last a model/ without weights; training from one says
    so, naming the checkpoint that holds the merged model and the adapters beside it, before anything loads."""
    config = load_config(lora_config(tiny_model_dir, arithmetic_files[0], parity_reward, checkpoint={"every": 1, "keep": 2},
                                     model={"lora": {**LORA, "merged": "last"}}))
    Trainer(config, run_dir=tmp_path / "run").train()
    checkpoints = (tmp_path / "run" / "checkpoints")
    earlier = checkpoints / "step_000001" / "model"
    settings = make_config(earlier, arithmetic_files[0], None)
    with pytest.raises(FileNotFoundError) as refused:
        Trainer(load_config(settings), run_dir=tmp_path / "again")
    assert str(refused.value) == (
        f"{earlier} has no weights: it is a LoRA run's checkpoint saved without its merged model (model.lora.merged: "
        f"last keeps it in the last checkpoint only ({checkpoints / 'step_000002' / 'model'})); take a checkpoint that "
        f"holds it, or merge the adapters beside it ({earlier.parent / 'adapter'}) into their base model with peft's "
        "merge_and_unload and save_pretrained (entrorl eval --model takes the adapters as they are)")
    assert not (tmp_path / "again").exists()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def draw_adapters(model: torch.nn.Module, std: float, part: str = "lora_") -> None:
    """Adapter weights (those whose name holds ``part``) drawn from N(0, std²), seeded by their names, so that the
    adapters change the model (B starts at zero)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if part in name:
                parameter.normal_(std=std, generator=torch.Generator().manual_seed(len(name)))


def test_only_the_adapters_train_and_a_checkpoint_holds_the_merged_model(tmp_path, tiny_model_dir, arithmetic_files,
                                                                         parity_reward):
    from peft import PeftModel

    train, _ = arithmetic_files
    trainer = Trainer(load_config(lora_config(tiny_model_dir, train, parity_reward)), run_dir=tmp_path / "run")
    base = load_causal_lm(tiny_model_dir)
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    # rank 4 on all seven linear layers of each of the two blocks (hidden 32, 2 of 4 heads for k / v: 16 wide, MLP 128)
    per_block = sum(4 * (fan_in + fan_out) for fan_in, fan_out in
                    [(32, 32), (32, 16), (32, 16), (32, 32), (32, 128), (32, 128), (128, 32)])
    assert trainer.adapter.trainable_parameters() == 2 * per_block
    assert [p for group in trainer.optimizer.param_groups for p in group["params"]] == [
        p for p in trainer.model.parameters() if p.requires_grad]

    trainer.train()
    ids = torch.randint(3, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    # the base weights did not move; the adapters did, so the policy is no longer the base model
    with trainer.adapter.disabled() as base_again:
        torch.testing.assert_close(logits(base_again, ids), logits(base, ids), rtol=0, atol=0)
    assert not torch.allclose(logits(trainer.model, ids), logits(base, ids), atol=1e-4)

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    merged = load_causal_lm(checkpoint / "model")  # a plain Hugging Face directory: no adapter modules, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), logits(trainer.model, ids), rtol=1e-5, atol=1e-5)
    # the adapters alone, in peft's format, onto the base model
    adapted = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), checkpoint / "adapter")
    torch.testing.assert_close(logits(adapted, ids), logits(trainer.model, ids), rtol=0, atol=0)


def test_the_reference_is_the_base_model_with_the_adapters_off(tmp_path, tiny_model_dir, arithmetic_files,
                                                                parity_reward):
    train, _ = arithmetic_files
    config = load_config(lora_config(tiny_model_dir, train, parity_reward, method="kl_ref", optim={"steps": 3}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    assert trainer.needs_reference and trainer.reference is None  # no second copy of the model is loaded
    for _ in range(3):
        metrics = trainer.train_step()
    # kl/ref_k1 is the mean of log pi - log pi_ref over the trained tokens: 0 while the adapters were still at zero
    assert abs(metrics["kl/ref_k1"]) > 0
    ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    with trainer._reference_model() as reference:
        torch.testing.assert_close(logits(reference, ids), logits(load_causal_lm(tiny_model_dir), ids), rtol=0, atol=0)
    trainer.close()


@pytest.mark.parametrize("merged", ["every", "last"])
def test_a_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, tiny_model_dir, arithmetic_files, parity_reward,
                                                        merged):
    """With model.lora.merged: last, the checkpoint the run stopped at holds the adapters without the merged model,
    and the resume needs nothing more; the run's last checkpoint is merged."""
    train, _ = arithmetic_files
    settings = lora_config(tiny_model_dir, train, parity_reward, method="clip_cov", optim={"steps": 4},
                           checkpoint={"every": 0, "keep": 3}, model={"lora": {**LORA, "merged": merged}})
    straight = Trainer(load_config(settings), run_dir=tmp_path / "straight")
    straight.train()

    interrupted = Trainer(load_config(settings), run_dir=tmp_path / "interrupted")
    with pytest.raises(TrainingInterrupted):
        interrupted.train(should_stop=lambda: interrupted.step == 2)
    stopped_at = tmp_path / "interrupted" / "checkpoints" / "step_000002"
    assert (stopped_at / "adapter" / "adapter_model.safetensors").is_file()
    assert (stopped_at / "model" / "config.json").is_file() and (stopped_at / "model" / "tokenizer.json").is_file()
    assert (stopped_at / "model" / "model.safetensors").is_file() is (merged == "every")
    Trainer(load_config(settings), run_dir=tmp_path / "interrupted", resume=True).train()
    last = tmp_path / "interrupted" / "checkpoints" / "step_000004" / "model"
    assert (last / "model.safetensors").is_file()
    # how the model generates (its EOS ids) is kept with or without the merged weights
    assert json.loads((stopped_at / "model" / "generation_config.json").read_text()) == json.loads(
        (last / "generation_config.json").read_text())

    def comparable(run):
        return [{k: v for k, v in record.items() if not k.startswith("time/")} for record in read_metrics(run)]

    assert [record["step"] for record in read_metrics(tmp_path / "interrupted")] == [1, 2, 3, 4]
    assert comparable(tmp_path / "interrupted") == comparable(tmp_path / "straight")


def test_lora_settings_are_checked_before_the_model_loads(tiny_model_dir, arithmetic_files, parity_reward):
    train, _ = arithmetic_files
    for lora, message in [({"rank": 0}, "rank"), ({"target_modules": []}, "target_modules"),
                          ({"target_modules": ["q_proj", " "]}, "target_modules: .*name at least one module"),
                          ({"dropout": 0.1}, "disable_dropout"), ({"alpha": 0}, "alpha"), ({"r": 8}, "r")]:
        with pytest.raises(ConfigError, match=message):
            load_config(lora_config(tiny_model_dir, train, parity_reward, model={"lora": lora}))
    # dropout on the adapters is allowed once the model's dropout is on too
    load_config(lora_config(tiny_model_dir, train, parity_reward,
                            model={"lora": {"dropout": 0.1}, "disable_dropout": False}))
    with pytest.raises(ConfigError, match=r"model.lora.dropout: Input should be less than 1"):
        load_config(lora_config(tiny_model_dir, train, parity_reward,
                                model={"lora": {"dropout": 1.0}, "disable_dropout": False}))


def test_a_blank_module_name_given_as_a_string_is_refused_like_one_in_a_list(tiny_model_dir, arithmetic_files,
                                                                            parity_reward):
    """target_modules: '  ' names no module, as [' '] does: refused when the configuration is checked, before the model
    loads, instead of reaching peft as a pattern that matches nothing."""
    train, _ = arithmetic_files
    for blank in ("", "  "):
        with pytest.raises(ConfigError, match="target_modules: .*name at least one module"):
            load_config(lora_config(tiny_model_dir, train, parity_reward, model={"lora": {"target_modules": blank}}))


def test_the_output_layer_a_tied_embedding_and_modules_the_model_lacks_are_refused(tmp_path, tiny_model_dir, arithmetic_files,
                                                                  parity_reward):
    train, _ = arithmetic_files
    for targets, message in [(["q_proj", "lm_head"], r"names the output layer \(lm_head\)"),
                             (["no_such_proj"], "target_modules"),
                             # peft drops a name that matches nothing when another one matches: a typo trained fewer
                             # layers than asked without a word
                             (["q_proj", "v_projj"], r"^model.lora.target_modules: 'v_projj' matches no module of this "
                                                     r"model \(a name matches .*\); its modules' last names: .*v_proj"),
                             (["embed_tokens"], r"input embedding \(embed_tokens\), whose weight this model shares")]:
        config = load_config(lora_config(tiny_model_dir, train, parity_reward,
                                         model={"lora": {**LORA, "target_modules": targets}}))
        with pytest.raises(ValueError, match=message):
            Trainer(config, run_dir=tmp_path / "run")


def test_all_linear_is_a_value_of_its_own_not_a_name_in_a_list(tiny_model_dir, arithmetic_files, parity_reward):
    """['q_proj', 'all-linear'] adapted q_proj alone: peft took 'all-linear' as a module's name, which matched nothing
    and was dropped. Refused; ['all-linear'] alone is 'all-linear'."""
    train, _ = arithmetic_files
    with pytest.raises(ConfigError, match="'all-linear' is a value of its own, not a module's name"):
        load_config(lora_config(tiny_model_dir, train, parity_reward,
                                model={"lora": {**LORA, "target_modules": ["q_proj", "all-linear"]}}))
    alone = load_config(lora_config(tiny_model_dir, train, parity_reward,
                                    model={"lora": {**LORA, "target_modules": ["all-linear"]}}))
    assert alone.model.lora.target_modules == "all-linear"
    # a checkpoint an earlier version saved with such a list trained the other names alone (peft dropped it): resumed
    # with those names, nothing changed
    from entrorl.trainer.config import resume_changes

    current = load_config(lora_config(tiny_model_dir, train, parity_reward,
                                      model={"lora": {**LORA, "target_modules": ["q_proj"]}})).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["model"]["lora"]["target_modules"] = ["q_proj", "all-linear"]
    assert resume_changes(saved, current) == ([], [])


def test_resumed_adapters_whose_names_matched_nothing_in_an_earlier_version_are_warned_about():
    """An earlier version let ['q_proj', 'v_projj'] through and peft trained q_proj alone: the run's own settings must
    still resume it, so resumed adapters warn of the name (a new run is refused, and a list matching nothing too)."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    with pytest.warns(UserWarning, match=r"'v_projj' matches no module of this model .*; the run resumed was trained "
                                         r"without adapters there, and goes on so"):
        adapter = LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0,
                              target_modules=["q_proj", "v_projj"], resumed=True)
    assert {name.split(".")[-4] for name, p in adapter.model.named_parameters() if p.requires_grad} == {"q_proj"}
    for targets, resumed in ((["q_proj", "v_projj"], False), (["v_projj"], True)):
        with pytest.raises(ValueError, match="'v_projj' matches no module"):
            LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0, target_modules=targets,
                        resumed=resumed)


def test_the_reference_is_scored_without_dropout_as_a_loaded_reference_is(tmp_path, arithmetic_files, parity_reward):
    """model.lora.dropout needs model.disable_dropout: false, which leaves the base model's own dropout on too: the
    reference (the policy with its adapters off) was scored in train mode, its log-probs random from pass to pass
    (kl/ref noisy, not the KL to the starting model). It is scored in eval mode, as a loaded reference is, and the
    policy's mode is put back."""
    from entrorl.lab.tiny_model import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64)
    settings = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.3}))
    train, _ = arithmetic_files
    trainer = Trainer(load_config(lora_config(model_dir, train, parity_reward, method="kl_ref",
                                              model={"disable_dropout": False, "lora": {**LORA, "dropout": 0.1}})),
                      run_dir=tmp_path / "run")
    try:
        rollouts = trainer.collect().rollouts
        rows, mask = torch.arange(len(rollouts)), rollouts.response_mask
        assert trainer.model.training
        with torch.no_grad():
            expected = trainer.token_stats(load_causal_lm(model_dir).eval(), rollouts, rows, need=("logprob",)).logprob
            for _ in range(2):
                with trainer._reference_model() as reference:
                    scored = trainer.token_stats(reference, rollouts, rows, need=("logprob",)).logprob
                torch.testing.assert_close(scored[mask], expected[mask], rtol=0, atol=1e-5)
        assert trainer.model.training
    finally:
        trainer.close()


def test_resume_refuses_a_moved_base_model(tmp_path, tiny_model_dir, arithmetic_files, parity_reward):
    """The adapters are put back onto model.path: another directory there would be another base."""
    import shutil

    train, _ = arithmetic_files
    settings = lora_config(tiny_model_dir, train, parity_reward)
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")
    settings["model"]["path"] = str(moved)
    with pytest.raises(ValueError, match="model.path"):
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True)


def test_resume_warns_when_the_base_model_was_replaced_in_place(tmp_path, tiny_model_dir, arithmetic_files,
                                                                 parity_reward):
    """Same model.path, other weights in it (another model saved over it): the adapters would sit on another base, and
    the resumed run says so; the same files again (copied elsewhere and back) say nothing."""
    import shutil
    import warnings

    from entrorl.lab.tiny_model import save_tiny_model

    train, _ = arithmetic_files
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    settings = lora_config(base, train, parity_reward)
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    settings["optim"]["steps"] = 3
    shutil.copytree(base, tmp_path / "kept")
    shutil.rmtree(base)
    shutil.copytree(tmp_path / "kept", base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True).close()
    save_tiny_model(base, seed=1, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    with pytest.warns(UserWarning, match=r"the model in model.path \(.*\) is not the one step_000002 was trained with: "
                                         r"its weight files changed since, and the LoRA adapters' base model is read"):
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True).close()


def test_resume_may_change_which_checkpoints_hold_the_merged_model(tmp_path, tiny_model_dir, arithmetic_files,
                                                                    parity_reward):
    """model.lora.merged only decides which checkpoints hold the merged model/: a checkpoint setting, as the refusal
    of the other model.lora keys says a resumed run may change."""
    train, _ = arithmetic_files
    settings = lora_config(tiny_model_dir, train, parity_reward, optim={"steps": 1},
                           checkpoint={"every": 1, "keep": 3})
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    settings["optim"]["steps"], settings["model"]["lora"] = 3, {**settings["model"]["lora"], "merged": "last"}
    trainer = Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True)
    assert [key for key, _, _ in trainer.resume_changes] == ["model.lora.merged", "optim.steps"]
    trainer.train()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [(checkpoints / f"step_00000{step}" / "model" / "model.safetensors").is_file() for step in (1, 2, 3)] == [
        True, False, True]


def test_damaged_adapters_name_the_checkpoint_to_delete(tmp_path, tiny_model_dir, arithmetic_files, parity_reward):
    train, _ = arithmetic_files
    settings = lora_config(tiny_model_dir, train, parity_reward, optim={"steps": 2})
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    weights = tmp_path / "run" / "checkpoints" / "step_000002" / "adapter" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(b"x" * 100 + saved[100:])  # damaged, at its written size
    settings["optim"]["steps"] = 3
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*; incomplete: step_000002 \(damaged: adapter/"
                                                r"adapter_model.safetensors does not hold the bytes written"):
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True)
    listing = tmp_path / "run" / "checkpoints" / "step_000002" / "files.json"  # as written before checksums
    listing.write_text(json.dumps({"files": json.loads(listing.read_text())["files"]}))
    with pytest.raises(ValueError, match="adapters of checkpoint .*step_000002.*delete step_000002"):
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True)
    weights.write_bytes(saved[:100])  # cut short: not a complete checkpoint, and the only one
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*; incomplete: step_000002 \(adapter/adapter_model"
                                                r".safetensors has 100 bytes instead of the \d+ written\)"):
        Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True)


@pytest.mark.parametrize("merged", ["every", "last"])
def test_a_checkpoint_with_an_empty_adapter_file_is_skipped(tmp_path, tiny_model_dir, arithmetic_files, parity_reward,
                                                            merged):
    """As for the model's files: a power cut can leave a renamed checkpoint with an empty file; resume takes the one
    before (with merged: last, one without the merged model)."""
    train, _ = arithmetic_files
    settings = lora_config(tiny_model_dir, train, parity_reward, optim={"steps": 4}, checkpoint={"every": 2, "keep": 3},
                           model={"lora": {**LORA, "merged": merged}})
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    (tmp_path / "run" / "checkpoints" / "step_000004" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    settings["optim"]["steps"] = 5
    assert Trainer(load_config(settings), run_dir=tmp_path / "run", resume=True).step == 2


def test_shared_prompt_scoring_gives_the_adapters_the_gradient_of_one_padded_pass():
    """The prompt pass filling the KV cache runs through the adapters too, and the gradient flows back through the
    cache into them (test_modeling checks the same for whole models)."""
    from test_modeling import ARCHITECTURES, NEED, grouped_batch, random_model

    from entrorl.modeling import bucketed_response_token_stats, response_token_stats
    from entrorl.trainer.adapters import LoraAdapter

    model = random_model(ARCHITECTURES["qwen2"]()).double()  # float64, as there: float32 rounding differs by CPU
    LoraAdapter(model, rank=4, alpha=8.0)
    draw_adapters(model, 0.1, ".lora_B.")  # B starts at zero, which would give A no gradient
    batch = grouped_batch([4, 9, 1, 6], group_size=4, vocab=40)
    weights = torch.randn(batch[3].shape, generator=torch.Generator().manual_seed(1)) * batch[3]

    def adapter_gradients(score):
        model.zero_grad(set_to_none=True)
        stats = score(model, *batch, temperature=0.8, need=NEED)
        ((stats.logprob + 0.1 * stats.entropy) * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = adapter_gradients(response_token_stats)
    shared = adapter_gradients(lambda *args, **kwargs: bucketed_response_token_stats(
        *args, **kwargs, overhead_tokens=0, prompt_pass_tokens=0))
    # only the adapters have gradients: A and B of the 7 linear layers of each of the 2 blocks
    assert expected.keys() == shared.keys() and len(expected) == 28 and all(".lora_" in name for name in expected)
    for name in expected:
        torch.testing.assert_close(shared[name], expected[name], atol=1e-5, rtol=1e-4)


def test_bfloat16_base_with_float32_adapters_and_activation_checkpointing(tmp_path, tiny_model_dir, arithmetic_files,
                                                                         parity_reward, monkeypatch):
    """A low-precision base keeps float32 adapters, which the optimizer steps directly (no master weights); with
    activation checkpointing the adapters still get their gradient."""
    train, _ = arithmetic_files
    config = load_config(lora_config(tiny_model_dir, train, parity_reward,
                                     model={"dtype": "bfloat16", "activation_checkpointing": True}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    adapters = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainer.master is None and {p.dtype for p in adapters.values()} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    trainer.train()
    moved = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[name])]
    assert any(".lora_B." in name for name in moved) and any(".lora_A." in name for name in moved)
    # the merged model is float32: W + (alpha / r) B A rounded to bfloat16 would lose most of a small update
    merged = load_causal_lm(tmp_path / "run" / "checkpoints" / "step_000002" / "model")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    layer = trainer.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected)
    assert not torch.equal(expected.bfloat16().float(), expected)  # what bfloat16 would have kept differs
    # for eval, adapters on a bfloat16 base stay apart from it, in float32, as in training
    from peft.tuners.lora import LoraLayer

    from entrorl.trainer.checkpoint import load_model_directory, resolve_model_directory

    adapters = resolve_model_directory(tmp_path / "run" / "checkpoints" / "step_000002" / "adapter")
    model = load_model_directory(adapters, dtype="bfloat16")
    assert any(isinstance(module, LoraLayer) for module in model.modules()) and not model.training
    written = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "model" / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float32"  # the config names the weights' type
    ids = torch.randint(3, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(trainer.model, ids), rtol=0, atol=0)
    # and so does `eval --model` of the run or a checkpoint, in the run's bfloat16: its float32 merged model/ rounded
    # to bfloat16 lost about half of the update
    from typer.testing import CliRunner

    import entrorl.trainer.checkpoint as checkpoint_module
    from entrorl.cli import app

    loaded, load = [], checkpoint_module.load_model_directory
    monkeypatch.setattr(checkpoint_module, "load_model_directory", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    for model_argument in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_000002"):
        result = CliRunner().invoke(app, ["eval", "--model", str(model_argument), "--data", str(train), "--n", "1",
                                          "--max-prompts", "1", "--max-new-tokens", "1", "--reward", "exact_match"])
        assert result.exit_code == 0, result.output
        torch.testing.assert_close(logits(loaded[-1], ids), logits(trainer.model, ids), rtol=0, atol=0)
    assert resolve_model_directory(tmp_path / "run").adapters is None  # without the half-precision reason: model/



def test_eval_of_a_half_precision_lora_checkpoint_takes_base_and_falls_back_to_the_merged_model_without_it(
        tmp_path, tiny_model_dir, arithmetic_files, parity_reward, monkeypatch):
    """--base with a checkpoint loads its adapters on that base; without the base at hand, or without peft, the merged
    model/ (said)."""
    import shutil

    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    config = load_config(lora_config(base, train, parity_reward, model={"dtype": "bfloat16"}, optim={"steps": 1},
                                     checkpoint={"every": 1}))
    Trainer(config, run_dir=tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    moved = base.rename(tmp_path / "moved")

    def evaluate(*extra):
        result = CliRunner().invoke(app, ["eval", "--model", str(checkpoint), "--data", str(train), "--n", "1",
                                          "--max-prompts", "1", "--max-new-tokens", "1", "--reward", "exact_match",
                                          "--out", str(tmp_path / "eval.json"), *extra])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / "eval.json").read_text())["settings"], " ".join(result.output.split())

    settings, _ = evaluate("--base", str(moved))
    assert settings["adapters"] == str((checkpoint / "adapter").resolve())
    settings, said = evaluate()
    assert "adapters" not in settings and settings["model_directory"] == str((checkpoint / "model").resolve())
    assert "loading the merged" in said and "(--dtype float32 keeps it" in said
    moved.rename(base)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    settings, said = evaluate()
    assert "adapters" not in settings and "needs the peft package" in said and "loading the merged" in said


def test_the_merged_model_holds_embedding_adapters_of_an_untied_model(tmp_path):
    """peft keeps an embedding's adapters apart from a linear layer's (lora_embedding_A / B); both are merged."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    model = random_model(ARCHITECTURES["llama_bias"]())
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    adapter = LoraAdapter(model, rank=4, alpha=8.0, target_modules=["embed_tokens", "q_proj", "down_proj"])
    draw_adapters(model, 0.2)  # both halves away from their start, so that every adapter changes the model
    adapter.save_merged(tmp_path / "merged")
    (tmp_path / "merged" / "generation_config.json").unlink(missing_ok=True)
    merged = load_causal_lm(tmp_path / "merged")
    ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    adapted = logits(model, ids)
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    with adapter.disabled() as base:  # the same modules: what the adapters change is not negligible
        assert not torch.allclose(logits(base, ids), adapted, atol=1e-2)


def test_the_merged_model_holds_the_adapters_on_a_mixture_of_experts_fused_weights(tmp_path):
    """On fused experts (Mixtral in transformers 5) all-linear also adapts the experts' 3-D weights through peft's
    parameter wrappers, nested one per weight (experts.base_layer.base_layer.gate_up_proj): the merged model holds
    each under its own name with its update, and loads whole."""
    from test_modeling import COMMON
    from transformers import AutoModelForCausalLM, MixtralConfig

    from entrorl.trainer.adapters import LoraAdapter

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1))
    expert_weights = {name for name, _ in model.named_parameters() if ".experts." in name}
    adapter = LoraAdapter(model, rank=2, alpha=4.0)
    assert any(".experts.base_layer.base_layer." in name for name, _ in model.named_parameters())
    draw_adapters(model, 0.2)
    merged_names = set(adapter.merged_state_dict())
    assert expert_weights <= merged_names and not any("base_layer" in name for name in merged_names)
    assert {name for name, _ in adapter.merged_parameters()} <= merged_names
    adapter.save_merged(tmp_path / "merged")
    (tmp_path / "merged" / "generation_config.json").unlink(missing_ok=True)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    adapted = logits(model, ids)
    torch.testing.assert_close(logits(merged.eval(), ids), adapted, rtol=1e-5, atol=1e-5)
    with adapter.disabled() as base:  # the experts' adapters among the rest change the model
        assert not torch.allclose(logits(base, ids), adapted, atol=1e-2)
    # peft's parameter wrappers take no dropout: the setting that cannot be honoured is the one named
    model = AutoModelForCausalLM.from_config(MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ValueError, match=r"^model\.lora\.dropout: .*lora_dropout"):
        LoraAdapter(model, rank=2, alpha=4.0, dropout=0.1)


def test_merged_weights_have_the_base_model_s_names_and_merged_parameters_takes_the_type_asked_for():
    """merged_state_dict holds the base model's entries and nothing of the adapters; merged_parameters lists the base's
    parameters, in the type asked for: float32 from a bfloat16 base gives the float32 merged sum, not the bfloat16 one.
    Integer buffers keep their type."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    names = random_model(ARCHITECTURES["llama_bias"]())
    model = random_model(ARCHITECTURES["llama_bias"]()).to(torch.bfloat16)
    for each in (names, model):
        each.model.register_buffer("token_counts", torch.arange(5))  # a buffer saved with the weights
    adapter = LoraAdapter(model, rank=4, alpha=8.0, target_modules=["q_proj", "down_proj"])
    draw_adapters(model, 0.2)
    merged = adapter.merged_state_dict()
    assert merged.keys() == names.state_dict().keys()
    counts = merged.pop("model.token_counts")
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.arange(5))
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}
    wide = dict(adapter.merged_parameters(torch.float32))
    assert list(wide) == [name for name, _ in names.named_parameters()]
    for name, tensor in wide.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, merged[name]), name
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    narrow = dict(adapter.merged_parameters())  # the base's own type: the float32 sum rounded once
    assert narrow[q_proj].dtype == torch.bfloat16 and torch.equal(narrow[q_proj], merged[q_proj].to(torch.bfloat16))
    assert not torch.equal(narrow[q_proj].float(), merged[q_proj])


def test_an_adapter_that_reaches_the_output_layer_under_a_name_not_foreseen_is_refused(monkeypatch):
    """After peft has put the adapters in, the output layer is checked itself, whatever the names matched."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer import adapters

    monkeypatch.setattr(adapters, "_named", lambda model, module, targets: [])  # a name the check does not recognise
    with pytest.raises(ValueError, match="model.lora.target_modules reaches the output layer"):
        adapters.LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0, target_modules=["lm_head"])


def test_module_names_match_whole_names_or_their_ends_after_a_dot():
    """A name that only ends the output layer's name without a dot ("head" of "lm_head") does not name it."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    with pytest.raises(ValueError, match="model.lora.target_modules") as refused:
        LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0, target_modules=["head"])
    assert "output layer" not in str(refused.value)


def test_saved_adapters_keep_a_base_name_that_is_no_directory_and_must_fit_the_model_they_load_into(tmp_path):
    """save keeps the name of a base model that is no directory here (a hub id, a moved one) as it is; load refuses
    adapter files that lack some of this model's adapters or hold others, naming them; the safetensors file is preferred
    to a pickled one."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter, adapter_weights_file, read_adapter_config

    def adapter(targets):
        model = random_model(ARCHITECTURES["llama_bias"]())
        model.name_or_path = "../no-such-base"  # no directory here
        return LoraAdapter(model, rank=4, alpha=8.0, target_modules=targets)

    adapter(["q_proj"]).save(tmp_path / "q")
    adapter(["q_proj", "v_proj"]).save(tmp_path / "qv")
    assert read_adapter_config(tmp_path / "q")["base_model_name_or_path"] == "../no-such-base"
    with pytest.raises(ValueError, match=r"do not fit .*missing: .*v_proj.*; unexpected: none"):
        adapter(["q_proj", "v_proj"]).load(tmp_path / "q")
    with pytest.raises(ValueError, match=r"do not fit .*missing: none; unexpected: .*v_proj"):
        adapter(["q_proj"]).load(tmp_path / "qv")
    adapter(["q_proj"]).load(tmp_path / "q")  # the same adapters: no error
    (tmp_path / "q" / "adapter_model.bin").write_bytes(b"older")
    assert adapter_weights_file(tmp_path / "q") == tmp_path / "q" / "adapter_model.safetensors"
    (tmp_path / "q" / "adapter_model.safetensors").write_bytes(b"")
    assert adapter_weights_file(tmp_path / "q") == tmp_path / "q" / "adapter_model.bin"


def test_eval_merges_adapters_on_the_output_layer_of_an_untied_bfloat16_base(tmp_path):
    """Untied, the output layer's and the input embedding's adapters can be applied; the one on the output layer is
    merged (the scoring path reads its weight), so the model comes back merged, in eval mode, whatever its type."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import load_adapted_causal_lm

    random_model(ARCHITECTURES["llama_bias"]()).save_pretrained(tmp_path / "base")
    base = load_causal_lm(tmp_path / "base", dtype="bfloat16")
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["embed_tokens", "q_proj", "lm_head"]))
    draw_adapters(adapted, 0.3)
    adapted.save_pretrained(tmp_path / "adapters")
    model = load_adapted_causal_lm(tmp_path / "adapters", tmp_path / "base", dtype="bfloat16")
    assert not model.training and not any(isinstance(module, LoraLayer) for module in model.modules())
    ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(logits(model, ids), logits(load_causal_lm(tmp_path / "base", dtype="bfloat16"), ids))


def test_a_single_module_name_adapts_that_module(tmp_path, tiny_model_dir, arithmetic_files, parity_reward):
    """--set model.lora.target_modules=q_proj: one name, not a regular expression over full module names."""
    train, _ = arithmetic_files
    config = load_config(lora_config(tiny_model_dir, train, parity_reward), ["model.lora.target_modules=q_proj"])
    assert config.model.lora.target_modules == ["q_proj"]
    trainer = Trainer(config, run_dir=tmp_path / "run")
    adapted = {name.split(".lora_")[0] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapted == {f"model.layers.{layer}.self_attn.q_proj" for layer in (0, 1)}
    trainer.close()


def test_without_peft_the_configuration_says_what_to_install(tiny_model_dir, arithmetic_files, parity_reward, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "peft" else find_spec(name, *args))
    train, _ = arithmetic_files
    with pytest.raises(ConfigError, match=r"peft package: pip install 'entrorl\[lora\]'"):
        load_config(lora_config(tiny_model_dir, train, parity_reward))


def test_eval_loads_adapters_onto_the_base_model_they_record(tmp_path, tiny_model_dir, arithmetic_files, parity_reward,
                                                            monkeypatch):
    """A checkpoint's adapters (and the model/ of a checkpoint written without the merged model) load onto the base
    model for eval: merged into a float32 base, with the same predictions as the run's merged model."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from entrorl.trainer.adapters import read_adapter_config
    from entrorl.trainer.checkpoint import load_model_directory, resolve_model_directory, training_run_of

    train, _ = arithmetic_files
    monkeypatch.chdir(tiny_model_dir.parent)  # model.path relative to the working directory, as users write it
    settings = lora_config(tiny_model_dir.name, train, parity_reward, optim={"steps": 4}, checkpoint={"every": 2},
                           model={"lora": {**LORA, "merged": "last"}})
    Trainer(load_config(settings), run_dir=tmp_path / "run").train()
    first, last = (tmp_path / "run" / "checkpoints" / name for name in ("step_000002", "step_000004"))
    recorded = read_adapter_config(first / "adapter")["base_model_name_or_path"]
    assert recorded == str(tiny_model_dir.resolve())  # found from any working directory

    # a model/ without the merged model stands for its checkpoint's adapters, with its own tokenizer
    directory = resolve_model_directory(first / "model")
    assert (directory.adapters, directory.weights, directory.tokenizer) == (first / "adapter", tiny_model_dir.resolve(),
                                                                          first / "model")
    # the adapters alone: the base model's tokenizer
    assert resolve_model_directory(first / "adapter").tokenizer == tiny_model_dir.resolve()
    ids = torch.randint(3, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    model = load_model_directory(directory)
    assert not model.training and not any(isinstance(module, LoraLayer) for module in model.modules())  # merged
    expected = logits(PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), first / "adapter"), ids)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # the last checkpoint's adapters give its merged model's predictions, and they differ from the first's
    adapted = logits(load_model_directory(resolve_model_directory(last / "adapter")), ids)
    torch.testing.assert_close(adapted, logits(load_causal_lm(last / "model"), ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-4)
    assert resolve_model_directory(last / "model").adapters is None  # merged: a complete model
    # a checkpoint stands for its model/, a run directory for its newest checkpoint's
    assert resolve_model_directory(first) == directory
    assert resolve_model_directory(tmp_path / "run") == resolve_model_directory(last / "model")
    assert resolve_model_directory(tmp_path / "run" / "checkpoints") == resolve_model_directory(last / "model")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run directory without a complete, intact checkpoint"):
        resolve_model_directory(tmp_path / "empty")
    # a run stopped before its first checkpoint: its config.json is a training configuration, not a model's
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="run directory without a complete, intact checkpoint"):
        resolve_model_directory(tmp_path / "early")
    # the run a checkpoint belongs to, from any of the paths that name it; none for a model directory
    run = (tmp_path / "run").resolve()
    for named in (run, run / "checkpoints", first, first / "model", first / "adapter"):
        assert training_run_of(named) == run, named
    assert training_run_of(tiny_model_dir) is None and training_run_of(tmp_path / "early") == (tmp_path / "early").resolve()
    # a model directory with a checkpoints/ folder of its own is no run directory
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "with-folder")
    (tmp_path / "with-folder" / "checkpoints").mkdir()
    assert resolve_model_directory(tmp_path / "with-folder").weights == tmp_path / "with-folder"
    (tmp_path / "with-folder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        resolve_model_directory(tmp_path / "with-folder")
    # a power cut's empty adapter file, and a truncated one: in a checkpoint, the sizes it wrote say so before loading
    loose = tmp_path / "loose-adapter"
    shutil.copytree(first / "adapter", loose)
    for adapters, empty, cut in (
            (first / "adapter", r"checkpoint .*step_000002 is incomplete \(adapter/adapter_model.safetensors is empty\)",
             r"checkpoint .*step_000002 is incomplete \(adapter/adapter_model.safetensors has \d+ bytes instead of"),
            (loose, "or an empty one", "adapter_model.safetensors cannot be read")):
        weights = adapters / "adapter_model.safetensors"
        saved = weights.read_bytes()
        weights.write_bytes(b"")
        with pytest.raises((FileNotFoundError, ValueError), match=empty):
            resolve_model_directory(adapters.parent if adapters.name == "adapter" else adapters)
        weights.write_bytes(saved[: len(saved) // 2])
        with pytest.raises(ValueError, match=cut):
            load_model_directory(resolve_model_directory(adapters))


def random_adapters(model_dir, directory, *, safe_serialization: bool = True, **lora):
    """Rank-4 adapters on ``model_dir``'s model, both halves drawn at random (so that they change its predictions
    a lot), saved with peft into ``directory``; the adapted model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(model_dir),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **{"target_modules": "all-linear", **lora}))
    draw_adapters(model, 0.3)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return model


def test_eval_refuses_adapters_it_cannot_apply_saying_why(tmp_path, tiny_model_dir):
    import json
    import shutil

    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.trainer.adapters import LoraAdapter
    from entrorl.trainer.checkpoint import load_model_directory, resolve_model_directory

    LoraAdapter(load_causal_lm(tiny_model_dir), **LORA).save(tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match="holds peft adapters: train from their base model"):
        load_causal_lm(tmp_path / "adapters")  # as model.path of a training run
    with pytest.raises(ValueError, match="--base is for LoRA adapters.*leave --base out"):
        resolve_model_directory(tiny_model_dir, base=tiny_model_dir)
    config_file = tmp_path / "adapters" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match="base model .*moved, which is not a directory here.*--base"):
        resolve_model_directory(tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match=r"^--base .*elsewhere is not a directory: .* \(they record .*moved\)$"):
        resolve_model_directory(tmp_path / "adapters", base=tmp_path / "elsewhere")  # the option, not the record
    shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert resolve_model_directory(tmp_path / "adapters", base=tmp_path / "elsewhere").weights == tmp_path / "elsewhere"
    for recorded in (None, 5):
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        with pytest.raises(ValueError, match="do not record their base model: give its directory with --base"):
            resolve_model_directory(tmp_path / "adapters")
    config_file.write_text(json.dumps({**config, "peft_type": "FROM_A_NEWER_PEFT"}))
    with pytest.raises(ValueError, match="adapter_config.json cannot be read by peft"):
        load_model_directory(resolve_model_directory(tmp_path / "adapters", base=tiny_model_dir))
    for text, said in (("{", "is not valid JSON"), ("[]", "is no peft adapter configuration"),
                       (json.dumps({"base_model_name_or_path": str(tiny_model_dir)}), "is no peft adapter configuration")):
        config_file.write_text(text)
        with pytest.raises(ValueError, match=f"adapter_config.json {said}"):
            resolve_model_directory(tmp_path / "adapters", base=tiny_model_dir)
    config_file.write_text(json.dumps(config))
    (tmp_path / "adapters" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        resolve_model_directory(tmp_path / "adapters", base=tiny_model_dir)

    LoraAdapter(load_causal_lm(tiny_model_dir), **LORA).save(tmp_path / "adapters")
    other = save_tiny_model(tmp_path / "wider", seed=0, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                            max_position_embeddings=64)
    with pytest.raises(ValueError, match="adapters in .*adapters do not fit the model in .*wider"):
        load_model_directory(resolve_model_directory(tmp_path / "adapters", base=other))
    # the tiny model ties its input embedding to its output layer: an adapter on either would reach both when merged
    for target in ("embed_tokens", "lm_head"):
        random_adapters(tiny_model_dir, tmp_path / target, target_modules=[target])
        with pytest.raises(ValueError, match="adapt the input embedding or the output layer, which share one weight"):
            load_model_directory(resolve_model_directory(tmp_path / target))


def test_eval_reads_pickled_adapters_and_takes_weights_beside_adapter_files_as_the_model(tmp_path, tiny_model_dir):
    from entrorl.trainer.checkpoint import load_model_directory, resolve_model_directory

    adapted = random_adapters(tiny_model_dir, tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()  # what older peft versions write
    ids = torch.randint(3, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    loaded = load_model_directory(resolve_model_directory(tmp_path / "pickled"))
    torch.testing.assert_close(logits(loaded, ids), logits(adapted, ids), rtol=1e-5, atol=1e-5)
    # a complete model saved with adapter files beside it is that model, unless --base asks for the adapters
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "both")
    for name in ("adapter_config.json", "adapter_model.bin"):
        shutil.copy(tmp_path / "pickled" / name, tmp_path / "both" / name)
    assert resolve_model_directory(tmp_path / "both").adapters is None
    assert resolve_model_directory(tmp_path / "both", base=tiny_model_dir).adapters == tmp_path / "both"


def test_cli_eval_samples_the_adapted_model(tmp_path, tiny_model_dir, arithmetic_files):
    """entrorl eval of adapters (given their base with --base) draws the samples the merged model draws, and not the
    base model's."""
    import json
    import shutil

    from test_trainer import invoke_cli

    from entrorl.trainer.adapters import LoraAdapter

    _, held_out = arithmetic_files
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    adapter = LoraAdapter(load_causal_lm(tmp_path / "base"), **LORA)
    draw_adapters(adapter.model, 0.3)
    adapter.save(tmp_path / "adapters")
    adapter.save_merged(tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "base" / name, tmp_path / "merged")

    def completions(*model: str) -> list[str]:
        samples = tmp_path / "samples.jsonl"
        result = invoke_cli("eval", *model, "--data", str(held_out), "--n", "2", "--reward", "exact_match",
                            "--max-new-tokens", "6", "--out", str(tmp_path / "eval.json"), "--samples", str(samples))
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["completion"] for line in samples.read_text().splitlines()]

    adapted = completions("--model", str(tmp_path / "adapters"), "--base", str(tmp_path / "base"))
    settings = json.loads((tmp_path / "eval.json").read_text())["settings"]
    assert (settings["adapters"], settings["base"]) == (str((tmp_path / "adapters").resolve()),
                                                        str((tmp_path / "base").resolve()))
    assert "model_directory" not in settings
    assert adapted == completions("--model", str(tmp_path / "merged"))
    # saved with their tokenizer and no config.json (as TRL's and transformers' Trainer.save_model write adapters):
    # the tokenizer is theirs (it was refused as "not a Hugging Face model directory")
    assert not (tmp_path / "adapters" / "config.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "base" / name, tmp_path / "adapters")
    assert adapted == completions("--model", str(tmp_path / "adapters"), "--base", str(tmp_path / "base"))
    from entrorl.trainer.checkpoint import resolve_model_directory

    assert resolve_model_directory(tmp_path / "adapters", base=tmp_path / "base").tokenizer == tmp_path / "adapters"
    assert adapted != completions("--model", str(tmp_path / "base"))
    refused = invoke_cli("eval", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--data", str(held_out))
    assert refused.returncode == 2 and "leave --base out" in refused.stderr


def test_the_merged_weight_is_the_base_weight_plus_alpha_over_rank_times_b_a():
    """W + (alpha / r) B A, with the scale alpha / r (6 / 4 = 1.5 here, not alpha, not 1), for the merged model and for
    the weights given to an inference engine; the layers not adapted keep their weights."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    model = random_model(ARCHITECTURES["llama_bias"]())
    adapter = LoraAdapter(model, rank=4, alpha=6.0, target_modules=["q_proj"])
    draw_adapters(model, 0.2)
    layer = model.model.layers[1].self_attn.q_proj
    expected = layer.base_layer.weight + 1.5 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    merged = adapter.merged_state_dict()
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dict(adapter.merged_parameters())["model.layers.1.self_attn.q_proj.weight"], expected,
                               rtol=1e-6, atol=1e-6)
    k_proj = model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(merged["model.layers.1.self_attn.k_proj.weight"], k_proj)


def test_the_adapters_take_the_dropout_rate_asked_for():
    """model.lora.dropout reaches the adapters (off by default)."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    for dropout, expected in ((0.25, 0.25), (0.0, None)):
        model = random_model(ARCHITECTURES["llama_bias"]())
        LoraAdapter(model, rank=4, alpha=8.0, dropout=dropout, target_modules=["q_proj"])
        for layer in model.model.layers:
            applied = layer.self_attn.q_proj.lora_dropout["default"]
            assert (applied.p if isinstance(applied, torch.nn.Dropout) else None) == expected


def test_one_module_name_given_to_the_adapter_as_a_string_is_a_name_not_a_pattern():
    """LoraAdapter(target_modules="q_proj") adapts the q_proj layers, as ["q_proj"] does (peft would read a string as a
    regular expression over full module names, which "q_proj" matches none of)."""
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    model = random_model(ARCHITECTURES["llama_bias"]())
    LoraAdapter(model, rank=4, alpha=8.0, target_modules="q_proj")
    adapted = {name.split(".lora_")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {f"model.layers.{layer}.self_attn.q_proj" for layer in range(len(model.model.layers))}


def test_adapters_loaded_for_eval_onto_another_base_directory_are_frozen_and_load_without_a_warning(tmp_path):
    """Kept apart on a bfloat16 base, the adapters are loaded for inference (no parameter asks for a gradient); the base
    given (not the one the adapters record) is the one peft is told of, so it does not warn of a renamed base."""
    import shutil
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import load_adapted_causal_lm

    random_model(ARCHITECTURES["llama_bias"]()).save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    adapted = get_peft_model(load_causal_lm(tmp_path / "base", dtype="bfloat16"),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "adapters")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapted_causal_lm(tmp_path / "adapters", tmp_path / "copy", dtype="bfloat16")
    assert not [str(warning.message) for warning in caught if "renamed" in str(warning.message)]
    assert any(isinstance(module, LoraLayer) for module in model.modules())
    assert not [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("damage", ["not a pickle", "cut short"])
def test_a_damaged_pickled_adapter_file_cannot_be_read(tmp_path, damage):
    """An adapter_model.bin (older peft) that holds no pickle, or a legacy-format one cut short: ValueError naming the
    file and what its reader said."""
    import io

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    adapter = LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0, target_modules=["q_proj"])
    adapter.peft_model.save_pretrained(tmp_path / "adapters", safe_serialization=False)
    weights = tmp_path / "adapters" / "adapter_model.bin"
    legacy = io.BytesIO()
    torch.save(torch.load(weights, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    weights.write_bytes(b"x" * 100 if damage == "not a pickle" else legacy.getvalue()[:10])
    reader = "UnpicklingError" if damage == "not a pickle" else "EOFError"
    with pytest.raises(ValueError, match=rf"adapter_model.bin cannot be read \({reader}"):
        adapter.load(tmp_path / "adapters")


def test_the_merged_model_of_a_float64_base_is_float64_and_its_config_says_so(tmp_path):
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    adapter = LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()).double(), rank=4, alpha=8.0,
                          target_modules=["q_proj"])
    assert adapter.merged_dtype() == torch.float64
    adapter.save_merged(tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "float64"


def test_without_peft_the_adapter_says_what_to_install(monkeypatch):
    import sys

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft then fails
    with pytest.raises(ImportError, match=r"model.lora needs the peft package: pip install 'entrorl\[lora\]'"):
        LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0)


def _llama_adapter(rank: int = 4):
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    return LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=rank, alpha=8.0, target_modules=["q_proj"])


def test_a_pickled_adapter_file_cut_short_cannot_be_read_and_is_not_taken_for_another_model_s(tmp_path):
    """adapter_model.bin as torch.save writes it today (a zip archive), cut short: torch says RuntimeError, which is a
    damaged file (not adapters that 'do not fit the model'), for LoraAdapter.load and for an eval's loader alike."""
    from peft import LoraConfig, get_peft_model
    from test_modeling import ARCHITECTURES, random_model

    from entrorl.modeling import load_causal_lm
    from entrorl.trainer.adapters import load_adapted_causal_lm

    random_model(ARCHITECTURES["llama_bias"]()).save_pretrained(tmp_path / "base")
    get_peft_model(load_causal_lm(tmp_path / "base"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "adapters", safe_serialization=False)
    weights = tmp_path / "adapters" / "adapter_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read \(RuntimeError: "):
        _llama_adapter().load(tmp_path / "adapters")
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read") as refused:
        load_adapted_causal_lm(tmp_path / "adapters", tmp_path / "base")
    assert "do not fit" not in str(refused.value)


def test_adapters_of_another_rank_do_not_fit_as_a_value_error(tmp_path):
    """LoraAdapter.load says ValueError when the adapters do not fit: rank-4 weights into rank-8 adapters (torch's
    size mismatch was a RuntimeError)."""
    _llama_adapter(rank=4).save(tmp_path / "rank4")
    with pytest.raises(ValueError, match=r"the adapters in .*rank4 do not fit this model's adapter settings: .*size mismatch"):
        _llama_adapter(rank=8).load(tmp_path / "rank4")


def test_adapters_whose_configuration_says_training_mode_still_load_frozen_for_eval(tmp_path):
    """An adapter_config.json with inference_mode false (as a training script may leave it) still loads for
    inference: kept apart on a bfloat16 base, no adapter weight asks for a gradient."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import load_adapted_causal_lm

    random_model(ARCHITECTURES["llama_bias"]()).save_pretrained(tmp_path / "base")
    adapted = get_peft_model(load_causal_lm(tmp_path / "base", dtype="bfloat16"),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "adapters")
    config_file = tmp_path / "adapters" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["inference_mode"] = False
    config_file.write_text(json.dumps(config))
    model = load_adapted_causal_lm(tmp_path / "adapters", tmp_path / "base", dtype="bfloat16")
    assert any(isinstance(module, LoraLayer) for module in model.modules())
    assert not [name for name, p in model.named_parameters() if p.requires_grad]


def test_memory_that_runs_out_while_reading_adapters_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """A reader's out-of-memory RuntimeError propagates as it is; any other RuntimeError of the reader is a file that
    cannot be read (ValueError naming it)."""
    import safetensors.torch

    from test_modeling import ARCHITECTURES, random_model

    from entrorl.trainer.adapters import LoraAdapter

    adapter = LoraAdapter(random_model(ARCHITECTURES["llama_bias"]()), rank=4, alpha=8.0, target_modules=["q_proj"])
    adapter.save(tmp_path / "adapters")

    def refused(message):
        def load_file(*args, **kwargs):
            raise RuntimeError(message)
        return load_file

    monkeypatch.setattr(safetensors.torch, "load_file", refused("DefaultCPUAllocator: not enough memory"))
    with pytest.raises(RuntimeError, match="not enough memory") as raised:
        adapter.load(tmp_path / "adapters")
    assert not isinstance(raised.value, ValueError)
    monkeypatch.setattr(safetensors.torch, "load_file", refused("invalid header"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors cannot be read \(RuntimeError: invalid header"):
        adapter.load(tmp_path / "adapters")
