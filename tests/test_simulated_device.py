"""Device placement without a GPU: the library's functions and whole training runs on a simulated second device
(``tests/simulated_device.py``), where mixing a device tensor with a CPU tensor raises as it does on CUDA.

The trainer's runs on the simulated device are compared with the same runs on the CPU: the simulated device computes
on the CPU, with the CPU's random stream, so every metric must come out the same."""

from __future__ import annotations

import copy
import importlib
import json
import math

import numpy as np
import pytest
import torch

import entrorl._checks
from simulated_device import DEVICE, DeviceMismatch, OnDevice, on_device, simulated_device


# ---------------------------------------------------------------------------------------------------------------------
# the simulation itself


def test_mixing_a_device_tensor_with_a_cpu_tensor_raises_as_on_cuda():
    with simulated_device():
        device_tensor = on_device(torch.arange(4.0))
        with pytest.raises(DeviceMismatch):
            device_tensor + torch.ones(4)
        with pytest.raises(DeviceMismatch):
            torch.zeros(4).index_add_(0, torch.tensor([0, 1]), device_tensor[:2])
        with pytest.raises(DeviceMismatch):  # a device index into a CPU tensor
            torch.arange(4.0)[on_device(torch.tensor([True, False, True, False]))]
        with pytest.raises(TypeError, match="cuda"):
            device_tensor.numpy()
        # what CUDA allows: a 0-dim CPU tensor, CPU indices into a device tensor, factories on the tensor's device
        assert isinstance(device_tensor * torch.tensor(2.0), OnDevice)
        assert device_tensor[torch.tensor([1, 3])].tolist() == [1.0, 3.0]
        created = torch.zeros(3, device=device_tensor.device)
        assert isinstance(created, OnDevice) and created.device == DEVICE
        assert isinstance(torch.tensor([1, 2], device=device_tensor.device), OnDevice)
        back = (device_tensor * 2).cpu()
        assert not isinstance(back, OnDevice) and back.tolist() == [0.0, 2.0, 4.0, 6.0]
        assert isinstance(torch.ones(2).to(DEVICE), OnDevice)


def test_what_cuda_refuses_beyond_mixed_inputs_is_refused_too():
    """A 0-dim CPU tensor is a number to an elementwise operation's inputs only: CUDA refuses it as the output
    (``total += x.sum()`` with a CPU ``total``) and as an index (``index_select``); float64 made from Python data on a
    device without it fails as it does on an Apple GPU."""
    with simulated_device():
        values = on_device(torch.arange(4.0))
        with pytest.raises(DeviceMismatch):
            torch.zeros(()).add_(values.sum())
        with pytest.raises(DeviceMismatch):
            values.index_select(0, torch.tensor(1))
        with pytest.raises(DeviceMismatch):  # a mask is no number
            values.masked_fill(torch.tensor(True), 0.0)
        assert values.masked_fill(values > 1, torch.tensor(0.0)).tolist() == [0.0, 1.0, 0.0, 0.0]
        assert torch.where(values > 1, values, torch.tensor(-1.0)).tolist() == [-1.0, -1.0, 2.0, 3.0]
        filled = values.clone()
        filled[filled > 2] = torch.tensor(9.0)  # index_put's value
        assert filled.tolist() == [0.0, 1.0, 2.0, 9.0]
        assert values.clone().fill_(torch.tensor(2.0)).tolist() == [2.0] * 4
    with simulated_device(float64=False):
        for make in (torch.tensor, torch.as_tensor):
            with pytest.raises(TypeError, match="float64"):
                make([1.0, 2.0], dtype=torch.float64, device=DEVICE)


def test_device_tensors_have_addresses_are_saved_as_their_data_and_refuse_cpu_generators(tmp_path):
    """As on CUDA: distinct live tensors have distinct addresses (entrorl compares them), torch.save writes what
    torch.load(map_location="cpu", weights_only=True) reads back as CPU tensors, and a draw on the device from a CPU
    generator fails."""
    generator = torch.Generator().manual_seed(0)
    with simulated_device():
        first, second = torch.zeros(6, device=DEVICE), torch.ones(3, device=DEVICE)
        assert first.data_ptr() != second.data_ptr() and first[2:].data_ptr() == first.data_ptr() + 8
        torch.save({"exp_avg": on_device(torch.arange(6.0))}, tmp_path / "state.pt")
        for draw in (lambda: torch.randperm(5, generator=generator, device=DEVICE),
                     lambda: torch.rand(3, generator=generator, device=DEVICE),
                     lambda: on_device(torch.zeros(3)).uniform_(generator=generator)):
            with pytest.raises(DeviceMismatch, match="generator"):
                draw()
        parameter = torch.nn.Parameter(torch.ones(2)).to(DEVICE)
        torch.save({"weight": torch.nn.Parameter(on_device(torch.ones(2)))}, tmp_path / "parameter.pt")
        shallow = copy.copy(first)
        assert isinstance(shallow, OnDevice) and shallow.data_ptr() == first.data_ptr()
        weight = torch.nn.Linear(2, 2).to(DEVICE).weight
        weight.tag = "kept"
        shallow = copy.copy(weight)  # a parameter sharing the data and the attributes, as a CUDA one's shallow copy
        assert isinstance(shallow, torch.nn.Parameter) and shallow.device == DEVICE and shallow.tag == "kept"
        assert shallow.data_ptr() == weight.data_ptr()
    loaded = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)["exp_avg"]
    assert type(loaded) is torch.Tensor and loaded.tolist() == list(range(6))
    weight = torch.load(tmp_path / "parameter.pt", map_location="cpu", weights_only=True)["weight"]
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad and parameter.requires_grad


def test_a_model_moved_to_the_simulated_device_keeps_its_weights_and_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    inputs = torch.randn(4, 3)
    expected = layer(inputs).square().sum()
    expected.backward()
    expected_gradient = layer.weight.grad.clone()
    layer.weight.grad = None
    with simulated_device():
        layer.to(DEVICE)
        assert layer.weight.device == DEVICE
        loss = layer(on_device(inputs)).square().sum()
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()))
        assert torch.equal(layer.weight.grad.cpu(), expected_gradient)
        with pytest.raises(DeviceMismatch):
            layer(inputs)  # inputs left on the CPU


def test_tied_weights_stay_tied_on_the_simulated_device():
    embedding = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    with simulated_device():
        model.to(DEVICE)
        assert model["head"].weight is model["embedding"].weight
        assert isinstance(model["head"].weight, OnDevice) and len(list(model.parameters())) == 1


@pytest.fixture(autouse=True)
def the_simulated_device_is_a_device_to_train_on(monkeypatch):
    """``model.device: meta`` names the simulated device, which the configuration refuses as a device type entrorl does
    not run on, as it should for the real ``meta`` device."""
    import entrorl.trainer.config

    monkeypatch.setattr(entrorl.trainer.config, "DEVICE_TYPES", entrorl.trainer.config.DEVICE_TYPES | {DEVICE.type})


@pytest.fixture(params=[True, False], ids=["device", "device-without-float64"])
def float64(request, monkeypatch) -> bool:
    """Both kinds of device: one with float64 (CUDA) and one without (Apple's GPUs), whose float64 statistics entrorl
    computes on the CPU."""
    if not request.param:
        monkeypatch.setattr(entrorl._checks, "DEVICES_WITHOUT_FLOAT64", frozenset({"mps", DEVICE.type}))
    return request.param


def test_a_device_without_float64_refuses_it_and_entrorl_moves_such_statistics_to_the_cpu(float64):
    from entrorl._checks import in_float64, widest_float

    with simulated_device(float64=float64):
        values = on_device(torch.tensor([1.0, 2.0]))
        if float64:
            assert isinstance(values.double(), OnDevice) and widest_float(values.device) == torch.float64
        else:
            with pytest.raises(TypeError, match="float64"):
                values.double()
            with pytest.raises(TypeError, match="float64"):
                torch.zeros(2, dtype=torch.float64, device=values.device)
            with pytest.raises(TypeError, match="float64"):  # torch's MPS copy converts before it moves
                values.to(device="cpu", dtype=torch.float64)
            assert widest_float(values.device) == torch.float32
        wide = in_float64(values)
        assert wide.dtype == torch.float64 and isinstance(wide, OnDevice) == float64 and wide.tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------------
# functions of the library given device tensors


def _diagnostic_inputs():
    from entrorl.trainer.diagnostics import decision_points

    generator = torch.Generator().manual_seed(0)
    rows, width = 6, 5
    prompt_ids = torch.tensor([[3, 4]] * 3 + [[5, 6]] * 3)
    response_ids = torch.randint(0, 3, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[0, 3:] = False
    coefficients = torch.randn(rows, width, generator=generator)
    disc_centered = torch.randn(rows, width, generator=generator)
    before = torch.rand(rows, width, generator=generator)
    after = before + 0.01 * torch.randn(rows, width, generator=generator)
    points = decision_points(prompt_ids, torch.ones(rows, 2, dtype=torch.bool), response_ids)
    return (coefficients, disc_centered, before, after, mask), points


@pytest.mark.parametrize("points_on_device", [False, True], ids=["points-from-decision_points", "points-on-device"])
def test_predicted_vs_measured_with_decision_points_on_device_tensors(points_on_device, float64):
    """``decision_points`` returns its ids on the CPU; the statistics may be on the GPU. Shared points used to fail
    there: a device mask indexing the CPU ids, then a sum created on the CPU."""
    from entrorl.trainer.diagnostics import predicted_vs_measured

    tensors, points = _diagnostic_inputs()
    expected, expected_per_token = predicted_vs_measured(*tensors, lr=0.1, temperature=1.0, points=points)
    assert math.isfinite(expected["entropy/delta_token_corr"])
    with simulated_device(float64=float64):
        got, per_token = predicted_vs_measured(*[on_device(t) for t in tensors], lr=0.1, temperature=1.0,
                                               points=on_device(points) if points_on_device else points)
        assert isinstance(per_token, OnDevice)
        assert torch.equal(per_token.cpu(), expected_per_token)
    assert got == pytest.approx(expected, nan_ok=True)


def test_pass_at_k_takes_counts_on_a_device(float64):
    """pass_at_k and pass_at_k_curve read tensors on any device, as the module's other functions do."""
    from entrorl.evaluation import avg_at_k, pass_at_k, pass_at_k_curve, summarize_samples

    correct = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    expected_curve = pass_at_k_curve(correct.sum(1), 4, [1, 2, 4])
    n, c = torch.tensor([8, 8, 8]), torch.tensor([0, 3, 8])
    expected = pass_at_k(n, c, 2)
    with simulated_device(float64=float64):
        assert summarize_samples(on_device(correct)).pass_at_k == pytest.approx(expected_curve)
        assert avg_at_k(on_device(correct)) == pytest.approx(expected_curve[1])
        assert pass_at_k_curve(on_device(correct).sum(1), 4, [1, 2, 4]) == pytest.approx(expected_curve)
        got = pass_at_k(on_device(n), on_device(c), 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected))
    assert float(np.asarray(got)[1]) == pytest.approx(1 - (5 * 4) / (8 * 7))


def test_group_statistics_dynamic_sampling_and_overlong_shaping_on_a_device(float64):
    """The public helpers around the rewards answer on their input's device, its float64 arithmetic done where the
    device has it."""
    from entrorl.advantages import group_mean_std
    from entrorl.data import informative_groups
    from entrorl.rewards import overlong_penalties

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    lengths = torch.tensor([3, 9, 10, 12, 7, 8])
    expected = (group_mean_std(rewards, groups), informative_groups(rewards, groups),
                overlong_penalties(lengths, max_length=10, cache_length=4))
    with simulated_device(float64=float64):
        statistics = group_mean_std(on_device(rewards), on_device(groups))
        informative = informative_groups(on_device(rewards), on_device(groups))
        penalties = overlong_penalties(on_device(lengths), max_length=10, cache_length=4)
        assert all(isinstance(value, OnDevice) for value in (*statistics, informative, penalties))
    for got, wanted in zip(statistics, expected[0]):
        torch.testing.assert_close(got.cpu(), wanted)
    assert informative.cpu().tolist() == expected[1].tolist() == [True, True, False, False, False, False]
    torch.testing.assert_close(penalties.cpu(), expected[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_statistics_and_their_gradient_on_a_device_match_the_cpu(dtype, float64):
    from entrorl.tokens import token_stats

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 13, generator=generator).to(dtype)
    targets = torch.randint(0, 13, (3, 5), generator=generator)

    def statistics_and_gradient(on):
        leaf = on(logits.clone()).requires_grad_(True)
        stats = token_stats(leaf, on(targets), temperature=0.7, chunk_size=4,
                            need=("logprob", "entropy", "disc", "disc_centered"))
        (stats.logprob.sum() + 0.3 * stats.entropy.sum()).backward()
        return [value.detach().cpu() for value in (*stats.as_dict().values(), leaf.grad)]

    expected = statistics_and_gradient(lambda tensor: tensor)
    with simulated_device(float64=float64):
        got = statistics_and_gradient(on_device)
    for got_value, expected_value in zip(got, expected):
        torch.testing.assert_close(got_value, expected_value)


def test_diversity_shaping_of_rewards_on_a_device(float64):
    from entrorl.rewards import diversity_adjusted_rewards

    completions = ["a b c", "a b c", "x y", "p q r s"]
    table = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))

    def embed(texts):
        return torch.stack([table[[ord(character) for character in text]].sum(0) for text in texts])

    rewards, groups = torch.tensor([1.0, 1.0, 0.0, -1.0]), torch.tensor([0, 0, 1, 1])
    expected = diversity_adjusted_rewards(rewards, completions, groups, embedder=embed)
    with simulated_device(float64=float64):
        got = diversity_adjusted_rewards(on_device(rewards), completions, on_device(groups), embedder=embed)
        assert isinstance(got, OnDevice)
    torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("estimator", [info.name for info in __import__("entrorl").available_advantages()])
def test_advantage_estimators_on_device_tensors_match_the_cpu(estimator, float64):
    from entrorl import compute_advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 0.25])
    inputs = dict(rewards=rewards, group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]),
                  lengths=torch.tensor([3, 5, 4, 6, 2, 7, 3, 3, 5]),
                  seq_log_prob=-torch.linspace(1.0, 5.0, 9), correct=rewards >= 0.5)
    params = {"k": 2} if estimator == "passk" else {}  # k at most the groups' size
    expected = compute_advantages(estimator, **inputs, **params)
    with simulated_device(float64=float64):
        got = compute_advantages(estimator, **{key: on_device(value) for key, value in inputs.items()}, **params)
        assert isinstance(got, OnDevice)
    torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("method", [info.name for info in __import__("entrorl").available_methods()]
                         + ["dapo+clip_b+forking_tokens", "gspo+icepop", "clip_v+kl_cov+entropy_bonus"])
def test_objectives_on_device_tensors_match_the_cpu(method, float64, recwarn):
    """Token statistics, then the objective's loss and its gradient, from device logits: the CPU's numbers."""
    from entrorl.objective import PolicyBatch, build_objective
    from entrorl.tokens import token_stats

    generator = torch.Generator().manual_seed(1)
    rows, width, vocab = 4, 6, 11
    logits = torch.randn(rows, width, vocab, generator=generator)
    tokens = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[1, 4:] = False
    old_log_prob = token_stats(logits + 0.1 * torch.randn(rows, width, vocab, generator=generator), tokens).logprob
    advantages = torch.randn(rows, width, generator=generator)

    def loss_and_gradient(on):
        leaf = on(logits).requires_grad_(True)
        stats = token_stats(leaf, on(tokens), mask=on(mask), need=("logprob", "entropy", "disc", "disc_centered"))
        batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=on(old_log_prob), advantages=on(advantages),
                            mask=on(mask), entropy=stats.entropy, disc=stats.disc, disc_centered=stats.disc_centered,
                            ref_log_prob=on(old_log_prob + 0.02), rollout_log_prob=on(old_log_prob - 0.01), step=1)
        torch.manual_seed(0)  # Clip-Cov's random choice
        output = build_objective(method)(batch)
        output.loss.backward()
        return float(output.loss.detach()), leaf.grad.cpu()

    expected_loss, expected_gradient = loss_and_gradient(lambda tensor: tensor)
    with simulated_device(float64=float64):
        loss, gradient = loss_and_gradient(on_device)
    assert loss == pytest.approx(expected_loss, rel=1e-6, abs=1e-8)
    torch.testing.assert_close(gradient, expected_gradient)


# ---------------------------------------------------------------------------------------------------------------------
# whole training runs


@pytest.fixture
def device_accepted_by_kernels(monkeypatch):
    """transformers re-kernelizes a model when its train/eval mode changes, and the kernels package names the devices
    it knows: the simulated one is let through."""
    try:
        kernelize = importlib.import_module("kernels._internals.layer.kernelize")
    except ImportError:
        return
    validate = kernelize._validate_device_type
    monkeypatch.setattr(kernelize, "_validate_device_type",
                        lambda device, *args, **kwargs: None if str(device) == DEVICE.type else validate(device, *args, **kwargs))


RUNS = {
    "grpo-eval-forks-samples-first-order": {
        "method": "grpo", "eval": {"every": 1, "at_start": True}, "logging": {"samples_every": 1},
        "diagnostics": {"first_order": True}},
    "clip_cov-off-policy": {"method": "clip_cov", "optim": {"mini_batches": 2, "epochs": 2}},
    "dapo+clip_b+forking_tokens-micro-batches": {
        "method": "dapo+clip_b+forking_tokens", "optim": {"micro_batch_size": 3}},
    "kl_ref-lora": {"method": "kl_ref", "model": {"lora": {"rank": 4}}},
    "gspo+icepop-checkpointing-unbucketed": {
        "method": "gspo+icepop", "model": {"activation_checkpointing": True},
        "optim": {"share_prompts": False, "length_buckets": 1}},
    "passk-dynamic-sampling": {"method": "grpo", "advantage": {"name": "passk", "params": {"k": 2}},
                               "rollout": {"dynamic_sampling": True, "top_p": 0.9}},
    "rft-unlikeliness-overlong-bf16": {
        "method": "rft", "model": {"dtype": "bfloat16"},
        "reward": {"unlikeliness": {"beta_rank": 0.25},
                   "overlong": {"max_length": 4, "cache_length": 2}},
        "rollout": {"top_k": 5}},
}


def varied_reward(prompt: str, completion: str, answer, /, **meta) -> float:
    """0, 0.5 or 1 by the completion's characters: a random model's groups then differ, and every step trains."""
    return (sum(map(ord, completion)) % 3) / 2


def _merged(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _config(tiny_model_dir, arithmetic_files, changes: dict):
    from entrorl.trainer.config import TrainConfig

    train, held_out = arithmetic_files
    base = {
        "seed": 7, "torch_threads": 1, "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(train), "eval": str(held_out)}, "reward": {"name": f"{__name__}:varied_reward"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 5, "temperature": 1.0},
        "optim": {"steps": 2, "lr": 1e-3}, "eval": {"every": 0, "n": 2, "ks": [1, 2], "max_prompts": 3, "top_forks": 5},
        "logging": {"progress": False}, "checkpoint": {"every": 2, "keep": 1},
    }
    return TrainConfig.model_validate(_merged(base, changes))


def _run(config, run_dir) -> list[dict]:
    from entrorl.trainer import Trainer

    trainer = Trainer(config, run_dir=run_dir)
    trainer.train()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings(r"ignore:warning. at step \d+ dynamic sampling found 0 informative")  # a random model
@pytest.mark.parametrize("name", list(RUNS))
def test_a_training_run_on_the_simulated_device_matches_the_cpu(name, tiny_model_dir, arithmetic_files, tmp_path,
                                                                device_accepted_by_kernels):
    """Every tensor a step creates lands on the model's device (sampling, rewards' tensors, advantages, the objective,
    the diagnostics, evaluation, forks, checkpoints), and the run's numbers are the CPU's."""
    if "lora" in RUNS[name].get("model", {}):
        pytest.importorskip("peft")
    on_cpu = _run(_config(tiny_model_dir, arithmetic_files, {**RUNS[name], "model": {"device": "cpu", **RUNS[name].get("model", {})}}),
                  tmp_path / "cpu")
    config = _config(tiny_model_dir, arithmetic_files, RUNS[name])
    config.model.device = DEVICE.type
    with simulated_device():
        on_device_run = _run(config, tmp_path / "device")
    assert len(on_device_run) == len(on_cpu) >= 2
    # In bfloat16 the device's operations run as torch decomposes them for a tensor subclass (attention as its math
    # formula), which rounds otherwise than the CPU's kernels: log-probs move in their third digit, and what depends on
    # them (the unlikeliness ranking, covariances) with them. Only the samples are compared there.
    bfloat16 = RUNS[name].get("model", {}).get("dtype") == "bfloat16"
    for expected, got in zip(on_cpu, on_device_run):
        for key, value in expected.items():
            # a correlation of per-token entropy changes of about 1e-6, which rounding (below) moves noticeably
            if key.startswith("time/") or key in ("memory/rss_gb", "memory/peak_rss_gb", "entropy/delta_token_corr"):
                continue
            if bfloat16 and not key.startswith(("response/", "tokens/", "step")):
                continue
            if isinstance(value, float):
                # torch decomposes some operations for a tensor subclass (attention as its formula), which rounds
                # otherwise than the CPU's kernels by about 1e-7, more in ratios of small means; AdamW is torch's fused
                # kernel on the CPU, its loop on another device; an entropy change measured after an update is a
                # difference of nearby numbers
                tolerance = 1e-3 if "delta" in key else 1e-4
                assert got.get(key) == pytest.approx(value, rel=tolerance, abs=1e-6, nan_ok=True), (expected["step"], key)
            else:
                assert got.get(key) == value, (expected["step"], key)
    assert sorted(path.name for path in (tmp_path / "device").iterdir()) == sorted(path.name for path in (tmp_path / "cpu").iterdir())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["grpo", "clip_cov", "dapo+clip_b+forking_tokens", "clip_v+kl_cov", "adaptive_entropy"])
def test_a_training_run_on_a_device_without_float64(method, tiny_model_dir, arithmetic_files, tmp_path, monkeypatch,
                                                   device_accepted_by_kernels):
    """An Apple GPU has no float64: the run's float64 statistics (selectors, covariances, diagnostics, advantages) are
    taken on the CPU, and the sampler draws its uniforms in float32 there (so the samples are not the CPU run's)."""
    monkeypatch.setattr(entrorl._checks, "DEVICES_WITHOUT_FLOAT64", frozenset({"mps", DEVICE.type}))
    config = _config(tiny_model_dir, arithmetic_files, {
        "method": method, "eval": {"every": 1}, "diagnostics": {"first_order": True}, "optim": {"mini_batches": 2}})
    config.model.device = DEVICE.type
    with simulated_device(float64=False):
        records = _run(config, tmp_path / "run")
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["entropy/mean"]) and math.isfinite(record["entropy/predicted_delta"])
        assert "entropy/first_order_delta" in record or any(key.startswith("entropy/first_order") for key in record)
    assert (tmp_path / "run" / "eval").is_dir() and (tmp_path / "run" / "forks").is_dir()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_run_on_the_device_resumed_from_its_checkpoint_equals_the_uninterrupted_run(dtype, tiny_model_dir,
                                                                                    arithmetic_files, tmp_path,
                                                                                    device_accepted_by_kernels):
    """Checkpoints of a run on the device (its optimizer state there, float16's loss scale, Clip-Cov's state) are read
    back on the device, and the resumed steps are the uninterrupted run's."""
    changes = {"method": "clip_cov", "model": {"dtype": dtype}, "optim": {"steps": 3, "mini_batches": 2},
               "checkpoint": {"every": 1, "keep": 3}}
    config = _config(tiny_model_dir, arithmetic_files, changes)
    config.model.device = DEVICE.type
    with simulated_device():
        whole = _run(config, tmp_path / "whole")
        from entrorl.trainer import Trainer

        first = _config(tiny_model_dir, arithmetic_files, {**changes, "optim": {"steps": 1, "mini_batches": 2}})
        first.model.device = DEVICE.type
        _run(first, tmp_path / "parts")
        resumed = Trainer(config, run_dir=tmp_path / "parts", resume=True)
        assert next(resumed.model.parameters()).device == DEVICE
        resumed.train()
    parts = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in parts] == [1, 2, 3]
    for expected, got in zip(whole, parts):  # the first part's own final evaluation aside
        assert {key: value for key, value in got.items() if not key.startswith(("time/", "eval/"))} == \
            {key: value for key, value in expected.items() if not key.startswith(("time/", "eval/"))}


def test_the_laboratorys_evaluation_of_a_model_on_a_device(float64, tmp_path, device_accepted_by_kernels):
    """entrorl.lab.runner.evaluate_policy with the model on the device: its S / D histograms are taken on the CPU."""
    from entrorl.lab.presets import LabPreset
    from entrorl.lab.runner import _prepare_data, evaluate_policy
    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.modeling import load_causal_lm, load_tokenizer

    model_dir = save_tiny_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=128)
    preset = LabPreset(name="tiny", train_task="sum_chain", forgetting_task="sum_chain", train_problems=4,
                       eval_problems=3, forgetting_problems=2, eval_n=2, forgetting_n=2, max_new_tokens=4, top_forks=3)
    data = _prepare_data(tmp_path, preset)
    tokenizer = load_tokenizer(model_dir)
    with simulated_device(float64=float64):
        result = evaluate_policy(load_causal_lm(model_dir).to(DEVICE), tokenizer, preset, data)
    assert set(result["distributions"]) == {"disc/correct", "disc/wrong", "disc_centered/correct", "disc_centered/wrong"}
    if float64:  # the same samples as on the CPU (without float64 the sampler draws its uniforms in float32)
        on_cpu = evaluate_policy(load_causal_lm(model_dir), tokenizer, preset, data)
        assert result["summary"] == on_cpu["summary"] and result["distributions"] == on_cpu["distributions"]
        assert [(fork["token"], fork["position"]) for fork in result["forks"]] == \
            [(fork["token"], fork["position"]) for fork in on_cpu["forks"]]
        assert [fork["entropy"] for fork in result["forks"]] == pytest.approx([fork["entropy"] for fork in on_cpu["forks"]],
                                                                              rel=1e-5)
