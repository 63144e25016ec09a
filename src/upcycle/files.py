"""Publishing directories atomically: every writer of a directory (convert, data prepare, export, checkpoints)
builds it under a temporary sibling name and uses these, so a reader sees a complete directory or none."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from upcycle.errors import UpcycleError


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_output_over_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, flag: str) -> None:
    """Refuse an output directory that is, or contains, one of the inputs: replacing it (--force) would delete the
    very files the command reads. Paths are compared after resolving symlinks, so an alias of the input is caught."""
    out_real = Path(out).expanduser().resolve()
    for item in inputs:
        item_real = Path(item).expanduser().resolve()
        if item_real == out_real or out_real in item_real.parents:
            what = "is" if item_real == out_real else "contains"
            raise UpcycleError(f"{flag} {out} {what} the input {item}; replacing it would delete the input, "
                               f"choose another {flag}")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`; an existing `out` is removed only after the new one is in place."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
    fsync_dir(out.parent)
