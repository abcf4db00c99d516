"""Sampling with vLLM on a GPU, producing the same :class:`~entrorl.rollout.sampler.Rollouts` as ``HFSampler``.

vLLM (an optional dependency: ``pip install 'entrorl[vllm]'``) runs beside the training model on the same GPU
(``gpu_memory_utilization`` bounds its share). Each sampled token's log-prob is returned with
``logprobs=0`` and the engine's ``logprobs_mode="processed_logprobs"``, i.e. under the distribution after
temperature, top-k and top-p — the same quantity ``HFSampler`` keeps — so TIS / IcePop can correct the
train–rollout mismatch (vLLM's kernels and the trainer's forward pass do not give bit-identical log-probs).

After every optimizer update the trainer calls :meth:`VLLMSampler.sync_weights` with the training model: its
parameters are pushed into the engine's model through vLLM's ``load_weights`` (Hugging Face names, which vLLM
maps onto its fused layers) and the prefix cache is reset, so the next rollouts come from the updated policy. With
LoRA adapters the engine holds the base model, and the merged weights ``W + (alpha / r) B A`` are pushed instead,
computed a layer at a time and loaded in pieces.

Request building (:func:`vllm_sampling_kwargs`) and output conversion (:func:`outputs_to_rollouts`) are plain
functions of Python data so that they can be checked without a GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from entrorl.modeling import left_pad
from entrorl.rollout.sampler import Rollouts, SamplingParams

__all__ = ["VLLMSampler", "vllm_sampling_kwargs", "outputs_to_rollouts", "import_vllm", "check_vllm_available"]

# about the bytes of weights that one load into the engine carries (a piece ends with the tensor that reaches it)
SYNC_CHUNK_BYTES = 1 << 30

_INSTALL_HINT = "pip install 'entrorl[vllm]' in an environment with a CUDA build of torch, or use rollout.backend: hf"


def import_vllm():
    """The ``vllm`` module, or an ImportError saying how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(
            f"the vLLM rollout backend needs the vllm package, which is not installed ({error}); {_INSTALL_HINT}"
        ) from None


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("the vLLM rollout backend needs a CUDA GPU and torch sees none; use rollout.backend: hf on this machine")


def check_vllm_available() -> None:
    """Raise ImportError / RuntimeError unless vllm can be imported and a CUDA GPU is visible (before any model loads)."""
    import_vllm()
    _require_cuda()


def vllm_sampling_kwargs(params: SamplingParams, eos_token_ids: Sequence[int], *, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one response per prompt with entrorl's ``params``.

    ``top_k = 0`` (entrorl: no filter) becomes vLLM's ``-1``; ``temperature = 0`` is greedy in both. ``logprobs=0``
    asks for the sampled token's log-prob only. The EOS ids are passed as ``stop_token_ids`` so every id in the
    list ends a response, as in ``HFSampler``.
    """
    if not eos_token_ids:
        raise ValueError("vllm_sampling_kwargs needs at least one eos token id")
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,
        "max_tokens": int(params.max_new_tokens),
        "logprobs": 0,
        "stop_token_ids": [int(token) for token in eos_token_ids],
        "detokenize": False,
    }
    if seed is not None:
        kwargs["seed"] = int(seed)
    return kwargs


def _sampled_log_prob(position_log_probs: dict[int, Any], token: int, row: int, position: int) -> float:
    entry = position_log_probs.get(token) if position_log_probs is not None else None
    if entry is None:
        raise ValueError(f"vLLM returned no log-prob for the sampled token {token} (row {row}, position {position})")
    value = entry.logprob if hasattr(entry, "logprob") else float(entry)
    return float(value)


def outputs_to_rollouts(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Any],
    *,
    pad_token_id: int,
    eos_token_ids: Iterable[int],
    max_new_tokens: int,
) -> Rollouts:
    """Convert vLLM ``RequestOutput`` objects (one per prompt, ``n = 1``) to :class:`Rollouts`.

    Prompts are left-padded, responses right-padded with ``pad_token_id``; a response is valid up to and including
    its first EOS (tokens after it, which vLLM does not produce, would be cut); ``truncated`` means no EOS within
    ``max_new_tokens``; ``sampler_log_probs`` are vLLM's log-probs of the sampled tokens (0 on padding).
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    eos = {int(token) for token in eos_token_ids}
    rows = len(prompts)
    responses: list[list[int]] = []
    log_probs: list[list[float]] = []
    ended: list[bool] = []
    for row, output in enumerate(outputs):
        if len(output.outputs) != 1:
            raise ValueError(f"expected one completion per prompt (n=1), got {len(output.outputs)} for row {row}")
        completion = output.outputs[0]
        tokens = [int(token) for token in completion.token_ids][:max_new_tokens]
        if completion.logprobs is None:
            raise ValueError("vLLM returned no log-probs: the request must set logprobs=0 (see vllm_sampling_kwargs)")
        cut = next((index + 1 for index, token in enumerate(tokens) if token in eos), len(tokens))
        tokens = tokens[:cut]
        responses.append(tokens)
        log_probs.append([_sampled_log_prob(completion.logprobs[i], token, row, i) for i, token in enumerate(tokens)])
        ended.append(bool(tokens) and tokens[-1] in eos)

    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    response_width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((rows, response_width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((rows, response_width), dtype=torch.bool)
    sampler_log_probs = torch.zeros((rows, response_width), dtype=torch.float32)
    for row, (tokens, values) in enumerate(zip(responses, log_probs)):
        if tokens:
            response_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            response_mask[row, : len(tokens)] = True
            sampler_log_probs[row, : len(tokens)] = torch.as_tensor(values, dtype=torch.float32)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        sampler_log_probs=sampler_log_probs,
        lengths=response_mask.sum(dim=-1),
        truncated=torch.tensor([not done for done in ended], dtype=torch.bool),
    )


class VLLMSampler:
    """Samples responses with a vLLM engine; same interface and output as ``HFSampler``.

    Args:
        model_path: local Hugging Face model directory the engine loads (the training model's starting point).
        eos_token_id: id (or ids) that end a response.
        pad_token_id: id used for padding.
        dtype: the engine's dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``).
        gpu_memory_utilization: share of the GPU's memory vLLM may take (weights + KV cache); the rest is the
            trainer's.
        max_model_len: context bound of the engine (prompt + response); ``None`` = the model's.
        seed: seed of the engine's sampler. Every request gets its own seed, ``seed + number of requests sent
            before it``: vLLM seeds each request separately, so one seed shared by the copies of a prompt in a
            group would give them all the same response.
        llm: an already built ``vllm.LLM`` to use instead of building one (e.g. with tensor parallelism).
        **llm_kwargs: further ``vllm.LLM`` arguments (``enforce_eager=True``, ``enable_prefix_caching=...``).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
        seed: int = 0,
        llm: Any = None,
        **llm_kwargs: Any,
    ) -> None:
        self._vllm = import_vllm()
        _require_cuda()
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not eos:
            raise ValueError("VLLMSampler needs at least one eos_token_id")
        if not 0.0 < gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        self.eos_token_ids = [int(token) for token in eos]
        self.pad_token_id = int(pad_token_id)
        self.seed = int(seed)
        self._requests_sent = 0
        if llm is None:
            if model_path is None:
                raise ValueError("VLLMSampler needs model_path (a local model directory) or a built llm")
            path = Path(model_path)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"VLLMSampler: {path} is not a local Hugging Face model directory (no config.json)")
            # sync_weights sends a function to the engine's own worker processes (pickled, never over a network)
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            llm = self._vllm.LLM(
                model=str(path),
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=self.seed,
                # log-probs after temperature / top-k / top-p: the distribution the tokens were drawn from
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self.llm = llm

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to draw the same samples: how many requests (each seeded in turn) were sent."""
        return {"requests_sent": self._requests_sent}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._requests_sent = int(state["requests_sent"])

    def sampling_params(self, params: SamplingParams, count: int) -> list:
        """One ``vllm.SamplingParams`` for each of the next ``count`` requests, each with its own seed."""
        first = self.seed + self._requests_sent
        return [self._vllm.SamplingParams(**vllm_sampling_kwargs(params, self.eos_token_ids, seed=first + index))
                for index in range(count)]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, progress=None) -> Rollouts:
        """Sample one response per prompt (repeat a prompt to sample a group); ``progress`` gets the count done."""
        if not prompts:
            raise ValueError("generate() got no prompts")
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt must have at least one token")
        sampling = self.sampling_params(params, len(prompts))
        self._requests_sent += len(prompts)
        requests = [{"prompt_token_ids": [int(token) for token in prompt]} for prompt in prompts]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        rollouts = outputs_to_rollouts(
            prompts, outputs, pad_token_id=self.pad_token_id, eos_token_ids=self.eos_token_ids,
            max_new_tokens=params.max_new_tokens,
        )
        if progress is not None:
            progress(len(prompts))
        return rollouts

    def _engine_model(self):
        """The engine's ``torch.nn.Module`` where an old (V0, in-process) engine exposes it, else None."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            return None

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Copy the training model's parameters into the engine, then drop cached prefixes computed with the old ones.

        ``weights`` replaces the model's own parameters: ``(Hugging Face name, tensor)`` pairs computed one at a time,
        such as the merged weights of a model with LoRA adapters. Either are loaded in pieces of about
        :data:`SYNC_CHUNK_BYTES` (a piece ends with the tensor that reaches it), so that no message to the engine
        carries the whole model and computed weights are not all held at once."""
        if weights is None:
            weights = ((name, parameter.detach()) for name, parameter in model.named_parameters())
        chunk, size = [], 0
        for name, tensor in weights:
            chunk.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= SYNC_CHUNK_BYTES:
                self._load_weights(chunk)
                chunk, size = [], 0
        if chunk:
            self._load_weights(chunk)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """``weights`` into the engine's model through its ``load_weights``, which takes any subset of its weights."""
        if hasattr(self.llm, "apply_model"):
            # vLLM's V1 engine runs the function on every worker; when the workers are other processes the
            # function and the weights are pickled to them, which vLLM allows only with
            # VLLM_ALLOW_INSECURE_SERIALIZATION=1 (set by __init__ when it builds the engine). They go as host
            # tensors, as weights read from disk do: a pickled GPU tensor would be rebuilt on the GPU by the engine's
            # process, outside its memory budget
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
                weights = [(name, tensor.cpu()) for name, tensor in weights]
            self.llm.apply_model(lambda module: module.load_weights(weights))
        elif (engine_model := self._engine_model()) is not None:
            engine_model.load_weights(weights)
        else:
            raise RuntimeError(
                "VLLMSampler.sync_weights cannot reach the engine's model: use a vLLM version with LLM.apply_model"
            )
