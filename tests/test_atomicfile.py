import errno
import os
import subprocess
import sys
import textwrap

import pytest

from cnnlab.atomicfile import atomic_copy, atomic_open, atomic_write_text, remove_stale_temp_files
from cnnlab.errors import CnnlabError


def test_replaces_the_file_only_when_the_write_completes(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_files_get_the_usual_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_a_write_is_temp_then_fsync_then_rename_then_fsync_of_the_folder(tmp_path, monkeypatch):
    import cnnlab.atomicfile as atomicfile

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomicfile.os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(atomicfile.os, "replace", lambda a, b: (calls.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "f.txt", "x")
    (_, synced_file), (_, renamed_from, renamed_to), (_, synced_folder) = calls
    assert synced_file == renamed_from and os.path.basename(renamed_from).startswith(".f.txt.")
    assert renamed_to == str(tmp_path / "f.txt") and synced_folder == str(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_full_disk_is_one_clear_error_that_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, code):
    import cnnlab.atomicfile as atomicfile

    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomicfile.os, "fsync", full)
    with pytest.raises(CnnlabError, match=rf"cannot write .*f.txt: {os.strerror(code)}; the previous f.txt \(if any\) is kept"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_file_size_limit_is_a_clear_error_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG (Python ignores SIGXFSZ): one line, old file kept, no temp."""
    script = textwrap.dedent(
        f"""
        import resource
        from cnnlab.atomicfile import atomic_write_bytes
        from cnnlab.errors import CnnlabError
        atomic_write_bytes({str(tmp_path / "f.bin")!r}, b"a" * 1000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            atomic_write_bytes({str(tmp_path / "f.bin")!r}, b"b" * 100_000)
        except CnnlabError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cannot write" in result.stdout and "File too large" in result.stdout
    assert (tmp_path / "f.bin").read_bytes() == b"a" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_stale_temp_files_of_cnnlab_naming_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".last.pt.ab3_x9zq.tmp", tmp_path / ".metrics.csv.0123abcd.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / ".hidden.tmp", tmp_path / "notes.tmp", tmp_path / ".a.toolong123.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_copy_is_independent_of_its_source_once_the_source_is_replaced(tmp_path):
    atomic_write_text(tmp_path / "a", "one")
    atomic_copy(tmp_path / "a", tmp_path / "b")
    atomic_write_text(tmp_path / "a", "two")
    assert (tmp_path / "b").read_text() == "one" and (tmp_path / "a").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
