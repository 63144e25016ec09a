"""OUT/metrics.jsonl survives what interrupts a run: a partial last line (killed mid-write, a full disk) does not stop
the resume, truncating on resume never loses records when the rewrite itself fails, and a failed append names the
file."""

from __future__ import annotations

import builtins
import errno
import io
import json

import pytest

from upcycle.cli import os_error_line
from upcycle.errors import UpcycleError
from upcycle.train.metrics import METRICS_FILE, MetricsLog, truncate_metrics


def _write(path, steps, tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps) + tail)


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_partial_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / METRICS_FILE
    _write(path, [1, 2, 3, 4], tail='{"step": 5, "lo')  # killed while writing step 5
    with MetricsLog(tmp_path, enabled=True, start_step=4, max_steps=6, progress=False, tensorboard=False) as log:
        log.log({"step": 5, "loss": 0.2, "lr": 1e-3})
    assert _steps(path) == [1, 2, 3, 4, 5]
    _write(path, [1, 2, 3, 4], tail='{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert _steps(path) == [1, 2]


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UpcycleError, match=r"metrics.jsonl line 2 is not a step record"):
        truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\n{"st\n{"step": 3}\n'  # left as it was


def test_a_failed_rewrite_keeps_every_record(tmp_path, monkeypatch):
    """The disk fills while truncate_metrics rewrites the file: the old file must still be whole."""
    path = tmp_path / METRICS_FILE
    _write(path, range(1, 9))
    before = path.read_bytes()
    real_open = builtins.open

    class _FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(tmp_path) in str(file):
            real_open(file, mode, *args, **kwargs).close()  # opening for writing truncates, as on a real disk
            return _FullDisk()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    monkeypatch.setattr(io, "open", full_disk_open)
    with pytest.raises(OSError):
        truncate_metrics(path, 4)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary file left behind


def test_a_full_disk_on_append_names_the_metrics_file(tmp_path):
    (tmp_path / METRICS_FILE).symlink_to("/dev/full")  # every write to /dev/full fails with ENOSPC
    log = MetricsLog(tmp_path, enabled=True, start_step=0, max_steps=2, progress=False, tensorboard=False)
    with pytest.raises(OSError) as exc:
        log.log({"step": 1, "loss": 1.0, "lr": 1e-3})
    assert exc.value.errno == errno.ENOSPC
    line = os_error_line(exc.value)
    assert str(tmp_path / METRICS_FILE) in line and "ENOSPC" in line
    with pytest.raises(OSError, match="metrics.jsonl"):  # the buffered record fails again on close, named too
        log.close()
