"""Tiny Hugging Face causal LMs with character-level tokenizers, built locally (no download).

A real architecture (Qwen2) at a few hundred thousand to a few million parameters, and a tokenizer made
with the ``tokenizers`` library whose vocabulary is a fixed alphabet plus special tokens. Both are saved
with ``save_pretrained`` so the ordinary loading path (``AutoModelForCausalLM.from_pretrained``) is what
reads them back.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from entrorl._files import modes_as_the_umask_gives
from entrorl.modeling import quiet_progress_bars

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "build_char_tokenizer", "build_tiny_qwen2", "save_tiny_model"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
DEFAULT_ALPHABET = string.digits + string.ascii_letters + " +-*/=()<>.,:;?!'\"\n_#%[]{}^\\|&@$~`"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet`` (unknown characters map
    to ``<unk>``), ``<pad>``/``<eos>``/``<bos>`` specials, and a decoder that joins characters verbatim."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    characters = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_qwen2(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    bos_token_id: int = 2,
):
    """A randomly initialised ``Qwen2ForCausalLM`` (deterministic for a seed), tied embeddings, no dropout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        attention_dropout=0.0,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def save_tiny_model(directory: str | Path, *, alphabet: str = DEFAULT_ALPHABET, seed: int = 0, **model_kwargs) -> Path:
    """Build a tokenizer and a tiny Qwen2 for it and save both to ``directory`` (a loadable HF model dir)."""
    directory = Path(directory)
    tokenizer = build_char_tokenizer(alphabet)
    model = build_tiny_qwen2(
        len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **model_kwargs,
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_quietly(model, tokenizer, directory)
    return directory


def save_quietly(model, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of both into ``directory`` without transformers' "Writing model shards" progress bar (one
    bar per tiny weight file, or under the caller's own), which is put back as it was."""
    with quiet_progress_bars():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    modes_as_the_umask_gives(directory)
