"""`files.publish_dir`: the one way every command publishes a directory, and its one "output exists" policy;
`files.atomic_write`: the one way a single file is replaced; `files.exclusive_lock`: the one lock on a run's
directory."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import save_dense, subprocess_env
from upcycle.convert.conversion import convert
from upcycle.errors import UpcycleError
from upcycle import files
from upcycle.files import (LockHeld, atomic_path, atomic_write, atomic_write_json, exclusive_lock, publish_dir,
                          sha256_file)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale(parent: Path, name: str, pid: int, tag: str = "upcycle-tmp") -> Path:
    path = parent / f".{name}.{tag}-{pid}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half written")
    return path


def test_publish_dir_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError):
        with publish_dir(out, force=False) as tmp:
            (tmp / "a").write_text("partial")
            raise RuntimeError("killed")
    assert not out.exists() and not list(out.parent.iterdir())
    with publish_dir(out, force=False) as tmp:
        (tmp / "a").write_text("complete")
        assert not out.exists()
    assert (out / "a").read_text() == "complete" and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_one_policy_for_an_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(UpcycleError, match="already exists.*--force"):
        with publish_dir(out, force=False):
            pass
    assert (out / "old").exists()
    with publish_dir(out, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    file_out = tmp_path / "file"
    file_out.write_text("not a directory")
    with pytest.raises(UpcycleError, match="not a directory"):
        with publish_dir(file_out, force=True):
            pass
    assert file_out.read_text() == "not a directory"
    with pytest.raises(UpcycleError, match="contains the input"):
        with publish_dir(tmp_path, force=True, inputs=[out / "new"]):
            pass


def test_temporaries_of_killed_runs_are_removed_and_those_of_live_runs_kept(tmp_path):
    dead, alive = _dead_pid(), subprocess.os.getppid()
    stale = _stale(tmp_path, "out", dead)
    live = _stale(tmp_path, "out", alive)
    other = _stale(tmp_path, "other", dead)
    with publish_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists() and live.exists() and other.exists()


def test_a_killed_conversion_leaves_nothing_the_next_run_does_not_remove(tmp_path):
    dense = save_dense(tmp_path / "dense", "llama")
    stale = _stale(tmp_path, "moe", _dead_pid())  # killed while writing
    convert(dense, tmp_path / "moe", num_experts=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]
    old = _stale(tmp_path, "moe", _dead_pid(), tag="upcycle-old")  # a --force run killed while deleting the old one
    stale = _stale(tmp_path, "moe", _dead_pid())
    convert(dense, tmp_path / "moe", num_experts=2, progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]
    assert not stale.exists() and not old.exists()


def test_a_previous_output_moved_aside_is_kept_while_the_output_is_missing(tmp_path):
    old = _stale(tmp_path, "out", _dead_pid(), tag="upcycle-old")
    with pytest.raises(RuntimeError):
        with publish_dir(tmp_path / "out", force=False):
            raise RuntimeError
    assert old.exists()


def test_sha256_file(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert sha256_file(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import errno
    import os

    with pytest.raises(UpcycleError, match="cannot write OUTPUT .*: No space left on device; nothing was written"):
        with publish_dir(tmp_path / "out", force=False) as tmp:
            (tmp / "a").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs, where the machine allows mounting (root, no sandbox); skipped elsewhere."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_convert_onto_a_full_disk_is_refused_up_front_or_fails_cleanly(tmp_path, small_tmpfs, monkeypatch):
    from upcycle.convert import conversion as convert_module

    dense = save_dense(tmp_path / "dense", "llama")  # its output needs ~0.5 MB, more than the tmpfs holds
    with pytest.raises(UpcycleError, match="needs about .* of disk"):
        convert(dense, small_tmpfs / "moe", num_experts=8, progress=False)
    assert list(small_tmpfs.iterdir()) == []
    monkeypatch.setattr(convert_module, "_free_disk_bytes", lambda path: 10**12)  # as if the estimate were wrong
    with pytest.raises(UpcycleError, match="No space left on device; nothing was written"):
        convert(dense, small_tmpfs / "moe", num_experts=8, progress=False)
    assert list(small_tmpfs.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_replaces_the_file_and_makes_the_file_and_its_directory_durable(tmp_path, monkeypatch):
    synced = []
    real_fsync = files.fsync_path
    monkeypatch.setattr(files, "fsync_path", lambda path: (synced.append(Path(path).name), real_fsync(path)))
    path = tmp_path / "report.md"
    path.write_text("old")
    atomic_write(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert synced == [f".report.md.tmp-{os.getpid()}", tmp_path.name]  # the file before the rename, then the directory
    atomic_write(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes"
    atomic_write_json(tmp_path / "a.json", {"b": [1]}, indent=1)
    assert (tmp_path / "a.json").read_text() == '{\n "b": [\n  1\n ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "report.md"]


def test_a_write_failing_midway_leaves_the_old_file_whole_and_names_it(tmp_path):
    """A real ENOSPC (the temporary file is a link to /dev/full, where write() fails naming no file): the old file
    is untouched, no temporary file is left, and the error names the file that was being written."""
    path = tmp_path / "results.json"
    path.write_text("old, complete")
    (tmp_path / f".results.json.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError) as error:
        atomic_write(path, "x" * (1 << 20))
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert path.read_text() == "old, complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_writer_that_raises_inside_atomic_path_leaves_the_old_file(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path, keep_suffix=True) as tmp:
            assert tmp.name == f".figure.tmp-{os.getpid()}.png"  # savefig picks the format by the ending
            tmp.write_bytes(b"half")
            raise RuntimeError("killed halfway")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


# ---------------------------------------------------------------------------------------------------------------------
# exclusive_lock


def test_the_lock_refuses_a_second_holder_names_the_first_and_is_free_once_closed(tmp_path):
    path = tmp_path / ".lock"
    handle, unlocked = exclusive_lock(path)
    assert unlocked is None and path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(LockHeld) as held:  # flock belongs to the open file: a second open() is a second holder
        exclusive_lock(path)
    assert held.value.holder == str(os.getpid())
    second = subprocess.run([sys.executable, "-c", "import sys; from upcycle.files import exclusive_lock, LockHeld\n"
                             "try:\n    exclusive_lock(sys.argv[1])\nexcept LockHeld as held:\n"
                             "    sys.exit(f'held by {held.holder}')", str(path)],
                            capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert second.stderr.strip() == f"held by {os.getpid()}"
    handle.close()
    again, _ = exclusive_lock(path)
    again.close()


def test_a_waiting_lock_is_taken_when_the_holder_lets_go(tmp_path):
    path = tmp_path / ".setup.lock"
    handle, _ = exclusive_lock(path)
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(exclusive_lock(path, wait=True)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not taken  # blocked while the first holds it
    handle.close()
    waiter.join(10)
    assert len(taken) == 1 and taken[0][1] is None
    taken[0][0].close()


def test_on_a_file_system_without_locks_the_file_is_returned_with_the_error(tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre without flock

    monkeypatch.setattr(fcntl, "flock", no_locks)
    handle, unlocked = exclusive_lock(tmp_path / ".lock")
    try:
        assert unlocked.errno == errno.ENOSYS and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        handle.close()
