"""Publishing files and directories atomically, exclusive locks, and file digests.

Every command that writes a directory (convert, data prepare, export) builds it with `publish_dir`: a temporary hidden
sibling `.NAME.upcycle-tmp-PID` is filled, made durable and renamed into place only when complete, so a reader sees a
complete directory or none. One policy for an existing output: refused unless `force`, and then replaced only once the
new one is complete. Temporary directories left by killed runs (their PID no longer alive) are removed by the next run
that publishes the same NAME.

Every single file that must never be seen half written (a report, a JSON record, a figure, a cache) is written with
`atomic_write` (or `atomic_path` for a writer that takes a path): a temporary sibling `.NAME.tmp-PID`, fsynced, renamed
over NAME, and the directory fsynced. A run that must be the only one on a directory holds `exclusive_lock` on a file
in it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from upcycle.errors import UpcycleError


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries (new files, renames), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming(error: OSError, path: Path, tmp: Path) -> OSError:
    """`error` naming `path` where it names no file (write() on a full disk) or only the temporary file `tmp`, so the
    one-line message says which file could not be written."""
    if error.filename is None or error.filename == str(tmp):
        named = OSError(error.errno, error.strerror or str(error), str(path))
        named.__cause__ = error
        return named
    return error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; when the block ends normally it is fsynced and renamed over
    `path` (one rename: a reader sees the old file or the new, never half of one) and the directory is fsynced, so the
    new file survives a crash. When the block raises, the temporary file is removed and `path` is untouched; an
    OSError naming no file, or the temporary one, is re-raised naming `path`. The temporary name is `.NAME.tmp-PID`
    (one per process), or with `keep_suffix` `.STEM.tmp-PID.SUFFIX`, for writers that pick a format by the ending
    (matplotlib's savefig)."""
    path = Path(path)
    name = f".{path.stem}.tmp-{os.getpid()}{path.suffix}" if keep_suffix else f".{path.name}.tmp-{os.getpid()}"
    tmp = path.with_name(name)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _naming(error, path, tmp) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically and durably (`atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> None:
    """`data` as JSON (with a final newline), written atomically and durably."""
    atomic_write(path, json.dumps(data, indent=indent) + "\n")


class LockHeld(Exception):
    """Another process holds the exclusive lock on `path`; `holder` is the pid it wrote there ("unknown" if none)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by process {holder}")
        self.path, self.holder = path, holder


def exclusive_lock(path: str | os.PathLike, *, wait: bool = False) -> tuple[IO, OSError | None]:
    """Take an exclusive advisory lock (flock) on file `path`, created if missing, and write this process's pid into
    it. Returns (the open file, which holds the lock until it is closed or the process ends, SIGKILL included; None,
    or the OSError of a file system without locks: Lustre without flock (ENOSYS), NFSv3 without lockd (ENOLCK), on
    which the file holds no lock and the caller decides whether to go on). Raises LockHeld when another process holds
    the lock, or with `wait` waits for it."""
    import fcntl

    path = Path(path)
    handle = open(path, "a+")  # noqa: SIM115 (returned open: it holds the lock)
    unlocked = None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise LockHeld(path, holder) from None
    except OSError as error:
        unlocked = error
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle, unlocked


def wait_for_file(path: Path, timeout_s: float = 120.0, interval_s: float = 0.5) -> bool:
    """Whether file `path` exists, waiting up to `timeout_s` for one that another node wrote to show through a network
    file system's attribute cache (listing the directory makes an NFS client revalidate it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if path.is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
        time.sleep(interval_s)


def _resolved(path: Path) -> Iterator[Path]:
    try:
        yield path.resolve()
    except (RuntimeError, OSError):  # a symlink loop inside an input directory
        return


def _real_paths(item: Path) -> Iterator[Path]:
    """`item` after resolving symlinks and, for a directory, every file and directory below it, each resolved too: a
    directory's files may be symlinks to elsewhere (Hugging Face's cache keeps a snapshot's files as symlinks into
    blobs/), and replacing that elsewhere deletes the input as surely as replacing the directory itself. A symlink
    loop resolves to nothing (it holds no data; the command that reads it names it)."""
    try:
        real = item.resolve()
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError before Python 3.13, OSError(ELOOP) after
        return
    yield real
    if not real.is_dir():
        return
    seen = {real}
    for root, dirs, files in os.walk(real, followlinks=True):
        for name in files:
            yield from _resolved(Path(root, name))
        kept = []
        for name in dirs:
            target = next(_resolved(Path(root, name)), None)
            if target is None:
                continue
            yield target
            if target not in seen:  # a symlinked directory that loops back is walked once
                seen.add(target)
                kept.append(name)
        dirs[:] = kept


def refuse_output_over_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, flag: str) -> None:
    """Refuse an output directory that is, or contains, one of the inputs: replacing it (--force) would delete the
    very files the command reads. Paths are compared after resolving symlinks (of the inputs and of every file inside
    an input directory), so an alias of the input is caught."""
    out_real = Path(out).expanduser().resolve()
    for item in inputs:
        item_path = Path(item).expanduser()
        for item_real in _real_paths(item_path):
            if item_real != out_real and out_real not in item_real.parents:
                continue
            what = "is" if item_real == out_real else "contains"
            if item_real == next(_resolved(item_path), None):
                raise UpcycleError(f"{flag} {out} {what} the input {item}; replacing it would delete the input, "
                                   f"choose another {flag}")
            raise UpcycleError(f"{flag} {out} {what} {item_real}, which the input {item} reads through a symlink; "
                               f"replacing {flag} would delete the input, choose another {flag}")


TMP_TAG = "upcycle-tmp"
_USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
OLD_TAG = "upcycle-old"


def path_kind(path: str | os.PathLike) -> str:
    """What is at `path`, for messages: "a file", "a directory", "a character device" (/dev/null), "a FIFO",
    "a socket", "a block device", "a symlink loop", "a broken symlink" or "nothing"."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return "a broken symlink" if path.is_symlink() else "nothing"
    for test, kind in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def not_an_input(what: str, path: str | os.PathLike, wanted: str = "a file or a directory") -> UpcycleError:
    """The error for an input `path` that is not `wanted`: "does not exist", or what it is instead (/dev/null, a FIFO
    or a symlink to itself exist, and are not inputs)."""
    kind = path_kind(path)
    found = "does not exist" if kind == "nothing" else f"is {kind}, not {wanted}"
    return UpcycleError(f"{what} {path} {found}")


def read_json(path: str | os.PathLike, *, fix: str = "fix or re-create it"):
    """The parsed JSON file at `path`; a file that is not UTF-8 JSON, or nests too deeply for Python's parser (a few
    hundred bytes of brackets raise RecursionError), is one UpcycleError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpcycleError(f"{path} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:
        raise UpcycleError(f"{path} nests its JSON too deeply to be read; {fix}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (provenance records: manifests, data.json)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(out: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
                 flag: str = "OUTPUT") -> Path:
    """The one "output exists" policy, checked before any work: `out` must not be or contain an input; an existing
    `out` is refused unless `force`, and must then be a directory. Returns `out` as an absolute path."""
    out = Path(out).expanduser().absolute()
    refuse_output_over_inputs(out, inputs, flag=flag)
    if out.exists() or out.is_symlink():
        if not force:
            raise UpcycleError(f"{flag} {out} already exists; choose another {flag} or pass --force to replace it")
        if out.is_symlink():  # --force would replace the link, not what it points to, and leave the old link behind
            raise UpcycleError(f"{flag} {out} is a symlink (to {os.readlink(out)}); --force replaces directories, "
                               f"not links: give the directory it points to, or remove the link")
        if not out.is_dir():
            raise UpcycleError(f"{flag} {out} exists and is not a directory; remove it or choose another {flag}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UpcycleError(f"{flag} {out}: {out.parent} is not a directory")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.NAME.upcycle-tmp-PID` directories of `out` left by runs that were killed (PID no longer alive), and
    `.NAME.upcycle-old-PID` ones once `out` itself is in place. Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({TMP_TAG}|{OLD_TAG})-(\d+)")
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.upcycle-*"):
        match = pattern.fullmatch(path.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == OLD_TAG and not out.exists():
            continue  # killed between the two renames: the previous output is all there is, keep it
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path)
    return removed


@contextlib.contextmanager
def publish_dir(out: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = (),
                flag: str = "OUTPUT") -> Iterator[Path]:
    """Yield an empty temporary sibling directory of `out`; when the block ends normally, make it durable and rename it
    into place as `out` (an existing `out`, allowed only with `force`, is removed after the new one is in place). When
    the block raises, the temporary directory is removed and `out` is untouched.

    `out`'s parent directories are created if missing."""
    out = check_output(out, force=force, inputs=inputs, flag=flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = out.parent / f".{out.name}.{TMP_TAG}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise UpcycleError(f"cannot create {flag} {out}: {exc.strerror}") from None
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        fsync_path(tmp)
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _USER_FIXABLE:  # a full or read-only disk is the user's to fix, not a crash
            raise UpcycleError(f"cannot write {flag} {out}: {exc.strerror}; nothing was written") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`; an existing `out` is removed only after the new one is in place."""
    if out.exists():
        old = out.parent / f".{out.name}.{OLD_TAG}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    fsync_path(out.parent)
