"""Atomic writes: a folder or a file appears whole at its final path, or not at all.

Every writer of the package goes through here: adapters, checkpoints, merged and exported models,
cached assets, reports. Something is written into a temporary sibling and renamed into place, so
a crash at any point leaves either the old content or the new, never half of it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> list[Path]:
    """Delete the temporary folders and files of earlier writes of ``path`` whose process, on this
    host, is gone (a killed merge or save); another host's or a live process's are left alone."""
    host, removed = socket.gethostname(), []
    for sibling in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        tag = sibling.name[len(f".{path.name}{TMP_MARK}") :]
        owner, _, _ = tag.rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def temporary_sibling(path: Path) -> Path:
    """An empty folder next to ``path`` (same filesystem, so the final rename is atomic), with the
    permissions of an ordinary new folder (mkdtemp's 0700 would survive the rename). Its name holds
    this host and process, so that a later write of ``path`` can remove it if this one is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{_owner_tag()}", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the folder ``tmp`` to ``path``; an existing ``path`` is kept until the new one is in place."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(path: str | os.PathLike, fill: Callable[[Path], None], replace: bool = True) -> Path:
    """Make the folder ``path`` by ``fill(tmp)``; with ``replace`` an existing one is swapped out,
    without it an existing one (e.g. another process finished first) is kept and ours dropped."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        fill(tmp)
        if replace:
            replace_dir(tmp, path)
        elif path.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to the file ``path`` through a temporary file renamed at the end."""
    return write_lines(path, [text])


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write the strings of ``lines`` (a generator is fine) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{_owner_tag()}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing parent of ``path`` when it is a file (so ``path`` cannot be created)."""
    existing = next((p for p in Path(path).absolute().parents if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None
