"""Loading local Hugging Face causal LMs and computing per-token statistics of their responses."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import glob
import inspect
import json
import os
import pickle
import re
import stat
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from entrorl._files import refuse_a_name_that_is_not_utf8
from entrorl.data.records import ends_with_the_prompt
from entrorl.tokens import TokenStats, token_stats, token_stats_from_hidden

__all__ = [
    "DamagedWeightsError", "is_out_of_memory", "out_of_memory_while",
    "load_tokenizer", "save_tokenizer", "load_causal_lm", "check_causal", "turn_off_dropout", "check_model_files", "response_token_stats", "bucketed_response_token_stats", "length_buckets",
    "prompt_groups", "shares_prompts", "length_dependent_rope", "reset_dynamic_rope", "cache_argument", "output_cache", "left_pad", "model_context_length", "read_model_config",
    "check_prompts_fit", "encode_records", "unstopped_turn_end_note", "unknown_token_note", "model_vocab_size", "declared_vocab_size", "stop_token_ids", "encode_prompt",
    "FUSED_HEAD_MODEL_TYPES", "DTYPES",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architectures whose logits are exactly ``final_hidden @ lm_head.weight.T`` (no soft-capping or scaling),
# so the statistics can be computed from hidden states without building the logits.
FUSED_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "qwen2_moe", "qwen3_moe", "phi3", "olmo2"})

# tokenizer classes saved by ``PreTrainedTokenizerFast`` itself; AutoTokenizer would swap in the
# architecture's own tokenizer class and its pre-processing, which a custom tokenizer does not have.
_GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
_PADDING_BORROWED_FROM_EOS: "weakref.WeakSet" = weakref.WeakSet()  # tokenizers whose pad load_tokenizer set


# what a saved tokenizer leaves in its directory (any one of them); without them transformers would build an empty
# tokenizer from config.json alone, and every prompt would encode to nothing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
# the weight files from_pretrained reads, sharded or not
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_UNREADABLE_ADVICE = "ask its owner to make it readable (chmod g+r or a+r), or copy the model"


def _check_model_dir(path: str | Path, *, model_config: bool = True) -> Path:
    """``path`` as a readable directory; with ``model_config``, one holding a model's config.json (a tokenizer alone,
    as beside peft adapters, needs none)."""
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file; the model is a directory (config.json, weights and tokenizer)")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (give a local Hugging Face model directory)")
    refuse_a_name_that_is_not_utf8(path, "the model directory")
    if not os.access(path, os.R_OK | os.X_OK):  # else every file in it would look missing
        status = path.stat()
        raise PermissionError(errno.EACCES, f"Permission denied: this user may not list the model directory (owner "
                              f"{_owner(status.st_uid)}, mode {stat.filemode(status.st_mode)}); {_UNREADABLE_ADVICE}",
                              str(path))
    saved = sorted((path / "checkpoints").glob("step_*/model/config.json"))  # zero-padded steps: oldest first
    if saved and not declares_a_model(path / "config.json"):  # a run directory's config.json holds the run's settings
        raise FileNotFoundError(f"{path} is an entrorl run directory; its models are in checkpoints/step_N/model (the "
                                f"last one: {saved[-1].parent})")
    refuse_broken_links(path, ["config.json"])
    if model_config and not (path / "config.json").is_file():
        inside = " (an entrorl checkpoint keeps its model in model/: give that directory)" if (path / "model" / "config.json").is_file() else ""
        if (path / "adapter_config.json").is_file():
            inside = (" (it holds peft adapters: train from their base model, the base_model_name_or_path of its "
                      "adapter_config.json; entrorl eval --model takes adapters)")
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory{inside}")
    return path


def declared_vocab_size(model_path: str | Path) -> int | None:
    """The vocabulary size the ``config.json`` of the model directory ``model_path`` declares (a multimodal model's:
    its text model's); None when there is none to read."""
    try:
        declared = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(declared, dict) and "vocab_size" not in declared and isinstance(declared.get("text_config"), dict):
        declared = declared["text_config"]
    size = declared.get("vocab_size") if isinstance(declared, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def declares_a_model(config_file: Path) -> bool:
    """Whether ``config_file`` is a model's config.json (it names a ``model_type`` or ``architectures``)."""
    try:
        declared = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(declared, dict) and bool(declared.get("model_type") or declared.get("architectures"))


def check_model_files(path: str | Path, *, tokenizer: bool = True, weights: bool = True) -> Path:
    """``path`` as a local model directory holding a tokenizer and weights (its config.json with them); a
    ``FileNotFoundError`` naming what is missing (checked before anything loads, so that a bad directory fails at
    once)."""
    path = _check_model_dir(path, model_config=weights)
    read = []  # what the load would read, where a link to nothing would be taken for a missing or another file
    if weights:
        read.append("generation_config.json")
        meant = _weights_transformers_reads(path, links_count=True)  # else transformers takes the next one in its order
        read += WEIGHT_PATTERNS if meant is None else [glob.escape(meant[0])]  # an index's shards: _check_shards_listed
    if tokenizer:  # a fast tokenizer's tokenizer.json holds its vocabulary: the vocabulary files beside it go unread
        read += ["tokenizer.json", "tokenizer_config.json", *_TOKENIZER_EXTRAS]
        if not (path / "tokenizer.json").is_file():
            read += [*TOKENIZER_FILES, "merges.txt"]
    refuse_broken_links(path, read)
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it there with "
                                "tokenizer.save_pretrained")
    if weights and not _has_weight_files(path):
        if path.name == "model" and (path.parent / "adapter" / "adapter_config.json").is_file():
            merged = [model for model in sorted(path.parent.parent.glob("step_*/model")) if _has_weight_files(model)]
            last = f" ({merged[-1]})" if merged else ", written when the run reaches its last step"
            raise FileNotFoundError(
                f"{path} has no weights: it is a LoRA run's checkpoint saved without its merged model "
                f"(model.lora.merged: last keeps it in the last checkpoint only{last}); take a checkpoint that holds it, "
                f"or merge the adapters beside it ({path.parent / 'adapter'}) into their base model with peft's "
                "merge_and_unload and save_pretrained (entrorl eval --model takes the adapters as they are)")
        raise FileNotFoundError(f"{path} has no weights (no *.safetensors or pytorch_model*.bin); save them there with "
                                "model.save_pretrained")
    if weights:
        _refuse_weights_transformers_does_not_read(path)
        _check_shards_listed(path)
    refuse_files_this_user_cannot_read(path, tokenizer=tokenizer, weights=weights)
    return path


# what a tokenizer's loading reads besides its vocabulary, when they are there
_TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def _weight_files_loaded(directory: Path) -> list[str]:
    """The weight files transformers loads from ``directory`` (:func:`_weights_transformers_reads`; other files, such
    as a ``consolidated.safetensors`` beside them, it does not read)."""
    found = _weights_transformers_reads(directory)
    return [] if found is None else [found[0], *(found[1] or ())]


def _weights_transformers_reads(path: Path, *, links_count: bool = False) -> tuple[str, list[str] | None] | None:
    """The weight file transformers reads first in ``path``, in its order (``model.safetensors``, else its index,
    else the same of ``pytorch_model.bin``; the file ``config.json`` names as ``transformers_weights`` instead, an
    index when it ends so), with the shards an index lists (None when the index cannot be read; none for a single
    file); None when there is none. With ``links_count``, a link to nothing counts as the file it stands for (the one
    the copy was meant to give transformers)."""
    present = os.path.lexists if links_count else os.path.isfile
    order = (("model.safetensors", "model.safetensors.index.json"),
             ("pytorch_model.bin", "pytorch_model.bin.index.json"))
    named = _weights_config_names(path)
    if isinstance(named, str):
        order = ((None, named),) if named.endswith(".safetensors.index.json") else ()
    for single, index in order:
        if single is not None and present(path / single):
            return single, []
        if present(path / index):
            try:
                names = list(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return index, None
            return index, sorted(set(names)) if all(isinstance(name, str) for name in names) else None
    return None


def _weights_config_names(path: Path) -> Any:
    """What the ``config.json`` in ``path`` names as its weights (``transformers_weights``), None when nothing."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_files_this_user_cannot_read(directory: Path, *, tokenizer: bool = True, weights: bool = True,
                                       advice: str = _UNREADABLE_ADVICE) -> None:
    """``PermissionError`` naming the first of the files a load of ``directory`` reads (``config.json``; with
    ``weights`` the weight files transformers takes, with their index and generation config; with ``tokenizer`` the
    tokenizer's) that this user may not read (:func:`refuse_unreadable`)."""
    names = ["config.json"]
    if weights:
        names += [*_weight_files_loaded(directory), "generation_config.json"]
    if tokenizer:  # a fast tokenizer's tokenizer.json holds its vocabulary: the vocabulary files beside it go unread
        vocabulary = () if (directory / "tokenizer.json").is_file() else (*TOKENIZER_FILES, "merges.txt")
        names += ["tokenizer.json", "tokenizer_config.json", *vocabulary, *_TOKENIZER_EXTRAS]
    refuse_unreadable(sorted({file for pattern in names for file in directory.glob(pattern)}), advice=advice)


def refuse_broken_links(directory: Path, patterns) -> None:
    """``FileNotFoundError`` naming the files of ``directory`` matching ``patterns`` (``fnmatch``'s: a name holding
    ``[``, ``*`` or ``?`` is given through ``glob.escape``) that are links to nothing, as in a Hugging Face cache's
    snapshot copied without the blobs its links point to: transformers would call them missing, take another file for
    them (a slow tokenizer's), or load without them (a generation config)."""
    broken = sorted(directory / entry.name for entry in os.scandir(directory)
                    if entry.is_symlink() and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
                    and not (directory / entry.name).exists())
    if broken:
        others = ", ".join(file.name for file in broken[1:4]) + (", ..." if len(broken) > 4 else "")
        more = f", and {len(broken) - 1} more links to nothing ({others})" if len(broken) > 1 else ""
        raise FileNotFoundError(f"{directory}: {broken[0].name} is a link to {os.readlink(broken[0])}, which does not "
                                f"exist{more}: a model copied without the files its links point to (copy it with cp -L, "
                                "which copies what the links point to)")


def refuse_unreadable(files, *, advice: str = _UNREADABLE_ADVICE) -> None:
    """``PermissionError`` naming the first of ``files`` that is a file this user may not read, with its owner and
    mode, before a loader reports it as a missing or damaged file (safetensors says "No such file or directory")."""
    for file in files:
        if Path(file).is_file() and not os.access(file, os.R_OK):
            status = Path(file).stat()
            raise PermissionError(errno.EACCES, f"Permission denied: this user may not read it (owner "
                                  f"{_owner(status.st_uid)}, mode {stat.filemode(status.st_mode)}); {advice}", str(file))


def _owner(uid: int) -> str:
    """The user name of ``uid`` where the system has one, else ``uid N``."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def _has_weight_files(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def _refuse_weights_transformers_does_not_read(path: Path) -> None:
    """``FileNotFoundError`` when ``path`` holds weight files but none that transformers reads: shards without the
    index that lists them (a download of ``*.safetensors`` alone), or a file of another name (``consolidated``),
    which would fail only after the data and tokenizer had loaded, naming neither."""
    if _weights_transformers_reads(path, links_count=True) is not None or _weights_config_names(path) is not None:
        return  # (a file of its own naming, which transformers is told to read)
    files = sorted(name for pattern in WEIGHT_PATTERNS for name in (found.name for found in path.glob(pattern)))
    shards = [name for name in files if re.fullmatch(r".+-\d+-of-\d+\.(safetensors|bin)", name)]
    if shards:
        index = "model.safetensors.index.json" if shards[0].endswith(".safetensors") else "pytorch_model.bin.index.json"
        raise FileNotFoundError(f"{path} has the shards {', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''} "
                                f"but not their index, {index}, which says what each holds: copy it there too")
    raise FileNotFoundError(f"{path} has weight files transformers does not read ({', '.join(files[:3])}): it reads "
                            "model.safetensors, or model.safetensors.index.json and its shards, or pytorch_model.bin "
                            "(or its index); save the model with save_pretrained")


def _check_shards_listed(path: Path) -> None:
    """``FileNotFoundError`` naming the shards that the index transformers reads in ``path`` lists but the directory
    lacks (a download or a copy cut short), instead of a failure somewhere inside the load. An index transformers
    cannot read either is left to its own error."""
    found = _weights_transformers_reads(path)
    if found is None or found[1] is None:
        return
    index, listed = found
    refuse_broken_links(path, [glob.escape(name) for name in listed])
    missing = [name for name in listed if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {len(missing)} of the weight files its {index} lists ({', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}): a download or a copy was cut "
            "short; copy them there")


def _refuse_custom_code(path: Path, error: ValueError, trust_remote_code: bool) -> None:
    """Re-raise transformers' refusal of a directory's own code as the setting that allows it."""
    if not trust_remote_code and "trust_remote_code" in str(error):
        raise ValueError(
            f"{path} holds its own model or tokenizer code (auto_map in its config), which runs only when allowed: after "
            "reading that code, set model.trust_remote_code: true (train) or pass --trust-remote-code (eval, data audit)"
        ) from None


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer saved in a local model directory; sets ``pad_token = eos_token`` when there is none (for batching;
    :func:`save_tokenizer` leaves it out again)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = check_model_files(path, weights=False)
    _check_json_files(path, ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"))
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class") if config_file.is_file() else None
    try:
        if declared in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        _check_json_files(path, ("tokenizer.json",))  # large: read again only to name it when it is what failed
        if isinstance(error, ValueError):
            _refuse_custom_code(path, error, trust_remote_code)
        raise
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no eos_token: responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        _PADDING_BORROWED_FROM_EOS.add(tokenizer)
    return tokenizer


class DamagedWeightsError(ValueError):
    """A model directory's weight file cannot be read: damaged or truncated."""


_OUT_OF_MEMORY_WORDS = ("cannot allocate memory", "can't allocate memory", "not enough memory", "out of memory",
                        "bad_alloc")


def errors_in_chain(error: BaseException | None, *, during: bool = True) -> Iterator[BaseException]:
    """``error``, then what it was raised from (``__cause__``) or, with ``during``, while handling (``__context__``),
    and so on, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (error.__context__ if during else None)


def is_out_of_memory(error: BaseException, *, during: bool = True) -> bool:
    """Whether ``error`` (or what it was raised from, or, with ``during``, what it was raised while handling) says that
    memory ran out: ``MemoryError``, an allocator's or a memory map's refusal (``ENOMEM``, under ``ulimit -v`` too), a
    device's out-of-memory error; not a damaged file."""
    for link in errors_in_chain(error, during=during):
        if isinstance(link, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(link, OSError) and link.errno == errno.ENOMEM:
            return True
        if isinstance(link, (RuntimeError, OSError)) and any(word in str(link).lower() for word in _OUT_OF_MEMORY_WORDS):
            return True  # a memory map or an allocator refused (torch, safetensors): said in words only
    return False


def out_of_memory_while(doing: str, error: BaseException, *, files_read: bool = True) -> MemoryError:
    """The one-line error for memory that ran out while ``doing`` something; ``files_read``: while reading files,
    which are then said to be intact (not damaged, whatever the reader's message suggests)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    intact = "the files are intact; " if files_read else ""
    return MemoryError(f"out of memory while {doing} ({detail}): {intact}free memory, raise the process's memory limit "
                       "(ulimit -v, a scheduler's memory request) or use a smaller model or batch")


def unreadable_weight_file(directory: Path) -> Path | None:
    """The first of ``directory``'s weight files whose index of tensors cannot be read (a damaged or truncated file),
    or None when every one reads. Only the header is read: safetensors' for ``*.safetensors``, the archive's for a
    ``pytorch_model*.bin`` (memory-mapped, weights only)."""
    from safetensors import safe_open

    # pytorch_model*.bin only: a Trainer's output keeps its settings in training_args.bin, which is no weight file
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin")):
        if not os.access(file, os.R_OK):  # not this user's to read: not damaged (safetensors says "No such file")
            continue
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as opened:
                    opened.keys()
            else:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as error:
            # a memory map refused under a memory limit says nothing of the file; the load's own failure, which this
            # check runs while handling, is not the header's
            if not is_out_of_memory(error, during=False):
                return file
    return None


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _check_json_files(directory: Path, names: tuple[str, ...], remedy: str = "save the tokenizer again") -> None:
    """``ValueError`` naming the first of ``directory``'s files ``names`` that exists and is not a JSON object (a
    damaged file would otherwise fail deep inside ``transformers`` with a message that names no file, or be passed
    over without a word: a generation config, with the stop tokens it lists)."""
    for name in names:
        file = directory / name
        if not file.is_file():
            continue
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file} is not valid UTF-8 JSON ({error}): the file is damaged; {remedy}") from None
        if not isinstance(content, dict):
            raise ValueError(f"{file} holds a JSON {_JSON_TYPES.get(type(content), 'value')}, not an object: the file "
                             f"is damaged; {remedy}")


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)`` as the tokenizer was before :func:`load_tokenizer` lent it EOS as its
    padding token: a checkpoint's tokenizer declares no padding when its source declared none (a data collator that
    masks padding in the labels would otherwise mask every EOS)."""
    if tokenizer not in _PADDING_BORROWED_FROM_EOS or tokenizer.pad_token_id != tokenizer.eos_token_id:
        tokenizer.save_pretrained(directory)  # its own padding, or one a caller set since
        return
    tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' and huggingface_hub's progress bars off in the block (loading or writing a model shows a bar per
    weight file otherwise, under the caller's own progress), each put back as it was: a library user's later
    downloads keep theirs."""
    import importlib

    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the package exports a class of that name
    transformers_bars, hub_states = hf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)
    hf_logging.disable_progress_bar()  # both
    try:
        yield
    finally:
        if transformers_bars:
            hf_logging.enable_progress_bar()  # both again
        hub_tqdm.progress_bar_states.clear()  # the hub's global setting and each group's, as they were
        hub_tqdm.progress_bar_states.update(hub_states)


def load_causal_lm(path: str | Path, *, dtype: str = "float32", disable_dropout: bool = True, trust_remote_code: bool = False,
                   device: str | torch.device | None = None):
    """``AutoModelForCausalLM`` from a local directory (never the hub), on ``device`` (default: where
    ``transformers`` loads it, the CPU), optionally with dropout off.

    Refused, naming the cause: weights that do not cover the model (transformers would start the missing ones at
    random), a model that is not causal (:func:`check_causal`) or that ignores the padding mask
    (:func:`check_left_padding`). The checks run a few 8-token forwards, on ``device``."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    path = check_model_files(path, tokenizer=False)
    # transformers passes over a damaged one without a word, and with it the end-of-turn ids it lists as stop tokens
    _check_json_files(path, ("generation_config.json",), remedy="save the model (or its GenerationConfig) again")
    try:
        with quiet_progress_bars():
            # weights of another shape are loaded as missing ones, so that the refusal below names them
            model, loading = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except ValueError as error:
        _refuse_custom_code(path, error, trust_remote_code)
        if sys.flags.optimize >= 2 and "docstring" in str(error).replace(str(path), ""):
            raise ValueError(f"transformers cannot import the model's code when Python strips docstrings (python -OO, "
                             f"PYTHONOPTIMIZE=2): run without them ({error})") from error
        raise
    except MemoryError as error:
        _refuse_shapes_config_json_declares_beyond_the_files(path, trust_remote_code, error)
        raise out_of_memory_while(f"loading the model of {path}", error) from error
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError) as error:
        damaged = unreadable_weight_file(path)  # a file whose header cannot be read, memory refusals aside
        if damaged is None and is_out_of_memory(error):
            _refuse_shapes_config_json_declares_beyond_the_files(path, trust_remote_code, error)
            raise out_of_memory_while(f"loading the model of {path}", error) from error
        if damaged is None:  # every file's header reads: not a damaged file
            raise
        raise DamagedWeightsError(f"{damaged} cannot be read ({type(error).__name__}: {error}): the file is damaged or "
                                  "truncated; save the model again") from error
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in loading.get("mismatched_keys") or ())
    if missing or mismatched:
        raise _weights_do_not_fit(path, type(model).__name__, missing=missing, mismatched=mismatched)
    if device is not None:
        model = model.to(device)
    _run_without_router_logits(model, path)
    check_causal(model, path)
    check_left_padding(model, path)
    if disable_dropout:
        turn_off_dropout(model, path)
    return model


def _weights_do_not_fit(path: Path, model_name: str, *, missing: Sequence[str] = (),
                        mismatched: Sequence[str] = ()) -> ValueError:
    listed = "; ".join(f"{what}: {', '.join(keys[:5])}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
                       for what, keys in (("missing", missing), ("of another shape", mismatched)) if keys)
    return ValueError(f"the weights in {path} do not fit {model_name} ({listed}): those weights would start at random. "
                      "Is it a causal language model's directory, saved whole, with the config.json it was saved with?")


def _refuse_shapes_config_json_declares_beyond_the_files(path: Path, trust_remote_code: bool,
                                                         error: BaseException) -> None:
    """Raise :func:`_weights_do_not_fit` when the model that ``config.json`` describes (built on the meta device,
    which takes no memory) has weights of other shapes than the safetensors files hold: memory that ran out while
    loading then came from the config (a ``vocab_size`` of 10^9), not from the model's size."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = read_model_config(path, trust_remote_code=trust_remote_code)
    if config is None:
        return
    try:
        with torch.device("meta"):
            described = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a diagnosis only: the memory error is raised instead
        return
    declared = {name: tuple(tensor.shape) for name, tensor in described.state_dict().items()}
    mismatched = []
    for name in _weight_files_loaded(path):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(path / name, framework="pt") as opened:
                for key in opened.keys():
                    shape = tuple(opened.get_slice(key).get_shape())
                    if key in declared and declared[key] != shape:
                        mismatched.append(f"{key} {list(shape)} in the files, {list(declared[key])} in config.json")
        except Exception:  # noqa: BLE001 - a header that cannot be read now (memory, a damaged file) tells nothing
            continue
    if mismatched:
        raise _weights_do_not_fit(path, type(described).__name__, mismatched=sorted(mismatched)) from error


# the behaviour checks below run the model on a few made-up sequences of at most this many tokens
_PROBE_LENGTH = 8


@contextlib.contextmanager
def _probing(model, *, training: bool):
    """The model in train or eval mode without gradients, put back as it was afterwards."""
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _probe_shape(model) -> tuple[int, int, torch.device]:
    """``(vocabulary size, probe length within the context, device)`` for the behaviour checks."""
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None) or 0
    length = min(_PROBE_LENGTH, model_context_length(model) or _PROBE_LENGTH)
    return int(vocab), length, next(model.parameters()).device


def _probe_difference(model, logits: torch.Tensor, reference: torch.Tensor) -> float | None:
    """The largest difference between two computations of the same logits, when it is more than rounding explains
    (relative to the logits' scale: float32 rounding stays below 1e-6, bit-identical for same shapes on the CPU but
    not with a GPU's atomic additions, as in MoE kernels; half precision rounds at 4e-3 and more); else None."""
    logits, reference = logits.float(), reference.float()
    change = float((logits - reference).abs().max())
    tolerance = 5e-2 if model.dtype in (torch.bfloat16, torch.float16) else 1e-4
    return change if change > tolerance * max(1.0, float(reference.abs().max())) else None


def _probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of one unpadded ``[1, T]`` probe, with an attention mask of ones where the forward takes one (GPT-2
    warns about a missing mask whenever the ids hold its padding id)."""
    parameters = inspect.signature(model.forward).parameters
    if "attention_mask" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return model(input_ids=ids).logits


def check_causal(model, source: str | Path = "the model") -> None:
    """``ValueError`` unless the model's prediction at a position ignores the tokens after it.

    An encoder loaded as a language model (BERT's ``BertLMHeadModel`` without ``is_decoder``) attends in both
    directions: the log-prob it gives a token would already have seen that token. Checked by behaviour, so any
    architecture is covered: two sequences that share their first half, each run alone (same shapes, so a causal
    model gives the first half the same logits up to rounding), must agree on the first half."""
    vocab, length, device = _probe_shape(model)
    if vocab < 2 or length < 2:
        return
    first = torch.arange(length, device=device) % vocab
    second = first.clone()
    second[length // 2:] = (second[length // 2:] + 1) % vocab
    with _probing(model, training=False):
        shared = [_probe_logits(model, ids[None])[0, : length // 2] for ids in (first, second)]
    change = _probe_difference(model, shared[1], shared[0])
    if change is not None:
        raise ValueError(
            f"{source} is not a causal language model: its predictions at the first {length // 2} positions changed by "
            f"{change:.3g} when only later tokens did (bidirectional attention, as in an encoder such as BERT). Its "
            "log-probs would see the tokens they score."
        )


def check_left_padding(model, source: str | Path = "the model") -> None:
    """``ValueError`` unless a left-padded row gets the logits it gets alone.

    entrorl batches prompts of different lengths by padding them on the left, with an attention mask and position
    ids counted from each row's first real token. A model that ignores the mask (RWKV, RecurrentGemma: their
    recurrent state runs through the padding) would score and sample every padded row wrong. Checked by behaviour:
    a short row padded beside a longer one, against the short row alone."""
    vocab, length, device = _probe_shape(model)
    if vocab < 2 or length < 3:
        return
    short = (torch.arange(length // 2, device=device) + 1) % vocab
    long = (torch.arange(length, device=device) + 2) % vocab
    input_ids, attention = left_pad([short.tolist(), long.tolist()], 0)
    input_ids, attention = input_ids.to(device), attention.to(device).long()
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    try:
        with _probing(model, training=False):
            padded = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits[0, -len(short):]
            alone = model(input_ids=short[None], attention_mask=torch.ones_like(short)[None],
                          position_ids=torch.arange(len(short), device=device)[None]).logits[0]
    except TypeError as error:
        if "attention_mask" not in str(error) and "position_ids" not in str(error):
            raise
        raise ValueError(f"{source} cannot run left-padded batches: its forward does not take an attention mask and "
                         f"position ids ({error})") from None
    change = _probe_difference(model, padded, alone)
    if change is not None:
        raise ValueError(
            f"{source} does not handle left padding: a row padded on the left beside a longer one got logits {change:.3g} "
            f"away from its own (model type {getattr(model.config, 'model_type', '?')!r}; a recurrent model that ignores "
            "the attention mask, such as RWKV or RecurrentGemma, cannot be batched this way)"
        )


def _is_random_rate(name: str) -> bool:
    """An attribute naming a train-mode random rate: dropout (``dropout``, ``attention_dropout``, ``attn_pdrop``,
    ``layerdrop``, ...) or MoE router jitter (``router_jitter_noise``)."""
    name = name.lower()
    return "drop" in name or "jitter" in name


def _zero_random_rates(holder) -> dict[str, float]:
    """Set every positive float attribute of ``holder`` (a module or a config) that :func:`_is_random_rate` to 0;
    returns what they were."""
    zeroed = {}
    for name, value in list(vars(holder).items()):
        if isinstance(value, float) and value > 0 and _is_random_rate(name):
            zeroed[name] = value
            setattr(holder, name, 0.0)
    return zeroed


# (config, its own values, the values entrorl runs it with) of each setting changed on a loaded model's configs
_CHANGED_CONFIG_SETTINGS = "_entrorl_changed_config_settings"


def _remember_changed_settings(model, changes: list[tuple[Any, dict[str, Any], dict[str, Any]]]) -> None:
    setattr(model, _CHANGED_CONFIG_SETTINGS, getattr(model, _CHANGED_CONFIG_SETTINGS, []) + changes)


@contextlib.contextmanager
def config_rates_restored(model) -> Iterator[None]:
    """The settings entrorl changed on ``model``'s configs (the random rates :func:`turn_off_dropout` zeroed, the
    router logits :func:`load_causal_lm` turns off) put back for the time of the block, so that a checkpoint saved in
    it is the original model's configuration: a plain directory another trainer fine-tunes with the dropout and the
    load-balancing loss its authors chose."""
    changed = getattr(model, _CHANGED_CONFIG_SETTINGS, [])
    for config, own, _ in changed:
        for name, value in own.items():
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, _, running in changed:
            for name, value in running.items():
                setattr(config, name, value)


def _run_without_router_logits(model, source: str | Path) -> None:
    """Turn off a mixture-of-experts model's ``output_router_logits``: the router's logits feed the load-balancing
    loss, which entrorl's trainer does not add (verl's actor does not either), and with them on a one-token decode
    step fails in transformers' loss, whose mask covers the whole sequence. Said once; checkpoints keep the setting."""
    configs = [config for config in (model.config, getattr(model.config, "text_config", None))
               if config is not None and getattr(config, "output_router_logits", False)]
    if not configs:
        return
    for config in configs:
        config.output_router_logits = False
    _remember_changed_settings(model, [(config, {"output_router_logits": True}, {"output_router_logits": False})
                                       for config in configs])
    warnings.warn(f"{source} sets output_router_logits: entrorl samples and scores without the router's logits and "
                  "adds no load-balancing loss to the objective (as verl's actor); its checkpoints keep the setting",
                  stacklevel=1)  # here, so that the policy and its reference, loaded from one folder, say it once


def turn_off_dropout(model, source: str | Path = "the model") -> None:
    """Zero every train-mode random rate of ``model``, so that its train-mode forward is the eval-mode one and the
    update scores the sampled tokens as the sampler did: ``nn.Dropout`` modules, and the plain float rates that many
    architectures keep on their modules and configs under their own names (OPT's ``dropout`` and ``layerdrop``,
    GPT-BigCode's ``attn_pdrop``, Mixtral's ``router_jitter_noise``, ...). Then checks it: two train-mode forwards
    must agree, else a warning says the model keeps randomness under a name not covered here."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        _zero_random_rates(module)
    zeroed = [(config, rates, dict.fromkeys(rates, 0.0)) for config in (model.config, getattr(model.config, "text_config", None))
              if config is not None and (rates := _zero_random_rates(config))]
    _remember_changed_settings(model, zeroed)
    vocab, length, device = _probe_shape(model)
    if vocab < 1:
        return
    ids = torch.arange(length, device=device)[None] % vocab
    with _probing(model, training=True):
        first, second = _probe_logits(model, ids), _probe_logits(model, ids)
    if not torch.equal(first, second) and not first.isnan().any():  # NaN != NaN: a broken model is said elsewhere
        warnings.warn(f"{source}: the model's train-mode forward is still random with its dropout rates at 0 "
                      f"(logits moved by {float((first - second).abs().max()):.3g} between two identical calls): it keeps "
                      "a random rate under a name entrorl does not know, so the update will not score the sampled tokens "
                      "as the sampler did", stacklevel=3)


def model_context_length(model) -> int | None:
    """The context length (``max_position_embeddings``) of a model or of its ``transformers`` config, or None when it
    declares none."""
    value = getattr(getattr(model, "config", model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def read_model_config(path: str | Path, *, trust_remote_code: bool = False):
    """The ``transformers`` config of a model directory, read without the weights (a second to check prompts against the
    context before a large model loads), or None when it cannot be read: the loader then reports why."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _end_of_text(tokenizer, ids: list[int], plain: list[int]) -> int:
    """Where the text's own tokens ``plain`` end within ``ids`` (the text with the tokenizer's special tokens); for an
    empty text, after the special tokens the tokenizer puts before any text (found from a one-character text: a
    BOS that is also the EOS stays)."""
    if plain:
        start = _start_of_text(ids, plain)
        return len(ids) if start is None else start + len(plain)
    probe, probe_plain = tokenizer("0")["input_ids"], tokenizer("0", add_special_tokens=False)["input_ids"]
    start = _start_of_text(probe, probe_plain) if probe_plain else None
    return min(start or 0, len(ids))


def _start_of_text(ids: list[int], plain: list[int]) -> int | None:
    """The first position of ``plain`` (non-empty) within ``ids``, among the special tokens' places; None if absent."""
    added = len(ids) - len(plain)
    return next((at for at in range(added + 1) if ids[at:at + len(plain)] == plain), None)


def encode_prompt(tokenizer, prompt: str, *, template: str = "{prompt}", chat_template: bool = False,
                  messages: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """The token ids the policy sees for ``prompt``: ``template.format(prompt=prompt)``, wrapped as a user turn with
    the tokenizer's chat template when ``chat_template`` (the template then writes the special tokens itself, so
    the tokenizer adds none: no second BOS). An EOS that the tokenizer appends after the text (its post-processor's)
    is left out: the response continues the prompt, not a finished text; other special tokens stay.

    ``messages``: the conversation a prompt given as chat messages comes with (:attr:`entrorl.data.PromptRecord.messages`),
    ending with the user's turn ``prompt``; the chat template renders all of it, ``template`` filled in that last turn.
    It needs ``chat_template``."""
    text = template.format(prompt=prompt)
    if messages is not None and not ends_with_the_prompt(messages, prompt):
        raise ValueError("encode_prompt: messages must end with the user's turn whose content is the prompt (a "
                         "PromptRecord's conversation does)")
    if messages is not None and not chat_template:
        raise ValueError("the prompt is given as chat messages, which only the tokenizer's chat template can write as "
                         "text: set model.chat_template: true (entrorl eval and data audit: --chat-template)")
    if not chat_template:
        ids = tokenizer(text)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        added = len(ids) - len(plain)
        if added > 0:
            end = _end_of_text(tokenizer, ids, plain)
            while len(ids) > end and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
        return ids
    _require_chat_template(tokenizer)
    from jinja2 import TemplateError

    source = getattr(tokenizer, "name_or_path", "")
    try:
        conversation = [*(messages or [])[:-1], {**(messages[-1] if messages else {"role": "user"}), "content": text}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # a typo in the template, its own raise_exception(...), or an expression that fails on this conversation
    except Exception as error:  # noqa: BLE001 - whatever the template's code raises is its failure on this prompt
        what = "the conversation" if messages else "a user turn"
        raise ValueError(f"the chat template of the tokenizer{f' in {source}' if source else ''} cannot render {what}: "
                         f"{type(error).__name__}: {error}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        source = getattr(tokenizer, "name_or_path", "")
        raise ValueError(f"a chat template was asked for, but the tokenizer{f' in {source}' if source else ''} has none")


def encode_records(tokenizer, records, *, template: str = "{prompt}", chat_template: bool = False) -> list[list[int]]:
    """:func:`encode_prompt` of each :class:`entrorl.data.PromptRecord` (its conversation, when it has one); an error
    of a record names its source (``file.jsonl:5``: the row a chat template refuses), one of the tokenizer's (no chat
    template) none."""
    if chat_template:
        _require_chat_template(tokenizer)
    encoded = []
    for record in records:
        try:
            encoded.append(encode_prompt(tokenizer, record.prompt, template=template, chat_template=chat_template,
                                         messages=record.messages))
        except ValueError as error:
            raise ValueError(f"{record.source}: {error}") from None
    return encoded


_REPLY_PROBE = "entrorl reply probe"


def unstopped_turn_end_note(model, tokenizer) -> str | None:
    """A sentence saying that the tokenizer's chat template ends an assistant turn with a token the sampler does not
    stop at (:func:`stop_token_ids`): a base model's tokenizer given a chat template ending turns with
    ``<|im_end|>`` (or Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``) while its EOS and generation config name only the
    end of the text, whose responses then run past their turn to the length limit. The turn's end is the first special
    token after the reply that ends the conversation, the turn a model generates (Phi-3 writes its EOS only after
    that; gpt-oss ends a generated turn with ``<|return|>``, earlier ones with ``<|end|>``), else, for a template that
    writes nothing after it (GLM-4's turn ends where the next role's marker begins), the first between a reply and
    the next user turn. None when that is a stop token, when there is none, or when the template cannot render such
    an exchange."""
    special = {*tokenizer.all_special_ids,
               *(token for token, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special)}
    special.discard(getattr(tokenizer, "unk_token_id", None))  # a marker the vocabulary cannot spell is no token the sampler could stop at
    exchange = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": _REPLY_PROBE}]
    ends: list[int] = []
    for conversation in (exchange, [*exchange, {"role": "user", "content": "2+2="}]):
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this exchange is not judged
            return None
        if not isinstance(text, str) or _REPLY_PROBE not in text:
            return None
        after = text[text.rfind(_REPLY_PROBE) + len(_REPLY_PROBE):]
        after = after[:after.find("2+2=")] if "2+2=" in after else after
        ends = [token for token in tokenizer(after, add_special_tokens=False)["input_ids"] if token in special]
        if ends:
            break
    stops = set(stop_token_ids(model, tokenizer))
    if not ends or ends[0] in stops:
        return None
    shown = tokenizer.convert_ids_to_tokens(ends[0])
    return (f"the chat template ends an assistant turn with {shown!r} (id {ends[0]}), which the model's stop tokens "
            f"{sorted(stops)} do not include: responses will run past the end of their turn, to the length limit; add "
            f"{ends[0]} to the model's generation_config.json eos_token_id (as chat models list their end-of-turn "
            "token), or train without the chat template")


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, then every EOS the model's generation config and config
    declare (chat models often list several, e.g. an end-of-turn token besides the end-of-text one)."""
    ids = [tokenizer.eos_token_id]
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        declared = getattr(config, "eos_token_id", None)
        ids += [declared] if isinstance(declared, int) else list(declared or [])
    return list(dict.fromkeys(int(token) for token in ids if token is not None))


def check_stop_tokens_can_be_sampled(model, stop_ids, *, warn: bool = True) -> None:
    """``ValueError`` when none of the ids that end a response has a row in ``model``'s vocabulary (an EOS added to
    the tokenizer without ``model.resize_token_embeddings``): the model could never sample one, and every response
    would run to the length limit. With ``warn``, a warning names the ones outside when others remain."""
    vocab = model_vocab_size(model)
    if vocab is None:
        return
    outside = [int(token) for token in stop_ids if int(token) >= vocab]
    if outside and len(outside) == len(stop_ids):
        raise ValueError(f"no response could ever end: the stop token id(s) {outside} have no row in the model's "
                         f"vocabulary of {vocab} ids (0-{vocab - 1}); a tokenizer given its EOS after the model was "
                         "saved needs the model's embeddings resized (model.resize_token_embeddings(len(tokenizer))) "
                         "and saved beside it")
    if outside and warn:
        inside = [int(token) for token in stop_ids if int(token) < vocab]
        warnings.warn(f"the stop token id(s) {outside} have no row in the model's vocabulary of {vocab} ids and can "
                      f"never be sampled; responses end at the others ({inside})", stacklevel=3)


def model_vocab_size(model) -> int | None:
    """The number of token ids the input embedding of a model (or its ``transformers`` config) has rows for, or None
    when it declares none."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embedding, "num_embeddings", None), int):
        return embedding.num_embeddings
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def check_prompts_fit(model, prompt_ids, sources, *, max_new_tokens: int, pad_token_id: int | None = None) -> None:
    """``ValueError`` listing every prompt that encodes to no tokens, or whose tokens plus ``max_new_tokens``
    exceed the context of ``model`` (a model or its config, :func:`model_context_length`): prompts are never
    truncated, since a cut prompt is a different question. Before that, :func:`check_prompt_ids_in_vocabulary`."""
    check_prompt_ids_in_vocabulary(model, prompt_ids, sources, pad_token_id=pad_token_id)
    context = model_context_length(model)
    problems = []
    for ids, source in zip(prompt_ids, sources):
        if not len(ids):
            problems.append(f"{source}: the prompt encodes to zero tokens")
        elif context is not None and len(ids) + max_new_tokens > context:
            problems.append(f"{source}: {len(ids)} prompt tokens + max_new_tokens {max_new_tokens} > context {context}")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} prompt(s) do not fit the model's context:\n  {shown}{more}\n"
                         "Shorten them, filter them out, or lower max_new_tokens.")


def check_prompt_ids_in_vocabulary(model, prompt_ids, sources, *, pad_token_id: int | None = None) -> None:
    """``ValueError`` naming the prompts with a token id past the input embedding of ``model`` (a model or its
    config), and a ``pad_token_id`` past it: a tokenizer given tokens the model was not resized for."""
    vocab = model_vocab_size(model)
    if vocab is None:
        return
    outside = [f"{source}: token id {max(ids)}" for ids, source in zip(prompt_ids, sources) if len(ids) and max(ids) >= vocab]
    if pad_token_id is not None and pad_token_id >= vocab:
        outside.insert(0, f"the tokenizer's padding token: id {pad_token_id}")
    if outside:
        shown = "\n  ".join(outside[:10])
        more = f"\n  ... and {len(outside) - 10} more" if len(outside) > 10 else ""
        raise ValueError(f"the model's input embedding has {vocab} rows (token ids 0-{vocab - 1}), and the tokenizer "
                         f"gives larger ids:\n  {shown}{more}\nA tokenizer given tokens after the model was saved "
                         "needs the model's embeddings resized (model.resize_token_embeddings(len(tokenizer))) and "
                         "saved beside it.")


def unknown_token_note(tokenizer, prompt_ids, records, *, what: str, template: str = "{prompt}") -> str | None:
    """A sentence naming the prompts whose tokens hold the tokenizer's unknown token (``<unk>``: a character its
    vocabulary cannot write, which the model then sees as one and the same token whatever it was), the first one's
    source and the characters of it that turn into it, and those of the prompt ``template`` (``{prompt}`` in it
    stands for the prompt); None when there are none, or the tokenizer has no such token. ``records`` are the
    prompts' :class:`entrorl.data.PromptRecord` (their text and source), ``what`` names the set."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return None
    hit = [record for ids, record in zip(prompt_ids, records) if unknown in ids]
    if not hit:
        return None
    first = hit[0]

    def unwritable(text: str) -> list[str]:
        return [character for character in dict.fromkeys(text)
                if unknown in tokenizer(character, add_special_tokens=False)["input_ids"]]

    def shown(characters: list[str]) -> str:
        return " ".join(repr(character) for character in characters[:10]) + (" ..." if len(characters) > 10 else "")

    # the whole conversation of a prompt given as chat messages: any turn of it may hold such a character
    text = first.prompt if getattr(first, "messages", None) is None else "".join(
        str(message.get("content", "")) for message in first.messages)
    in_template, in_prompt = unwritable(template.format(prompt="")), unwritable(text)
    note = (f"{len(hit)} of the {len(prompt_ids)} prompts of {what} hold text the tokenizer turns into its unknown "
            f"token {tokenizer.unk_token!r} (the model sees one token for any such character); the first is "
            f"{first.source}" + (f", whose {shown(in_prompt)} the vocabulary cannot write" if in_prompt else ""))
    if not in_template:
        return f"{note}: check the data's encoding, or use a tokenizer that covers these characters"
    template_part = (f"the prompt template {template!r} holds {shown(in_template)}, which "
                     + ("it cannot write either" if in_prompt else "the vocabulary cannot write"))
    advice = "change the template" + (" and check the data's encoding" if in_prompt else "")
    return f"{note}{'; ' if in_prompt else ', '}{template_part}: {advice}, or use a tokenizer that covers these characters"


def cache_argument(module) -> str:
    """The name under which ``module``'s forward takes a key/value cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (the old name still works there, with a deprecation warning). A peft wrapper, whose
    forward takes ``**kwargs`` on to the model it wraps, is asked about that model."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return _cache_argument_of(type(base))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(module_class: type) -> str:  # read once per class: scoring asks on every forward call
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def logits_to_keep(module, count: int) -> dict[str, int]:
    """``{"logits_to_keep": count}`` for a forward that takes it (transformers' causal LMs), so that it computes the
    logits of the last ``count`` positions only; ``{}`` for one that does not (a model's own code written before the
    argument, ``trust_remote_code``), whose caller then takes those positions from the whole logits. A peft wrapper is
    asked about the model it wraps, as are ``torch.compile``'s and data-parallel wrappers (``_orig_mod``, ``module``),
    whose forward passes every argument on."""
    return {"logits_to_keep": count} if _forwards_logits_to_keep(module) else {}


def _forwards_logits_to_keep(module) -> bool:
    if _takes_logits_to_keep(type(module)):
        return True
    wrapped = (module.get_base_model() if hasattr(module, "get_base_model") else None, getattr(module, "_orig_mod", None),
               getattr(module, "module", None))
    inner = next((candidate for candidate in wrapped if isinstance(candidate, torch.nn.Module) and candidate is not module),
                 None)
    return inner is not None and _forwards_logits_to_keep(inner)


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(module_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(module_class.forward).parameters


def output_cache(output):
    """The key/value cache a forward with ``use_cache=True`` returned, under either name (see :func:`cache_argument`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def left_pad(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as ``[rows, longest]`` ids, each row right-aligned after ``pad_id`` padding, and the
    bool mask of its real tokens (the layout a causal LM continues from)."""
    width = max((len(sequence) for sequence in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = True
    return ids, mask


def _backbone(model):
    """The decoder stack under the output layer (a transformers CausalLM's ``model``), reached through a wrapper too:
    a peft ``PeftModel`` forwards ``get_decoder`` to the model it wraps, where its own ``.model`` is the whole CausalLM."""
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else None
    return backbone if backbone is not None and backbone is not model else None


def _uses_fused_head(model) -> bool:
    """Whether the statistics can come from the final hidden states and the head's weight: a plain-linear-head
    architecture whose head is a plain ``nn.Linear`` (not a LoRA layer, which computes more than ``hidden @ W^T``)."""
    if getattr(model.config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES or _backbone(model) is None:
        return False
    # a peft prompt-learning wrapper (prompt or prefix tuning) adds its virtual tokens in its own forward, which a call
    # of the backbone would skip
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    get_head = getattr(model, "get_output_embeddings", None)
    return callable(get_head) and type(get_head()) is torch.nn.Linear


def response_token_stats(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need=("logprob", "entropy"),
    fused_head: bool | None = None,
) -> TokenStats:
    """Statistics of the response tokens under ``model`` (one forward over prompt + response).

    For plain-linear-head architectures the statistics come from the final hidden states and the LM head
    (:func:`token_stats_from_hidden`), so the ``[B, R, V]`` logits are never built; otherwise from logits of
    the response positions only. Differentiable when grad is enabled.
    """
    reset_dynamic_rope(model)  # a dynamic-NTK rotation would otherwise be the longest earlier call's
    device = next(model.parameters()).device
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    attention = torch.cat([prompt_mask, response_mask], dim=1).to(device).long()
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    prompt_width, response_width = prompt_ids.shape[1], response_ids.shape[1]
    targets = response_ids.to(device)
    mask = response_mask.to(device)
    if fused_head is None:
        fused_head = _uses_fused_head(model)
    if fused_head:
        hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention, position_ids=positions).last_hidden_state
        hidden = hidden[:, prompt_width - 1 : prompt_width + response_width - 1]
        return _stats_through_head(model, hidden, targets, mask, temperature=temperature, need=need)
    kept = response_width + 1  # the last prompt position and the response's: those that predict a response token
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                   **logits_to_keep(model, kept)).logits[:, -kept:-1]
    return token_stats(logits, targets, temperature=temperature, mask=mask, need=need)


def _stats_through_head(model, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, temperature: float,
                        need) -> TokenStats:
    """Statistics of ``targets`` from the final hidden states that predict them, through the model's LM head."""
    head = model.get_output_embeddings()
    return token_stats_from_hidden(hidden, head.weight, targets, lm_head_bias=head.bias, temperature=temperature,
                                   mask=mask, need=need)


def length_buckets(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, *, max_buckets: int = 8,
                   overhead_tokens: int = 1024) -> list[torch.Tensor]:
    """Rows grouped by length so that each group's forward pass pads only to its own longest row.

    Rows are sorted by prompt + response length and cut into ``k`` groups of equal size, ``k`` in
    ``1, 2, 4, ... <= max_buckets``, choosing the ``k`` that minimises the padded positions of all groups
    (``sum_g rows_g * (max prompt_g + max response_g)``) plus ``overhead_tokens`` per extra forward pass.
    Returns the row indices of each group (their concatenation is a permutation of all rows).
    """
    rows = prompt_lengths.shape[0]
    order = torch.argsort(prompt_lengths + response_lengths, stable=True)
    best, best_cost = [order], None
    k = 1
    while k <= max(1, min(max_buckets, rows)):
        groups = [group for group in order.chunk(k) if group.numel()]
        padded = sum(group.numel() * int(prompt_lengths[group].max() + response_lengths[group].max()) for group in groups)
        cost = padded + overhead_tokens * (len(groups) - 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = groups, cost
        k *= 2
    return best


def length_dependent_rope(model) -> tuple[str, int] | None:
    """``(rope type, original context)`` when the model's RoPE frequencies depend on the length of the sequence a
    forward call holds: ``longrope`` (Phi-3's long-context scaling: long factors for every position once the call's
    longest sequence passes the original context) or ``dynamic`` (NTK scaling that grows with that length). None
    for any other model. ``transformers`` takes the length from the largest position id of the call."""
    config = getattr(model, "config", None)
    parameters = getattr(config, "rope_parameters", None) or {}
    if not isinstance(parameters, dict):
        return None
    # one set of parameters, or one per layer type (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}})
    candidates = [value for value in parameters.values() if isinstance(value, dict)] or [parameters]
    for candidate in candidates:
        rope_type = str(candidate.get("rope_type", ""))
        kind = next((kind for kind in ("longrope", "dynamic") if kind in rope_type), None)
        if kind is None:
            continue
        original = (candidate.get("original_max_position_embeddings")
                    or getattr(config, "original_max_position_embeddings", None) or getattr(config, "max_position_embeddings", None))
        if original:
            return kind, int(original)
    return None


def reset_dynamic_rope(model) -> None:
    """Put every dynamic-NTK rotary module back on its original frequencies. ``transformers`` grows them with the
    longest call so far and shrinks them back only after a call shorter than the original context, so without this a
    row's rotation would depend on the calls before it (the sampler's, a longer row's). A module with one RoPE per
    layer type (Gemma 3) keeps each type's frequencies under the type's name. Does nothing for other models."""
    rope = length_dependent_rope(model)
    if rope is None or rope[0] != "dynamic":
        return
    for module in model.modules():
        rope_types = getattr(module, "rope_type", None)
        original_length = getattr(module, "original_max_seq_len", None)
        if rope_types is None or not original_length:
            continue
        for layer_type, rope_type in rope_types.items() if isinstance(rope_types, dict) else [(None, rope_types)]:
            prefix = f"{layer_type}_" if layer_type else ""
            original = getattr(module, f"{prefix}original_inv_freq", None)
            current = getattr(module, f"{prefix}inv_freq", None)
            if "dynamic" in str(rope_type) and isinstance(original, torch.Tensor) and isinstance(current, torch.Tensor):
                module.register_buffer(f"{prefix}inv_freq", original.to(current.device), persistent=False)
                setattr(module, f"{prefix}max_seq_len_cached", original_length)


def _rope_safe_buckets(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, rope: tuple[str, int], *,
                       max_buckets: int, overhead_tokens: int) -> list[torch.Tensor]:
    """:func:`length_buckets` for a model with a :func:`length_dependent_rope`, so that each row gets the frequencies
    it gets alone: rows within the original context never share a pass with longer ones; beyond it, longrope rows
    (all on the long factors) are bucketed together, and dynamic-NTK rows (whose frequencies follow their own
    length) share a pass only with rows of the same length. (Each pass, :func:`response_token_stats`, puts a
    dynamic-NTK model back on its original frequencies first: :func:`reset_dynamic_rope`.)"""
    kind, original = rope
    totals = prompt_lengths + response_lengths
    groups = []
    for rows in ((totals <= original).nonzero().squeeze(-1), (totals > original).nonzero().squeeze(-1)):
        if not rows.numel():
            continue
        if kind == "dynamic" and bool(totals[rows[0]] > original):
            groups += [rows[totals[rows] == length] for length in torch.unique(totals[rows])]
        else:
            groups += [rows[group] for group in length_buckets(prompt_lengths[rows], response_lengths[rows],
                                                               max_buckets=max_buckets, overhead_tokens=overhead_tokens)]
    return groups


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct prompts of a batch: ``(first, inverse)`` where ``first[u]`` is the first row holding distinct
    prompt ``u`` and ``inverse[row]`` is the distinct prompt of ``row`` (rows are equal when their tokens and their
    padding are)."""
    keys = torch.where(prompt_mask.bool(), prompt_ids, -1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)
    first = torch.full((int(inverse.max()) + 1,), prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def shares_prompts(model) -> bool:
    """Whether :func:`bucketed_response_token_stats` can run ``model``'s prompts once per distinct prompt: a
    plain-linear-head architecture (:data:`FUSED_HEAD_MODEL_TYPES`) whose layers all use full attention, without
    gradient checkpointing (whose layers drop a cache passed to them) and without a :func:`length_dependent_rope`
    (the prompt pass alone would be shorter than its rows)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # the name from transformers 5.24 on
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing or length_dependent_rope(model) is not None:
        return False
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        full = all(kind == "full_attention" for kind in layer_types)
    else:
        full = not getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) is None
    return _uses_fused_head(model) and full


def bucketed_response_token_stats(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need=("logprob", "entropy"),
    max_buckets: int = 8,
    overhead_tokens: int = 1024,
    share_prompts: bool = True,
    prompt_pass_tokens: int = 256,
) -> TokenStats:
    """:func:`response_token_stats` computed per length group (:func:`length_buckets`), each group cut to its own
    widths, then put back in the rows' order and padded to the full response width (zeros on padding).

    A row's statistics do not depend on the other rows of its forward pass, so the result is the same as one
    pass over the whole batch (float rounding aside), with fewer padded positions computed: responses of very
    different lengths, as RL rollouts are, waste much of a single padded pass. (With a
    :func:`length_dependent_rope` they do depend on the longest row of the pass: such a model's rows are grouped
    so that each gets the frequencies it gets alone, see :func:`_rope_safe_buckets`.)

    With ``share_prompts`` (and a model that :func:`shares_prompts`), rows that repeat a prompt, as the G responses
    of a GRPO group do, run it once: one forward over the distinct prompts fills a key/value cache, and each
    group's responses are then run on top of their prompts' cached keys and values. The gradient flows through the
    cache into the prompt pass, so values and gradients are again those of one padded pass, for
    ``(rows - distinct prompts) x prompt length`` fewer token positions. The prompts are shared only when that
    saves more than ``prompt_pass_tokens`` positions, the cost of the extra forward pass (the fixed cost of one
    forward call is worth about 160 positions of arithmetic on the benchmark's 2-layer model with hidden size 64,
    and fewer on any larger model). Differentiable when grad is on.
    """
    prompt_lengths, response_lengths = prompt_mask.sum(-1), response_mask.sum(-1)
    rope = length_dependent_rope(model)
    if rope is None:
        groups = length_buckets(prompt_lengths, response_lengths, max_buckets=max_buckets, overhead_tokens=overhead_tokens)
    else:
        groups = _rope_safe_buckets(prompt_lengths, response_lengths, rope, max_buckets=max_buckets,
                                    overhead_tokens=overhead_tokens)
    width = response_ids.shape[1]
    prompt_pass = None
    if share_prompts and shares_prompts(model):
        first, inverse = prompt_groups(prompt_ids, prompt_mask)
        if int(prompt_lengths.sum() - prompt_lengths[first].sum()) > prompt_pass_tokens:
            prompt_pass = _distinct_prompt_pass(model, prompt_ids[first], prompt_mask[first])
    if len(groups) == 1 and prompt_pass is None:
        return response_token_stats(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=temperature,
                                    need=need)
    parts: dict[str, list[torch.Tensor]] = {}
    for group in groups:
        prompt_width = max(1, int(prompt_lengths[group].max()))
        response_width = max(1, int(response_lengths[group].max()))
        # prompts are left-padded and responses right-padded: keep the last / first columns
        group_prompt_ids, group_prompt_mask = prompt_ids[group, -prompt_width:], prompt_mask[group, -prompt_width:]
        group_response_ids, group_response_mask = response_ids[group, :response_width], response_mask[group, :response_width]
        if prompt_pass is None:
            stats = response_token_stats(model, group_prompt_ids, group_prompt_mask, group_response_ids,
                                         group_response_mask, temperature=temperature, need=need)
        else:
            stats = _response_stats_on_cached_prompts(
                model, prompt_pass, inverse[group], group_prompt_mask, group_response_ids, group_response_mask,
                temperature=temperature, need=need,
            )
        for name, values in stats.as_dict().items():
            parts.setdefault(name, []).append(torch.nn.functional.pad(values, (0, width - response_width)))
    inverse_order = torch.argsort(torch.cat(groups))
    return TokenStats(**{name: torch.cat(values)[inverse_order.to(values[0].device)] for name, values in parts.items()})


def _distinct_prompt_pass(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """One forward over left-padded prompts: per layer ``(keys, values)`` ``[U, H_kv, P, D]`` and the final hidden
    state of each prompt's last token ``[U, H]`` (which predicts the first response token)."""
    device = next(model.parameters()).device
    width = max(1, int(prompt_mask.sum(-1).max()))
    input_ids, attention = prompt_ids[:, -width:].to(device), prompt_mask[:, -width:].to(device).long()
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    output = _backbone(model)(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    layers = [(entry[0], entry[1]) for entry in output_cache(output)]
    return layers, output.last_hidden_state[:, -1]


def _response_stats_on_cached_prompts(model, prompt_pass, distinct: torch.Tensor, prompt_mask: torch.Tensor,
                                      response_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float,
                                      need) -> TokenStats:
    """Statistics of responses whose prompts (distinct prompt ``distinct[row]``, left-padded to ``prompt_mask``'s
    width) went through :func:`_distinct_prompt_pass`: their keys and values seed the cache of one forward over the
    responses."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    layers, last_prompt_hidden = prompt_pass
    distinct = distinct.to(device)
    prompt_width = prompt_mask.shape[1]
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[distinct, :, -prompt_width:], values[distinct, :, -prompt_width:], index)
    attention = torch.cat([prompt_mask, response_mask], dim=1).to(device).long()
    positions = prompt_mask.sum(-1, keepdim=True).to(device) + torch.arange(response_ids.shape[1], device=device)
    backbone = _backbone(model)
    hidden = backbone(input_ids=response_ids.to(device), attention_mask=attention, position_ids=positions,
                      use_cache=True, **{cache_argument(backbone): cache}).last_hidden_state
    # the hidden state before response token j: the prompt's last for j = 0, response token j - 1's after that
    hidden = torch.cat([last_prompt_hidden[distinct][:, None], hidden[:, :-1]], dim=1)
    return _stats_through_head(model, hidden, response_ids.to(device), response_mask.to(device), temperature=temperature,
                               need=need)
