"""Small file-system helpers every module needs: atomic writes, safe joins, hashing, walking."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from curate.errors import UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_relative(rel: str, what: str = "path") -> str:
    """Return ``rel`` if it is a relative POSIX path that stays inside its root, else raise.

    Rejects absolute paths, Windows drives, backslashes and any '.' or '..' segment: a manifest
    or an annotation file must never point outside the folder it belongs to.
    """
    if not rel or rel.startswith("/") or _DRIVE.match(rel) or "\\" in rel or "\x00" in rel:
        raise UnsafePathError(f"{what} {rel!r} is not a relative path inside its root")
    parts = PurePosixPath(rel).parts
    if any(p in (".", "..") for p in rel.split("/")) or not parts:
        raise UnsafePathError(f"{what} {rel!r} escapes its root ('.' or '..' segment)")
    return rel


def safe_join(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """``root / rel`` after :func:`check_relative`."""
    return Path(root) / check_relative(rel, what)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def walk_files(root: str | os.PathLike) -> Iterator[str]:
    """Every regular file under ``root`` as a POSIX path relative to it, in a fixed order.

    Dotfiles are included (a reader decides what to ignore, and says so); symbolic links to
    directories are not followed, so a walk cannot loop or leave the tree. Uses ``os.scandir``
    and plain strings: a million-file source is walked in seconds.
    """
    stack = [("", os.fspath(root))]
    while stack:
        prefix, path = stack.pop()
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append((f"{prefix}{entry.name}/", entry.path))
            elif entry.is_file():
                yield prefix + entry.name
        stack.extend(reversed(subdirs))
