"""The vLLM rollout backend: request building and output conversion against a stand-in ``vllm`` module, the
trainer wiring (weights pushed after every update), and on a CUDA machine with vLLM, its log-probs against the
trainer's forward pass."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from entrorl.rollout import SamplingParams
from entrorl.rollout.vllm import VLLMSampler, check_vllm_available, outputs_to_rollouts, vllm_sampling_kwargs

PAD, EOS, EOS2 = 0, 1, 5


def _completion(tokens, log_probs, finish_reason="stop"):
    # vLLM's shape: one dict per position, token id -> Logprob(logprob, rank, decoded_token)
    entries = [{token: SimpleNamespace(logprob=value, rank=1, decoded_token=None)} for token, value in zip(tokens, log_probs)]
    return SimpleNamespace(token_ids=list(tokens), logprobs=entries, finish_reason=finish_reason, text="")


def _request_output(tokens, log_probs, prompt=(), finish_reason="stop"):
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=[_completion(tokens, log_probs, finish_reason)])


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeEngineModel:
    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.extend((name, tensor.clone()) for name, tensor in weights)


class _FakeLLM:
    """Records what it is asked; answers each request with the next scripted completion."""

    instances: list["_FakeLLM"] = []
    script: list[tuple[list[int], list[float]]] = []

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.requests, self.sampling, self.prefix_resets, self.progress_bars = [], [], 0, []
        self.engine_model = _FakeEngineModel()
        _FakeLLM.instances.append(self)

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.requests.append(requests)
        self.sampling.append(sampling_params)
        self.progress_bars.append(use_tqdm)
        outputs = []
        for index, request in enumerate(requests):
            tokens, log_probs = _FakeLLM.script[index % len(_FakeLLM.script)]
            tokens = tokens[: sampling_params[index].kwargs["max_tokens"]]
            outputs.append(_request_output(tokens, log_probs[: len(tokens)], request["prompt_token_ids"]))
        return outputs

    def apply_model(self, function):
        return [function(self.engine_model)]

    def reset_prefix_cache(self):
        self.prefix_resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = _FakeSamplingParams
    _FakeLLM.instances = []
    _FakeLLM.script = [([7, 8, EOS], [-0.5, -1.0, -0.25]), ([9, 9, 9, 9, 9, 9, 9, 9], [-2.0] * 8)]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return module


def test_request_kwargs_follow_the_sampling_params():
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20)
    assert vllm_sampling_kwargs(params, [EOS, EOS2], seed=3) == {
        "n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 12, "logprobs": 0,
        "stop_token_ids": [EOS, EOS2], "detokenize": False, "seed": 3,
    }
    # entrorl's "no top-k" (0) is vLLM's -1; greedy stays temperature 0; no seed given, none sent
    greedy = vllm_sampling_kwargs(SamplingParams(max_new_tokens=4, temperature=0.0), [EOS])
    assert greedy["top_k"] == -1 and greedy["temperature"] == 0.0 and "seed" not in greedy
    assert vllm_sampling_kwargs(params, [EOS], seed=0)["seed"] == 0  # seed 0 is a seed, not "none given"
    with pytest.raises(ValueError, match="eos"):
        vllm_sampling_kwargs(params, [])


@pytest.mark.parametrize(("top_k", "sent"), [(0, -1), (1, 1), (2, 2), (50, 50)])
def test_only_top_k_zero_becomes_vllms_no_filter(top_k, sent):
    """top_k = 1 is a filter (the most likely token only), not "no filter": only entrorl's 0 becomes vLLM's -1."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=top_k)
    assert vllm_sampling_kwargs(params, [EOS], seed=0)["top_k"] == sent


def test_outputs_become_padded_rollouts():
    prompts = [[3, 4], [6], [2, 3, 4]]
    outputs = [
        _request_output([7, 8, EOS], [-0.5, -1.0, -0.25]),            # ends with EOS
        _request_output([9, 9, 9, 9], [-2.0, -2.5, -3.0, -3.5], finish_reason="length"),  # hits max_new_tokens
        _request_output([EOS2], [-0.1]),                              # second EOS id, at once
    ]
    rollouts = outputs_to_rollouts(prompts, outputs, pad_token_id=PAD, eos_token_ids=[EOS, EOS2], max_new_tokens=4)
    assert rollouts.prompt_ids.tolist() == [[PAD, 3, 4], [PAD, PAD, 6], [2, 3, 4]]
    assert rollouts.prompt_mask.tolist() == [[False, True, True], [False, False, True], [True, True, True]]
    assert rollouts.response_ids.tolist() == [[7, 8, EOS, PAD], [9, 9, 9, 9], [EOS2, PAD, PAD, PAD]]
    assert rollouts.response_mask.sum(-1).tolist() == [3, 4, 1]
    assert rollouts.lengths.tolist() == [3, 4, 1]
    assert rollouts.truncated.tolist() == [False, True, False]
    expected = torch.tensor([[-0.5, -1.0, -0.25, 0.0], [-2.0, -2.5, -3.0, -3.5], [-0.1, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rollouts.sampler_log_probs, expected)
    assert rollouts.sampler_log_probs.dtype == torch.float32 and rollouts.response_mask.dtype == torch.bool
    # the dtypes HFSampler gives, so that rollouts of either backend concatenate and index alike
    assert rollouts.lengths.dtype == torch.long and rollouts.truncated.dtype == torch.bool
    assert rollouts.prompt_ids.dtype == torch.long and rollouts.response_ids.dtype == torch.long


def test_output_conversion_cuts_after_the_first_eos_and_rejects_missing_log_probs():
    rollouts = outputs_to_rollouts([[3]], [_request_output([7, EOS, 8, 9], [-1.0, -2.0, -3.0, -4.0])],
                                   pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=8)
    assert rollouts.response_ids.tolist() == [[7, EOS]] and rollouts.truncated.tolist() == [False]
    no_log_probs = _request_output([7], [-1.0])
    no_log_probs.outputs[0].logprobs = None
    with pytest.raises(ValueError, match="logprobs=0"):
        outputs_to_rollouts([[3]], [no_log_probs], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)
    wrong_token = _request_output([7], [-1.0])
    wrong_token.outputs[0].logprobs = [{8: SimpleNamespace(logprob=-1.0)}]
    with pytest.raises(ValueError, match="sampled token 7"):
        outputs_to_rollouts([[3]], [wrong_token], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)
    with pytest.raises(ValueError, match="2 outputs for 1 prompts"):
        outputs_to_rollouts([[3]], [wrong_token, wrong_token], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        outputs_to_rollouts([[3], [4]], [wrong_token], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)
    two_completions = _request_output([7], [-1.0])
    two_completions.outputs.append(_completion([8], [-2.0]))
    with pytest.raises(ValueError, match=r"one completion per prompt \(n=1\), got 2 for row 0"):
        outputs_to_rollouts([[3]], [two_completions], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)


def test_output_conversion_keeps_max_new_tokens_and_empty_responses():
    """Tokens beyond max_new_tokens are cut (the response is truncated); an empty completion is an all-padding row
    that is truncated (no EOS); log-probs given as plain numbers, 0.0 included, are read as they are."""
    outputs = [_request_output([9, 9, 9, 9, 9, 9], [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]), _request_output([], [])]
    rollouts = outputs_to_rollouts([[3], [4]], outputs, pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=3)
    assert rollouts.response_ids.tolist() == [[9, 9, 9], [PAD, PAD, PAD]]
    assert rollouts.response_mask.tolist() == [[True, True, True], [False, False, False]]
    assert rollouts.lengths.tolist() == [3, 0] and rollouts.truncated.tolist() == [True, True]
    torch.testing.assert_close(rollouts.sampler_log_probs, torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]]))

    only_empty = outputs_to_rollouts([[3]], [_request_output([], [])], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=3)
    assert only_empty.response_ids.tolist() == [[PAD]] and only_empty.response_mask.tolist() == [[False]]
    assert only_empty.truncated.tolist() == [True]

    plain = _request_output([7, EOS], [0.0, -0.5])
    plain.outputs[0].logprobs = [{7: 0.0}, {EOS: -0.5}]
    rollouts = outputs_to_rollouts([[3]], [plain], pad_token_id=PAD, eos_token_ids=[EOS], max_new_tokens=4)
    assert rollouts.sampler_log_probs.tolist() == [[0.0, -0.5]] and rollouts.truncated.tolist() == [False]


def test_prompts_and_responses_are_padded_with_the_given_pad_id():
    """A tokenizer's pad id is rarely 0: prompts (left) and responses (right) are padded with the id given, and the
    masks, not the pad id, say which positions are tokens."""
    pad = 11
    outputs = [_request_output([7, EOS], [-0.5, -0.25]), _request_output([9], [-1.0], finish_reason="length")]
    rollouts = outputs_to_rollouts([[3, 4, 0], [6]], outputs, pad_token_id=pad, eos_token_ids=[EOS], max_new_tokens=1)
    assert rollouts.prompt_ids.tolist() == [[3, 4, 0], [pad, pad, 6]]
    assert rollouts.prompt_mask.tolist() == [[True, True, True], [False, False, True]]
    assert rollouts.response_ids.tolist() == [[7], [9]] and rollouts.truncated.tolist() == [True, True]
    rollouts = outputs_to_rollouts([[3, 4, 0], [6]], outputs, pad_token_id=pad, eos_token_ids=[EOS], max_new_tokens=4)
    assert rollouts.response_ids.tolist() == [[7, EOS], [9, pad]] and rollouts.response_mask.tolist() == [[True, True], [True, False]]
    assert rollouts.truncated.tolist() == [False, True]


def test_sampler_builds_the_engine_and_requests(fake_vllm, tiny_model_dir):
    sampler = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD, dtype="float32", gpu_memory_utilization=0.3, seed=11)
    llm = _FakeLLM.instances[-1]
    assert llm.init_kwargs["model"] == str(tiny_model_dir)
    assert llm.init_kwargs["logprobs_mode"] == "processed_logprobs"
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"  # needed by sync_weights with worker processes
    assert (llm.init_kwargs["dtype"], llm.init_kwargs["gpu_memory_utilization"], llm.init_kwargs["seed"]) == ("float32", 0.3, 11)

    done = []
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.95, top_k=0)
    rollouts = sampler.generate([[3, 4], [3, 4], [6]], params, progress=done.append)
    assert llm.requests[-1] == [{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [6]}]
    sent = [request.kwargs for request in llm.sampling[-1]]
    assert all((kw["temperature"], kw["top_p"], kw["top_k"], kw["max_tokens"], kw["logprobs"]) == (0.8, 0.95, -1, 5, 0)
               for kw in sent)
    # one seed per request: the two copies of prompt [3, 4] (one group) must not draw the same response
    assert [kw["seed"] for kw in sent] == [11, 12, 13]
    assert rollouts.response_ids.tolist() == [[7, 8, EOS, PAD, PAD], [9, 9, 9, 9, 9], [7, 8, EOS, PAD, PAD]]
    assert rollouts.truncated.tolist() == [False, True, False]
    assert done == [3]
    assert llm.progress_bars == [False]  # entrorl reports progress itself; no vLLM bar in the middle of its own
    sampler.generate([[6]], params)
    assert [kw.kwargs["seed"] for kw in llm.sampling[-1]] == [14]  # seeds never repeat across calls
    resumed = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD, dtype="float32", seed=11)
    resumed.load_state_dict(sampler.state_dict())  # as a checkpoint carries it: a resumed run goes on with seed 15
    resumed.generate([[6]], params)
    assert [kw.kwargs["seed"] for kw in _FakeLLM.instances[-1].sampling[-1]] == [15]
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], params)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[3], []], params)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([], params)


def test_engine_gets_the_context_bound_and_further_engine_arguments(fake_vllm, tiny_model_dir):
    VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD, max_model_len=96, enforce_eager=True,
                enable_prefix_caching=False)
    kwargs = _FakeLLM.instances[-1].init_kwargs
    assert (kwargs["max_model_len"], kwargs["enforce_eager"], kwargs["enable_prefix_caching"]) == (96, True, False)
    VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    kwargs = _FakeLLM.instances[-1].init_kwargs
    assert kwargs["max_model_len"] is None and "enforce_eager" not in kwargs  # the model's own bound, vLLM's defaults
    assert (kwargs["dtype"], kwargs["gpu_memory_utilization"], kwargs["seed"]) == ("auto", 0.4, 0)


def test_a_serialization_setting_made_before_the_engine_is_built_is_kept(monkeypatch, fake_vllm, tiny_model_dir):
    """VLLM_ALLOW_INSECURE_SERIALIZATION is set to 1 only where it is not set already."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "0"


def test_sampled_rollouts_are_padded_with_the_samplers_pad_id(fake_vllm, tiny_model_dir):
    """generate pads prompts (left) and responses (right) with the pad id the sampler was given, not with 0."""
    pad = 11
    sampler = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=pad)
    long_prompt = [2 + index % 9 for index in range(40)]
    rollouts = sampler.generate([long_prompt, [6]], SamplingParams(max_new_tokens=5, temperature=1.0))
    assert _FakeLLM.instances[-1].requests[-1] == [{"prompt_token_ids": long_prompt}, {"prompt_token_ids": [6]}]
    assert rollouts.prompt_ids.tolist() == [long_prompt, [pad] * 39 + [6]]
    assert rollouts.prompt_mask.tolist() == [[True] * 40, [False] * 39 + [True]]
    assert rollouts.response_ids.tolist() == [[7, 8, EOS, pad, pad], [9, 9, 9, 9, 9]]
    assert rollouts.response_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(rollouts.sampler_log_probs, torch.tensor([[-0.5, -1.0, -0.25, 0.0, 0.0], [-2.0] * 5]))


def test_every_eos_id_of_the_sampler_ends_a_response(fake_vllm, tiny_model_dir):
    sampler = VLLMSampler(tiny_model_dir, eos_token_id=[EOS2, EOS], pad_token_id=PAD)
    rollouts = sampler.generate([[3], [4]], SamplingParams(max_new_tokens=8, temperature=1.0))
    assert [kw.kwargs["stop_token_ids"] for kw in _FakeLLM.instances[-1].sampling[-1]] == [[EOS2, EOS]] * 2
    assert rollouts.truncated.tolist() == [False, True]  # the first ends with EOS, the second id of the list


def test_sampler_arguments_are_checked_before_an_engine_is_built(fake_vllm, tmp_path, tiny_model_dir):
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\)"):
            VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD, gpu_memory_utilization=share)
    with pytest.raises(ValueError, match="at least one eos_token_id"):
        VLLMSampler(tiny_model_dir, eos_token_id=[], pad_token_id=PAD)
    with pytest.raises(ValueError, match="model_path"):
        VLLMSampler(eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMSampler(tmp_path, eos_token_id=EOS, pad_token_id=PAD)
    assert _FakeLLM.instances == []
    built = _FakeLLM()
    assert VLLMSampler(eos_token_id=EOS, pad_token_id=PAD, llm=built).llm is built  # a built engine needs no path


def test_sync_weights_pushes_every_parameter_and_resets_the_prefix_cache(fake_vllm, tiny_model_dir):
    sampler = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    llm = _FakeLLM.instances[-1]
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    sampler.sync_weights(model)
    loaded = dict(llm.engine_model.loaded)
    assert loaded.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(loaded[name], parameter) for name, parameter in model.named_parameters())
    assert llm.prefix_resets == 1

    # an old in-process engine without apply_model: the weights go straight into its model
    old_engine = _FakeEngineModel()
    sampler.llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=old_engine)))))
    sampler.sync_weights(model)
    assert [name for name, _ in old_engine.loaded] == [name for name, _ in model.named_parameters()]
    sampler.llm = SimpleNamespace()
    with pytest.raises(RuntimeError, match="apply_model"):
        sampler.sync_weights(model)


def test_sync_weights_loads_given_weights_in_pieces(monkeypatch, fake_vllm, tiny_model_dir):
    """Weights computed one at a time (merged LoRA weights) are loaded a piece at a time, each exactly once."""
    import entrorl.rollout.vllm as vllm_module

    sampler = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    llm = _FakeLLM.instances[-1]
    pieces = []
    llm.apply_model = lambda function: pieces.append(function(llm.engine_model))
    monkeypatch.setattr(vllm_module, "SYNC_CHUNK_BYTES", 3 * 4 * 10)  # three 10-element float32 tensors a piece
    handed_out = []

    def weights():
        for index in range(7):
            handed_out.append(index)
            yield f"layer.{index}.weight", torch.full((10,), float(index))

    sampler.sync_weights(torch.nn.Linear(1, 1), weights())
    assert len(pieces) == 3 and handed_out == list(range(7))  # 3 + 3 + 1
    assert [name for name, _ in llm.engine_model.loaded] == [f"layer.{index}.weight" for index in range(7)]
    assert all(torch.equal(tensor, torch.full((10,), float(index))) for index, (_, tensor) in enumerate(llm.engine_model.loaded))
    assert llm.prefix_resets == 1


class _AcceleratorTensor:
    """Stands for a tensor on the GPU: ``cpu()`` gives its host copy."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def numel(self):
        return self.value.numel()

    def element_size(self):
        return self.value.element_size()

    def cpu(self):
        return self.value.clone()

    def clone(self):
        return self


@pytest.mark.parametrize(("multiprocessing", "on_host"), [(None, True), ("1", True), ("0", False)])
def test_weights_go_to_engine_worker_processes_as_host_tensors(monkeypatch, fake_vllm, tiny_model_dir, multiprocessing, on_host):
    """vLLM's engine runs in other processes unless VLLM_ENABLE_V1_MULTIPROCESSING=0: the weights are then sent as
    host tensors (a pickled GPU tensor would be rebuilt on the GPU outside the engine's memory budget)."""
    if multiprocessing is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", multiprocessing)
    sampler = VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    llm = _FakeLLM.instances[-1]
    sampler.sync_weights(torch.nn.Linear(1, 1), [("layer.weight", _AcceleratorTensor(torch.arange(4.0)))])
    ((name, tensor),) = llm.engine_model.loaded
    assert name == "layer.weight" and isinstance(tensor, torch.Tensor) == on_host


def test_clear_errors_without_vllm_or_cuda(monkeypatch, fake_vllm, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        check_vllm_available()
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"entrorl\[vllm\]"):
        check_vllm_available()
    with pytest.raises(ImportError, match="vllm package"):
        VLLMSampler(tiny_model_dir, eos_token_id=EOS, pad_token_id=PAD)


def test_config_rejects_the_vllm_backend_where_it_cannot_run(monkeypatch, tmp_path, arithmetic_files, tiny_model_dir):
    from entrorl.trainer.config import ConfigError, load_config

    monkeypatch.setitem(sys.modules, "vllm", None)
    train, _ = arithmetic_files
    base = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(train)}, "reward": {"name": "exact_match"}}
    with pytest.raises(ConfigError, match=r"rollout.backend.*entrorl\[vllm\]"):
        load_config({**base, "rollout": {"backend": "vllm"}})
    assert load_config(base).rollout.backend == "hf"


def test_trainer_samples_with_vllm_and_pushes_the_updated_weights(fake_vllm, tmp_path, arithmetic_files, tiny_model_dir):
    from entrorl.modeling import load_tokenizer
    from entrorl.trainer import Trainer
    from entrorl.trainer.config import load_config

    train, _ = arithmetic_files
    # scripted completions "3<eos>" and "12<eos>" in the character tokenizer's ids
    tokenizer = load_tokenizer(tiny_model_dir)
    eos = tokenizer.eos_token_id
    _FakeLLM.script = [(tokenizer("3")["input_ids"] + [eos], [-1.0, -0.5]), (tokenizer("12")["input_ids"] + [eos], [-2.0, -1.5, -0.5])]
    config = load_config({
        # the stand-in makes torch report a GPU; the policy itself stays on the CPU here
        "seed": 0, "torch_threads": 1, "model": {"path": str(tiny_model_dir), "device": "cpu"}, "data": {"train": str(train)},
        "reward": {"name": "exact_match"}, "method": "grpo+tis",
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "backend": "vllm"},
        "optim": {"steps": 1, "lr": 1e-2}, "logging": {"progress": False}, "diagnostics": {"measure_entropy_change": False},
    })
    trainer = Trainer(config, run_dir=tmp_path / "run")
    assert isinstance(trainer.sampler, VLLMSampler)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = trainer.train_step()
    llm = _FakeLLM.instances[-1]
    assert len(llm.requests) == 1 and len(llm.requests[0]) == 4  # 2 prompts x group of 2
    assert math.isfinite(metrics["loss/total"])
    assert "correction/tis_weight_mean" in metrics  # the sampler's log-probs reached the objective
    loaded = dict(llm.engine_model.loaded)
    assert loaded.keys() == before.keys()
    # the engine got the weights after the update, not the ones it started from
    assert all(torch.equal(loaded[name], p.detach()) for name, p in trainer.model.named_parameters())
    assert any(not torch.equal(loaded[name], before[name]) for name in before)
    assert llm.prefix_resets == 1


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_the_engine_is_told_the_models_trust_remote_code(fake_vllm, tmp_path, arithmetic_files, tiny_model_dir,
                                                          trust_remote_code):
    """model.trust_remote_code loads the policy with the directory's own code; the engine the trainer builds loads the
    same directory and was not told (vLLM's own default, False, then refuses such a model)."""
    from entrorl.trainer import Trainer
    from entrorl.trainer.config import load_config

    train, _ = arithmetic_files
    config = load_config({
        "seed": 0, "torch_threads": 1, "data": {"train": str(train)}, "reward": {"name": "exact_match"},
        "model": {"path": str(tiny_model_dir), "device": "cpu", "trust_remote_code": trust_remote_code},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "backend": "vllm"},
        "optim": {"steps": 1}, "logging": {"progress": False}, "diagnostics": {"measure_entropy_change": False}})
    trainer = Trainer(config, run_dir=tmp_path / "run")
    try:
        assert _FakeLLM.instances[-1].init_kwargs["trust_remote_code"] is trust_remote_code
    finally:
        trainer.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lora_policy_gives_vllm_the_merged_weights(fake_vllm, tmp_path, arithmetic_files, tiny_model_dir, dtype):
    """With adapters the engine loads the base model and is given the merged weights W + (alpha / r) B A under the
    base model's names, rounded once to the engine's type: at the start and after every update."""
    pytest.importorskip("peft")
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.trainer import Trainer
    from entrorl.trainer.config import load_config

    train, _ = arithmetic_files
    tokenizer = load_tokenizer(tiny_model_dir)
    _FakeLLM.script = [(tokenizer("3")["input_ids"] + [tokenizer.eos_token_id], [-1.0, -0.5])]
    config = load_config({
        "seed": 0, "torch_threads": 1, "model": {"path": str(tiny_model_dir), "device": "cpu", "dtype": dtype,
                                                 "lora": {"rank": 4, "alpha": 8.0}},
        "data": {"train": str(train)}, "reward": {"name": "exact_match"}, "method": "grpo+tis",
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "backend": "vllm"},
        "optim": {"steps": 1, "lr": 1e-2}, "logging": {"progress": False}, "diagnostics": {"measure_entropy_change": False},
    })
    trainer = Trainer(config, run_dir=tmp_path / "run")
    llm = _FakeLLM.instances[-1]
    assert llm.init_kwargs["model"] == str(tiny_model_dir)  # the base model
    assert llm.engine_model.loaded == []  # new adapters change nothing (B = 0): the engine already holds the model
    base = dict(load_causal_lm(tiny_model_dir, dtype=dtype).named_parameters())
    with torch.no_grad():  # both halves away from zero, so that the merged weights differ from the base's
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    trainer.train()  # one step, checkpointed
    pushed = dict(llm.engine_model.loaded)
    assert pushed.keys() == base.keys()  # base names: no adapter, no base_layer
    assert {tensor.dtype for tensor in pushed.values()} == {getattr(torch, dtype)}
    layer = trainer.model.model.layers[0].self_attn.q_proj
    merged = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(getattr(torch, dtype))
    assert torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"], merged)
    assert not torch.equal(merged, base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(pushed["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not adapted
    assert llm.prefix_resets == 1
    # resumed, the new engine starts from the base model again and is given the checkpoint's merged weights at once
    config.optim.steps = 2
    resumed = Trainer(config, run_dir=tmp_path / "run", resume=True)
    again = _FakeLLM.instances[-1]
    assert again is not llm and again.init_kwargs["model"] == str(tiny_model_dir)
    assert all(torch.equal(tensor, pushed[name]) for name, tensor in again.engine_model.loaded)
    assert [name for name, _ in again.engine_model.loaded] == list(base)
    resumed.close()


_HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_VLLM_GPU, reason="needs vllm and a CUDA GPU")
def test_vllm_log_probs_match_the_trainer_forward_pass(tmp_path):
    """On a GPU: vLLM's processed log-probs of its own samples equal the trainer's (temperature-scaled) log-probs,
    before and after a weight sync, and after a sync of the merged weights of LoRA adapters."""
    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.modeling import load_causal_lm, load_tokenizer, response_token_stats

    model_dir = save_tiny_model(tmp_path / "model", hidden_size=256, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype="float32").cuda()
    sampler = VLLMSampler(model_dir, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    prompts = [tokenizer(text)["input_ids"] for text in ("1+2=", "7+5=", "9*9=", "3-8=")] * 4
    params = SamplingParams(max_new_tokens=24, temperature=0.8)

    def max_gap() -> float:
        rollouts = sampler.generate(prompts, params)
        stats = response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                     rollouts.response_mask, temperature=params.temperature, need=("logprob",))
        mask = rollouts.response_mask.cuda()
        return float((stats.logprob - rollouts.sampler_log_probs.cuda()).abs()[mask].max())

    assert max_gap() < 1e-3
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    sampler.sync_weights(model)
    assert max_gap() < 1e-3
    # LoRA adapters on the policy: the engine samples from the merged weights the trainer gives it
    from entrorl.trainer.adapters import LoraAdapter

    adapter = LoraAdapter(model, rank=8, alpha=16.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    sampler.sync_weights(model, adapter.merged_parameters())
    assert max_gap() < 1e-3
