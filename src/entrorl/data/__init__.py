"""Prompt data for RL fine-tuning: loading, a resumable prompt stream, and data selection.

* :func:`load_prompts` reads ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` and ``save_to_disk``
  directories into :class:`PromptRecord` s; malformed input raises :class:`DataError` naming the file
  and line / row. :func:`write_jsonl` writes records back, atomically.
* :class:`PromptStream` deals records in seeded epochs, endlessly and resumably.
* :func:`informative_groups` / :func:`group_pass_rates` implement DAPO dynamic sampling
  (arXiv 2503.14476); :func:`filter_by_pass_rate` / :func:`parse_band` keep prompts whose pass rate
  lies in a band (:func:`pass_rate_band_mask` marks them) such as ``[0.1, 0.5]`` or ``(1/16, 15/16)``.

This package depends only on torch, numpy and the standard library; ``pyarrow`` and ``datasets`` are
imported lazily, when a Parquet file or a saved data set is read.
"""

from entrorl.data.filters import (
    filter_by_pass_rate,
    group_pass_rates,
    informative_groups,
    parse_band,
    pass_rate_band_mask,
)
from entrorl.data.loading import SUPPORTED_FORMATS, load_prompts, write_jsonl
from entrorl.data.records import DataError, PromptRecord, check_prompt_template
from entrorl.data.stream import PromptStream

__all__ = [
    "SUPPORTED_FORMATS",
    "DataError",
    "PromptRecord",
    "PromptStream",
    "check_prompt_template",
    "filter_by_pass_rate",
    "group_pass_rates",
    "informative_groups",
    "load_prompts",
    "parse_band",
    "pass_rate_band_mask",
    "write_jsonl",
]
