"""entrorl._files: what an output path names (a file, a link, a device, a descriptor) and how it is written."""

from __future__ import annotations

import os

import pytest

from entrorl._files import write_atomically, write_folder_atomically, written_in_place
from entrorl.data.loading import check_output_file


def _waiting(read_end: int) -> bytes:
    """What the pipe holds now, without waiting for more."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 65536)
    except BlockingIOError:
        return b""


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for end in (read_end, write_end):
        os.close(end)


@pytest.mark.parametrize("spelling", ["0{n}", "{arabic_indic}", "\u00b2", "9" * 20])
def test_descriptor_names_the_kernel_does_not_have_are_refused_and_nothing_is_written(pipe, spelling):
    """/dev/fd/01 or /dev/fd/<digits of another script> name no descriptor: an OSError naming the path, as open()
    gives, and nothing reaches the descriptor whose number they spell."""
    read_end, write_end = pipe
    name = spelling.format(n=write_end, arabic_indic="".join(chr(0x0660 + int(d)) for d in str(write_end)))
    path = f"/dev/fd/{name}"
    with pytest.raises(OSError) as refused:
        write_atomically(path, lambda handle: handle.write(b"lost"))
    assert refused.value.filename == path
    assert _waiting(read_end) == b""


def test_a_descriptor_open_for_reading_is_opened_anew_for_writing(pipe):
    """/dev/fd/N of a pipe's reading end: check_output_file accepts it, so the write must go through (the descriptor
    itself cannot be written; the pipe opened for writing can)."""
    read_end, _ = pipe
    path = f"/dev/fd/{read_end}"
    assert written_in_place(path)
    check_output_file(path, what="--out")
    write_atomically(path, lambda handle: handle.write(b"summary"))
    assert _waiting(read_end) == b"summary"


def test_a_descriptor_open_for_writing_is_written_through_itself(pipe):
    read_end, write_end = pipe
    write_atomically(f"/proc/self/fd/{write_end}", lambda handle: handle.write(b"one "))
    write_atomically(f"/dev/fd/{write_end}", lambda handle: handle.write(b"two"))
    os.write(write_end, b" three")  # the descriptor's own writes follow
    assert _waiting(read_end) == b"one two three"


def test_a_regular_file_is_replaced_with_its_permission_bits_kept(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    target.chmod(0o640)
    assert not written_in_place(target)
    write_atomically(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(ZeroDivisionError):  # any failure: the old content stays, no temporary file is left
        write_atomically(target, lambda handle: handle.write(b"half") and 1 / 0)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_written_atomically_replaces_the_old_one_or_leaves_it(tmp_path):
    """write_folder_atomically: the new folder replaces the old one whole (no file of the old one left); a write that
    fails or is interrupted leaves the old folder as it was and no temporary folder; a link is followed."""
    target = tmp_path / "copy"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def write_new(folder):
        folder.mkdir()
        (folder / "new.txt").write_text("new")

    write_folder_atomically(target, write_new)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]

    def interrupted(folder):
        write_new(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, interrupted)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]

    def failing(folder):
        folder.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="copy"):
        write_folder_atomically(target, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    link = tmp_path / "link"
    link.symlink_to(target)
    write_folder_atomically(link, lambda folder: (folder.mkdir(), (folder / "third.txt").write_text("3")))
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["third.txt"]


def test_a_folder_write_stopped_between_its_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """A Ctrl-C after the old folder was moved aside and before the new one took its place: the old one is back."""
    import entrorl._files as files

    target = tmp_path / "copy"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def interrupted_second_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, lambda folder: (folder.mkdir(), (folder / "new.txt").write_text("new")))
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
