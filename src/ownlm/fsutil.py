"""Crash-safe file writes shared by every stage: temp file + fsync + rename + fsync of the directory.

A reader (or a process restarted after SIGKILL or a power cut) sees the old file or the new one, never a
half-written one. Temporary files are created by mkstemp, so they are private (0600) from the first byte.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically; `mode` (e.g. 0o644) is applied before the rename (default 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the complete directory `tmp` to `target`, replacing any previous one.

    POSIX cannot rename over a non-empty directory, so the old one is first renamed aside; a crash between
    the two renames leaves it as `.<name>.old-*` next to target (never a half-written target).
    """
    for p in tmp.iterdir():
        fsync_file(p)
    fsync_dir(tmp)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
