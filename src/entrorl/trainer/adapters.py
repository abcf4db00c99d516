"""Low-rank adapters on the policy: LoRA (Hu et al., arXiv 2106.09685), through ``peft``.

Each adapted linear layer computes ``W x + (alpha / r) * B A x`` with the base weight ``W`` frozen and only
``A`` (r x in) and ``B`` (out x r) trained; ``B`` starts at zero, so the adapted model starts as the base model.
The adapters are put into the model's own modules, so the trainer keeps calling the same model object (sampling,
scoring, the KV-cache prompt sharing, activation checkpointing); only the trainable parameters change.

A checkpoint holds the adapters in peft's format (``adapter/``, loadable with ``PeftModel.from_pretrained`` onto
the base model) and, in ``model/``, the merged model ``W + (alpha / r) * B A``: a plain Hugging Face directory that
``entrorl eval`` and any other tool load without peft. The merged weights are float32 when the base is bfloat16 or
float16: the adapters are float32, and rounding ``W + (alpha / r) * B A`` back to the base's precision would lose
most of an update that is small next to ``W`` (about three quarters of it at a relative size of 1e-3, in bfloat16).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from entrorl.modeling import is_out_of_memory

__all__ = ["LoraAdapter", "ADAPTER_DIRECTORY", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "read_adapter_config",
           "adapter_weights_file", "load_adapted_causal_lm"]

ADAPTER_DIRECTORY = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_WEIGHTS_PICKLED = "adapter_model.bin"  # older peft, or safe_serialization=False
_ADAPTER_NAME = "default"
# the levels peft puts between a module and the weight it adapts: q_proj.base_layer.weight, or for nested parameter
# wrappers experts.base_layer.base_layer.gate_up_proj
_WRAPPER_LEVELS = re.compile(r"(?:\.base_layer)+(?=\.)")


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("model.lora needs the peft package: pip install 'entrorl[lora]' (or pip install peft)") from error
    return peft


def _names(target: str, name: str) -> bool:
    """Whether ``target`` names the module called ``name``: its full name, or the end of it after a dot, as peft
    matches."""
    return name == target or name.endswith("." + target)


def _named(model: torch.nn.Module, module: torch.nn.Module | None, targets: list[str]) -> list[str]:
    """The entries of ``targets`` that name ``module`` (:func:`_names`)."""
    names = {name for name, candidate in model.named_modules() if candidate is module} if module is not None else set()
    return [target for target in targets if any(_names(target, name) for name in names)]


class LoraAdapter:
    """LoRA adapters put into ``model`` (in place), its other parameters frozen. A name of ``target_modules`` that
    matches no module is refused, unless the adapters are ``resumed`` from a checkpoint of a run that an earlier version
    started with it (peft trained without it): then a warning names it."""

    def __init__(self, model: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 target_modules: str | list[str] = "all-linear", resumed: bool = False):
        peft = _import_peft()
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        # the scoring path computes the output layer from its weight (modeling.token_stats_from_hidden), which would
        # leave an adapter on it out of the log-probs and entropies
        if _named(model, output, targets):
            raise ValueError(f"model.lora.target_modules names the output layer ({', '.join(_named(model, output, targets))}); "
                             "adapters go on the layers before it")
        # an adapter on an embedding tied to the output layer changes the input side only, and no merged model (one
        # weight for both) can hold that
        if output is not None and embedding is not None and output.weight is embedding.weight and _named(model, embedding, targets):
            raise ValueError(f"model.lora.target_modules names the input embedding ({', '.join(_named(model, embedding, targets))}), "
                             "whose weight this model shares with its output layer: adapt the layers between them")
        # peft refuses a list none of whose names matches, and drops those that match nothing when others do
        unmatched = [target for target in targets if target_modules != "all-linear" and not any(
            _names(target, name) for name, _ in model.named_modules())]
        if unmatched:
            leaves = sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                             if name and not any(True for _ in module.children())})
            said = (f"model.lora.target_modules: {', '.join(map(repr, unmatched))} "
                    f"{'matches' if len(unmatched) == 1 else 'match'} no module of this model (a name matches a module "
                    f"whose name is it or ends with '.' and it); its modules' last names: "
                    f"{', '.join(leaves[:30])}{', ...' if len(leaves) > 30 else ''}")
            if not resumed or len(unmatched) == len(targets):
                raise ValueError(said)
            # a run an earlier version started, which peft trained without them: its adapters are what they are
            warnings.warn(f"{said}; the run resumed was trained without adapters there, and goes on so", stacklevel=3)
            targets = [target for target in targets if target not in unmatched]
        # peft reads a string as a regular expression over full module names; a list, as names or their ends
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                 target_modules=target_modules if target_modules == "all-linear" else targets)
        try:
            with warnings.catch_warnings():  # peft asks transformers through a name it deprecates
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.peft_model = peft.get_peft_model(model, config)
        except ValueError as error:  # a target module that the model does not have, or dropout on a wrapped weight
            setting = "dropout" if "lora_dropout" in str(error) else "target_modules"
            raise ValueError(f"model.lora.{setting}: {error}") from None
        self.model = model
        from peft.tuners.lora import LoraLayer

        if isinstance(model.get_output_embeddings(), LoraLayer):  # named in a way the check above did not foresee
            raise ValueError("model.lora.target_modules reaches the output layer; adapters go on the layers before it")

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[torch.nn.Module]:
        """The base model: the same modules with every adapter switched off and in eval mode (no dropout, as a loaded
        reference model), for the reference's log-probs; the training mode is put back afterwards."""
        training = self.model.training
        with self.peft_model.disable_adapter():
            self.model.eval()
            try:
                yield self.model
            finally:
                self.model.train(training)

    def merged_dtype(self) -> torch.dtype:
        """float32 when the base holds its weights in a narrower floating type, else the base's own type."""
        dtype = next(p.dtype for p in self.model.parameters() if not p.requires_grad and p.is_floating_point())
        return torch.float32 if torch.finfo(dtype).bits < 32 else dtype

    def _adapted_weights(self) -> dict[int, Any]:
        """The adapted layers by the identity of the base weight their update adds to: a linear or embedding layer's
        ``weight``, or the parameter a ``ParamWrapper`` wraps (peft's ``target_parameters``, which ``all-linear``
        uses for a mixture of experts' fused weights, nesting one wrapper per parameter)."""
        from peft.tuners.lora import LoraLayer, ParamWrapper

        adapted = {}
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and (_ADAPTER_NAME in module.lora_A
                                                  or _ADAPTER_NAME in getattr(module, "lora_embedding_A", {})):
                base = module.get_param() if isinstance(module, ParamWrapper) else module.get_base_layer().weight
                adapted[id(base)] = module
        return adapted

    @staticmethod
    def _merged(key: str, value: torch.Tensor, adapted: dict[int, Any], dtype: torch.dtype) -> tuple[str, torch.Tensor]:
        """``(base name, weight)`` of one entry (``value`` as the model holds it, for its identity): ``W + (alpha / r)
        * B A`` summed in float32 or wider and rounded once to ``dtype`` for an adapted weight, the value in ``dtype``
        otherwise (floating values only). The base name drops every ``.base_layer`` peft's wrappers put in."""
        layer = adapted.get(id(value))
        value = value.detach()
        if layer is not None:
            wide = torch.promote_types(value.dtype, torch.float32)
            value = (value.to(wide) + layer.get_delta_weight(_ADAPTER_NAME).to(wide)).to(dtype)
        elif value.is_floating_point():
            value = value.to(dtype)
        return _WRAPPER_LEVELS.sub("", key), value

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the merged model, ``W + (alpha / r) * B A`` for every adapted weight (linear, embedding or a
        wrapped parameter), under the base model's own names, on the CPU in :meth:`merged_dtype`; the model is not
        changed. One layer's update at a time is computed on the model's device."""
        adapted, dtype = self._adapted_weights(), self.merged_dtype()
        merged = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if ".lora_" not in key:
                name, value = self._merged(key, value, adapted, dtype)
                merged[name] = value.to("cpu").contiguous()
        return merged

    @torch.no_grad()
    def merged_parameters(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged model's parameters (as ``named_parameters`` lists them: no buffers, a tied weight once) under the
        base model's names, one at a time on the model's device: each adapted weight computed when it is reached, in
        ``dtype`` (default: the base's own type, the merged sum rounded once to it), the others as they are. For an
        inference engine that takes the policy's weights after every update (``VLLMSampler.sync_weights``)."""
        adapted = self._adapted_weights()
        for key, value in self.model.named_parameters():
            if ".lora_" not in key:
                yield self._merged(key, value, adapted, dtype or value.dtype)

    def save_merged(self, directory: Path) -> None:
        """The merged model as a plain Hugging Face model directory (weights and config; no adapter files), its
        config naming the weights' type."""
        directory = Path(directory)
        self.model.save_pretrained(directory, state_dict=self.merged_state_dict())
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        written = str(self.merged_dtype()).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes dtype, 4.x torch_dtype
            if key in config:
                config[key] = written
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def save(self, directory: Path) -> None:
        """The adapters alone, in peft's format (``adapter_config.json``, ``adapter_model.safetensors``), with the base
        model's directory recorded as an absolute path, so that ``entrorl eval`` finds it from any working directory."""
        self.peft_model.save_pretrained(directory)
        config_file = Path(directory) / ADAPTER_CONFIG
        config = json.loads(config_file.read_text(encoding="utf-8"))
        recorded = config.get("base_model_name_or_path")
        if recorded and Path(recorded).is_dir():
            config["base_model_name_or_path"] = str(Path(recorded).resolve())
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def load(self, directory: Path) -> None:
        """Put the adapters saved by :meth:`save` in ``directory`` back; ``ValueError`` when they do not fit."""
        _load_adapter_weights(self.peft_model, Path(directory))


def adapter_weights_file(directory: Path) -> Path | None:
    """The adapters' weight file in ``directory``: ``adapter_model.safetensors``, or the ``adapter_model.bin`` of older
    peft versions; None when there is neither."""
    for name in (ADAPTER_WEIGHTS, _ADAPTER_WEIGHTS_PICKLED):
        path = Path(directory) / name
        if path.is_file() and path.stat().st_size > 0:  # an empty one is what a power cut leaves
            return path
    return None


class _ShapesDoNotFit(ValueError):
    """Saved adapter weights whose shapes are not those of the adapters they are loaded into."""

    def __init__(self, directory: Path, detail: str):
        super().__init__(f"the adapters in {directory} do not fit this model's adapter settings: {detail}")
        self.detail = detail


def _load_adapter_weights(peft_model, directory: Path) -> None:
    """The adapter weights saved in ``directory`` into ``peft_model``, whose adapters must be exactly those:
    ``ValueError`` naming the first missing and unexpected ones otherwise (peft itself only warns)."""
    peft = _import_peft()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter_weights_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory / ADAPTER_WEIGHTS} is missing or empty")
    try:
        state: dict[str, Any] = (load_file(weights) if weights.name == ADAPTER_WEIGHTS
                                 else torch.load(weights, map_location="cpu", weights_only=True))
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:  # damaged or cut short
        if isinstance(error, RuntimeError) and is_out_of_memory(error):  # torch.load's own, for a zip archive cut short
            raise
        raise ValueError(f"{weights} cannot be read ({type(error).__name__}: {error})") from None
    try:
        result = peft.set_peft_model_state_dict(peft_model, state)
    except RuntimeError as error:  # weights of other shapes: adapters of another rank, or of another model
        if is_out_of_memory(error):
            raise
        raise _ShapesDoNotFit(directory, " ".join(str(error).split())) from None  # torch's lines, as one
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    expected = {key for key, _ in peft.get_peft_model_state_dict(peft_model).items()}
    missing = sorted(expected - set(state))
    if missing or unexpected:
        raise ValueError(f"the adapters in {directory} do not fit this model's adapter settings (missing: "
                         f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})")


def read_adapter_config(adapters: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of the peft adapters in ``adapters``; ``ValueError`` naming the file when it is no
    peft adapter configuration. Its ``base_model_name_or_path`` is the base model the adapters were trained on."""
    config_file = Path(adapters) / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ValueError(f"{config_file} is no peft adapter configuration (no peft_type)")
    return config


def load_adapted_causal_lm(adapters: Path, base: Path, *, dtype: str = "float32", trust_remote_code: bool = False,
                           device: str | torch.device | None = None) -> torch.nn.Module:
    """The model in ``base`` (loaded and checked by :func:`entrorl.modeling.load_causal_lm`) with the adapters saved in
    ``adapters`` in peft's format (a checkpoint's ``adapter/``, or any ``PeftModel.save_pretrained`` directory), in
    eval mode; ``ValueError`` when they do not fit the model.

    A float32 (or float64) base gets the adapters merged into its weights, ``W + (alpha / r) B A``: sampling then
    costs what the base model's does. A bfloat16 / float16 base keeps them as separate float32 layers, as in training,
    since the merged weights rounded to the base's precision would lose most of an update that is small next to
    ``W``; the static-cache decoder runs them itself. Adapters on the output layer are merged whatever the type."""
    from entrorl.modeling import load_causal_lm

    peft = _import_peft()
    adapters = Path(adapters)
    read_adapter_config(adapters)
    try:
        config = peft.PeftConfig.from_pretrained(str(adapters))
    except (KeyError, TypeError, ValueError) as error:  # a peft_type, or fields, this peft does not know or lacks
        raise ValueError(f"{adapters / ADAPTER_CONFIG} cannot be read by peft {peft.__version__}: {error}") from None
    model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    config.inference_mode, config.base_model_name_or_path = True, model.name_or_path  # the base given, not the recorded
    full_precision = torch.finfo(model.get_input_embeddings().weight.dtype).bits >= 32
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            peft_model = peft.get_peft_model(model, config)
        except ValueError as error:  # target modules the model does not have
            raise ValueError(f"the adapters in {adapters} do not fit the model in {base}: {error}") from None
    from peft.tuners.lora import LoraLayer

    ends = [module for module in (model.get_input_embeddings(), model.get_output_embeddings()) if isinstance(module, LoraLayer)]
    if tied and ends:  # merged, the adapter's change would reach both ends of the one shared weight
        raise ValueError(f"the adapters in {adapters} adapt the input embedding or the output layer, which share one "
                         f"weight in the model in {base}: entrorl cannot apply them exactly")
    try:
        _load_adapter_weights(peft_model, adapters)
    except _ShapesDoNotFit as error:  # adapters of another model
        raise ValueError(f"the adapters in {adapters} do not fit the model in {base}: {error.detail}") from None
    # the scoring path reads the output layer's weight (modeling.token_stats_from_hidden): an adapter there is merged
    if full_precision or isinstance(model.get_output_embeddings(), LoraLayer):
        return peft_model.merge_and_unload().eval()
    return model.eval()
