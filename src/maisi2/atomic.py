"""Atomic output: files appear complete, together, and never over an existing file unasked.

Every output is written to a temporary ``.NAME.<pid>-<random>.part<suffixes>`` file beside its
target and moved into place only when all of its set are written:

* without ``overwrite`` a target is created with ``link(2)``, which fails when the name exists,
  so two writers racing for one name cannot both succeed (no check-then-rename window);
* with ``overwrite`` the files being replaced are kept aside until the whole set is in place and
  put back if any move fails;
* SIGINT, SIGTERM and SIGHUP arriving while a set is being moved into place take effect right
  after it (main thread), so an interrupt lands before the set or after it, never inside;
* ``.part`` files of a writer that is gone (killed, or SIGKILL) are removed by the next writer of
  the same target.

`check_outputs` runs the same checks before any work: a target that is a folder, an existing file
without ``overwrite``, a folder that cannot be written, too little free disk space.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from maisi2.errors import InvalidInput, Maisi2Error, MissingInput, OutputExists

__all__ = ["atomic_output", "output_set", "check_writable", "check_outputs", "check_free_space", "OutputError"]

# An old-style or foreign .part file is left alone for this long before it counts as stale.
_STALE_SECONDS = 24 * 3600
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# OSErrors that already say what happened (ours, or a missing/existing file): passed on unchanged.
_PLAIN_OS_ERRORS = (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class OutputError(Maisi2Error, OSError):
    """An output cannot be written; the message says why and what to do (one line)."""


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if `path` is a folder, or exists and may not be replaced."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InvalidInput(f"{path} is a folder; name the output file itself (e.g. {path / 'ct.nii.gz'})")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    return path


def check_outputs(targets: Iterable[str | os.PathLike], overwrite: bool = False, needed_bytes: int = 0,
                  folders: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """All the checks of a set of outputs before any work; returns the targets as Paths.

    Besides `check_writable` for each file (`folders` are targets that are folders, which the
    caller checks): its folder (or the nearest existing parent, when the folder is still to be
    made) accepts a new file, and has `needed_bytes` free. Stale ``.part`` files of these targets
    are removed.
    """
    paths = _checked(targets, overwrite, folders)
    for folder in sorted({p.parent for p in paths}):
        _probe_write(_nearest_existing(folder))
    check_free_space(paths, needed_bytes)
    for path in paths:
        clean_stale_parts(path)
    return paths


def check_free_space(targets: Iterable[str | os.PathLike], needed_bytes: int) -> None:
    """An `OutputError` when the disk of the targets' folder has less than `needed_bytes` free."""
    if needed_bytes <= 0:
        return
    for folder in sorted({Path(t).expanduser().parent for t in targets}):
        existing = _nearest_existing(folder)
        free = shutil.disk_usage(existing).free
        if free < needed_bytes:
            raise OutputError(f"{existing} has {free / 2**20:.0f} MiB free but the outputs need about "
                              f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another output folder")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is a file, so no output folder can be made under it; choose another output path")
    return folder


def _probe_write(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".maisi2-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write in {folder} ({err.strerror or err}); choose an output folder you can write "
                          "to, or fix its permissions") from err


# -- staging and placing ----------------------------------------------------------------------

def _part_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part{''.join(target.suffixes)}")


def clean_stale_parts(target: str | os.PathLike) -> list[Path]:
    """Remove ``.part`` files of `target` left by writers that are gone; returns those removed."""
    target = Path(target).expanduser()
    if not target.parent.is_dir():
        return []
    removed = []
    for part in target.parent.glob(f".*{target.name}.*.part*"):  # also the parts of parts (nested staging)
        if _writer_gone(part):
            try:
                _remove(part)
                removed.append(part)
            except OSError:
                pass  # another cleaner was first, or no permission: not ours to insist on
    return removed


def _writer_gone(part: Path) -> bool:
    middle = part.name.rsplit(".part", 1)[0].rsplit(".", 1)[-1]
    pid_text = middle.split("-", 1)[0]
    if "-" in middle and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, someone else's
        else:
            return False
    try:
        return time.time() - part.stat().st_mtime > _STALE_SECONDS
    except OSError:
        return False


def _checked(targets, overwrite: bool, folders) -> list[Path]:
    folders = {Path(f).expanduser() for f in folders}
    return [Path(t).expanduser() if Path(t).expanduser() in folders else check_writable(t, overwrite) for t in targets]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def output_set(targets: Iterable[str | os.PathLike], overwrite: bool = False,
               folders: Iterable[str | os.PathLike] = ()) -> Iterator[dict[Path, Path]]:
    """Yield {target: temporary path}; write each temporary file; on a clean exit all move into place.

    The temporary names keep the targets' suffixes (writers that infer the format from the name
    behave the same). `folders` are targets written as a folder (e.g. a DICOM series): the writer
    makes the temporary folder. On an exception nothing is placed and every temporary file is removed.
    """
    paths = _checked(targets, overwrite, folders)
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    staged = {p: _part_name(p) for p in paths}
    try:
        try:
            yield staged
        except (*_PLAIN_OS_ERRORS, OutputError):
            raise
        except OSError as err:
            raise _explained(err, "writing", staged) from err
        _place_all(staged, overwrite)
    finally:
        for tmp in staged.values():
            if tmp.exists():
                _remove(tmp)


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """One file: yield a temporary path in the target's folder; it becomes `path` when the block succeeds."""
    with output_set([path], overwrite) as staged:
        (tmp,) = staged.values()
        yield tmp


def _place_all(staged: dict[Path, Path], overwrite: bool) -> None:
    placed: list[Path] = []
    aside: dict[Path, Path] = {}
    with _signals_held():
        try:
            for target, tmp in staged.items():
                if not tmp.exists():
                    raise MissingInput(f"{tmp} was not written; nothing of the set was placed")
                if overwrite and target.exists():
                    aside[target] = _part_name(target)
                    os.replace(target, aside[target])
                _place(tmp, target)
                placed.append(target)
        except BaseException as err:
            for target in placed:
                _remove(target)
            for target, old in aside.items():
                os.replace(old, target)
            if isinstance(err, OSError) and not isinstance(err, (*_PLAIN_OS_ERRORS, OutputError)):
                raise _explained(err, "placing") from err
            raise
        for old in aside.values():
            _remove(old)


def _place(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`, failing if `target` exists (atomically where the filesystem links)."""
    if tmp.is_dir():
        _place_folder(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExists(f"{target} appeared while this run was writing; not replacing it "
                              "(pass --overwrite to replace)") from None
    except OSError as err:
        if err.errno not in _LINK_UNSUPPORTED:
            raise
        if target.exists():  # no hard links here (e.g. FAT, some network shares): check, then rename
            raise OutputExists(f"{target} appeared while this run was writing; not replacing it") from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def _place_folder(tmp: Path, target: Path) -> None:
    """rename(2) of a folder fails onto a file or a non-empty folder (it may replace an empty one,
    which loses nothing), so this too never replaces another writer's output."""
    if target.exists() or target.is_symlink():
        raise OutputExists(f"{target} appeared while this run was writing; not replacing it "
                              "(pass --overwrite to replace)")
    try:
        os.rename(tmp, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputExists(f"{target} appeared while this run was writing; not replacing it") from None
        raise


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP that arrive inside the block are delivered when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: received.append(number)) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(received):
            os.kill(os.getpid(), sig)


def _explained(err: OSError, doing: str, staged: dict[Path, Path] | None = None) -> OSError:
    """A write failure as one line naming the file (the target, not its staging name), the reason and what to do."""
    where = f" {err.filename}" if err.filename else ""
    for target, tmp in (staged or {}).items():
        if err.filename and tmp.name in str(err.filename):
            where = f" {target}"
    reason = err.strerror or str(err)
    hint = {
        errno.ENOSPC: "the disk is full: free some space or choose another output folder",
        errno.EDQUOT: "the disk quota is used up: free some space or choose another output folder",
        errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
        errno.EPERM: "permission denied: choose a folder you can write to, or fix its permissions",
        errno.EROFS: "the file system is read-only: choose another output folder",
        errno.EFBIG: "the file is larger than this file system or process allows",
    }.get(err.errno, "nothing of the output set was kept")
    return OutputError(f"{doing}{where} failed ({reason}); {hint}")
