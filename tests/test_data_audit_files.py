"""The data audit's files as one set (write_audit_outputs): an earlier audit's set stays whole when writing fails or is
interrupted, and replacing it keeps what the earlier writes kept (permission bits, links followed, pipes and devices
written into, other file systems)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import threading
from pathlib import Path

import pytest

from entrorl.data import load_prompts
from entrorl.data.audit import AuditThresholds, audit_prompt
from entrorl.trainer.audit import AuditResult, write_audit_outputs

ROWS = [{"prompt": f"p{i}", "answer": str(i)} for i in range(3)]


def _result(data: Path, count: int | None = None) -> AuditResult:
    """A hand-made result for the first ``count`` prompts of ``data`` (all by default), 4 samples each, half right."""
    records = load_prompts(data)[:count]
    answers = [[r.answer, "9", r.answer, "8"] for r in records]
    correct = [[a == r.answer for a in ans] for r, ans in zip(records, answers)]
    audits = [audit_prompt(a, c, thresholds=AuditThresholds()) for a, c in zip(answers, correct)]
    return AuditResult(records=records, audits=audits, completions=[[f"so {a}" for a in ans] for ans in answers],
                       answers=answers, too_long=[], n=4, correct=correct)


def _jsonl(tmp_path: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return data


@pytest.fixture
def other_filesystem(tmp_path):
    """A folder on another filesystem than tmp_path (/dev/shm, a tmpfs), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another filesystem than tmp_path")
    folder = shm / f"entrorl-audit-set-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_replacing_an_earlier_audit_keeps_the_permission_bits_of_its_files(tmp_path):
    """A file of an earlier audit whose mode someone restricted (0600) keeps it when the new audit replaces it."""
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    os.chmod(out / "summary.json", 0o600)
    os.chmod(out / "d.filtered.jsonl", 0o600)
    os.chmod(out / "audit.jsonl", 0o640)
    write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("summary.json", "d.filtered.jsonl", "audit.jsonl")}
    assert modes == {"summary.json": 0o600, "d.filtered.jsonl": 0o600, "audit.jsonl": 0o640}


def test_a_summary_that_links_to_another_file_system_is_written_through_the_link(tmp_path, other_filesystem):
    """summary.json a link to a file on another file system: the file it names is replaced (a copy, where a rename
    cannot cross), the link kept."""
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = other_filesystem / "summary.json"
    target.write_text("{}\n")
    (out / "summary.json").symlink_to(target)
    outputs = write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    assert (out / "summary.json").is_symlink()
    assert json.loads(target.read_text()) == outputs.summary


def test_a_filtered_copy_linked_to_another_file_system_is_copied_there_and_the_set_is_one_audit_s(tmp_path, other_filesystem):
    """The filtered file a link to another file system: the new copy goes there, and the folder's files are all the
    new audit's (were the copy to fail, all the earlier one's: never one file of each)."""
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    write_audit_outputs(_result(data, 2), data, out, band="[0, 1]", plot=False)
    target = other_filesystem / "kept.jsonl"
    shutil.move(out / "d.filtered.jsonl", target)
    (out / "d.filtered.jsonl").symlink_to(target)
    try:
        write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    except OSError:
        pass  # failing is acceptable; leaving one file of each audit is not
    summary = json.loads((out / "summary.json").read_text())
    assert len((out / "audit.jsonl").read_text().splitlines()) == summary["audited"]


def test_an_interrupt_between_the_two_renames_of_a_saved_data_set_copy_puts_the_earlier_copy_back(tmp_path, monkeypatch):
    """The earlier filtered folder is moved aside, then the new one in: an interrupt between the two puts the earlier
    copy back."""
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(data))
    out = tmp_path / "out"
    write_audit_outputs(_result(data, 2), data, out, band="[0, 1]", plot=False)
    final = os.path.realpath(out / "ds.filtered")
    replace, fired = os.replace, []

    def interrupted(src, dst, *args, **kwargs):
        if os.fspath(dst) == final and ".old-" not in os.path.basename(os.fspath(src)) and not fired:
            fired.append(src)
            raise KeyboardInterrupt
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    monkeypatch.undo()
    assert fired
    assert (out / "ds.filtered").is_dir(), sorted(p.name for p in out.iterdir())
    assert datasets.load_from_disk(str(out / "ds.filtered")).num_rows == 2


def test_an_interrupt_while_the_earlier_data_set_copy_is_removed_leaves_no_mixed_set(tmp_path, monkeypatch):
    """The earlier filtered folder (long to remove, for a big data set) is removed only once the whole new set is in
    place: an interrupt while it is removed leaves the new set whole."""
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(data))
    out = tmp_path / "out"
    write_audit_outputs(_result(data, 2), data, out, band="[0, 1]", plot=False)
    rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)).startswith(".ds.filtered.old-") and os.path.exists(path):
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    try:
        write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    summary = json.loads((out / "summary.json").read_text())
    assert len((out / "audit.jsonl").read_text().splitlines()) == summary["audited"]
    assert datasets.load_from_disk(str(out / "ds.filtered")).num_rows == summary["band"]["kept"]


def test_a_summary_that_links_to_a_pipe_is_written_into_not_replaced(tmp_path):
    """What cannot be replaced -- a pipe, a device such as /dev/null -- is written into, as every atomic write of
    entrorl's does: the FIFO stays a FIFO and its reader gets the summary."""
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (out / "summary.json").symlink_to(fifo)
    got: list[bytes] = []

    def reader():
        with open(fifo, "rb") as handle:
            got.append(handle.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    finally:
        if stat.S_ISFIFO(os.lstat(fifo).st_mode) and not got:
            try:  # let the reader go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and json.loads(got[0])["audited"] == 3


# ---------------------------------------------------------------------------------------------- the CLI

REWARDS = """
def half(prompt, completion, answer, **meta):
    return 0.5

def flaky(prompt, completion, answer, **meta):
    if prompt.startswith("3"):
        raise ValueError("bad thing")
    return 0.0
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from entrorl.lab.tiny_model import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    return save_tiny_model(directory, seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64)


def test_an_audit_that_fails_to_write_leaves_no_reward_errors_log_of_its_own_beside_the_earlier_set(
        tmp_path, monkeypatch, tiny_model):
    """reward_errors.log belongs to the set: an audit whose reward failed on some samples and whose writing then fails
    (a full disk) leaves the earlier audit's files exactly as they were, with no log of its own beside them."""
    from typer.testing import CliRunner

    import entrorl.trainer.audit as audit_module
    from entrorl.cli import app

    (tmp_path / "entrorl_test_audit_set_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("m.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in (1, 2, 3)))

    def audit(reward: str):
        return CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model), "--data", "m.jsonl", "--n", "2",
                                        "--max-new-tokens", "2", "--reward", f"entrorl_test_audit_set_rewards:{reward}",
                                        "--out", "aud", "--band", "[0, 1]"])

    try:
        first = audit("half")
        assert first.exit_code == 0, first.output
        earlier = {path.name: path.read_bytes() for path in Path("aud").iterdir()}

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(audit_module, "write_selected_rows", full)
        result = audit("flaky")
        assert result.exit_code != 0 and "No space left on device" in result.output, result.output
        assert {path.name: path.read_bytes() for path in Path("aud").iterdir()} == earlier
    finally:
        sys.modules.pop("entrorl_test_audit_set_rewards", None)
