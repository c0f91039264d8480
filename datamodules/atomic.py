"""Atomic writes: a reader sees the old file (folder) or the new one, never a half-written one.

Files are written to a temporary name next to their destination and renamed over it
(``os.replace`` is atomic within a file system). Folders are filled in a *staging folder*
next to the destination, named ``.<name>.staging-<host>-<pid>.<random>``, and swapped in by
two renames (destination -> ``<staging>-old``, staging -> destination). The staging name says
who is writing, which gives readers and later writers two guarantees:

- a reader that finds the destination missing or changed mid-read while a live writer's
  staging folder exists knows a swap is under way and may retry (``writer_active``);
- what a killed writer left behind (its pid is dead on this host, or it is older than a day)
  is removed by the next writer (``remove_stale_staging``).

Everything written here is made readable as the umask allows (``mkstemp``/``mkdtemp`` create
0600/0700), so a cache shared between users stays usable.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class UnwritableFolder(OSError):
    """The folder a write goes to cannot be created or written (read-only, a file in the way, full)."""


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically: on any failure, or a kill, ``path`` keeps its old
    content; the staging file a killed writer leaves is removed by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write the new content into a staging folder, then swap it in for ``folder``.

    A failure (or interruption) in ``fill`` leaves ``folder`` as it was and removes the staging
    folder. Raises ``UnwritableFolder`` when the staging folder cannot be created next to ``folder``.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(folder)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(folder), dir=folder.parent))
    except OSError as err:
        raise UnwritableFolder(err.errno, err.strerror or str(err), str(folder.parent)) from err
    try:
        fill(staging)
        os.chmod(staging, 0o755 & ~_umask())
        # two renames: a reader that meets the short gap sees our staging folder and waits
        old = folder.parent / f"{staging.name}-old"
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_folder(
    folder: Path,
    read: Callable[[Path], T],
    wait_s: float = 30.0,
    errors: tuple[type[BaseException], ...] = (OSError,),
    vanished: Callable[[BaseException], bool] = lambda err: isinstance(err, OSError),
) -> T:
    """``read(folder)`` of a folder that ``replace_folder`` may swap meanwhile, all from one version.

    A read that fails with one of ``errors`` is retried when the folder was swapped during it, or
    when the error says a file ``vanished`` while a live writer is at work (the swap's short gap);
    a read that succeeded across a swap may mix two versions and is retried too. Gives up after
    ``wait_s``: the last error is raised, or the last read returned.
    """
    deadline = time.monotonic() + wait_s
    while True:
        before = folder_identity(folder)
        try:
            value = read(folder)
        except errors as err:
            swapped = folder_identity(folder) != before
            if not ((swapped or vanished(err) and writer_active(folder)) and time.monotonic() < deadline):
                raise
        else:
            if folder_identity(folder) == before or time.monotonic() >= deadline:
                return value
        time.sleep(0.05)


def folder_identity(folder: Path) -> tuple[int, int, int] | None:
    """Which directory ``folder`` names now; a replace installs a new one (ctime guards inode reuse)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def scratch_folder(base: Path) -> Path:
    """A private folder named like a staging folder of ``base``, so the next caller removes it
    if this process is killed before it does (e.g. DuckDB's spill folder)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(base)
    return Path(tempfile.mkdtemp(prefix=staging_prefix(base), dir=base.parent))


def staging_prefix(folder: Path) -> str:
    """Staging folders (and files) name their writer, so a later run can tell a dead writer's leftovers."""
    return f".{folder.name}.staging-{socket.gethostname()}-{os.getpid()}."


def writer_active(folder: Path) -> bool:
    """Another live process is writing ``folder`` right now (its staging folder exists)."""
    return any(not stale for _, stale in _staging_folders(folder))


def remove_stale_staging(folder: Path) -> list[Path]:
    """Delete the staging folders (files) of ``folder`` that killed writers left (see ``_staging_folders``)."""
    removed = []
    for path, stale in _staging_folders(folder):
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _staging_folders(folder: Path, max_age_s: float = 86_400.0) -> Iterator[tuple[Path, bool]]:
    """(path, stale) of each staging folder of ``folder``: stale when its writer (this host) is
    dead, or - for a writer on another host - when it is older than a day."""
    if not folder.parent.is_dir():
        return
    host = socket.gethostname()
    for path in folder.parent.glob(f".{glob.escape(folder.name)}.staging-*"):
        match = re.fullmatch(rf"\.{re.escape(folder.name)}\.staging-(.+)-(\d+)\.[^.]*", path.name)
        if match is None:
            continue
        try:
            old = time.time() - path.stat().st_mtime > max_age_s
        except OSError:  # removed meanwhile
            continue
        yield path, (match.group(1) == host and not _alive(int(match.group(2)))) or old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
