"""The data audit's files as one set (write_audit_outputs): an earlier audit's set stays whole when writing fails or is
interrupted, and replacing it keeps what the earlier writes kept (permission bits, links followed, pipes and devices
written into, other file systems)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from entrorl._files import put_in_place_together
from entrorl.data import load_prompts
from entrorl.data.audit import AuditThresholds, audit_prompt
from entrorl.trainer.audit import AuditResult, write_audit_outputs

ROWS = [{"prompt": f"p{i}", "answer": str(i)} for i in range(3)]


def _result(data: Path, count: int | None = None, first_reward_error: str | None = None) -> AuditResult:
    """A hand-made result for the first ``count`` prompts of ``data`` (all by default), 4 samples each, half right."""
    records = load_prompts(data)[:count]
    answers = [[r.answer, "9", r.answer, "8"] for r in records]
    correct = [[a == r.answer for a in ans] for r, ans in zip(records, answers)]
    audits = [audit_prompt(a, c, thresholds=AuditThresholds()) for a, c in zip(answers, correct)]
    result = AuditResult(records=records, audits=audits, completions=[[f"so {a}" for a in ans] for ans in answers],
                         answers=answers, too_long=[], n=4, correct=correct)
    result.first_reward_error = first_reward_error
    return result


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

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from entrorl.lab.tiny_model import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    return save_tiny_model(directory, seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=64)


def test_an_audit_that_fails_to_write_leaves_no_reward_errors_log_of_its_own_beside_the_earlier_set(audit, monkeypatch):
    """reward_errors.log belongs to the set: an audit whose reward failed on some samples and whose writing then fails
    (a full disk) leaves the earlier audit's files exactly as they were, with no log of its own beside them; the
    traceback is kept in a temporary file the error names."""
    import entrorl.trainer.audit as audit_module

    first = audit("half")
    assert first.exit_code == 0, first.output
    earlier = {path.name: path.read_bytes() for path in Path("aud").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_module, "write_selected_rows", full)
    result = audit("flaky")
    assert result.exit_code != 0 and "No space left on device" in result.output, result.output
    assert {path.name: path.read_bytes() for path in Path("aud").iterdir()} == earlier
    assert "bad thing" in _traceback_named(result.output)  # the traceback is kept in a temporary file, named


def _saved_data_set(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(data))
    return data


# ------------------------------------------------------------------------------------ put_in_place_together


def test_two_names_linked_to_one_file_get_it_back_when_the_set_fails(tmp_path):
    """Two names of the set are links to one file: it is replaced once (the first name's), and a failure later in the
    set puts the original back (each entry moved aside has a name of its own)."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    staging.mkdir(parents=True)
    kept = tmp_path / "kept.jsonl"
    kept.write_text("the earlier audit's rows\n")
    (out / "a.jsonl").symlink_to(kept)
    (out / "b.jsonl").symlink_to(kept)
    (staging / "a.jsonl").write_text("new a\n")
    (staging / "b.jsonl").write_text("new b\n")
    # "summary.json" is not staged: putting it in place fails, after both links' file was replaced
    with pytest.raises(OSError):
        put_in_place_together(staging, out, ["a.jsonl", "b.jsonl", "summary.json"])
    assert kept.is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert kept.read_text() == "the earlier audit's rows\n"


def test_an_interrupt_right_after_a_file_is_moved_aside_puts_it_back(tmp_path, monkeypatch):
    """An interrupt that arrives as a file has just been moved aside (before anything records it) still has it put
    back: what was moved aside is read from the file system."""
    out, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    staging.mkdir(parents=True)
    for name in ("a.json", "b.json"):
        (out / name).write_text(f"old {name}")
        (staging / name).write_text(f"new {name}")
    replace = os.replace

    def rename_then_interrupt(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if os.path.basename(os.fspath(src)) == "b.json" and ".old-" in os.path.basename(os.fspath(dst)):
            raise KeyboardInterrupt  # the signal, delivered during the rename, raised as it returns

    monkeypatch.setattr(os, "replace", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        put_in_place_together(staging, out, ["a.json", "b.json"])
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == {"a.json": "old a.json", "b.json": "old b.json"}


def test_a_missing_folder_behind_a_link_is_named_in_the_error(tmp_path):
    """summary.json a dangling link into a folder that does not exist: the error names the link's target, the path
    that is missing, not the link."""
    data = _jsonl(tmp_path)
    out = tmp_path / "out"
    write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(tmp_path / "gone" / "summary.json")
    with pytest.raises(OSError) as caught:
        write_audit_outputs(_result(data, 2), data, out, band="[0, 1]", plot=False)
    assert "gone" in str(caught.value), str(caught.value)


# ------------------------------------------------------------------------------------ write_audit_outputs


def test_an_interrupt_while_the_earlier_data_set_copy_is_removed_leaves_no_reward_log_of_the_earlier_set(tmp_path, monkeypatch):
    """What was moved aside (a big data set folder: long to remove) is removed once the whole new set is in place, an
    earlier set's file this one has not (reward_errors.log) taken away with it: an interrupt there leaves the new set
    whole, with no file of the earlier set."""
    data = _saved_data_set(tmp_path)
    out = tmp_path / "out"
    write_audit_outputs(_result(data, 2, first_reward_error="reward raised: Traceback ..."), data, out, band="[0, 1]",
                        plot=False)
    assert (out / "reward_errors.log").is_file()
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
    assert summary["audited"] == 3 and summary["first_reward_error"] is None
    assert not (out / "reward_errors.log").exists(), sorted(p.name for p in out.iterdir())
    assert len((out / "audit.jsonl").read_text().splitlines()) == summary["audited"]
    datasets = pytest.importorskip("datasets")
    assert datasets.load_from_disk(str(out / "ds.filtered")).num_rows == summary["band"]["kept"]


def test_a_second_interrupt_during_the_rollback_still_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    """Placing the summary fails; the rollback first renames the earlier files back, then removes the new ones (a
    data set folder: long): a second interrupt there still leaves the earlier set whole."""
    datasets = pytest.importorskip("datasets")
    data = _saved_data_set(tmp_path)
    out = tmp_path / "out"
    write_audit_outputs(_result(data, 2), data, out, band="[0, 1]", plot=False)
    replace, rmtree, failed = os.replace, shutil.rmtree, []

    def full_disk_on_the_summary(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)) == "summary.json" and ".audit.tmp-" in os.fspath(src):
            failed.append(src)
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    def second_interrupt(path, *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        if failed and os.path.exists(path) and not name.startswith(".audit.tmp-") and ".old-" not in name:
            failed.clear()
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk_on_the_summary)
    monkeypatch.setattr(shutil, "rmtree", second_interrupt)
    with pytest.raises((KeyboardInterrupt, OSError)):
        write_audit_outputs(_result(data), data, out, band="[0, 1]", plot=False)
    monkeypatch.undo()
    names = sorted(p.name for p in out.iterdir())
    assert (out / "audit.jsonl").is_file() and (out / "ds.filtered").is_dir(), names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audited"] == 2
    assert len((out / "audit.jsonl").read_text().splitlines()) == 2
    assert datasets.load_from_disk(str(out / "ds.filtered")).num_rows == 2


# ------------------------------------------------------------------------------------ the CLI

REWARDS = """
def half(prompt, completion, answer, **meta):
    return 0.5

def flaky(prompt, completion, answer, **meta):
    if prompt.startswith("3"):
        raise ValueError("bad thing")
    return 0.0

def broken(prompt, completion, answer, **meta):
    raise KeyError("no such column")
"""


@pytest.fixture
def audit(tmp_path, monkeypatch, tiny_model):
    from typer.testing import CliRunner

    from entrorl.cli import app

    (tmp_path / "entrorl_test_audit_set_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("m.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in (1, 2, 3)))

    def run(reward: str):
        return CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model), "--data", "m.jsonl", "--n", "2",
                                        "--max-new-tokens", "2", "--reward", f"entrorl_test_audit_set_rewards:{reward}",
                                        "--out", "aud", "--band", "[0, 1]"])

    yield run
    sys.modules.pop("entrorl_test_audit_set_rewards", None)


def _traceback_named(output: str) -> str:
    match = re.search(r"traceback is in (\S+?)[;)]?(?:\s|$)", output)
    assert match, output
    kept = Path(match.group(1))
    text = kept.read_text()
    kept.unlink()  # a temporary file of the audit's
    return text


def test_a_reward_that_failed_everywhere_leaves_the_earlier_audit_s_reward_errors_log_as_it_was(audit):
    """A reward that failed on every sample with an earlier audit's set in --out: the set is left as it was, its
    reward_errors.log included, and the new traceback goes to a temporary file the error names."""
    first = audit("flaky")
    assert first.exit_code == 0, first.output
    earlier = {path.name: path.read_bytes() for path in Path("aud").iterdir()}
    assert b"bad thing" in earlier["reward_errors.log"]
    result = audit("broken")
    assert result.exit_code != 0 and "failed on all" in result.output, result.output
    assert {path.name: path.read_bytes() for path in Path("aud").iterdir()} == earlier
    assert "no such column" in _traceback_named(result.output)


_AUDIT = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    base, n, kill = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "kill"
    model = base / "model"
    if not model.exists():
        from entrorl.lab.tiny_model import save_tiny_model
        save_tiny_model(model, seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=64)
    data = base / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\\n" for a in range(4)))
    if kill:  # a job scheduler's SIGTERM while the set goes in: after the second file of the set is in place
        replace, count = os.replace, [0]
        def replace_then_terminate(source, destination, *args, **kwargs):
            done = replace(source, destination, *args, **kwargs)
            if ".audit.tmp-" in os.fspath(source):
                count[0] += 1
                if count[0] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
            return done
        os.replace = replace_then_terminate
    sys.argv = ["entrorl", "data", "audit", "--model", str(model), "--data", str(data), "--n", n,
                "--max-new-tokens", "2", "--out", str(base / "out")]
    from entrorl.cli import main
    main()
""")


def test_a_sigterm_while_data_audit_puts_its_set_in_place_leaves_the_earlier_set_whole(tmp_path):
    """A job scheduler's SIGTERM while `entrorl data audit` puts its set in place (after its second file went in):
    the set is rolled back as on Ctrl-C, the earlier audit's files are as they were, and the command says
    "terminated" and exits 143."""
    script = tmp_path / "audit.py"
    script.write_text(_AUDIT)
    environment = {**os.environ, "TMPDIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
                   "ENTRORL_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, str(script), str(tmp_path), "2", "no"], capture_output=True, text=True,
                           env=environment, timeout=300)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    second = subprocess.run([sys.executable, str(script), str(tmp_path), "3", "kill"], capture_output=True, text=True,
                            env=environment, timeout=300)
    now = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert now == earlier, f"mixed set: changed {sorted(k for k in now if now[k] != earlier.get(k))}"
    assert second.returncode == 128 + signal.SIGTERM and "terminated" in second.stderr, (second.returncode,
                                                                                          second.stderr[-500:])


def test_data_audit_interrupted_after_its_set_went_in_does_not_say_the_folder_holds_the_earlier_set(
        tmp_path, monkeypatch, tiny_model):
    """`entrorl data audit` interrupted once its new set is in (while what it replaced is being removed: a saved data
    set's filtered copy is long to remove) says the folder holds this audit's set; interrupted before, that it holds
    what it held before."""
    import entrorl._files as files
    from typer.testing import CliRunner

    from entrorl.cli import app

    monkeypatch.chdir(tmp_path)
    Path("m.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                                       for i in (1, 2, 3)))

    def run(n: str):
        return CliRunner().invoke(app, ["data", "audit", "--model", str(tiny_model), "--data", "m.jsonl", "--n", n,
                                        "--max-new-tokens", "2", "--out", "aud", "--band", "[0, 1]"])

    first = run("2")
    assert first.exit_code == 0, first.output
    earlier = {p.name: p.read_bytes() for p in Path("aud").iterdir()}

    remove = files._remove_entry

    def interrupted(path):
        if ".old-" in path.name:  # the set is in; what it replaced is being removed
            raise KeyboardInterrupt
        return remove(path)

    with monkeypatch.context() as patch:
        patch.setattr(files, "_remove_entry", interrupted)
        second = run("3")
    now = {p.name: p.read_bytes() for p in Path("aud").iterdir() if not p.name.startswith(".")}
    assert second.exit_code == 130, second.output
    said = " ".join(second.output.split())
    assert "after the audit's files went in: aud holds this audit's set" in said
    assert json.loads(now["summary.json"])["n"] == 3 and now != earlier
