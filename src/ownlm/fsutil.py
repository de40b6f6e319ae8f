"""Crash-safe file writes shared by every stage: temp file + fsync + rename + fsync of the directory.

A reader (or a process restarted after SIGKILL or a power cut) sees the old file or the new one, never a
half-written one. Temporary files are created by mkstemp, so they are private (0600) from the first byte.

Everything under the home is private to its user: directories 0700, files 0600 (models and adapters are
derived from the user's conversations). Modes are set where a file or directory is created, not left to the
umask: `mkdir_private`, `write_private`, and `make_private` for trees a library wrote (safetensors,
save_pretrained) before they are renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def mkdir_private(path: Path) -> Path:
    """`mkdir -p` that creates each missing component 0700; directories that already exist are left as they are.

    os.makedirs applies its mode to the last component only and the umask to all of them, hence one mkdir +
    chmod per component.
    """
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, PRIVATE_DIR)
        except FileExistsError:  # another process or thread made it first: theirs is made the same way
            continue
        os.chmod(p, PRIVATE_DIR)
    if not path.is_dir():
        raise NotADirectoryError(path)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist: callers write into fresh temporary directories) as a 0600 file holding
    `data`, fsynced. O_NOFOLLOW: never write through a planted symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # the umask may have removed bits but never adds any; be exact anyway
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)


def make_private(root: Path) -> None:
    """Set every directory under `root` (and root) to 0700 and every file to 0600; symlinks are not followed.

    For trees written by code that takes no mode (safetensors, transformers' save_pretrained, copytree); call it
    while the tree is still in a private temporary directory, before it is renamed into place.
    """
    root = Path(root)
    if root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, PRIVATE_FILE)
        return
    os.chmod(root, PRIVATE_DIR)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, PRIVATE_DIR)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, PRIVATE_FILE)


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
    mkdir_private(path.parent)
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
    the two renames leaves it as `.<name>.old-*` next to target (never a half-written target). The tree is
    made private (0700/0600) before the rename: its writers (safetensors, save_pretrained) take no mode.
    """
    make_private(tmp)
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
