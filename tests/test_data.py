"""Tests for entrorl.data: loaders (every format, every malformed input), PromptStream, dynamic
sampling helpers, pass-rate band filtering, and write_jsonl."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from entrorl.data import (
    DataError,
    PromptRecord,
    PromptStream,
    filter_by_pass_rate,
    group_pass_rates,
    informative_groups,
    load_prompts,
    parse_band,
    pass_rate_band_mask,
    write_jsonl,
)

ROWS = [
    {"question": "What is 1+1?", "solution": "2", "level": 1, "tags": ["easy"]},
    {"question": "Solve x^2 = 4.", "solution": "\\{-2, 2\\}", "level": 3, "tags": []},
    {"question": "Ünïcode — 半分は?", "solution": "1/2", "level": 2, "tags": ["frac", "cjk"]},
]
COLS = dict(prompt_column="question", answer_column="solution")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_rows(records: list[PromptRecord], rows=ROWS, meta_keys=("level", "tags")):
    assert [r.prompt for r in records] == [row["question"] for row in rows]
    assert [r.answer for r in records] == [row["solution"] for row in rows]
    assert [r.meta for r in records] == [{k: row[k] for k in meta_keys} for row in rows]


# --------------------------------------------------------------------------------------------------
# format round trips
# --------------------------------------------------------------------------------------------------


def test_jsonl_round_trip_with_blank_lines_and_sources(tmp_path):
    p = tmp_path / "file.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1], ensure_ascii=False), json.dumps(ROWS[2])]
    write_lines(p, lines)
    recs = load_prompts(p, **COLS)
    check_rows(recs)
    assert [r.source for r in recs] == [f"{p}:1", f"{p}:4", f"{p}:5"]
    assert all(isinstance(r, PromptRecord) for r in recs)


def test_jsonl_crlf_and_bom(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    check_rows(load_prompts(p, **COLS))


def test_json_list_round_trip(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    recs = load_prompts(p, **COLS)
    check_rows(recs)
    assert [r.source for r in recs] == [f"{p}[0]", f"{p}[1]", f"{p}[2]"]


def test_json_data_object_round_trip(tmp_path):
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": ROWS, "version": 2}), encoding="utf-8")
    check_rows(load_prompts(p, **COLS))


def test_csv_round_trip_with_multiline_field(tmp_path):
    p = tmp_path / "data.csv"
    rows = [
        {"question": "line one\nline two, with comma", "solution": "7", "level": "1"},
        {"question": 'He said "hi"', "solution": "x", "level": "2"},
    ]
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["question", "solution", "level"])
        w.writeheader()
        for r in rows:
            w.writerow(r)
    recs = load_prompts(p, **COLS)
    assert [r.prompt for r in recs] == [r["question"] for r in rows]
    assert [r.answer for r in recs] == ["7", "x"]
    assert [r.meta for r in recs] == [{"level": "1"}, {"level": "2"}]  # CSV values stay strings
    # the first record spans lines 2-3, so the second starts on line 4
    assert [r.source for r in recs] == [f"{p}:2", f"{p}:4"]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    recs = load_prompts(p, **COLS)
    check_rows(recs)
    assert recs[1].source == f"{p}[1]"
    # one row per row group: every row group is read, in order
    groups = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), groups, row_group_size=1)
    assert pq.ParquetFile(groups).num_row_groups == len(ROWS)
    recs = load_prompts(groups, **COLS)
    check_rows(recs)
    assert [r.source for r in recs] == [f"{groups}[0]", f"{groups}[1]", f"{groups}[2]"]


def test_parquet_numeric_answers_and_null_meta(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "nums.parquet"
    table = pa.table({"q": ["a", "b"], "ans": [42, 7], "score": [0.5, float("nan")], "note": ["n", None],
                      "peak": [float("inf"), float("-inf")]})
    pq.write_table(table, p)
    recs = load_prompts(p, prompt_column="q", answer_column="ans")
    assert [r.answer for r in recs] == ["42", "7"]
    assert recs[0].meta == {"score": 0.5, "note": "n", "peak": None}  # infinities become null too
    assert recs[1].meta == {"score": None, "note": None, "peak": None}  # NaN becomes null


def test_float32_and_float16_columns_read_as_the_numbers_written(tmp_path):
    """A float32 (or float16) answer or meta column reads as the number written, as the same value in a JSON file does:
    0.1, not its float64 widening 0.10000000149011612, which no reward would match; in Parquet, Arrow and a saved
    data set alike."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    table = pa.table({"prompt": ["a", "b", "c"], "answer": pa.array([0.1, 2.675, float("nan")], type=pa.float32()),
                      "weight": pa.array([0.1, 1.5, None], type=pa.float16()),
                      "score": pa.array([0.3, float("inf"), 1.0], type=pa.float32())})
    parquet, saved = tmp_path / "f32.parquet", tmp_path / "f32_saved"
    pq.write_table(table, parquet)
    datasets.Dataset(table).save_to_disk(str(saved))
    jsonl = tmp_path / "f32.jsonl"
    jsonl.write_text('{"prompt": "a", "answer": 0.1, "weight": 0.1, "score": 0.3}\n')
    for path in (parquet, saved):
        recs = load_prompts(path, require_answer=False)
        assert [r.answer for r in recs] == ["0.1", "2.675", None]
        assert [r.meta for r in recs] == [{"weight": 0.1, "score": 0.3}, {"weight": 1.5, "score": None},
                                          {"weight": None, "score": 1.0}]
        assert recs[0].answer == load_prompts(jsonl)[0].answer


@pytest.mark.parametrize("name, text", [("huge.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "x=", "answer": N}\n'),
                                         ("huge.json", '[{"prompt": "x=", "answer": N}]')])
def test_a_number_too_long_for_python_is_a_data_error_naming_the_file(tmp_path, name, text):
    """json reads a whole number of over 4300 digits as a ValueError, not a JSONDecodeError: it is a DataError naming
    the file (and line) with the way to keep it, not a bare error without a place."""
    path = tmp_path / name
    path.write_text(text.replace("N", "9" * 5000))
    where = f"{path}:2" if name.endswith(".jsonl") else str(path)
    with pytest.raises(DataError, match=rf"^{re.escape(where)}: a number too long to read \(Exceeds the limit .*write it "
                                        r"as a string, in quotes"):
        load_prompts(path)


def test_arrow_file_and_stream(tmp_path):
    """An Arrow IPC file, an IPC stream, and the .arrow shard that datasets.save_to_disk writes."""
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(ROWS)
    for name, writer in (("file.arrow", pa.ipc.new_file), ("stream.arrow", pa.ipc.new_stream)):
        p = tmp_path / name
        with pa.OSFile(str(p), "wb") as sink, writer(sink, table.schema) as out:
            out.write_table(table)
        recs = load_prompts(p, **COLS)
        check_rows(recs)
        assert recs[2].source == f"{p}[2]"
    # a table written in several record batches: the rows of every batch are read, in order
    p = tmp_path / "batches.arrow"
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
        for batch in table.to_batches(max_chunksize=1):
            out.write_batch(batch)
    recs = load_prompts(p, **COLS)
    check_rows(recs)
    assert [r.source for r in recs] == [f"{p}[0]", f"{p}[1]", f"{p}[2]"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (shard,) = (tmp_path / "saved").glob("*.arrow")
    check_rows(load_prompts(shard, **COLS))
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"broken\.arrow: cannot be read as Arrow IPC"):
        load_prompts(broken, **COLS)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    d1 = tmp_path / "ds"
    ds.save_to_disk(str(d1))
    recs = load_prompts(d1, **COLS)
    check_rows(recs)
    assert recs[2].source == f"{d1}[2]"

    d2 = tmp_path / "dsdict"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(d2))
    check_rows(load_prompts(d2, **COLS))

    d3 = tmp_path / "nodtrain"
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(d3))
    with pytest.raises(DataError) as e:
        load_prompts(d3, **COLS)
    msg = str(e.value)
    assert "'train'" in msg and "'validation'" in msg and "'test'" in msg


def test_dataset_dict_contributes_its_train_split_whatever_the_split_order(tmp_path):
    """The 'train' split is read even when it is not the first split saved."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    d = tmp_path / "testfirst"
    datasets.DatasetDict({"test": ds.select([0]), "train": ds}).save_to_disk(str(d))
    check_rows(load_prompts(d, **COLS))


def test_held_out_data_saved_as_a_dataset_dict_of_several_splits_is_refused_naming_them(tmp_path):
    """Evaluation data (data.eval, `entrorl eval --data`) read with split=None: a DatasetDict of one split gives it,
    one of several is refused naming them and a split's sub-directory (its 'train' split, the training prompts, was
    evaluated without a word), which can be given instead."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    several = tmp_path / "several"
    datasets.DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(several))
    with pytest.raises(DataError, match=r"a saved DatasetDict of several splits \('train', 'test'\); point at the "
                                        r"split to evaluate on, its sub-directory"):
        load_prompts(several, split=None, **COLS)
    check_rows(load_prompts(several / "test", split=None, **COLS))
    only = tmp_path / "only"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(only))
    check_rows(load_prompts(only, split=None, **COLS))
    assert len(load_prompts(several, **COLS)) == 1  # training data: the 'train' split, as before


def test_directory_that_is_not_a_dataset(tmp_path):
    d = tmp_path / "plain_dir"
    d.mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_prompts(d)
    # a state.json of some other tool (no "_data_files" list) is not a data set saved without rows
    (d / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain_dir: a directory that is not a saved data set"):
        load_prompts(d)


@pytest.mark.parametrize("output_format", ["numpy", "torch", "pandas", "arrow"])
def test_a_saved_data_set_with_an_output_format_gives_python_answers_and_meta(tmp_path, output_format):
    """A data set saved with an output format (numpy, torch, pandas, arrow: a view of its rows) loads as one saved
    without it: an integer answer becomes its string, and list columns (ragged ones too) plain nested lists."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path / f"{output_format}_format"
    rows = [{"prompt": "a", "answer": 3, "steps": [[1, 2], [3]], "tags": ["x", "y"]},
            {"prompt": "b", "answer": 4, "steps": [[4]], "tags": []}]
    datasets.Dataset.from_list(rows).with_format(output_format).save_to_disk(str(d))
    recs = load_prompts(d)
    assert [(r.prompt, r.answer, r.source) for r in recs] == [("a", "3", f"{d}[0]"), ("b", "4", f"{d}[1]")]
    assert [r.meta for r in recs] == [{"steps": [[1, 2], [3]], "tags": ["x", "y"]}, {"steps": [[4]], "tags": []}]
    assert json.loads(json.dumps([r.meta for r in recs])) == [r.meta for r in recs]


def test_csv_and_json_with_a_byte_order_mark(tmp_path):
    """A UTF-8 byte order mark at the start of a CSV or JSON file is not part of the first column name or value."""
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbfprompt,answer\na,1\n")
    assert [(r.prompt, r.answer, r.source) for r in load_prompts(c)] == [("a", "1", f"{c}:2")]
    j = tmp_path / "bom.json"
    j.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"prompt": "a", "answer": "1"}]).encode())
    assert [(r.prompt, r.answer) for r in load_prompts(j)] == [("a", "1")]


def test_parquet_decimal_answers_and_typed_meta_columns(tmp_path):
    """A decimal answer is a number (kept as its string); dates and times in meta become ISO strings, decimals
    strings, and a map column a list of [key, value] pairs."""
    import datetime
    import decimal

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "typed.parquet"
    pq.write_table(pa.table({
        "prompt": ["a"],
        "answer": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)),
        "when": [datetime.datetime(2024, 1, 2, 3, 4, 5)],
        "day": [datetime.date(2024, 1, 2)],
        "at": [datetime.time(3, 4, 5)],
        "price": pa.array([decimal.Decimal("0.10")], pa.decimal128(5, 2)),
        "counts": pa.array([[("k", 1), ("j", 2)]], pa.map_(pa.string(), pa.int64())),
    }), p)
    (rec,) = load_prompts(p)
    assert rec.answer == "1.50"
    assert rec.meta == {"when": "2024-01-02T03:04:05", "day": "2024-01-02", "at": "03:04:05", "price": "0.10",
                        "counts": [["k", 1], ["j", 2]]}
    json.dumps(rec.meta)  # every value is JSON-able


def test_arrow_and_parquet_files_with_a_repeated_column_name(tmp_path):
    """Two columns of the same name are refused by name, before any row is read, in an Arrow file and in a Parquet
    one (where pyarrow's own reader fails with a message about field references)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["1"]), pa.array(["b"])], names=["prompt", "answer", "prompt"])
    p = tmp_path / "dup.arrow"
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
        out.write_table(table)
    with pytest.raises(DataError, match=r"dup\.arrow \(schema\): repeated column name\(s\) 'prompt'"):
        load_prompts(p)
    q = tmp_path / "dup.parquet"
    pq.write_table(table, q)
    with pytest.raises(DataError, match=r"dup\.parquet \(schema\): repeated column name\(s\) 'prompt'; expected unique"):
        load_prompts(q)


def test_saved_dataset_without_the_prompt_column_names_the_columns(tmp_path):
    """A saved data set is checked column by column before its rows, as a Parquet file is: the error is the
    schema's, naming the missing column and the columns there are."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    with pytest.raises(DataError, match=r"saved \(schema\): no prompt column 'prompt'.*'question'"):
        load_prompts(d, answer_column="solution")
    with pytest.raises(DataError, match=r"saved \(schema\): meta column\(s\) 'lvl' not found"):
        load_prompts(d, meta_columns=["lvl"], **COLS)


def test_saved_dataset_columns_left_out_by_meta_columns_are_not_decoded(tmp_path):
    """An image column that cannot be decoded does not stop a saved data set from loading when meta_columns leaves
    it out (it is never read)."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("PIL")
    d = tmp_path / "images"
    features = datasets.Features(prompt=datasets.Value("string"), answer=datasets.Value("string"), image=datasets.Image())
    datasets.Dataset.from_dict({"prompt": ["a"], "answer": ["1"], "image": [{"bytes": b"not an image", "path": None}]},
                               features=features).save_to_disk(str(d))
    assert [(r.prompt, r.answer, r.meta) for r in load_prompts(d, meta_columns=[])] == [("a", "1", {})]


def test_saved_dataset_without_rows_is_an_empty_data_set(tmp_path):
    """A saved data set with no rows (which datasets.load_from_disk cannot read: no data file) is refused as an empty
    data set, like an empty file of any other format; so is a DatasetDict whose split to read has none (its 'train'
    split for training data, its only split for held-out data). An empty split beside the one read does not matter:
    that split alone is read. Held-out data of several splits is refused as such even when one is empty."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "empty"
    datasets.Dataset.from_list(ROWS).select([]).save_to_disk(str(d))
    with pytest.raises(DataError, match=r"empty: empty data set \(no records\)"):
        load_prompts(d, **COLS)
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS).select([])}).save_to_disk(str(splits))
    with pytest.raises(DataError, match=r"empty data set \(no records\)"):
        load_prompts(splits, **COLS)
    only = tmp_path / "only"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS).select([])}).save_to_disk(str(only))
    with pytest.raises(DataError, match=r"only: empty data set \(no records\)"):
        load_prompts(only, split=None, **COLS)
    mixed = tmp_path / "mixed"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS).select([])}).save_to_disk(str(mixed))
    assert len(load_prompts(mixed, **COLS)) == len(ROWS)
    with pytest.raises(DataError, match=r"mixed: a saved DatasetDict of several splits \('train', 'test'\)"):
        load_prompts(mixed, split=None, **COLS)
    empty_train = tmp_path / "empty_train"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS).select([]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(empty_train))
    with pytest.raises(DataError, match=r"empty_train: a saved DatasetDict of several splits"):
        load_prompts(empty_train, split=None, **COLS)
    assert len(load_prompts(empty_train / "test", split=None, **COLS)) == len(ROWS)
    (empty_train / "dataset_dict.json").write_text("{}")  # edited by hand: no listing of its splits
    with pytest.raises(DataError, match=r"empty_train: a saved DatasetDict whose dataset_dict.json lists no splits"):
        load_prompts(empty_train, **COLS)


def test_meta_columns_selection(tmp_path):
    p = tmp_path / "m.jsonl"
    write_lines(p, [json.dumps(r) for r in ROWS])
    recs = load_prompts(p, meta_columns=["level"], **COLS)
    assert [r.meta for r in recs] == [{"level": r["level"]} for r in ROWS]
    assert [r.meta for r in load_prompts(p, meta_columns=[], **COLS)] == [{}, {}, {}]


def test_a_meta_object_column_is_spread_into_the_meta_fields(tmp_path):
    """Records laid out as {prompt, answer, meta: {...}} (as reasoning_gym_records returns them, dumped as they are)
    give the reward the same keyword arguments as flat columns."""
    p = tmp_path / "nested.jsonl"
    write_lines(p, [json.dumps({"prompt": "q", "answer": "1", "level": 2, "meta": {"entry": {"x": [1, 2]}, "task": "t"}}),
                    json.dumps({"prompt": "r", "answer": "2", "meta": "plain text stays a column"})])
    recs = load_prompts(p)
    assert recs[0].meta == {"level": 2, "entry": {"x": [1, 2]}, "task": "t"}
    assert recs[1].meta == {"meta": "plain text stays a column"}
    write_lines(p, [json.dumps({"prompt": "q", "answer": "1", "task": "a", "meta": {"task": "b"}})])
    with pytest.raises(DataError, match=r"nested\.jsonl:1.*repeats the column\(s\) 'task'"):
        load_prompts(p)


def test_a_meta_object_column_is_spread_in_parquet_and_when_meta_columns_chooses_it(tmp_path):
    """A struct column called meta in a Parquet file is spread as a JSON object is; so is a meta object kept by
    naming it in meta_columns."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    q = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["1"], "level": [2], "meta": [{"task": "t", "size": 3}]}), q)
    assert [r.meta for r in load_prompts(q)] == [{"level": 2, "task": "t", "size": 3}]
    assert [r.meta for r in load_prompts(q, meta_columns=["meta"])] == [{"task": "t", "size": 3}]
    p = tmp_path / "nested.jsonl"
    write_lines(p, [json.dumps({"prompt": "q", "answer": "1", "level": 2, "meta": {"task": "t"}})])
    assert [r.meta for r in load_prompts(p, meta_columns=["meta"])] == [{"task": "t"}]


def test_a_meta_object_may_not_repeat_the_prompt_or_answer_column(tmp_path):
    """Keys of the nested meta object that name the prompt or answer column are refused, not silently kept."""
    p = tmp_path / "clash.jsonl"
    write_lines(p, [json.dumps({"prompt": "q", "answer": "1", "meta": {"answer": "2", "k": 1}})])
    with pytest.raises(DataError, match=r"clash\.jsonl:1.*repeats the column\(s\) 'answer'"):
        load_prompts(p)
    write_lines(p, [json.dumps({"question": "q", "answer": "1", "meta": {"question": "other"}})])
    with pytest.raises(DataError, match=r"clash\.jsonl:1.*repeats the column\(s\) 'question'"):
        load_prompts(p, prompt_column="question")


def test_numeric_answers_become_strings(tmp_path):
    p = tmp_path / "n.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": 3}', '{"prompt": "b", "answer": 2.5}', '{"prompt": "c", "answer": -1}',
                    '{"prompt": "d", "answer": 3.0}'])
    assert [r.answer for r in load_prompts(p)] == ["3", "2.5", "-1", "3.0"]  # str(value): a float keeps its ".0"


def test_answer_optional(tmp_path):
    p = tmp_path / "noans.jsonl"
    write_lines(p, ['{"prompt": "a"}', '{"prompt": "b", "answer": null}', '{"prompt": "c", "answer": "  "}'])
    recs = load_prompts(p, require_answer=False)
    assert [r.answer for r in recs] == [None, None, None]
    with pytest.raises(DataError, match=r"noans\.jsonl:1.*'answer'"):
        load_prompts(p)
    c = tmp_path / "noans.csv"
    c.write_text("prompt,topic\nhello,x\n", encoding="utf-8")
    assert load_prompts(c, require_answer=False)[0].answer is None
    with pytest.raises(DataError, match=r"noans\.csv:1.*no answer column 'answer'"):
        load_prompts(c)
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    q = tmp_path / "noans.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "level": [1, 2], "topic": ["x", "y"]}), q)
    recs = load_prompts(q, require_answer=False, meta_columns=["level"])
    assert [(r.prompt, r.answer, r.meta) for r in recs] == [("a", None, {"level": 1}), ("b", None, {"level": 2})]


def test_missing_and_empty_answers_are_told_apart(tmp_path):
    """A row without the answer column says 'missing'; a null answer says 'empty'."""
    p = tmp_path / "ans.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'])
    with pytest.raises(DataError, match=r"ans\.jsonl:2: answer column 'answer' is missing \(fields: 'prompt'\);"):
        load_prompts(p)
    write_lines(p, ['{"prompt": "a", "answer": null}'])
    with pytest.raises(DataError, match=r"ans\.jsonl:1: answer column 'answer' is empty;"):
        load_prompts(p)


def test_non_finite_answers(tmp_path):
    """A NaN answer is a missing answer; an infinite one is refused."""
    p = tmp_path / "nan.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": NaN}'])
    assert load_prompts(p, require_answer=False)[0].answer is None
    with pytest.raises(DataError, match=r"nan\.jsonl:1: answer column 'answer' is empty"):
        load_prompts(p)
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": -Infinity}'])
    with pytest.raises(DataError, match=r"nan\.jsonl:2: answer column 'answer' holds -inf; expected a string or a finite number"):
        load_prompts(p)


def test_extension_is_case_insensitive(tmp_path):
    """An upper-case extension picks the same loader."""
    p = tmp_path / "DATA.JSONL"
    write_lines(p, ['{"prompt": "a", "answer": "1"}'])
    (rec,) = load_prompts(p)
    assert (rec.prompt, rec.answer, rec.source) == ("a", "1", f"{p}:1")


def test_prompt_is_stored_unchanged(tmp_path):
    p = tmp_path / "ws.jsonl"
    write_lines(p, [json.dumps({"prompt": "  padded\n", "answer": " 4 "})])
    rec = load_prompts(p)[0]
    assert rec.prompt == "  padded\n" and rec.answer == " 4 "


# --------------------------------------------------------------------------------------------------
# malformed input
# --------------------------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"}', '{"prompt": "c", "answer": '])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert "file.jsonl:3" in str(e.value)
    assert "not valid JSON" in str(e.value)
    assert e.value.location == f"{p}:3" and e.value.path == str(p)
    assert isinstance(e.value, ValueError)


def test_non_object_line(tmp_path):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '["prompt", "b"]'])
    with pytest.raises(DataError, match=r"file\.jsonl:2: a JSON array where a JSON object was expected"):
        load_prompts(p)


def test_missing_prompt_column(tmp_path):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"question": "b", "answer": "2"}'])
    with pytest.raises(DataError, match=r"file\.jsonl:2: missing prompt column 'prompt'.*'question'"):
        load_prompts(p)


@pytest.mark.parametrize("value", ['""', '"   "', "null"])
def test_empty_prompt(tmp_path, value):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', "", f'{{"prompt": {value}, "answer": "2"}}'])
    with pytest.raises(DataError, match=r"file\.jsonl:3: prompt column 'prompt'") as e:
        load_prompts(p)
    assert "expected a non-empty string" in str(e.value)


def test_non_string_prompt(tmp_path):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": 5, "answer": "1"}'])
    with pytest.raises(DataError, match=r"file\.jsonl:1: prompt column 'prompt' holds a number"):
        load_prompts(p)


@pytest.mark.parametrize("column,value,kind", [
    (column, value, kind) for column in ("prompt", "answer")
    for value, kind in (("true", "a boolean"), ("[1, 2]", "an array"), ('{"a": 1}', "an object"))
    if (column, kind) != ("prompt", "an array")])  # a prompt's array is read as chat messages (below)
def test_a_prompt_or_answer_of_another_json_type_is_named_by_its_type(tmp_path, column, value, kind):
    p = tmp_path / "file.jsonl"
    fields = {"prompt": '"a"', "answer": '"1"', column: value}
    write_lines(p, [f'{{"prompt": {fields["prompt"]}, "answer": {fields["answer"]}}}'])
    with pytest.raises(DataError, match=rf"file\.jsonl:1: {column} column '{column}' holds {kind}[ ;]"):
        load_prompts(p)


def test_missing_meta_column(tmp_path):
    p = tmp_path / "file.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1", "level": 1}', '{"prompt": "b", "answer": "2"}'])
    with pytest.raises(DataError, match=r"file\.jsonl:2: meta column\(s\) 'level' missing"):
        load_prompts(p, meta_columns=["level"])
    c = tmp_path / "file.csv"
    c.write_text("prompt,answer\na,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"file\.csv:1 \(header\): meta column\(s\) 'level' not found"):
        load_prompts(c, meta_columns=["level"])


def test_missing_columns_in_columnar_formats(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["1"]}), p)
    with pytest.raises(DataError, match=r"x\.parquet \(schema\): no prompt column 'prompt'.*'question'"):
        load_prompts(p)
    with pytest.raises(DataError, match=r"x\.parquet \(schema\): meta column\(s\) 'lvl' not found"):
        load_prompts(p, prompt_column="question", meta_columns=["lvl"])


def test_null_answer_in_parquet_names_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), p)
    with pytest.raises(DataError, match=r"x\.parquet\[1\]: answer column 'answer' is empty"):
        load_prompts(p)


def test_non_jsonable_meta_in_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["1"], "blob": [b"\x00\x01"]}), p)
    with pytest.raises(DataError, match=r"b\.parquet\[0\]: column 'blob' holds a bytes value"):
        load_prompts(p)
    assert load_prompts(p, meta_columns=[])[0].meta == {}


def test_not_a_parquet_file(tmp_path):
    p = tmp_path / "fake.parquet"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot be read as Parquet"):
        load_prompts(p)
    # a Parquet file whose footer is damaged: pyarrow raises a plain OSError ("Couldn't deserialize thrift")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 20, "answer": ["1"] * 20}), damaged)
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-12] + data[-8:])  # four bytes of the footer's metadata cut out
    with pytest.raises(DataError, match=r"(?s)damaged\.parquet: cannot be read as Parquet \(.*\); expected a Parquet file"):
        load_prompts(damaged)


def test_empty_files(tmp_path):
    for name, content in [("e.jsonl", ""), ("b.jsonl", "\n\n  \n"), ("e.csv", ""), ("h.csv", "prompt,answer\n"),
                          ("l.json", "[]"), ("d.json", '{"data": []}')]:
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match="empty data set") as e:
            load_prompts(p)
        assert name in str(e.value)
    p = tmp_path / "z.json"
    p.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"z\.json: empty file"):
        load_prompts(p)


def test_empty_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), p)
    with pytest.raises(DataError, match=r"e\.parquet: empty data set"):
        load_prompts(p)


def test_unsupported_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_prompts(p)
    msg = str(e.value)
    assert "data.txt" in msg and "'.txt'" in msg
    for fmt in (".jsonl", ".json", ".csv", ".parquet", "save_to_disk"):
        assert fmt in msg
    q = tmp_path / "noext"
    q.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="no extension"):
        load_prompts(q)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_prompts(p)
    assert str(e.value) == f"prompt data not found: {p}" and e.value.filename == str(p)


def test_missing_relative_file_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_prompts("data/nope.jsonl")
    assert str(e.value) == (f"prompt data not found: data/nope.jsonl (looked for {tmp_path / 'data' / 'nope.jsonl'}: "
                            "a relative path is taken from the working directory)")
    import pickle

    monkeypatch.chdir(tmp_path.parent)  # as a worker process would report it: the same message, wherever it is read
    copy = pickle.loads(pickle.dumps(e.value))
    assert str(copy) == str(e.value) and copy.filename == "data/nope.jsonl" and isinstance(copy, FileNotFoundError)


def test_json_shapes(tmp_path):
    cases = [
        ('{"rows": []}', r"without a \"data\" field.*'rows'"),
        ('{"data": 3}', r"\"data\" holds a JSON number"),
        ('{"data": {"prompt": "a", "answer": "1"}}', r"\"data\" holds a JSON object; expected a list of objects"),
        ('"text"', r"top level is a JSON string"),
        ('[{"prompt": "a", "answer": "1"}, 7]', r"\[1\]: row 1 is a JSON number; expected a JSON object"),
        ('[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]', r"bad\.json:2: not valid JSON"),
    ]
    for text, pattern in cases:
        p = tmp_path / "bad.json"
        p.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=pattern):
            load_prompts(p)
    p = tmp_path / "row.json"
    p.write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"row\.json\[1\]: prompt column 'prompt' is empty"):
        load_prompts(p)


def test_csv_malformations(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,answer\na,1\nb,2,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: 3 field\(s\); expected 2 as in the header on line 1"):
        load_prompts(p)
    p.write_text("prompt,prompt\na,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:1: header repeats column name"):
        load_prompts(p)
    p.write_text("prompt, ,answer\na,x,1\n", encoding="utf-8")  # a name of spaces only is no name
    with pytest.raises(DataError, match=r"bad\.csv:1: header field 2 is empty"):
        load_prompts(p)
    p.write_text("prompt,answer\na,1\n,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: prompt column 'prompt' is empty"):
        load_prompts(p)
    p.write_text("prompt,answer\na,1\n,\n", encoding="utf-8")  # a record of empty fields is a record, not a blank line
    with pytest.raises(DataError, match=r"bad\.csv:3: prompt column 'prompt' is empty"):
        load_prompts(p)
    p.write_text("prompt,answer\na,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:2: answer column 'answer' is empty"):
        load_prompts(p)
    # an unclosed quote would take the rest of the file as one field: named at the line its record starts on
    p.write_text('prompt,answer\nWhat is 1+1?,2\nWhat is 2+2?,"4\nWhat is 3+3?,6\nWhat is 4+4?,8\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: malformed CSV \(unexpected end of data\); expected "
                                        r"comma-separated fields with balanced quotes"):
        load_prompts(p)
    p.write_text('prompt,answer\n"What is 2+2?"x,4\n', encoding="utf-8")  # text after a closing quote
    with pytest.raises(DataError, match=r"bad\.csv:2: malformed CSV"):
        load_prompts(p)
    p.write_text('prompt,answer\nsay "hi",1\n"a ""quoted"" word",2\n', encoding="utf-8")  # quotes inside fields stay
    assert [record.prompt for record in load_prompts(p)] == ['say "hi"', 'a "quoted" word']


def test_a_json_object_that_repeats_a_key_is_refused_as_a_csv_header_is(tmp_path):
    lines = tmp_path / "repeated.jsonl"
    lines.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "4", "answer": "5"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"repeated\.jsonl:2: an object repeats the key 'answer'; expected unique keys"):
        load_prompts(lines)
    whole = tmp_path / "repeated.json"
    whole.write_text('{"data": [{"prompt": "a", "answer": "1", "meta": {"x": 1, "x": 2}}]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"repeated\.json\[0\]: an object repeats the key 'x'") as refused:
        load_prompts(whole)
    assert refused.value.location == f"{whole}[0]"
    whole.write_text('[{"prompt": "a", "answer": "1"},\n {"prompt": "b", "answer": "4", "answer": "3"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"repeated\.json\[1\]: an object repeats the key 'answer'") as refused:
        load_prompts(whole)
    assert refused.value.location == f"{whole}[1]"
    whole.write_text('{"data": [{"prompt": "a", "answer": "1"}], "data": []}', encoding="utf-8")  # no row to name
    with pytest.raises(DataError, match=r"repeated\.json: an object repeats the key 'data'"):
        load_prompts(whole)
    whole.write_text('{"data": [{"prompt": "a", "answer": "1"}], "about": {"v": 1, "v": 2}}', encoding="utf-8")
    with pytest.raises(DataError, match=r"repeated\.json: an object repeats the key 'v'"):
        load_prompts(whole)


def test_a_lone_surrogate_is_refused_with_its_row_and_a_surrogate_pair_is_read(tmp_path):
    """JSON's ``\\ud800`` escape decodes to half of a UTF-16 pair, which no UTF-8 text can hold (the tokenizer, the
    samples and the checkpoints would each fail on it later): refused at load, naming the row, the column and where;
    both halves of a pair are one character."""
    lines = tmp_path / "lone.jsonl"
    lines.write_text('{"prompt": "ok \\ud83d\\ude00 x=", "answer": "1"}\n{"prompt": "x=", "answer": "1 \\ud800"}\n',
                     encoding="utf-8")
    with pytest.raises(DataError, match=r"lone\.jsonl:2: column 'answer' holds a lone surrogate \(\\ud800, at "
                                        r"character 2\): half of a UTF-16 pair") as refused:
        load_prompts(lines)
    assert refused.value.location == f"{lines}:2"
    lines.write_text('{"prompt": "ok \\ud83d\\ude00 x=", "answer": "1"}\n', encoding="utf-8")
    assert load_prompts(lines)[0].prompt == "ok \U0001f600 x="
    whole = tmp_path / "lone.json"
    for row in ('{"prompt": "\\udfff", "answer": "1"}', '{"prompt": "p", "answer": "1", "tags": [{"\\udc00": 1}]}'):
        whole.write_text(f"[{row}]", encoding="utf-8")
        with pytest.raises(DataError, match=r"lone\.json\[0\]: column '(prompt|tags)' holds a lone surrogate"):
            load_prompts(whole)


def test_csv_blank_lines_are_skipped_and_lines_still_counted(tmp_path):
    """Blank lines before the header and between records are skipped; sources and the header line stay exact."""
    p = tmp_path / "gaps.csv"
    p.write_text("\nprompt,answer\na,1\n\nb,2\n", encoding="utf-8")
    recs = load_prompts(p)
    assert [(r.prompt, r.answer, r.source) for r in recs] == [("a", "1", f"{p}:3"), ("b", "2", f"{p}:5")]
    p.write_text("\nprompt,answer\na,1,x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gaps\.csv:3: 3 field\(s\); expected 2 as in the header on line 2"):
        load_prompts(p)


@pytest.mark.parametrize("text", ["prompt,answer,level\na,1,2\nb,2\n", 'prompt,answer,"two\nlines"\na,1\n'])
def test_csv_record_with_fewer_fields_than_the_header(tmp_path, text):
    """A short record is refused like a long one, naming its line and the line where the header starts (a quoted
    header name may span lines)."""
    p = tmp_path / "short.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"short\.csv:3: 2 field\(s\); expected 3 as in the header on line 1"):
        load_prompts(p)


def test_a_bad_row_error_carries_its_file_and_location(tmp_path):
    """``DataError.path`` and ``.location`` tell programs what the message tells people, for a line and for a row."""
    p = tmp_path / "rows.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"prompt": "", "answer": "2"}'])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert (e.value.path, e.value.location) == (str(p), f"{p}:2")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    q = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "  "]}), q)
    with pytest.raises(DataError) as e:
        load_prompts(q)
    assert (e.value.path, e.value.location) == (str(q), f"{q}[1]")


def test_a_long_prompt_in_a_csv_file_loads_as_in_jsonl(tmp_path):
    """A well-formed CSV record whose prompt is longer than the csv module's default field limit (131072 characters)
    is read like any other, and the limit is left as it was."""
    import csv

    p = tmp_path / "long.csv"
    p.write_text("prompt,answer\n" + "x" * 200_000 + ",2\n", encoding="utf-8")
    limit = csv.field_size_limit()
    assert [len(r.prompt) for r in load_prompts(p)] == [200_000]
    assert csv.field_size_limit() == limit


def test_invalid_utf8(tmp_path):
    p = tmp_path / "enc.jsonl"
    p.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"enc\.jsonl:2: not valid UTF-8"):
        load_prompts(p)
    c = tmp_path / "enc.csv"
    c.write_bytes(b"prompt,answer\na,1\n\xfe,2\n")
    with pytest.raises(DataError, match=r"enc\.csv:3: not valid UTF-8"):
        load_prompts(c)


def test_invalid_utf8_after_a_bom_names_the_right_line(tmp_path):
    """The BOM does not shift the reported line: a bad byte right after the first newline is on line 2."""
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbfprompt,answer\n\xfe,1\n")
    with pytest.raises(DataError) as e:
        load_prompts(c)
    assert e.value.location == f"{c}:2"


def test_a_byte_order_mark_is_skipped_only_at_the_start_of_a_jsonl_file(tmp_path):
    """A BOM opening a later line (two files joined with cat) is not taken for the file's own: that line is refused."""
    p = tmp_path / "joined.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n\xef\xbb\xbf{"prompt": "b", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"joined\.jsonl:2: not valid JSON") as e:
        load_prompts(p)
    assert e.value.location == f"{p}:2"


def test_jsonl_errors_name_the_column_and_the_byte_within_the_line(tmp_path):
    p = tmp_path / "cols.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": 2,}'])
    with pytest.raises(DataError, match=r"cols\.jsonl:2: not valid JSON \(.* at column 29\)"):
        load_prompts(p)
    p.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"cols\.jsonl:2: not valid UTF-8 \(invalid start byte at byte 12 of the line\)"):
        load_prompts(p)


def test_invalid_utf8_just_before_a_newline_names_its_own_line(tmp_path):
    """Without a BOM the reported line is counted up to the bad byte, not past it."""
    c = tmp_path / "end.csv"
    c.write_bytes(b"prompt,answer\na,1\n\xfe\nb,2\n")
    with pytest.raises(DataError) as e:
        load_prompts(c)
    assert e.value.location == f"{c}:3" and str(e.value).startswith(f"{c}:3: not valid UTF-8")


def test_a_false_answer_is_refused_like_a_true_one(tmp_path):
    p = tmp_path / "flag.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": false}'])
    with pytest.raises(DataError, match=r"flag\.jsonl:1: answer column 'answer' holds a boolean \(False\)"):
        load_prompts(p, require_answer=False)


def test_a_long_column_list_in_a_message_names_twenty_and_counts_the_rest(tmp_path):
    p = tmp_path / "wide.csv"
    names = [f"c{i}" for i in range(25)]
    p.write_text(",".join(names) + "\n" + ",".join("x" * 25) + "\n", encoding="utf-8")
    listed = ", ".join(repr(n) for n in names[:20])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert f"(columns: {listed}, ... (5 more))" in str(e.value)
    p.write_text(",".join(names[:20]) + "\n" + ",".join("x" * 20) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert f"(columns: {listed}); expected" in str(e.value)  # twenty names: all of them, nothing counted


def test_an_empty_data_set_error_carries_its_path(tmp_path):
    p = tmp_path / "none.jsonl"
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert (e.value.path, e.value.location) == (str(p), None)


def test_write_jsonl_writes_non_ascii_text_as_utf8_not_escapes(tmp_path):
    out = write_jsonl([PromptRecord("半分は? — Ünï", "½", {"tag": "é"}, "m")], tmp_path / "u.jsonl")
    assert out.read_bytes() == '{"prompt": "半分は? — Ünï", "answer": "½", "tag": "é"}\n'.encode("utf-8")


def test_bad_arguments(tmp_path):
    p = tmp_path / "ok.jsonl"
    write_lines(p, ['{"prompt": "a", "answer": "1"}'])
    with pytest.raises(TypeError, match="meta_columns"):
        load_prompts(p, meta_columns="level")
    with pytest.raises(ValueError, match="must differ"):
        load_prompts(p, prompt_column="x", answer_column="x")
    with pytest.raises(ValueError, match="also the prompt or answer column"):
        load_prompts(p, meta_columns=["answer"])
    with pytest.raises(TypeError, match="prompt_column must be a non-empty string"):
        load_prompts(p, prompt_column="")
    with pytest.raises(TypeError, match="answer_column must be a non-empty string"):
        load_prompts(p, answer_column="")
    for value in ("no", 0, None):
        with pytest.raises(TypeError, match="require_answer must be True or False"):
            load_prompts(p, require_answer=value)


def test_meta_columns_arguments_are_checked(tmp_path):
    """meta_columns may not repeat a name nor list the prompt column."""
    p = tmp_path / "ok.jsonl"
    write_lines(p, [json.dumps(ROWS[0])])
    with pytest.raises(ValueError, match="lists a column twice"):
        load_prompts(p, meta_columns=["level", "level"], **COLS)
    with pytest.raises(ValueError, match="'question' is also the prompt or answer column"):
        load_prompts(p, meta_columns=["question"], **COLS)
    with pytest.raises(TypeError, match="meta_columns must hold non-empty strings, got ''"):
        load_prompts(p, meta_columns=["level", ""], **COLS)


def test_loading_does_not_import_trainer_or_lab():
    # only what ``import entrorl.data`` adds on top of ``import entrorl`` is this package's doing
    code = (
        "import sys, entrorl; before = set(sys.modules); import entrorl.data; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.startswith(('entrorl.trainer', 'entrorl.lab', 'datasets', 'pyarrow'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------------
# PromptStream
# --------------------------------------------------------------------------------------------------


def make_records(n: int) -> list[PromptRecord]:
    return [PromptRecord(prompt=f"p{i}", answer=str(i), meta={"i": i}, source=f"mem:{i + 1}") for i in range(n)]


def indices(batch):
    return [i for i, _ in batch]


def test_stream_records_match_indices():
    recs = make_records(10)
    batch = PromptStream(recs, seed=3).next_batch(25)
    assert len(batch) == 25
    assert all(rec is recs[i] for i, rec in batch)


def test_stream_same_seed_same_order_different_seed_differs():
    recs = make_records(50)
    a = indices(PromptStream(recs, seed=7).next_batch(120))
    b = indices(PromptStream(recs, seed=7).next_batch(120))
    c = indices(PromptStream(recs, seed=8).next_batch(120))
    assert a == b
    assert a != c


def test_stream_independent_of_global_rng():
    recs = make_records(30)
    np.random.seed(0)
    torch.manual_seed(0)
    a = indices(PromptStream(recs, seed=1).next_batch(60))
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.rand(10)
    b = indices(PromptStream(recs, seed=1).next_batch(60))
    assert a == b


def test_stream_epoch_is_documented_permutation():
    recs = make_records(13)
    s = PromptStream(recs, seed=5)
    got = indices(s.next_batch(13 * 3))
    for e in range(3):
        expect = np.random.default_rng((5, e)).permutation(13).tolist()
        assert got[13 * e : 13 * (e + 1)] == expect
        assert s.epoch_order(e).tolist() == expect


def test_stream_every_record_once_per_epoch_and_epochs_differ():
    n = 17
    s = PromptStream(make_records(n), seed=11)
    epochs = []
    for e in range(4):
        assert s.epoch == e and s.position == 0
        epochs.append(indices(s.next_batch(n)))
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in epochs}) == 4


def test_stream_crosses_epoch_boundaries_seamlessly():
    n = 7
    recs = make_records(n)
    straight = indices(PromptStream(recs, seed=2).next_batch(n * 5))
    s = PromptStream(recs, seed=2)
    pieces = []
    for size in (3, 5, 0, 1, 9, 6, 11):  # sums to 35
        pieces += indices(s.next_batch(size))
    assert pieces == straight
    assert s.epoch == 5 and s.position == 0
    s.next_batch(3)
    assert s.epoch == 5 and s.position == 3
    big = PromptStream(recs, seed=2).next_batch(n * 2 + 3)  # a batch larger than the data set
    assert indices(big) == straight[: n * 2 + 3]


def test_stream_no_shuffle_is_file_order():
    s = PromptStream(make_records(4), shuffle=False)
    assert indices(s.next_batch(10)) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_stream_resume_equals_straight_run():
    recs = make_records(23)
    sizes = [5, 8, 13, 2, 9, 17, 4]
    s = PromptStream(recs, seed=42)
    straight = [indices(s.next_batch(k)) for k in sizes]

    first = PromptStream(recs, seed=42)
    part = [indices(first.next_batch(k)) for k in sizes[:3]]
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    assert set(state) >= {"epoch", "position"}
    resumed = PromptStream(recs, seed=42)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch and resumed.position == first.position
    part += [indices(resumed.next_batch(k)) for k in sizes[3:]]
    assert part == straight


def test_stream_load_state_validation():
    s = PromptStream(make_records(5), seed=1)
    s.next_batch(3)
    state = s.state_dict()
    with pytest.raises(ValueError, match="num_records"):
        PromptStream(make_records(6), seed=1).load_state_dict(state)
    # as many records, one answer edited: another stream; read from elsewhere (another source), the same one
    edited = make_records(5)
    edited[3] = dataclasses.replace(edited[3], answer="33")
    with pytest.raises(ValueError, match="saved over other records"):
        PromptStream(edited, seed=1).load_state_dict(state)
    moved = [dataclasses.replace(record, source=f"copy.jsonl:{n}") for n, record in enumerate(make_records(5), 1)]
    PromptStream(moved, seed=1).load_state_dict(state)
    assert PromptStream(moved, seed=1).records_digest == state["records_digest"]
    meta_changed = [dataclasses.replace(record, meta={"i": -1}) for record in make_records(5)]
    assert PromptStream(meta_changed, seed=1).records_digest != state["records_digest"]
    with pytest.raises(ValueError, match="seed"):
        PromptStream(make_records(5), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'position'"):
        PromptStream(make_records(5), seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        PromptStream(make_records(5), seed=1).load_state_dict({"epoch": 0, "position": 5})
    minimal = PromptStream(make_records(5), seed=1)
    minimal.load_state_dict({"epoch": state["epoch"], "position": state["position"]})
    assert minimal.next_batch(4) == s.next_batch(4)


def test_stream_bad_arguments():
    with pytest.raises(ValueError, match="no records"):
        PromptStream([])
    with pytest.raises(ValueError, match="seed"):
        PromptStream(make_records(2), seed=-1)
    with pytest.raises(ValueError, match="non-negative"):
        PromptStream(make_records(2)).next_batch(-1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: PromptStream(make_records(2), seed=True),
        lambda: PromptStream(make_records(2), seed=1.5),
        lambda: PromptStream(make_records(2)).next_batch(True),
        lambda: PromptStream(make_records(2)).next_batch(2.0),
        lambda: PromptStream(make_records(2)).epoch_order(-1),
        lambda: PromptStream(make_records(2)).epoch_order(True),
    ],
)
def test_stream_refuses_booleans_fractions_and_negatives_where_counts_are_due(call):
    with pytest.raises(ValueError):
        call()


def test_stream_shuffle_must_be_a_boolean():
    with pytest.raises(TypeError, match="shuffle"):
        PromptStream(make_records(2), shuffle=1)


def test_stream_length_is_one_epoch():
    s = PromptStream(make_records(9), seed=0)
    assert len(s) == 9 == len(s.records)
    s.next_batch(len(s))
    assert s.epoch == 1 and s.position == 0


def test_stream_epoch_order_is_a_fresh_array_the_caller_may_change():
    s = PromptStream(make_records(6), seed=4)
    expect = np.random.default_rng((4, 0)).permutation(6).tolist()
    order = s.epoch_order(0)
    order[:] = 0
    assert indices(s.next_batch(6)) == expect and s.epoch_order(0).tolist() == expect


def test_stream_refuses_a_state_of_another_shuffle_setting_or_a_negative_epoch():
    shuffled = PromptStream(make_records(5), seed=1)
    shuffled.next_batch(2)
    state = shuffled.state_dict()
    assert state["shuffle"] is True
    with pytest.raises(ValueError, match="shuffle"):
        PromptStream(make_records(5), seed=1, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        PromptStream(make_records(5), seed=1).load_state_dict({"epoch": -1, "position": 0})
    with pytest.raises(ValueError, match="position must be a non-negative integer"):
        PromptStream(make_records(5), seed=1).load_state_dict({"epoch": 0, "position": True})


def test_stream_state_without_an_epoch_is_refused_by_name():
    with pytest.raises(ValueError, match=r"state has no 'epoch'"):
        PromptStream(make_records(5), seed=1).load_state_dict({"position": 2})


def test_stream_a_refused_state_leaves_the_stream_where_it_was():
    s = PromptStream(make_records(5), seed=1)
    s.next_batch(2)
    for bad in ({"epoch": 3, "position": 1, "seed": 2}, {"epoch": 3, "position": 1, "num_records": 4},
                {"epoch": 3, "position": 7}, {"epoch": 3}):
        with pytest.raises(ValueError):
            s.load_state_dict(bad)
        assert (s.epoch, s.position) == (0, 2)
    assert s.epoch_order(0).tolist() == [4, 0, 1, 2, 3] and indices(s.next_batch(3)) == [1, 2, 3]


def test_stream_deals_python_ints_and_keeps_its_records_as_a_tuple():
    recs = make_records(4)
    s = PromptStream(recs, seed=0)
    batch = s.next_batch(6)
    assert all(type(i) is int for i in indices(batch))
    json.dumps(indices(batch))
    recs.append(PromptRecord("extra", "x"))
    assert isinstance(s.records, tuple) and len(s) == 4



def test_stream_digest_does_not_depend_on_the_order_of_meta_keys():
    """The same rows read with their fields in another order (another file format, another writer) are the same
    records: their digest is the same and a state saved over one resumes over the other."""
    forward = [PromptRecord(f"p{i}", str(i), meta={"a": i, "b": -i, "c": [i]}) for i in range(4)]
    backward = [PromptRecord(f"p{i}", str(i), meta={"c": [i], "b": -i, "a": i}) for i in range(4)]
    saved = PromptStream(forward, seed=3)
    saved.next_batch(2)
    resumed = PromptStream(backward, seed=3)
    assert resumed.records_digest == saved.records_digest
    resumed.load_state_dict(saved.state_dict())
    assert indices(resumed.next_batch(5)) == indices(saved.next_batch(5))


def test_stream_records_digest_is_the_sha256_of_one_json_line_per_record():
    """The digest saved in a state is SHA-256 over one line per record: the JSON array [prompt, answer, meta], keys
    sorted, non-ASCII text written as itself (UTF-8), each line ended by a newline; a state saved by one run is
    accepted by another only if this value does not drift."""
    import hashlib

    recs = [PromptRecord("Combien font 2×3 ?", "6", meta={"z": 1, "a": "é"}), PromptRecord("p", None)]
    text = '["Combien font 2×3 ?", "6", {"a": "é", "z": 1}]\n["p", null, {}]\n'
    assert PromptStream(recs).records_digest == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert PromptStream(recs).state_dict()["records_digest"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_stream_order_follows_the_whole_seed_beyond_32_bits():
    """The documented order, range(n) shuffled by default_rng((seed, epoch)), holds for any non-negative seed: a seed
    of 2**40 + 3 deals its own order, not that of seed 3."""
    seed = 2**40 + 3
    s = PromptStream(make_records(12), seed=seed)
    for e in range(2):
        expect = np.arange(12)
        np.random.default_rng((seed, e)).shuffle(expect)
        assert indices(s.next_batch(12)) == expect.tolist()
    assert s.epoch_order(0).tolist() != PromptStream(make_records(12), seed=3).epoch_order(0).tolist()
    assert s.state_dict()["seed"] == seed

# --------------------------------------------------------------------------------------------------
# dynamic sampling helpers
# --------------------------------------------------------------------------------------------------


def test_informative_groups_exact():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 2.0, 1.0, 1.0 + 1e-12, 7.0], dtype=torch.float64)
    groups = torch.tensor([10, 10, 10, -3, -3, -3, 99, 5, 5, 42])
    got = informative_groups(rewards, groups)
    assert got.dtype == torch.bool
    # group 5 differs by 1e-12 only: exact comparison still calls it informative
    expect = [True, True, True, False, False, False, False, True, True, False]
    assert got.tolist() == expect
    # float32 loses the 1e-12 difference: then the group is all-equal
    assert informative_groups(rewards.float(), groups).tolist()[7:9] == [False, False]


def test_informative_groups_interleaved_and_reference():
    rng = np.random.default_rng(0)
    gid = rng.choice([4, -7, 1000, 3, 9], size=200)
    r = rng.integers(0, 2, size=200).astype(np.float64)
    r[gid == 3] = 1.0  # an all-correct group
    r[gid == 9] = 0.0  # an all-wrong group
    got = informative_groups(torch.tensor(r), torch.tensor(gid)).numpy()
    for g in np.unique(gid):
        vals = r[gid == g]
        assert np.all(got[gid == g] == (len(set(vals.tolist())) > 1))
    assert not got[gid == 3].any() and not got[gid == 9].any()
    # integer and bool rewards work too
    assert informative_groups(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1])).tolist() == [False, False, False]
    assert informative_groups(torch.tensor([True, False]), torch.tensor([2, 2])).tolist() == [True, True]
    assert informative_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_informative_groups_all_equal_groups_away_from_zero():
    """A group whose rewards are all equal is never informative, whatever the common value: negative,
    positive, infinite, or an integer that float32 could not tell from its neighbour."""
    rewards = torch.tensor([-1.0, -1.0, 3.0, 3.0, -float("inf"), -float("inf"), -2.0, -0.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert informative_groups(rewards, groups).tolist() == [False] * 6 + [True, True]
    big = 2**24  # float32 rounds big + 1 to big
    got = informative_groups(torch.tensor([big, big + 1, big, big]), torch.tensor([0, 0, 1, 1]))
    assert got.tolist() == [True, True, False, False]
    assert informative_groups(torch.tensor([-5, -5, -5]), torch.tensor([4, 4, 4])).tolist() == [False] * 3
    huge = 2**53  # float64 rounds huge + 1 to huge: integer rewards are compared as integers
    got = informative_groups(torch.tensor([huge, huge + 1, huge, huge]), torch.tensor([0, 0, 1, 1]))
    assert got.tolist() == [True, True, False, False]


def test_rewards_and_group_ids_given_as_lists_keep_float64_and_an_empty_batch_is_accepted():
    """Python floats are float64: as lists they are compared as the float64 tensor of them would be (torch's default
    float32 would make 1 and 1 + 1e-12 equal), and an empty batch given as two empty lists has nothing to keep."""
    assert informative_groups([1.0, 1.0 + 1e-12, 0.5, 0.5], [0, 0, 1, 1]).tolist() == [True, True, False, False]
    assert informative_groups([1.0, 1.0 + 1e-12], [0, 0]).tolist() == informative_groups(
        torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64), torch.tensor([0, 0])).tolist()
    assert informative_groups([], []).tolist() == [] and group_pass_rates([], []) == {}
    assert group_pass_rates([True, False, True], [7, 7, 3]) == {3: 1.0, 7: 0.5}



def test_an_empty_batch_is_answered_on_the_device_of_the_rewards():
    """Even with nothing to keep, the mask is a bool tensor on the rewards' device (meta stands in for an accelerator)."""
    got = informative_groups(torch.zeros(0, dtype=torch.long, device="meta"), torch.zeros(0, dtype=torch.long, device="meta"))
    assert (got.device.type, got.dtype, tuple(got.shape)) == ("meta", torch.bool, (0,))

def test_group_ids_far_apart_need_no_table_spanning_them():
    """Group ids are arbitrary integers: ids 2**62 apart (hashes of the prompts, say) work like 0 and 1."""
    groups = torch.tensor([-(2**62), 2**62, -(2**62), 2**62])
    assert informative_groups(torch.tensor([1.0, 0.0, 0.0, 0.0]), groups).tolist() == [True, False, True, False]
    assert group_pass_rates(torch.tensor([True, True, False, True]), groups) == {-(2**62): 0.5, 2**62: 1.0}


def test_informative_groups_validation():
    with pytest.raises(ValueError, match="NaN"):
        informative_groups(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        informative_groups(torch.tensor([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integers"):
        informative_groups(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="integers"):
        informative_groups(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        informative_groups(torch.tensor(1.0), torch.tensor([0]))
    with pytest.raises(ValueError, match="rewards must be real"):
        informative_groups(torch.tensor([1.0 + 0j, 1.0 + 1j]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="rewards is on meta but group_ids is on cpu"):
        informative_groups(torch.zeros(2, device="meta"), torch.tensor([0, 0]))


def test_group_pass_rates_exact():
    correct = torch.tensor([True] * 1 + [False] * 15 + [True] * 15 + [False] + [True, True, False])
    groups = torch.tensor([7] * 16 + [-2] * 16 + [0, 0, 0])
    rates = group_pass_rates(correct, groups)
    assert list(rates) == [-2, 0, 7]
    assert rates[7] == 1 / 16 and rates[-2] == 15 / 16 and rates[0] == 2 / 3
    assert all(type(k) is int and type(v) is float for k, v in rates.items())
    assert group_pass_rates(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 2])) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="bool"):
        group_pass_rates(torch.tensor([0.7, 1.0]), torch.tensor([1, 1]))
    assert group_pass_rates(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)) == {}


# --------------------------------------------------------------------------------------------------
# pass-rate band filtering
# --------------------------------------------------------------------------------------------------


def test_filter_by_pass_rate_sixteenths_edges():
    rates = [c / 16 for c in range(17)]
    recs = make_records(17)

    def kept(**kw):
        return [r.meta["i"] for r in filter_by_pass_rate(recs, rates, **kw)]

    lo, hi = 1 / 16, 15 / 16
    assert kept(low=lo, high=hi) == list(range(1, 16))
    assert kept(low=lo, high=hi, inclusive=(False, False)) == list(range(2, 15))
    assert kept(low=lo, high=hi, inclusive=(True, False)) == list(range(1, 15))
    assert kept(low=lo, high=hi, inclusive=(False, True)) == list(range(2, 16))
    # the band parsed from text gives the same floats as c / 16
    low, high, inc = parse_band("(1/16, 15/16)")
    assert kept(low=low, high=high, inclusive=inc) == list(range(2, 15))
    low, high, inc = parse_band("[1/16, 15/16]")
    assert kept(low=low, high=high, inclusive=inc) == list(range(1, 16))
    assert kept(low=0, high=1) == list(range(17))
    assert kept(low=0.5, high=0.5) == [8]


def test_filter_by_pass_rate_decimal_band_and_order():
    recs = make_records(6)
    rates = np.array([0.5, 0.1, 0.05, 0.3, 0.51, 0.0])
    low, high, inc = parse_band("[0.1, 0.5]")
    assert [r.meta["i"] for r in filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc)] == [0, 1, 3]
    assert filter_by_pass_rate(recs, torch.tensor(rates), low=0.1, high=0.5) == [recs[0], recs[1], recs[3]]


def test_filter_by_pass_rate_tenths_on_open_edges():
    """Rates c / 10 compared as doubles: a rate equal to an open edge (0.1 or 0.3, not exact in binary) is left out."""
    recs = make_records(11)
    rates = [c / 10 for c in range(11)]
    low, high, inc = parse_band("(0.1, 0.3)")
    assert [r.meta["i"] for r in filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc)] == [2]
    low, high, inc = parse_band("(1/10, 3/10]")
    kept = filter_by_pass_rate(recs, np.array(rates), low=low, high=high, inclusive=inc)
    assert [r.meta["i"] for r in kept] == [2, 3]
    # exact: a rate just above the edge (the same number in float32) is outside the closed band
    assert filter_by_pass_rate(make_records(2), [0.5, 0.5 + 1e-12], low=0.0, high=0.5) == make_records(2)[:1]
    # a float64 tensor keeps its precision too (float32 would round 0.1 above the open edge 0.1, and 0.5 + 1e-12 to 0.5)
    low, high, inc = parse_band("(0.1, 0.3)")
    kept = filter_by_pass_rate(recs, torch.tensor(rates, dtype=torch.float64), low=low, high=high, inclusive=inc)
    assert [r.meta["i"] for r in kept] == [2]
    rates64 = torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64)
    assert filter_by_pass_rate(make_records(2), rates64, low=0.0, high=0.5) == make_records(2)[:1]


def test_filter_by_pass_rate_takes_a_bfloat16_tensor():
    """pass_rates may be any torch tensor, a bfloat16 one (which numpy cannot hold) included."""
    recs = make_records(3)
    rates = torch.tensor([0.25, 0.5, 0.75], dtype=torch.bfloat16)
    assert filter_by_pass_rate(recs, rates, low=0.0, high=0.5) == recs[:2]



def test_filter_by_pass_rate_reads_float32_and_bfloat16_rates_in_their_own_precision():
    """A prompt solved 7 times in 10 lies in [0.7, 1] and one solved once in 10 outside (0.1, 0.5], whatever type
    holds the rates: a float32 tensor's 7/10 (torch's correct.float().mean(1)), widened to a double, is 0.69999999
    and its 1/10 is 0.10000000149, so the edges are rounded to the rates' type before comparing, as polarisation's."""
    correct = torch.zeros(4, 10)
    for row, solved in enumerate((7, 1, 3, 5)):
        correct[row, :solved] = 1
    recs = make_records(4)
    for rates in (correct.mean(dim=1), correct.mean(dim=1).to(torch.bfloat16), correct.mean(dim=1).numpy(),
                  correct.double().mean(dim=1)):
        low, high, inc = parse_band("[0.7, 1]")
        assert [r.meta["i"] for r in filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc)] == [0], rates
        low, high, inc = parse_band("(0.1, 0.5]")
        assert [r.meta["i"] for r in filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc)] == [2, 3], rates
        low, high, inc = parse_band("(0.3, 0.5)")
        assert filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc) == [], rates


def test_the_band_s_rounded_edges_never_move_the_exact_rates_0_and_1_nor_close_the_band():
    """Rounded to the rates' type, the edge 0.999 would become 1 in bfloat16 (taking in a prompt solved every time),
    1e-8 would become 0 in float16 (taking in one never solved), and (0.699, 0.7] would close to (x, x] in bfloat16
    (leaving out 7 of 10): those keep their own values."""
    recs = make_records(3)

    def kept(rates, band):
        low, high, inc = parse_band(band)
        return [r.meta["i"] for r in filter_by_pass_rate(recs[:len(rates)], rates, low=low, high=high, inclusive=inc)]

    assert kept((torch.tensor([10.0, 5.0, 0.0]) / 10).to(torch.bfloat16), "[0, 0.999]") == [1, 2]
    assert kept((torch.tensor([10.0, 5.0, 0.0]) / 10).to(torch.bfloat16), "[0.999, 1]") == [0]
    for rates in (np.array([0.0, 0.5, 1.0], dtype=np.float16), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float16)):
        assert kept(rates, "[1e-8, 1]") == [1, 2]
    assert kept((torch.tensor([7.0, 5.0]) / 10).to(torch.bfloat16), "(0.699, 0.7]") == [0]


def test_filter_by_pass_rate_takes_a_tensor_that_requires_grad():
    """Pass rates computed by a differentiable model (a tensor that requires grad, float32 or bfloat16) are read as
    numbers; the tensor's graph is left alone."""
    recs = make_records(4)
    for dtype in (torch.float32, torch.bfloat16):
        rates = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=dtype, requires_grad=True)
        assert filter_by_pass_rate(recs, rates * 1, low=0.25, high=0.5) == recs[1:3]
        assert pass_rate_band_mask(recs, rates, low=0.0, high=0.5, inclusive=(False, True)).tolist() == [
            False, True, True, False]
        assert rates.grad is None and rates.requires_grad

def test_filter_by_pass_rate_names_a_bad_rate_as_a_plain_number():
    with pytest.raises(ValueError, match=r"pass rate 1.2 of record 1 \(mem:2\) is not in \[0, 1\]"):
        filter_by_pass_rate(make_records(3), [0.1, 1.2, 0.3], low=0, high=1)


def test_filter_by_pass_rate_validation():
    recs = make_records(3)
    with pytest.raises(ValueError, match="3 records but 2 pass rates"):
        filter_by_pass_rate(recs, [0.1, 0.2], low=0, high=1)
    with pytest.raises(ValueError, match="3 records but 4 pass rates"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3, 0.4], low=0, high=1)
    with pytest.raises(ValueError, match="1-D"):
        filter_by_pass_rate(recs, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], low=0, high=1)
    for bad_low in (True, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="low must be"):
            filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=bad_low, high=1)
    with pytest.raises(ValueError, match="low"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=-0.1, high=1)
    with pytest.raises(ValueError, match="high"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0, high=1.5)
    with pytest.raises(ValueError, match="exceeds"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0.6, high=0.4)
    with pytest.raises(ValueError, match="empty"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0.4, high=0.4, inclusive=(True, False))
    with pytest.raises(ValueError, match=r"record 1 \(mem:2\)"):
        filter_by_pass_rate(recs, [0.1, float("nan"), 0.3], low=0, high=1)
    with pytest.raises(ValueError, match=r"of record 1 \(mem:2\) is not in"):
        filter_by_pass_rate(recs, [0.1, 1.2, -0.3], low=0, high=1)  # the first bad one is named
    with pytest.raises(ValueError, match="pair of booleans"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0, high=1, inclusive=True)
    with pytest.raises(ValueError, match="pair of booleans"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0, high=1, inclusive=(True, True, True))


def test_filter_by_pass_rate_inclusive_must_be_booleans():
    """Integers are not accepted as inclusive flags; numpy booleans are."""
    recs = make_records(3)
    with pytest.raises(ValueError, match="pair of booleans"):
        filter_by_pass_rate(recs, [0.1, 0.2, 0.3], low=0, high=1, inclusive=(1, 0))
    kept = filter_by_pass_rate(recs, [0.0, 0.5, 1.0], low=0, high=1, inclusive=(np.bool_(False), np.bool_(True)))
    assert kept == [recs[1], recs[2]]


def test_filter_by_pass_rate_takes_the_inclusive_flags_as_a_list():
    """A pair of flags read from a configuration file arrives as a list: it is taken like the tuple."""
    recs = make_records(3)
    kept = filter_by_pass_rate(recs, [0.0, 0.5, 1.0], low=0, high=1, inclusive=[False, True])
    assert kept == [recs[1], recs[2]]
    mask = pass_rate_band_mask(recs, [0.0, 0.5, 1.0], low=0, high=1, inclusive=[True, False])
    assert mask.tolist() == [True, True, False]


def test_filter_by_pass_rate_refuses_a_single_number_for_one_record():
    """A bare number is not a list of pass rates, even for a single record."""
    with pytest.raises(ValueError, match=r"pass_rates must be 1-D, got shape \(\)"):
        filter_by_pass_rate(make_records(1), 0.5, low=0, high=1)
    with pytest.raises(ValueError, match=r"pass_rates must be 1-D, got shape \(\)"):
        filter_by_pass_rate(make_records(1), torch.tensor(0.5), low=0, high=1)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[0.1, 0.5]", (0.1, 0.5, (True, True))),
        ("(1/16, 15/16)", (1 / 16, 15 / 16, (False, False))),
        ("[0,1/2)", (0.0, 0.5, (True, False))),
        ("  ( 0.25 , 1 ]  ", (0.25, 1.0, (False, True))),
        ("[1 / 3, 2/3]", (1 / 3, 2 / 3, (True, True))),
        ("[0.5, 0.5]", (0.5, 0.5, (True, True))),
        ("[1e-2, 0.5]", (0.01, 0.5, (True, True))),
    ],
)
def test_parse_band_cases(text, expected):
    assert parse_band(text) == expected


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("0.1, 0.5", "expected an interval with brackets"),
        ("[0.1 0.5]", "expected an interval with brackets"),
        ("[0.1, 0.5, 0.7]", "expected an interval with brackets"),
        ("[a, 0.5]", "cannot read the lower edge 'a'"),
        ("[0.1, 1/0]", "cannot read the upper edge"),
        ("[-0.1, 0.5]", "outside"),
        ("[0.1, 3/2]", "outside"),
        ("[0.6, 0.4]", "exceeds"),
        ("(0.5, 0.5]", "empty"),
        ("[, 0.5]", "lower edge .* is missing"),
        ("[0.1, 0.5] and more", "expected an interval with brackets"),
        ("[0.1, 0.5]]", "expected an interval with brackets"),
        ("[0.1, 0.5", "expected an interval with brackets"),
        ("(1/16, 15/16", "expected an interval with brackets"),
    ],
)
def test_parse_band_errors(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_band(text)


def test_parse_band_refuses_a_non_string_saying_what_it_expects():
    for value in (0.5, None, (0.1, 0.5)):
        with pytest.raises(TypeError, match=r"parse_band: expected a string such as '\[0.1, 0.5\]', got "):
            parse_band(value)


def test_parse_band_errors_quote_the_band_as_written():
    """An inverted or empty band is named as the user wrote it, not only by its parsed edges."""
    with pytest.raises(ValueError, match=r"the lower edge 0.6 exceeds the upper edge 0.4 in '\[0.6, 0.4\]'; expected"):
        parse_band("[0.6, 0.4]")
    with pytest.raises(ValueError, match=r"the band in '\(1/2, 1/2\]' is empty \(low == high == 0.5 with an open edge\)"):
        parse_band("(1/2, 1/2]")


def test_parse_band_fraction_matches_division():
    for n in (3, 7, 10, 16, 64):
        for c in range(n + 1):
            low, _, _ = parse_band(f"[{c}/{n}, 1]")
            assert low == c / n == float(Fraction(c, n))


# --------------------------------------------------------------------------------------------------
# write_jsonl
# --------------------------------------------------------------------------------------------------


def test_write_jsonl_round_trip(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [json.dumps(r, ensure_ascii=False) for r in ROWS])
    before = src.read_bytes()
    recs = load_prompts(src, **COLS)
    out = write_jsonl(recs, tmp_path / "nested" / "dir" / "out.jsonl")
    assert out == tmp_path / "nested" / "dir" / "out.jsonl"
    assert src.read_bytes() == before
    back = load_prompts(out)
    assert [(r.prompt, r.answer, r.meta) for r in back] == [(r.prompt, r.answer, r.meta) for r in recs]
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"prompt": ROWS[0]["question"], "answer": "2", "level": 1, "tags": ["easy"]}
    # custom column names round-trip too
    out2 = write_jsonl(recs, tmp_path / "out2.jsonl", **COLS)
    assert [(r.prompt, r.answer, r.meta) for r in load_prompts(out2, **COLS)] == [
        (r.prompt, r.answer, r.meta) for r in recs
    ]


def test_write_jsonl_round_trip_keeps_a_meta_field_named_meta(tmp_path):
    """Loading what write_jsonl wrote gives the same meta, also for a record whose meta has a field called "meta"
    holding an object (what a row {"prompt", "answer", "meta": {"meta": {...}}} loads as), beside a field of the same
    name as one inside it."""
    src = tmp_path / "in.jsonl"
    write_lines(src, [json.dumps({"prompt": "q", "answer": "1", "meta": {"meta": {"k": 1}}}),
                      json.dumps({"prompt": "r", "answer": "2", "k": 2, "meta": {"meta": {"k": 1}}}),
                      json.dumps({"prompt": "s", "answer": "3", "meta": "text"})])
    records = load_prompts(src)
    assert [rec.meta for rec in records] == [{"meta": {"k": 1}}, {"k": 2, "meta": {"k": 1}}, {"meta": "text"}]
    back = load_prompts(write_jsonl(records, tmp_path / "out.jsonl"))
    assert [rec.meta for rec in back] == [rec.meta for rec in records]


def test_write_jsonl_none_answer_round_trip(tmp_path):
    recs = [PromptRecord("q1", None, {"k": [1, {"a": None}]}, "x"), PromptRecord("q2", "4", {}, "y")]
    out = write_jsonl(recs, tmp_path / "o.jsonl")
    back = load_prompts(out, require_answer=False)
    assert [(r.prompt, r.answer, r.meta) for r in back] == [(r.prompt, r.answer, r.meta) for r in recs]
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"prompt": "q1", "answer": None, "k": [1, {"a": None}]}, {"prompt": "q2", "answer": "4"}]  # None is null


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old content\n", encoding="utf-8")
    good = make_records(3)
    bad = good + [PromptRecord("q", "a", {"x": object()}, "mem:9")]
    with pytest.raises(ValueError, match=r"record 3 \(mem:9\)"):
        write_jsonl(bad, target)
    assert target.read_text(encoding="utf-8") == "old content\n"
    nan = [PromptRecord("q", "a", {"x": float("nan")}, "mem:1")]
    with pytest.raises(ValueError, match="JSON"):
        write_jsonl(nan, target)
    assert target.read_text(encoding="utf-8") == "old content\n"
    write_jsonl(good, target)
    assert len(load_prompts(target)) == 3
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_write_jsonl_atomic_on_interrupted_write(tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl(make_records(2), target)
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_write_jsonl_syncs_the_new_file_before_it_replaces_the_target(tmp_path, monkeypatch):
    """The new content is on disk (fsync) before os.replace puts it in place: a crash leaves the old file or the new
    one, never an empty file under the target's name."""
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    write_jsonl(make_records(2), tmp_path / "out.jsonl")
    assert calls == ["fsync", "replace"]


def test_write_jsonl_refuses_to_overwrite_its_input(tmp_path):
    cases = [("in.jsonl", '{"prompt": "a", "answer": "1"}\n'), ("in.json", '[{"prompt": "a", "answer": "1"}]')]
    for name, text in cases:
        src = tmp_path / name
        src.write_text(text, encoding="utf-8")
        recs = load_prompts(src)
        with pytest.raises(ValueError, match="refusing"):
            write_jsonl(recs, src)
        assert src.read_text(encoding="utf-8") == text
    # the path of an input is refused even once the input itself is gone (the paths are compared)
    src.unlink()
    with pytest.raises(ValueError, match="refusing"):
        write_jsonl(recs, src)
    assert not src.exists()


def test_write_jsonl_meta_collision(tmp_path):
    with pytest.raises(ValueError, match="collides"):
        write_jsonl([PromptRecord("q", "a", {"answer": "b"}, "m")], tmp_path / "o.jsonl")
    with pytest.raises(TypeError, match="PromptRecord"):
        write_jsonl([{"prompt": "q"}], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_write_jsonl_refuses_a_meta_field_named_like_the_prompt_column(tmp_path):
    """A meta field would overwrite the prompt in the written object; it is refused, naming the prompt column."""
    with pytest.raises(ValueError, match=r"meta field 'prompt' that collides with the prompt column"):
        write_jsonl([PromptRecord("q", "a", {"prompt": "other"}, "m")], tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"meta field 'question' that collides with the prompt column"):
        write_jsonl([PromptRecord("q", "a", {"question": "other"}, "m")], tmp_path / "o.jsonl", **COLS)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_write_jsonl_over_an_existing_file_keeps_its_permissions(tmp_path):
    """Replacing a file (a new file under the hood) leaves its permission bits as they were."""
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")
    os.chmod(target, 0o600)
    write_jsonl(make_records(1), target)
    assert (target.stat().st_mode & 0o777) == 0o600 and len(load_prompts(target)) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_write_jsonl_gives_a_new_file_the_mode_the_umask_allows(tmp_path):
    """A new file gets the bits of a file written plainly (0o666 less the umask), not mkstemp's 0o600."""
    previous = os.umask(0o002)
    try:
        out = write_jsonl(make_records(1), tmp_path / "new.jsonl")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o664


def test_write_then_stream_then_filter_pipeline(tmp_path):
    recs = make_records(16)
    rates = [(i % 17) / 16 for i in range(16)]
    low, high, inc = parse_band("(1/16, 15/16)")
    kept = filter_by_pass_rate(recs, rates, low=low, high=high, inclusive=inc)
    out = write_jsonl(kept, tmp_path / "kept.jsonl")
    loaded = load_prompts(out)
    assert [r.meta["i"] for r in loaded] == list(range(2, 15))
    s = PromptStream(loaded, seed=0)
    assert sorted(i for i, _ in s.next_batch(len(loaded))) == list(range(len(loaded)))


# --------------------------------------------------------------------------------------------------
# output locations, checked before any work
# --------------------------------------------------------------------------------------------------


def test_output_checks_refuse_what_cannot_be_written_and_leave_nothing_behind(tmp_path):
    from entrorl.data.loading import check_output_directory, check_output_file

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--out .*a_file/e\.json cannot be written: .*a_file is not a directory"):
        check_output_file(a_file / "e.json", what="--out")
    with pytest.raises(ValueError, match="a_file is not a directory"):
        check_output_file(a_file / "deeper" / "e.json")
    with pytest.raises(ValueError, match=r"--out .* is a directory; expected the path of a file"):
        check_output_file(tmp_path, what="--out")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_directory(a_file)
    with pytest.raises(ValueError, match="a_file is not a directory"):
        check_output_directory(a_file / "audit")
    if Path("/proc/self").is_dir():  # Linux: no file can be made there, not even by root
        with pytest.raises(ValueError, match=r"/proc/entrorl_x cannot be created"):
            check_output_file("/proc/entrorl_x/e.json", what="--out")
        with pytest.raises(ValueError, match="cannot be written"):
            check_output_directory("/proc/entrorl_audit")

    assert check_output_file(tmp_path / "new" / "deeper" / "e.json") == tmp_path / "new" / "deeper" / "e.json"
    assert check_output_directory(tmp_path / "new" / "audit") == tmp_path / "new" / "audit"
    assert check_output_file(a_file) == a_file  # an existing file may be replaced
    assert check_output_file(tmp_path / "missing" / ".." / "e.json")  # as the OS reads it: tmp_path/e.json
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]  # no folder, no probe file left


def test_cli_reasoning_gym_errors_are_one_line(tmp_path):
    """A --out that cannot be written and a task that reasoning-gym cannot generate with its defaults (composite
    needs a list of data sets) end in one line naming the problem, exit status 2, no traceback."""
    pytest.importorskip("reasoning_gym")
    from typer.testing import CliRunner

    from entrorl.cli import app

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((tmp_path, "is a directory"), (a_file / "x.jsonl", "a_file is not a directory")):
        result = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmetic", "--size", "2", "--out", str(out)])
        assert result.exit_code == 2 and "error: --out" in result.output and message in result.output, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # not an uncaught error
    result = CliRunner().invoke(app, ["data", "reasoning-gym", "composite", "--size", "2", "--out", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 2, result.output
    assert "reasoning-gym cannot generate the task 'composite'" in result.output and "AssertionError" in result.output
    assert len(result.output.strip().splitlines()) == 1 and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "c.jsonl").exists()


def test_cli_reasoning_gym_writes_the_prompts_of_the_seed_given_with_or_without_the_instruction(tmp_path):
    """The same --seed writes the same prompts and another seed others; --no-instruction leaves out the instruction
    that the prompts otherwise end with, the task's own question kept."""
    pytest.importorskip("reasoning_gym")
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.rewards import REASONING_GYM_INSTRUCTION

    def generated(name: str, *options: str) -> list[dict]:
        out = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmetic", "--size", "4", "--out", str(out),
                                          *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in out.read_text().splitlines()]

    seeded = generated("seed-1", "--seed", "1")
    assert len(seeded) == 4
    assert [row["prompt"] for row in generated("seed-2", "--seed", "2")] != [row["prompt"] for row in seeded]
    assert all(REASONING_GYM_INSTRUCTION in row["prompt"] for row in seeded)
    bare = generated("bare", "--seed", "1", "--no-instruction")  # seed 1 again: the same questions and answers
    assert not any(REASONING_GYM_INSTRUCTION in row["prompt"] for row in bare)
    assert all(row["prompt"] in with_instruction["prompt"] and row["answer"] == with_instruction["answer"]
               for row, with_instruction in zip(bare, seeded, strict=True))


def test_the_named_prompt_column_is_read_even_beside_a_column_called_prompt(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "Q1", "prompt": "P1", "answer": "1"}) + "\n")
    (record,) = load_prompts(path, prompt_column="question")
    assert record.prompt == "Q1" and record.meta.get("prompt") == "P1"


def test_a_prompt_template_that_cannot_be_filled_is_refused_as_a_value_error():
    """A field nested in the prompt's format spec that fails when filled (a positional field, an attribute a string
    lacks, an index past its end) is refused with ValueError naming the template, as any other bad template is; a
    field that indexes the prompt is another field than ``{prompt}``."""
    from entrorl.data import check_prompt_template

    for template, failure in (("{prompt:{}}", "IndexError"), ("{prompt:{prompt.no_such_attribute}}", "AttributeError"),
                              ("{prompt:{prompt[99]}}", "IndexError"), ("{prompt:d}", "ValueError")):
        with pytest.raises(ValueError, match=rf"prompt template '.*' cannot be filled with a prompt \({failure}"):
            check_prompt_template(template)
    with pytest.raises(ValueError, match=r"has field\(s\) \['prompt\[0\]'\]"):
        check_prompt_template("{prompt[0]}")
    with pytest.raises(ValueError, match=r"has field\(s\) \[''\]; only \{prompt\} is filled in"):
        check_prompt_template("{} {prompt}")  # a positional field is another field
    with pytest.raises(ValueError, match=r"has no \{prompt\} field, so every prompt would be dropped"):
        check_prompt_template("Answer the question.")  # no field at all
    assert check_prompt_template("{{x}}: {prompt}") == "{{x}}: {prompt}"


def test_a_record_is_frozen_and_each_has_its_own_empty_meta_by_default():
    """PromptRecord is a frozen dataclass whose ``meta`` is a dict, empty unless given, never shared between records."""
    import dataclasses

    first, second = PromptRecord("What is 1+1?", "2"), PromptRecord("What is 2+2?", None)
    assert first.meta == {} and isinstance(first.meta, dict) and first.meta is not second.meta
    assert first.source == second.source == "<memory>"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.answer = "3"


def test_a_column_named_with_other_spaces_or_case_is_pointed_out(tmp_path):
    """A header written ``prompt, answer`` has a column ' answer', not 'answer': the error says which column nearly
    matches, in a CSV header and in a JSON row, for the prompt and for the answer; an unrelated name gets no hint."""
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("prompt, answer\n1+1=,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no answer column 'answer' \(columns: 'prompt', ' answer'\), and ' answer' differs "
                                        r"from it only in spaces or case;"):
        load_prompts(spaced)
    cased = tmp_path / "cased.jsonl"
    write_lines(cased, ['{"Prompt ": "1+1=", "answer": "2"}'])
    with pytest.raises(DataError, match=r"missing prompt column 'prompt' \(fields: 'Prompt ', 'answer'\), and 'Prompt ' differs"):
        load_prompts(cased)
    write_lines(cased, ['{"prompt": "1+1=", "ANSWER": "2"}'])
    with pytest.raises(DataError, match=r"answer column 'answer' is missing \(fields: 'prompt', 'ANSWER'\), and 'ANSWER' differs from it only in spaces or case;"):
        load_prompts(cased)
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("prompt,solution\n1+1=,2\n", encoding="utf-8")
    with pytest.raises(DataError) as refused:
        load_prompts(unrelated)
    assert "differs from it" not in str(refused.value)


@pytest.mark.parametrize("rates", [["0.5", "1"], [True, 0.5], np.array([True, False]), np.array(["0.5", "1"])])
def test_filter_by_pass_rate_refuses_text_and_flags_as_rates(rates):
    """numpy would read "0.5" as 0.5 and True as 1.0; a pass rate is a number, so both are refused, naming the value."""
    records = [PromptRecord("p", "1", source="m:1"), PromptRecord("q", "2", source="m:2")]
    with pytest.raises(ValueError, match=r"pass_rates must be numbers \(got ('0.5', str|True, bool)\)"):
        filter_by_pass_rate(records, rates, low=0, high=1)
    assert len(filter_by_pass_rate(records, [Fraction(1, 2), np.float32(1)], low=0, high=1)) == 2


@pytest.mark.parametrize("template", [None, 3, b"Q: {prompt}"])
def test_check_prompt_template_refuses_a_non_string_with_a_value_error_naming_it(template):
    from entrorl.data import check_prompt_template

    with pytest.raises(ValueError, match=rf"prompt template {re.escape(repr(template))} is a {type(template).__name__}, "
                                         r"not a string"):
        check_prompt_template(template)


def test_prompt_stream_refuses_records_that_are_not_prompt_records_when_built():
    """Strings dealt as records only failed at the first checkpoint (their digest reads .prompt): refused up front."""
    from entrorl.data import PromptStream

    with pytest.raises(TypeError, match=r"records must be PromptRecords .*; record 1 is a str"):
        PromptStream([PromptRecord(prompt="p", answer="1"), "y"])


def test_a_prompt_given_as_chat_messages_keeps_its_conversation_and_writes_back_as_such(tmp_path):
    """TRL's conversational format: the prompt column holds the messages; ``prompt`` is the user's last turn."""
    conversation = [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "2+2=?", "name": "sam"}]
    p = tmp_path / "chat.jsonl"
    write_lines(p, [json.dumps({"prompt": conversation, "answer": "4", "level": 1}),
                    json.dumps({"prompt": "3+3=", "answer": "6"})])
    first, second = load_prompts(p)
    assert (first.prompt, first.messages, first.answer, first.meta) == ("2+2=?", tuple(conversation), "4", {"level": 1})
    assert (second.prompt, second.messages) == ("3+3=", None)
    again = load_prompts(write_jsonl([first, second], tmp_path / "again.jsonl"))
    assert [(r.prompt, r.messages, r.answer, r.meta) for r in again] == [(r.prompt, r.messages, r.answer, r.meta)
                                                                       for r in (first, second)]


def test_a_verl_parquet_file_is_read_with_its_messages_and_its_nested_ground_truth(tmp_path):
    """verl's data sets: ``prompt`` holds chat messages, the answer is ``reward_model.ground_truth``."""
    import pandas as pd

    rows = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"{i}+1=?"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {"index": i}} for i in range(3)]
    p = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(p)
    records = load_prompts(p, answer_column="reward_model.ground_truth")
    assert [(r.prompt, r.answer) for r in records] == [(f"{i}+1=?", str(i + 1)) for i in range(3)]
    assert records[0].messages == ({"role": "user", "content": "0+1=?"},)
    assert records[2].meta["extra_info"] == {"index": 2} and records[2].meta["data_source"] == "gsm8k"
    chosen = load_prompts(p, answer_column="reward_model.ground_truth", meta_columns=["data_source"])
    assert [(r.answer, r.meta) for r in chosen] == [(str(i + 1), {"data_source": "gsm8k"}) for i in range(3)]
    with pytest.raises(DataError, match=r"train\.parquet \(schema\): no answer column 'reward.ground_truth'"):
        load_prompts(p, answer_column="reward.ground_truth")
    with pytest.raises(DataError, match=r"train\.parquet\[0\]: answer column 'reward_model.truth' is missing"):
        load_prompts(p, answer_column="reward_model.truth")


@pytest.mark.parametrize("messages, problem", [
    ([], "holds no message"),
    ([1, 2], "message 0 is a number; expected chat messages"),
    ([{"content": "hi"}], "message 0 is an object with the fields 'content'; expected chat messages"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "a list of content parts is not read"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
     "the conversation ends with a 'assistant' message; expected it to end with the user's turn"),
    ([{"role": "user", "content": "  "}], "the user's last message is empty"),
])
def test_chat_messages_that_cannot_be_a_prompt_are_refused_naming_the_row(tmp_path, messages, problem):
    p = tmp_path / "chat.jsonl"
    write_lines(p, [json.dumps({"prompt": "ok", "answer": "1"}), json.dumps({"prompt": messages, "answer": "1"})])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: prompt column 'prompt'.*{re.escape(problem)}"):
        load_prompts(p)


def test_a_conversation_edited_in_any_turn_is_other_records_to_a_resumed_stream():
    """The stream's digest covers a chat prompt's whole conversation: an edited system prompt is refused on resume."""
    from entrorl.data import PromptStream

    def records(system):
        return [PromptRecord(prompt=f"{i}+1=", answer=str(i + 1), messages=({"role": "system", "content": system},
                                                                            {"role": "user", "content": f"{i}+1="}))
                for i in range(4)]

    saved = PromptStream(records("Answer with a number."), seed=0)
    saved.next_batch(2)
    PromptStream(records("Answer with a number."), seed=0).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="other records"):
        PromptStream(records("Answer in words."), seed=0).load_state_dict(saved.state_dict())


def test_a_message_with_null_content_is_said_to_be_a_tool_call(tmp_path):
    p = tmp_path / "chat.jsonl"
    write_lines(p, [json.dumps({"prompt": [{"role": "assistant", "content": None, "tool_calls": []},
                                           {"role": "user", "content": "go"}], "answer": "1"})])
    with pytest.raises(DataError, match=r"message 0 .* \(its content is null: a tool call, which a prompt cannot hold\)"):
        load_prompts(p)


def test_a_float32_within_a_struct_reads_as_written_as_a_column_does(tmp_path):
    """A float32 0.1 is the answer "0.1" whether it is a column or a field within one (reward_model.ground_truth), in
    a parquet file and in a saved data set."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": pa.array(["one tenth?"]), "answer": pa.array([0.1], pa.float32()),
                      "reward_model": pa.array([{"ground_truth": 0.1, "inner": {"scale": 0.3}}],
                                               pa.struct([("ground_truth", pa.float32()),
                                                          ("inner", pa.struct([("scale", pa.float16())]))]))})
    pq.write_table(table, tmp_path / "verl.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "verl.parquet", tmp_path / "saved"):
        assert load_prompts(path)[0].answer == "0.1"
        record = load_prompts(path, answer_column="reward_model.ground_truth")[0]
        assert record.answer == "0.1" and record.meta["reward_model"]["inner"] == {"scale": 0.3}


def test_a_record_s_prompt_is_its_conversation_s_last_user_turn():
    """A record's conversation and its prompt cannot disagree: what is trained on, written and digested is the same."""
    conversation = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="})
    record = PromptRecord(prompt="1+1=", answer="2", messages=conversation)
    for prompt, messages in (("2+2=", conversation), ("1+1=", conversation[:1]), ("1+1=", ())):
        with pytest.raises(ValueError, match="the conversation must end with the user's turn, whose content is the prompt"):
            PromptRecord(prompt=prompt, answer="2", messages=messages)
    with pytest.raises(ValueError, match="a changed prompt: change its last message too"):
        dataclasses.replace(record, prompt="2+2=")


def test_fields_a_table_fills_with_null_are_left_out_of_a_message(tmp_path):
    """pyarrow gives every message of a column every field any message has, null where it had none."""
    import pandas as pd

    pd.DataFrame([{"prompt": [{"role": "system", "content": "be brief", "name": "rules"},
                              {"role": "user", "content": "1+1="}], "answer": "2"}]).to_parquet(tmp_path / "chat.parquet")
    (record,) = load_prompts(tmp_path / "chat.parquet")
    assert record.messages == ({"role": "system", "content": "be brief", "name": "rules"},
                               {"role": "user", "content": "1+1="})


def test_float32_values_within_lists_read_as_written_as_jsonl_gives_them(tmp_path):
    """Lists of structs (chat messages with a float field) and lists of floats within a struct read as written."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.float32())])
    table = pa.table({"prompt": pa.array([[{"role": "user", "content": "one tenth?", "weight": 0.1}]], pa.list_(message)),
                      "answer": pa.array(["0.1"]),
                      "extra_info": pa.array([{"vals": [0.1, 0.2], "x": 0.1, "grid": [[0.3]]}],
                                             pa.struct([("vals", pa.list_(pa.float32())), ("x", pa.float32()),
                                                        ("grid", pa.list_(pa.list_(pa.float16())))]))})
    pq.write_table(table, tmp_path / "chat.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "chat.parquet", tmp_path / "saved"):
        (record,) = load_prompts(path)
        assert record.messages[0]["weight"] == 0.1 and record.meta["extra_info"] == {"vals": [0.1, 0.2], "x": 0.1,
                                                                                     "grid": [[0.3]]}, path


def test_a_message_with_a_null_role_is_said_to_have_one(tmp_path):
    p = tmp_path / "chat.jsonl"
    write_lines(p, [json.dumps({"prompt": [{"role": None, "content": "q"}], "answer": "1"})])
    with pytest.raises(DataError, match=r"message 0 is an object with the fields 'role', 'content'"):
        load_prompts(p)


def test_float32_values_of_dictionary_encoded_and_array_columns_read_as_written(tmp_path):
    import datasets
    import pyarrow as pa

    table = pa.table({"prompt": pa.array(["p"]), "answer": pa.array(["1"]),
                      "weight": pa.array([0.1], pa.float32()).dictionary_encode()})
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert load_prompts(tmp_path / "d.arrow")[0].meta["weight"] == 0.1
    features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "grid": datasets.Array2D(shape=(1, 2), dtype="float32")})
    datasets.Dataset.from_dict({"prompt": ["p"], "answer": ["1"], "grid": [[[0.1, 0.2]]]},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(tmp_path / "saved")[0].meta["grid"] == [[0.1, 0.2]]


def test_the_earlier_reading_widens_only_the_float32_values_within_structs_and_lists(tmp_path):
    """nested_floats_widened() reads a file as entrorl did before it read nested float32 values as written: what a
    resumed run's saved data digest was taken over. Top-level float32 columns and float64 values read the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from entrorl.data.loading import nested_floats_widened

    pq.write_table(pa.table({"prompt": ["p"], "answer": ["1"], "top": pa.array([0.1], pa.float32()),
                             "info": pa.array([{"w": 0.1, "x": 0.3}], pa.struct([("w", pa.float32()), ("x", pa.float64())])),
                             "vals": pa.array([[0.1]], pa.list_(pa.float16()))}), tmp_path / "d.parquet")
    assert load_prompts(tmp_path / "d.parquet")[0].meta == {"top": 0.1, "info": {"w": 0.1, "x": 0.3}, "vals": [0.1]}
    with nested_floats_widened():
        earlier = load_prompts(tmp_path / "d.parquet")[0].meta
    assert earlier == {"top": 0.1, "info": {"w": float(np.float32(0.1)), "x": 0.3}, "vals": [float(np.float16(0.1))]}
    assert load_prompts(tmp_path / "d.parquet")[0].meta["info"]["w"] == 0.1  # the block's reading ends with it


def test_json_lines_written_under_a_json_name_are_refused_with_the_name_to_give_them(tmp_path):
    """datasets' Dataset.to_json and pandas' to_json(lines=True) write JSON Lines into a .json file: the refusal said
    only "Extra data at column 1" (a file of one row, "no data field"); it now says what the file is and what to call
    it. A .json file with something after its list still names the place."""
    path = tmp_path / "train.json"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": 4}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: not valid JSON \(Extra data at column 1\); expected a JSON list "
                                        r".*; if the file holds JSON Lines, one object per line .*, name it .jsonl"):
        load_prompts(path)
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"without a \"data\" field .*; if the file holds JSON Lines"):
        load_prompts(path)
    path.write_text('[{"prompt": "1+1?", "answer": "2"}]\n[]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: not valid JSON \(Extra data at column 1\); expected a JSON "
                                        r"list of objects or an object \{\"data\": \[...\]\}$"):
        load_prompts(path)
    path.rename(path.with_suffix(".jsonl"))
    path.with_suffix(".jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": 4}\n')
    assert [r.answer for r in load_prompts(path.with_suffix(".jsonl"))] == ["2", "4"]


def test_a_jsonl_error_names_the_column_within_its_line(tmp_path):
    """Read from the open file, each line keeps its newline: a line cut short was said to fail at column 1 (of the
    "second line" the newline made), not where it ends."""
    path = tmp_path / "train.jsonl"
    for newline in ("\n", "\r\n"):
        path.write_bytes(f'{{"prompt": "1+1?", "answer": "2"}}{newline}{{"prompt": "2+2?", "answer": {newline}'.encode())
        with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON \(Expecting value at column 30\)"):
            load_prompts(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_csv_or_jsonl_file_is_read_without_holding_copies_of_it(tmp_path, suffix):
    """A CSV was held as its bytes, its text and a StringIO of it (about 5 times the file beyond the records it gave;
    a JSONL file twice): read from the open file, a data set the size of the memory left can be loaded."""
    import tracemalloc

    path = tmp_path / f"big{suffix}"
    body = "x" * 5000
    if suffix == ".csv":
        path.write_text("prompt,answer\n" + "".join(f"{body}{i},{i}\n" for i in range(400)), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"prompt": f"{body}{i}", "answer": str(i)}) + "\n" for i in range(400)),
                        encoding="utf-8")
    tracemalloc.start()
    try:
        records = load_prompts(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.answer for r in records] == [str(i) for i in range(400)] and records[7].prompt == f"{body}7"
    assert (peak - kept) / path.stat().st_size < 1.2


def test_the_index_pandas_writes_into_parquet_is_a_meta_field_as_datasets_reads_it(tmp_path):
    """A data frame's index that is not 0..n-1 is stored as a column (``__index_level_0__``, or its name): datasets
    reads it as a column, and so does entrorl, which keeps the data digests of earlier runs (and a named index)."""
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"], "answer": ["1", "2"]}, index=[5, 6])
    frame.to_parquet(tmp_path / "unnamed.parquet")
    assert [r.meta for r in load_prompts(tmp_path / "unnamed.parquet")] == [{"__index_level_0__": 5},
                                                                           {"__index_level_0__": 6}]
    frame.rename_axis("problem_id").to_parquet(tmp_path / "named.parquet")
    assert [r.meta for r in load_prompts(tmp_path / "named.parquet")] == [{"problem_id": 5}, {"problem_id": 6}]


def test_a_class_label_answer_is_the_label_s_name(tmp_path):
    """A saved data set whose answer is a ClassLabel (multiple choice, as MMLU's) stores the label's number: the
    reference was '1' for 'B', and a model answering 'B' scored 0 on every prompt."""
    import datasets

    from entrorl.data.loading import answers_class_labels, class_labels_numbered

    features = datasets.Features({"prompt": datasets.Value("string"),
                                  "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})
    datasets.Dataset.from_dict({"prompt": ["Q1", "Q2", "Q3"], "answer": [1, 3, -1]},
                               features=features).save_to_disk(str(tmp_path / "choices"))
    records = load_prompts(tmp_path / "choices", require_answer=False)
    assert [r.answer for r in records] == ["B", "D", None]
    # the same data set as the Hub serves it, in Parquet, and its own Arrow shard: datasets keeps its features there
    dataset = datasets.load_from_disk(str(tmp_path / "choices"))
    dataset.to_parquet(str(tmp_path / "choices.parquet"))
    shard = next((tmp_path / "choices").glob("*.arrow"))
    for path in (tmp_path / "choices.parquet", shard):
        assert [r.answer for r in load_prompts(path, require_answer=False)] == ["B", "D", None]
    with class_labels_numbered():  # as entrorl read them before
        assert [r.answer for r in load_prompts(tmp_path / "choices.parquet", require_answer=False)] == ["1", "3", "-1"]
    assert all(answers_class_labels(path) for path in (tmp_path / "choices", tmp_path / "choices.parquet", shard))
    assert not answers_class_labels(tmp_path / "choices.parquet", "prompt")
