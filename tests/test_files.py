"""files.py: a file under its real name is always complete, and a failed write leaves nothing behind."""

import os

import pytest

from files import atomic_write, copy_file


def test_a_write_replaces_the_file_only_when_complete(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new, part one; ")
        assert path.read_bytes() == b"old"  # mid-write, the real name still holds the previous file
        f.write(b"part two")
    assert path.read_bytes() == b"new, part one; part two"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("sync", [True, False])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, sync):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path, "w", sync=sync) as f:
            f.write("half of the new")
            raise OSError(28, "disk full")  # what a full disk raises from inside a writer such as torch.save
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_text_mode_writes_utf8_and_two_writers_use_two_temporary_names(tmp_path):
    with atomic_write(tmp_path / "a.txt", "w") as f:
        f.write("déjà vu ▁\n")
        assert f.name.endswith(f".{os.getpid()}.tmp")  # the writer's pid: another process gets another name
    assert (tmp_path / "a.txt").read_bytes() == "déjà vu ▁\n".encode()


def test_copy_file_copies_every_byte(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "src").write_bytes(data)
    copy_file(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data
