"""The actor extension: entropy, S and D from the actor's logits, through verl's own loss function."""

from __future__ import annotations

import contextlib
from functools import partial
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl.workers.utils.losses", reason="verl is not installed; run 'make test-verl'")

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.torch_functional import logprobs_from_logits  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from entrorl.integrations.verl import TokenStatsEngineMixin, actor_token_stats, enable_actor_extension  # noqa: E402
from entrorl.integrations.verl.actor import entropy_gradient_needed  # noqa: E402
from entrorl.objective import PolicyBatch, build_objective  # noqa: E402
from entrorl.tokens import token_stats  # noqa: E402


def _reference_stats(logits: torch.Tensor, targets: torch.Tensor, temperature) -> dict:
    """H, S and D from their definitions (arXiv 2602.03392), in float64."""
    scaled = logits.double() / torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, *([1] * (logits.dim() - 1)))
    log_p = scaled.log_softmax(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    log_p_y = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    disc = log_p_y.exp() * (log_p_y + entropy)
    centered = disc - (p.square() * (log_p + entropy.unsqueeze(-1))).sum(-1)
    return {"entropy": entropy, "disc": disc, "disc_centered": centered}


@pytest.mark.parametrize("temperature", ["one", "scalar", "equal per row", "per row"])
def test_actor_token_stats_match_the_definitions(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 23, generator=generator) * 3).requires_grad_(True)
    targets = torch.randint(0, 23, (40,), generator=generator)
    temps = {"one": 1.0, "scalar": 0.7, "equal per row": torch.full((40,), 0.7),
             "per row": torch.rand(40, generator=generator) + 0.5}[temperature]
    stats = actor_token_stats(logits, targets, temperature=temps, chunk_size=7)
    reference = _reference_stats(logits, targets, temps if torch.is_tensor(temps) else torch.tensor([temps]))
    for name in ("entropy", "disc", "disc_centered"):
        assert stats[name].dtype == torch.float32
        torch.testing.assert_close(stats[name].double(), reference[name], atol=2e-6, rtol=1e-5)
    # the same numbers as entrorl.tokens on the same logits, and the entropy's gradient is the true one
    if not torch.is_tensor(temps) or bool((temps == temps[0]).all()):
        t = float(temps) if not torch.is_tensor(temps) else float(temps[0])
        direct = token_stats(logits, targets, temperature=t, need=("entropy", "disc", "disc_centered"))
        for name in ("entropy", "disc", "disc_centered"):
            assert torch.equal(stats[name], getattr(direct, name))
    weights = torch.randn(40, generator=generator)
    ours = torch.autograd.grad((stats["entropy"] * weights).sum(), logits)[0]
    theirs = torch.autograd.grad((reference["entropy"] * weights.double()).sum(), logits)[0]
    torch.testing.assert_close(ours.double(), theirs.double(), atol=1e-5, rtol=1e-4)


def test_a_row_s_statistics_do_not_depend_on_the_other_rows_temperatures_in_bfloat16():
    """Distinct per-row temperatures on bfloat16 logits: each row is scored in float32 at its own T (dividing the
    logits in bfloat16 moved the T = 0.6 rows' entropy by up to 0.09 nats once one row's T changed)."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 4000, generator=generator) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 4000, (8,), generator=generator)
    uniform = actor_token_stats(logits, targets, temperature=torch.full((8,), 0.6))
    mixed_temperatures = torch.full((8,), 0.6)
    mixed_temperatures[3] = 1.0
    mixed = actor_token_stats(logits, targets, temperature=mixed_temperatures)
    others = torch.arange(8) != 3
    for name in ("entropy", "disc", "disc_centered"):
        torch.testing.assert_close(mixed[name][others], uniform[name][others], atol=1e-6, rtol=1e-6)
    reference = _reference_stats(logits.double(), targets, mixed_temperatures.double())
    torch.testing.assert_close(mixed["entropy"].double(), reference["entropy"], atol=2e-5, rtol=1e-5)
    # verl divides by temperature_rmpad.unsqueeze(-1): [N, 1] is one per row too, as are [B], [B, 1, 1], [B, T, 1]
    torch.testing.assert_close(actor_token_stats(logits, targets, temperature=mixed_temperatures.unsqueeze(-1))["entropy"],
                               mixed["entropy"])
    batched, batch_targets = logits.view(2, 4, 4000), targets.view(2, 4)
    per_row = torch.tensor([0.6, 1.0])
    expected = torch.stack([actor_token_stats(batched[b], batch_targets[b], temperature=float(per_row[b]))["entropy"]
                            for b in range(2)])
    for shape in ((2,), (2, 1, 1)):
        torch.testing.assert_close(actor_token_stats(batched, batch_targets, temperature=per_row.view(shape))["entropy"],
                                   expected)
    per_position = per_row.view(2, 1).expand(2, 4).unsqueeze(-1)
    torch.testing.assert_close(actor_token_stats(batched, batch_targets, temperature=per_position)["entropy"], expected)


def test_actor_token_stats_rejects_unknown_statistics():
    with pytest.raises(ValueError, match="need must name some of"):
        actor_token_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), need=("logprob",))
    with pytest.raises(ValueError, match=r"need must name some of.*got \[\]"):
        actor_token_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), need=())


class PackedLMEngine:
    """Stands in for verl's FSDP language-model engine with remove-padding: one packed forward, then verl's loss.

    It follows verl 0.9's ``FSDPEngineWithLMHead`` contract: ``prepare_model_outputs(output, output_args,
    micro_batch, logits_processor_func)`` turns ``output.logits [1, nnz, V]`` into nested ``log_probs`` (logits
    divided by the temperature, targets rolled by one), and ``forward_step`` calls
    ``loss_function(model_output=..., data=micro_batch, dp_group=...)``.
    """

    use_ulysses_sp = False

    def __init__(self, logits: torch.Tensor, temperature: float):
        self.logits = logits
        self.temperature = temperature

    def _gather_and_unpad_packed(self, tensor, pad_size):
        return tensor[:-pad_size] if pad_size else tensor

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        logits = output.logits.squeeze(0) / output_args["temperature_rmpad"].unsqueeze(-1)
        log_probs = logprobs_from_logits(logits=logits, labels=output_args["input_ids_rmpad_rolled"])
        log_probs = self._gather_and_unpad_packed(log_probs, output_args["pad_size"])
        return {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, micro_batch["input_ids"].offsets())}

    def forward_step(self, micro_batch, loss_function, forward_only):
        nnz = self.logits.shape[0]
        output_args = {
            "input_ids_rmpad_rolled": torch.roll(micro_batch["input_ids"].values(), shifts=-1),
            "temperature_rmpad": torch.full((nnz,), self.temperature),
            "pad_size": 0,
        }
        model_output = self.prepare_model_outputs(SimpleNamespace(logits=self.logits.unsqueeze(0)), output_args, micro_batch, loss_function)
        return loss_function(model_output=model_output, data=micro_batch, dp_group=None)


class ExtendedEngine(TokenStatsEngineMixin, PackedLMEngine):
    pass


def _micro_batch(seed: int = 0, vocab: int = 17):
    """A verl micro-batch in its no-padding layout (nested prompts / responses / per-token fields)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, 5, (5,), generator=generator).tolist()
    response_lens = torch.randint(2, 9, (5,), generator=generator).tolist()
    response_lens[0] = 8
    nested = partial(torch.nested.as_nested_tensor, layout=torch.jagged)
    prompts = [torch.randint(0, vocab, (n,), generator=generator) for n in prompt_lens]
    responses = [torch.randint(0, vocab, (n,), generator=generator) for n in response_lens]
    advantages = torch.randn(5, generator=generator)
    per_token = {
        "old_log_probs": [-torch.rand(n, generator=generator) * 3 for n in response_lens],
        "ref_log_prob": [-torch.rand(n, generator=generator) * 3 for n in response_lens],
        "rollout_log_probs": [-torch.rand(n, generator=generator) * 3 for n in response_lens],
        "advantages": [advantages[i].expand(n).clone() for i, n in enumerate(response_lens)],
        "response_mask": [torch.ones(n, dtype=torch.int64) for n in response_lens],
    }
    data = tu.get_tensordict(
        {
            "input_ids": nested([torch.cat([p, r]) for p, r in zip(prompts, responses)]),
            "prompts": nested(prompts),
            "responses": nested(responses),
            **{key: nested(values) for key, values in per_token.items()},
        },
        non_tensor_dict={"dp_size": 1, "batch_num_tokens": sum(response_lens), "global_batch_size": 5},
    )
    logits = (torch.randn(sum(prompt_lens) + sum(response_lens), vocab, generator=generator) * 2).requires_grad_(True)
    return data, logits, prompts, responses, per_token


def _padded(rows, length):
    return torch.stack([torch.nn.functional.pad(row, (0, length - row.shape[0])) for row in rows])


def _direct_loss(method, params, data_parts, logits, temperature):
    """entrorl's objective on the padded response tensors, computed from the per-sequence logits."""
    prompts, responses, per_token = data_parts
    offset, stats = 0, {"logprob": [], "entropy": [], "disc": [], "disc_centered": []}
    for prompt, response in zip(prompts, responses):
        length = prompt.shape[0] + response.shape[0]
        sequence_logits = logits[offset + prompt.shape[0] - 1: offset + length - 1]
        result = token_stats(sequence_logits, response, temperature=temperature, need=tuple(stats))
        for name in stats:
            stats[name].append(getattr(result, name))
        offset += length
    width = max(r.shape[0] for r in responses)
    batch = PolicyBatch(
        log_prob=_padded(stats["logprob"], width), old_log_prob=_padded(per_token["old_log_probs"], width),
        advantages=_padded(per_token["advantages"], width), mask=_padded(per_token["response_mask"], width).bool(),
        entropy=_padded(stats["entropy"], width), disc=_padded(stats["disc"], width),
        disc_centered=_padded(stats["disc_centered"], width), ref_log_prob=_padded(per_token["ref_log_prob"], width),
        rollout_log_prob=_padded(per_token["rollout_log_probs"], width),
    )
    # verl's ppo_loss hands the loss the mini-batch's global counts (here one micro-batch: the same numbers)
    n_tokens = sum(r.shape[0] for r in responses)
    return build_objective(method, **params)(batch, batch_num_tokens=n_tokens, global_batch_size=len(responses), dp_size=1)


@pytest.mark.parametrize("method, entrorl", [
    ("clip_b", {"mu": 0.5}),
    ("clip_v", {"mu": 0.5, "max_frac": 0.3}),
    ("forking_tokens", {}),
    ("entropy_advantage", {}),
    ("entropy_bonus", {"entropy_coeff": 0.05}),
    ("kl_ref", {"kl_loss_coef": 0.3}),
    ("tis", {}),  # reads verl's rollout_log_probs
])
def test_engine_extension_feeds_verl_ppo_loss(method, entrorl, config_factory):
    """verl's real ppo_loss, called by an engine with the mixin, gives entrorl's loss and gradient."""
    data, logits, prompts, responses, per_token = _micro_batch(seed=len(method))
    config = config_factory(f"entrorl_{method}", entrorl=entrorl, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0)
    loss, metrics = ExtendedEngine(logits, temperature=0.8).forward_step(data, partial(ppo_loss, config=config), forward_only=False)
    grad = torch.autograd.grad(loss, logits)[0]

    params = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0, **entrorl}
    owned = {name for part in build_objective(method).parts for name in type(part).model_fields}
    expected = _direct_loss(method, {k: v for k, v in params.items() if k in owned}, (prompts, responses, per_token), logits, 0.8)
    expected_grad = torch.autograd.grad(expected.loss, logits)[0]
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert float(metrics["actor/pg_loss"].aggregate() if hasattr(metrics["actor/pg_loss"], "aggregate") else metrics["actor/pg_loss"]) != 0.0


def test_engine_without_the_extension_names_it(config_factory):
    data, logits, *_ = _micro_batch()
    config = config_factory("entrorl_clip_b")
    with pytest.raises(ValueError, match=r"needs per-token \['disc'\].*actor extension"):
        PackedLMEngine(logits, temperature=1.0).forward_step(data, partial(ppo_loss, config=config), forward_only=False)


def test_extension_computes_nothing_for_verl_losses(config_factory):
    data, logits, *_ = _micro_batch()
    engine = ExtendedEngine(logits, temperature=1.0)
    seen = {}
    original = PackedLMEngine.prepare_model_outputs

    def spy(self, *args):
        out = original(self, *args)
        seen["need"] = self._entrorl_need
        return out

    ExtendedEngine.prepare_model_outputs = lambda self, *args: TokenStatsEngineMixin.prepare_model_outputs(self, *args)
    PackedLMEngine.prepare_model_outputs = spy
    try:
        vanilla = engine.forward_step(data, partial(ppo_loss, config=config_factory("vanilla")), forward_only=False)[0]
        assert seen["need"] == ()
        engine.forward_step(data, partial(ppo_loss, config=config_factory("entrorl_clip_v")), forward_only=False)
        assert seen["need"] == ("disc_centered",)
    finally:
        PackedLMEngine.prepare_model_outputs = original
        del ExtendedEngine.prepare_model_outputs
    plain = PackedLMEngine(logits, temperature=1.0).forward_step(data, partial(ppo_loss, config=config_factory("vanilla")), forward_only=False)[0]
    torch.testing.assert_close(vanilla, plain)


def test_enable_actor_extension_wraps_verl_fsdp_engine():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    saved = {backend: dict(by_device) for backend, by_device in EngineRegistry._engines["language_model"].items()}
    try:
        replaced = enable_actor_extension()
        assert {"fsdp/cuda", "fsdp2/cuda"} <= set(replaced)
        engine_cls = EngineRegistry._engines["language_model"]["fsdp"]["cuda"]
        assert issubclass(engine_cls, TokenStatsEngineMixin) and issubclass(engine_cls, FSDPEngineWithLMHead)
        assert engine_cls.__mro__.index(TokenStatsEngineMixin) < engine_cls.__mro__.index(FSDPEngineWithLMHead)
        assert enable_actor_extension() == []  # idempotent
        assert EngineRegistry._engines["language_model"]["fsdp"]["cuda"] is engine_cls
    finally:
        for backend, by_device in saved.items():
            EngineRegistry._engines["language_model"][backend] = by_device


def _graphs_of_the_statistics(data, logits, config, *, forward_only: bool = False) -> dict[str, bool]:
    """``{model output key: requires_grad}`` of the statistics the extension computed for one micro-batch."""
    seen = {}
    original = TokenStatsEngineMixin._entrorl_token_stats

    def spy(self, *args):
        out = original(self, *args)
        seen.update({key: value.requires_grad for key, value in out.items()})
        return out

    TokenStatsEngineMixin._entrorl_token_stats = spy
    try:
        with torch.no_grad() if forward_only else contextlib.nullcontext():  # verl computes log-probs without a graph
            ExtendedEngine(logits, temperature=0.9).forward_step(data, partial(ppo_loss, config=config),
                                                                 forward_only=forward_only)
    finally:
        TokenStatsEngineMixin._entrorl_token_stats = original
    return seen


@pytest.mark.parametrize("method, gradient", [("clip_b", False), ("forking_tokens", False), ("entropy_advantage", False),
                                              ("entropy_bonus", True), ("adaptive_entropy", True)])
def test_statistics_carry_a_graph_only_for_entropy_regularisers(method, gradient, config_factory):
    """Selection statistics come from detached logits; an entropy bonus keeps its graph and switches verl's
    in-place log-prob backward off (calculate_entropy), which would otherwise overwrite the logits it reads."""
    data, logits, *_ = _micro_batch(seed=3)
    seen = _graphs_of_the_statistics(data, logits, config_factory(f"entrorl_{method}"))
    assert seen and all(flag == gradient for flag in seen.values()), seen
    assert tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False) is gradient

    # a forward-only pass has no backward: verl's settings are left untouched
    data, logits, *_ = _micro_batch(seed=4)
    assert _graphs_of_the_statistics(data, logits, config_factory(f"entrorl_{method}"), forward_only=True)
    assert tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False) is False


@pytest.mark.slow
@pytest.mark.parametrize("flag, extended", [("1", True), (None, False)])
def test_environment_variable_installs_the_extension_when_verl_is_imported(flag, extended):
    """ENTRORL_VERL_ACTOR_EXTENSION=1 in a fresh process: `import verl` (through the plugin entry point) puts the
    mixin on verl's FSDP engines; without it they stay verl's own."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "ENTRORL_VERL_ACTOR_EXTENSION"}
    if flag is not None:
        env["ENTRORL_VERL_ACTOR_EXTENSION"] = flag
    code = (
        "import verl\n"
        "from verl.workers.engine.base import EngineRegistry\n"
        "from entrorl.integrations.verl import TokenStatsEngineMixin\n"
        "engine = EngineRegistry._engines['language_model']['fsdp']['cuda']\n"
        "print(issubclass(engine, TokenStatsEngineMixin))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(extended)


def _sequences(count: int = 8, vocab: int = 17, seed: int = 0) -> list[dict]:
    """Prompt / response pairs with their logits rows (prompt + response), advantages and off-policy old log-probs."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(count):
        prompt_length = int(torch.randint(1, 5, (1,), generator=generator))
        response_length = int(torch.randint(2, 9, (1,), generator=generator))
        logits = torch.randn(prompt_length + response_length, vocab, generator=generator) * 2
        response = torch.randint(0, vocab, (response_length,), generator=generator)
        sampled = token_stats(logits[prompt_length - 1: -1], response, temperature=0.8, need=("logprob",)).logprob
        sequences.append({
            "prompt": torch.randint(0, vocab, (prompt_length,), generator=generator),
            "response": response,
            "logits": logits,
            "advantage": float(torch.randn(1, generator=generator)),
            "old_log_probs": sampled + torch.randn(response_length, generator=generator) * 0.3,
            "ref_log_prob": sampled + torch.randn(response_length, generator=generator) * 0.2,
        })
    return sequences


def _train_step_metrics(sequences, logits, config, *, ranks: int, micro: int, engine=None, empty=()):
    """One mini-batch of ``sequences`` over ``ranks`` data-parallel ranks, each in micro-batches of ``micro``
    sequences, through verl's ppo_loss; the metrics combined as verl does (per rank over micro-batches, then
    ``Metric.aggregate_dp`` over ranks). ``empty`` holds (rank, micro-batch) positions whose tokens are all masked.
    ``logits`` is one leaf with every sequence's rows in order."""
    from verl.utils.metric import Metric
    from verl.utils.py_functional import append_to_dict

    engine = engine or ExtendedEngine
    nested = partial(torch.nested.as_nested_tensor, layout=torch.jagged)
    rows = [0]
    for sequence in sequences:
        rows.append(rows[-1] + sequence["logits"].shape[0])
    per_rank = len(sequences) // ranks
    masked = {(rank, index // micro) for rank, index in empty}
    valid = lambda rank, start: ((rank, start // micro) not in masked)  # noqa: E731
    batch_num_tokens = sum(s["response"].shape[0] for r in range(ranks) for i, s in
                           enumerate(sequences[r * per_rank:(r + 1) * per_rank]) if valid(r, i))
    rank_metrics, total = [], 0.0
    for rank in range(ranks):
        collected = {}
        for start in range(0, per_rank, micro):
            first = rank * per_rank + start
            part = sequences[first: first + micro]
            data = tu.get_tensordict(
                {
                    "input_ids": nested([torch.cat([s["prompt"], s["response"]]) for s in part]),
                    "prompts": nested([s["prompt"] for s in part]),
                    "responses": nested([s["response"] for s in part]),
                    "old_log_probs": nested([s["old_log_probs"] for s in part]),
                    "ref_log_prob": nested([s["ref_log_prob"] for s in part]),
                    "advantages": nested([torch.full_like(s["old_log_probs"], s["advantage"]) for s in part]),
                    "response_mask": nested([torch.full((s["response"].shape[0],), int(valid(rank, start))) for s in part]),
                },
                non_tensor_dict={"dp_size": ranks, "batch_num_tokens": batch_num_tokens, "global_batch_size": len(sequences)},
            )
            loss, metrics = engine(logits[rows[first]: rows[first + len(part)]], temperature=0.8).forward_step(
                data, partial(ppo_loss, config=config), forward_only=False)
            total += float(loss)
            append_to_dict(collected, {k: v for k, v in metrics.items() if isinstance(v, Metric)})
        rank_metrics.append(collected)
    names = set().union(*rank_metrics)
    return {name: float(Metric.aggregate_dp([r.get(name, Metric("mean")) for r in rank_metrics])) for name in names}, total


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("method, entrorl", [("entropy_bonus", {"entropy_coeff": 0.05}), ("kl_ref", {"kl_loss_coef": 0.3}),
                                             ("dapo", {})])
def test_step_metrics_do_not_depend_on_the_micro_batches(method, entrorl, loss_agg_mode, config_factory):
    """Aggregated as verl aggregates them, the loss terms, the valid-token count and the largest ratio read the whole
    mini-batch's value however it is split over ranks and micro-batches (verl's own pg_loss does too)."""
    sequences = _sequences(seed=len(method))
    logits = torch.cat([s["logits"] for s in sequences]).requires_grad_(True)
    extra = {"use_kl_loss": True, "kl_loss_coef": 0.0} if method == "kl_ref" else {}
    config = config_factory(f"entrorl_{method}", entrorl=entrorl, clip_ratio_low=0.2, clip_ratio_high=0.28,
                            clip_ratio_c=3.0, loss_agg_mode=loss_agg_mode, **extra)
    whole, _ = _train_step_metrics(sequences, logits, config, ranks=1, micro=8)
    split, _ = _train_step_metrics(sequences, logits, config, ranks=2, micro=2)
    names = ["actor/pg_loss", "actor/loss/total", "actor/loss/policy", "actor/tokens/valid", "actor/ratio/max",
             {"entropy_bonus": "actor/reg/entropy_bonus", "kl_ref": "actor/kl/ref"}.get(method, "actor/loss/total")]
    for name in names:
        assert split[name] == pytest.approx(whole[name], rel=1e-5), name
    assert whole["actor/loss/total"] == pytest.approx(whole["actor/pg_loss"], rel=1e-6)
    assert whole["actor/tokens/valid"] == sum(s["response"].shape[0] for s in sequences)


def test_without_the_extension_partial_sums_are_left_out(config_factory):
    """verl's ppo_loss averages a policy loss's metrics over micro-batches: without the extension to retype them,
    the loss terms and the maximum would read a fraction of the truth, so they are not reported."""
    sequences = _sequences(seed=11)
    logits = torch.cat([s["logits"] for s in sequences]).requires_grad_(True)
    config = config_factory("entrorl_dapo", clip_ratio_c=3.0)
    metrics, _ = _train_step_metrics(sequences, logits, config, ranks=2, micro=2, engine=PackedLMEngine)
    assert not {"actor/loss/total", "actor/loss/policy", "actor/ratio/max"} & set(metrics)
    assert metrics["actor/tokens/valid"] == sum(s["response"].shape[0] for s in sequences)
    assert {"actor/pg_loss", "actor/pg_clipfrac", "actor/ratio/mean"} <= set(metrics)


def test_a_fully_masked_micro_batch_keeps_verl_aggregation_working(config_factory):
    """verl's Metric.aggregate_dp needs as many values of each metric from every rank: a rank whose micro-batch has
    no valid token still reports every metric (adaptive_entropy's controller metrics included)."""
    sequences = _sequences(seed=12)
    logits = torch.cat([s["logits"] for s in sequences]).requires_grad_(True)
    config = config_factory("entrorl_adaptive_entropy", entrorl={"target_entropy": 10.0, "entropy_coeff": 0.01},
                            clip_ratio_c=3.0)
    metrics, _ = _train_step_metrics(sequences, logits, config, ranks=2, micro=2, empty=[(1, 2)])
    assert {"actor/reg/adaptive_entropy_coeff", "actor/reg/adaptive_entropy_below_target"} <= set(metrics)
    assert all(value == value for value in metrics.values())


def test_a_fully_masked_micro_batch_leaves_the_largest_ratio_to_the_others(config_factory):
    """actor/ratio/max is a maximum over micro-batches and ranks: one without a valid token reads 0, below any ratio,
    so that a mini-batch whose ratios are all below 1 does not log 1."""
    sequences = _sequences(seed=13)
    for sequence in sequences:
        sequence["old_log_probs"] = sequence["old_log_probs"] + 5.0  # every ratio about exp(-5)
    logits = torch.cat([s["logits"] for s in sequences]).requires_grad_(True)
    config = config_factory("entrorl_dapo", clip_ratio_c=3.0)
    metrics, _ = _train_step_metrics(sequences, logits, config, ranks=2, micro=2, empty=[(1, 2)])
    assert 0 < metrics["actor/ratio/max"] < 0.1


@pytest.mark.parametrize("value, requested", [("1", True), ("true", True), ("TRUE", True), (" Yes ", True), ("0", False),
                                              ("on", False), ("false", False), ("", False), (None, False)])
def test_the_environment_variable_asks_for_the_extension(value, requested, monkeypatch):
    from entrorl.integrations.verl.actor import ACTOR_EXTENSION_ENV, actor_extension_requested

    if value is None:
        monkeypatch.delenv(ACTOR_EXTENSION_ENV, raising=False)
    else:
        monkeypatch.setenv(ACTOR_EXTENSION_ENV, value)
    assert actor_extension_requested() is requested


@pytest.fixture
def method_with_an_own_entropy_regulariser():
    """A method whose own regulariser, registered by the user as docs/verl.md says, penalises an entropy below a
    floor: ``coef * agg(relu(floor - H))``, whose gradient flows through H. Taken out of the registries afterwards."""
    from verl.trainer.ppo import core_algos

    from entrorl.integrations.verl import register_policy_losses
    from entrorl.objective import MethodSpec, register_method
    from entrorl.objective import methods as method_registry
    from entrorl.objective import parts as part_registry
    from entrorl.objective.parts import Regularizer, RegularizerTerm, register_part

    @register_part("test_entropy_floor", description="test-only: penalise an entropy below a floor")
    class EntropyFloor(Regularizer):
        requires = ("entropy",)
        coef: float = 0.1
        floor: float = 5.0

        def __call__(self, batch, advantages, aggregate, metrics):
            return RegularizerTerm(scalar=self.coef * aggregate(torch.relu(self.floor - batch.entropy), batch.mask))

    name = "test_grpo_entropy_floor"
    register_method(MethodSpec(name=name, description="test-only: grpo with an entropy floor", paper="none",
                               regularizers=(("test_entropy_floor", {}),)))
    register_policy_losses()
    yield name
    method_registry._METHODS.pop(name)
    method_registry._REGISTERED_BY.pop(name, None)
    part_registry._REGISTRY["regularizer"].pop("test_entropy_floor")
    core_algos.POLICY_LOSS_REGISTRY.pop(f"entrorl_{name}")


def test_a_regulariser_of_one_s_own_that_reads_the_entropy_gets_its_gradient(method_with_an_own_entropy_regulariser,
                                                                             config_factory):
    """Not only the built-in entropy terms: any regulariser reading the entropy trains through it, as in entrorl's
    own trainer (the extension detached it for every regulariser but those two, and the term's gradient was lost)."""
    data, logits, *_ = _micro_batch(seed=3)
    config = config_factory(f"entrorl_{method_with_an_own_entropy_regulariser}")
    assert entropy_gradient_needed(config)
    assert _graphs_of_the_statistics(data, logits, config) == {"entrorl_entropy": True}
    assert tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False) is True


def test_the_padded_layout_computes_the_statistics_on_views_of_the_logits(monkeypatch):
    """With ``use_remove_padding=False`` each row's statistics come from a view of verl's [B, T, V] logits: no
    second [N, V] tensor of their valid part (at 24k tokens and a 152k vocabulary in bfloat16, 7 GB more)."""
    import entrorl.integrations.verl.actor as actor

    data, logits, *_ = _micro_batch(seed=3)
    lengths = data["input_ids"].offsets().diff()
    rows = torch.split(logits.detach(), lengths.tolist())
    padded_logits = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, int(lengths.max()) - row.shape[0]))
                                 for row in rows])
    seen = []
    real = actor.actor_token_stats

    def spy(logits, targets, **kwargs):
        seen.append(logits)
        return real(logits, targets, **kwargs)

    monkeypatch.setattr(actor, "actor_token_stats", spy)
    engine = ExtendedEngine(logits, temperature=1.0)
    engine._entrorl_need, engine._entrorl_entropy_gradient = ("entropy",), False
    tu.assign_non_tensor(data, use_remove_padding=False)
    targets = torch.roll(data["input_ids"].values(), shifts=-1)
    stats = engine._entrorl_token_stats(SimpleNamespace(logits=padded_logits),
                                        {"input_ids_rmpad_rolled": targets, "temperature": torch.ones(len(lengths))},
                                        data)
    assert len(seen) == len(lengths)
    assert all(view.untyped_storage().data_ptr() == padded_logits.untyped_storage().data_ptr() for view in seen)
    torch.testing.assert_close(stats["entrorl_entropy"].values(),
                               _reference_stats(logits.detach(), targets, 1.0)["entropy"].float())


def test_padded_layout_gives_each_sequence_its_own_temperature():
    """With ``use_remove_padding=False`` verl hands the logits as ``[B, T, V]`` and one temperature per sequence: the
    statistics are those of the packed layout with each sequence's temperature on each of its tokens."""
    data, logits, prompts, responses, _ = _micro_batch(seed=3)
    lengths = data["input_ids"].offsets().diff()
    temperatures = torch.tensor([0.5, 0.8, 1.0, 1.3, 2.0])[: len(lengths)]
    targets = torch.roll(data["input_ids"].values(), shifts=-1)
    need = ("entropy", "disc")
    engine = ExtendedEngine(logits, temperature=1.0)
    engine._entrorl_need, engine._entrorl_entropy_gradient = need, False
    packed = engine._entrorl_token_stats(
        SimpleNamespace(logits=logits.unsqueeze(0)),
        {"input_ids_rmpad_rolled": targets, "temperature_rmpad": torch.repeat_interleave(temperatures, lengths),
         "pad_size": 0},
        data,
    )
    rows = torch.split(logits.detach(), lengths.tolist())
    padded_logits = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, int(lengths.max()) - row.shape[0]), value=9.0)
                                 for row in rows])
    tu.assign_non_tensor(data, use_remove_padding=False)
    padded = engine._entrorl_token_stats(
        SimpleNamespace(logits=padded_logits), {"input_ids_rmpad_rolled": targets, "temperature": temperatures},
        data,
    )
    for name in need:
        key = f"entrorl_{name}"
        torch.testing.assert_close(padded[key].values(), packed[key].values())
        assert torch.equal(padded[key].offsets(), packed[key].offsets())
    reference = _reference_stats(logits.detach(), targets, torch.repeat_interleave(temperatures, lengths))
    for name in need:
        torch.testing.assert_close(packed[f"entrorl_{name}"].values(), reference[name].float())


def _packed_stats(engine, data, logits, temperature, pad_size=0, logits_type=None):
    """The engine's statistics of a packed micro-batch whose logits, targets and temperatures carry ``pad_size``
    trailing rows of padding (verl's bucket or sequence-parallel padding)."""
    targets = torch.roll(data["input_ids"].values(), shifts=-1)
    rows = logits.detach()
    if pad_size:
        rows = torch.cat([rows, torch.full((pad_size, rows.shape[1]), 5.0)])
        targets = torch.cat([targets, torch.zeros(pad_size, dtype=targets.dtype)])
    temperatures = torch.cat([torch.full((logits.shape[0],), temperature), torch.ones(pad_size)])
    packed = rows.unsqueeze(0)
    output = SimpleNamespace(logits=packed if logits_type is None else logits_type(packed))
    return engine._entrorl_token_stats(
        output, {"input_ids_rmpad_rolled": targets, "temperature_rmpad": temperatures, "pad_size": pad_size}, data)


class _VocabSharded:
    """Stands in for a vocabulary-sharded DTensor: only ``full_tensor()`` gives the logits."""

    def __init__(self, tensor):
        self._tensor = tensor

    def full_tensor(self):
        return self._tensor


def test_packed_padding_and_sharded_logits_give_the_statistics_of_the_tokens():
    data, logits, *_ = _micro_batch(seed=5)
    engine = ExtendedEngine(logits, temperature=0.8)
    engine._entrorl_need, engine._entrorl_entropy_gradient = ("entropy", "disc_centered"), False
    plain = _packed_stats(engine, data, logits, 0.8)
    targets = torch.roll(data["input_ids"].values(), shifts=-1)
    reference = _reference_stats(logits.detach(), targets, torch.tensor([0.8]))
    for name in engine._entrorl_need:
        torch.testing.assert_close(plain[f"entrorl_{name}"].values(), reference[name].float())
    for other in (_packed_stats(engine, data, logits, 0.8, pad_size=3),
                  _packed_stats(engine, data, logits, 0.8, logits_type=_VocabSharded)):
        for name in engine._entrorl_need:
            key = f"entrorl_{name}"
            torch.testing.assert_close(other[key].values(), plain[key].values())
            assert torch.equal(other[key].offsets(), plain[key].offsets())


def test_a_call_that_is_not_a_loss_call_goes_straight_through():
    """verl also calls the loss function as a logits processor (``student_logits=..., data=...``)."""
    from entrorl.integrations.verl import with_token_fields

    seen = []

    def processor(**kwargs):
        seen.append(sorted(kwargs))
        return {"out": 1}

    data, logits, *_ = _micro_batch(seed=1)
    assert with_token_fields(processor)(student_logits=logits, data=data) == {"out": 1}
    assert seen == [["data", "student_logits"]]


def test_the_actor_config_is_found_through_a_wrapped_loss_function_or_a_partial_of_one(config_factory):
    import functools

    data, logits, *_ = _micro_batch(seed=2)
    config = config_factory("entrorl_clip_b", entrorl={"mu": 0.5}, clip_ratio_c=3.0)
    bound = partial(ppo_loss, config=config)

    @functools.wraps(bound)
    def decorated(*args, **kwargs):
        return bound(*args, **kwargs)

    direct, _ = ExtendedEngine(logits, temperature=0.8).forward_step(data, bound, forward_only=False)
    through, _ = ExtendedEngine(logits, temperature=0.8).forward_step(data, decorated, forward_only=False)
    torch.testing.assert_close(through, direct)
    # and through a partial of the wrapped function
    through, _ = ExtendedEngine(logits, temperature=0.8).forward_step(data, partial(decorated, dp_group=None),
                                                                       forward_only=False)
    torch.testing.assert_close(through, direct)


def test_distinct_temperatures_score_each_row_in_float32_as_one_temperature_does():
    """With one temperature per row, each row's statistics are those of its own temperature applied in float32, as a
    single temperature is (not verl's division of the bfloat16 logits by ``temperature.to(logits.dtype)``, which
    rounds the scaled logits: a row's entropy then moved with the other rows' temperatures)."""
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(30, 19, generator=generator) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 19, (30,), generator=generator)
    temperatures = torch.rand(30, generator=generator) + 0.5
    stats = actor_token_stats(logits, targets, temperature=temperatures)
    for row in range(30):
        alone = token_stats(logits[row : row + 1], targets[row : row + 1], temperature=float(temperatures[row]),
                            need=("entropy", "disc", "disc_centered"))
        for name in ("entropy", "disc", "disc_centered"):
            assert stats[name].dtype == torch.float32
            torch.testing.assert_close(stats[name][row : row + 1], getattr(alone, name), atol=1e-6, rtol=1e-6)


def test_a_recorded_aggregation_of_a_metric_the_loss_did_not_return_is_skipped():
    from verl.utils.metric import AggregationType, Metric

    from entrorl.integrations.verl import record_metric_aggregations, with_token_fields

    def loss_function(model_output, data, dp_group=None):
        record_metric_aggregations({"actor/loss/total": "sum", "actor/ratio/max": "max"})
        return torch.tensor(1.0), {"actor/ratio/max": 2.5, "actor/select/dropped_frac": 0.1}

    data, *_ = _micro_batch(seed=1)
    loss, metrics = with_token_fields(loss_function)(model_output={}, data=data, dp_group=None)
    assert float(loss) == 1.0 and set(metrics) == {"actor/ratio/max", "actor/select/dropped_frac"}
    assert isinstance(metrics["actor/ratio/max"], Metric) and metrics["actor/ratio/max"].aggregation == AggregationType.MAX
    assert metrics["actor/ratio/max"].aggregate() == 2.5 and metrics["actor/select/dropped_frac"] == 0.1


def test_enable_actor_extension_leaves_engines_other_than_verl_fsdp_alone():
    from verl.workers.engine.base import EngineRegistry

    class OtherEngine:  # another backend's engine (Megatron's, say): no FSDPEngineWithLMHead
        pass

    engines = EngineRegistry._engines["language_model"]
    saved = {backend: dict(by_device) for backend, by_device in engines.items()}
    engines["other_backend"] = {"cuda": OtherEngine}
    try:
        replaced = enable_actor_extension()
        assert not [key for key in replaced if key.startswith("other_backend/")]
        assert engines["other_backend"]["cuda"] is OtherEngine
    finally:
        engines.clear()
        engines.update(saved)


def test_padded_logits_take_one_temperature_per_sequence():
    """``[B, T, V]`` logits with a ``[B]`` tensor of distinct temperatures: each sequence's rows are scaled by its own."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 5, 13, generator=generator) * 2
    targets = torch.randint(0, 13, (3, 5), generator=generator)
    temperatures = torch.tensor([0.5, 1.0, 1.7])
    stats = actor_token_stats(logits, targets, temperature=temperatures)
    reference = _reference_stats(logits, targets, temperatures)
    for name in ("entropy", "disc", "disc_centered"):
        assert stats[name].shape == (3, 5)
        torch.testing.assert_close(stats[name].double(), reference[name], atol=2e-6, rtol=1e-5)


def test_an_empty_temperature_tensor_reads_as_temperature_one():
    """No rows, no temperatures: the statistics of nothing, empty, not an error about a temperature of 0."""
    stats = actor_token_stats(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), temperature=torch.zeros(0))
    assert set(stats) == {"entropy", "disc", "disc_centered"}
    assert all(value.shape == (0,) for value in stats.values())


def test_a_forward_pass_without_logits_names_the_fused_kernels_setting():
    """verl's fused kernels return log-probs without logits: the statistics cannot be computed, and the error says
    which setting to change."""
    data, logits, *_ = _micro_batch(seed=6)
    engine = ExtendedEngine(logits, temperature=1.0)
    engine._entrorl_need, engine._entrorl_entropy_gradient = ("disc",), False
    targets = torch.roll(data["input_ids"].values(), shifts=-1)
    with pytest.raises(ValueError, match=r"needs \['disc'\] from the logits.*use_fused_kernels=False"):
        engine._entrorl_token_stats(SimpleNamespace(logits=None), {
            "input_ids_rmpad_rolled": targets, "temperature_rmpad": torch.ones(targets.shape[0]), "pad_size": 0}, data)
