"""Small file-system helpers every module needs: atomic writes, safe joins, hashing, walking."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath

from curate.core.errors import CurateError, UnsafePathError, stable_text

_DRIVE = re.compile(r"^[A-Za-z]:")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, read_only: bool = False
                       ) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file
    (``read_only``: with no write permission, from the moment it appears)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if read_only:
                os.fchmod(fh.fileno(), 0o444)
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


def _inside(real: str, real_root: str) -> bool:
    """Whether resolved path ``real`` is ``real_root`` or lies under it (both resolved)."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    """A source folder, resolved: the same few roots are asked about for every file read."""
    return os.path.realpath(root)


def source_file_path(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """The file ``rel`` of a source folder, resolved, for reading: the one check every read of
    an original file goes through (ingest, labels, export, verify).

    :func:`safe_join` checks the text of ``rel``; this also resolves symbolic links and refuses
    a file that now leads outside ``root`` (a link swapped after ingest) or that is not a
    regular file (opening a FIFO would block). A missing file is returned as is, for the caller
    to report. The returned path is the resolved one, so that the file read is the one checked.
    """
    path = safe_join(root, rel, what)
    real_root = _real_root(os.fspath(root))
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        raise UnsafePathError(f"{what} {rel!r} leads outside its folder {root} (through a "
                              "symbolic link); only files inside the source folder are read")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{what} {rel!r} is {_special(mode)}, not a regular file")
    return Path(real)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()




#: Called with (path relative to the root, why) for each entry a walk leaves out.
OnSkip = Callable[[str, str], None]

_DIR, _FILE = "dir", "file"


def printable(rel: str) -> str:
    """``rel`` as valid UTF-8 text. ``os.scandir`` hands over the bytes of a name that is not
    UTF-8 as lone surrogates, which Parquet and JSON refuse; they become ``\\xff`` escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def _unrecordable(rel: str, is_dir: bool) -> str | None:
    """Why ``rel`` cannot be recorded as a manifest path, or None if it can."""
    inside = ", nor anything inside it" if is_dir else ""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return f"name is not valid UTF-8 (its bytes shown as \\x escapes): not read{inside}"
    try:
        check_relative(rel)
    except UnsafePathError as exc:
        return (f"name cannot be recorded as a safe relative path ({stable_text(exc)}): "
                f"not read{inside}")
    return None


def _entry_kind(entry: os.DirEntry, real_root: str, fenced: list[str]) -> str:
    """``_DIR`` to descend into, ``_FILE`` to list, or why the entry is left out."""
    if not entry.is_symlink():
        if entry.is_dir(follow_symlinks=False):
            return _DIR
        if entry.is_file(follow_symlinks=False):
            return _FILE
        return f"{_special(entry.stat(follow_symlinks=False).st_mode)}, not a regular file: " \
               "not read"
    try:
        real = os.path.realpath(entry.path, strict=True)
    except OSError:  # a missing target, or a loop
        return "symbolic link to nothing (broken, or a loop): not followed"
    if not _inside(real, real_root) or any(_inside(real, f) for f in fenced):
        return "symbolic link leading outside the source folder: not followed"
    mode = os.stat(real).st_mode
    if stat.S_ISDIR(mode):
        return "symbolic link to a folder: not followed (the folder's files are listed where " \
               "they are)"
    if not stat.S_ISREG(mode):
        return f"symbolic link to {_special(mode)}: not read"
    return _FILE


def walk_files(root: str | os.PathLike, *, on_skip: OnSkip | None = None,
               leave_out: Mapping[str, str] | None = None) -> Iterator[str]:
    """Every file under ``root`` that may be read, as a POSIX path relative to it, in a fixed
    order (by name, each folder's files before its sub-folders). The one tree walk of curate.

    Dotfiles are included (a reader decides what to ignore, and says so). Nothing outside
    ``root`` is ever listed, so nothing outside it is read:

    - a regular file is listed; so is a symbolic link to a regular file whose resolved target
      lies inside ``root`` (it is read through the link);
    - everything else is left out, never read, and reported to ``on_skip`` with why: links
      leading outside ``root`` (or into a ``leave_out`` folder), broken links, link loops,
      links to folders, FIFOs, sockets and devices, names that are not UTF-8 (reported with
      ``\\x`` escapes, see :func:`printable`) or that a manifest path cannot hold, folders
      that cannot be read, and the folders of ``leave_out`` (relative path -> why);
    - a folder left out is one entry, standing for everything inside it.

    Uses ``os.scandir`` and plain strings: a million-file source is walked in seconds. A root
    that cannot be read stops with one sentence.
    """
    base = os.fspath(root)
    real_root = os.path.realpath(base)
    leave_out = dict(leave_out or {})
    fenced = [os.path.realpath(os.path.join(base, rel)) for rel in leave_out]
    skip = on_skip if on_skip is not None else (lambda rel, why: None)
    stack = [("", base)]
    while stack:
        prefix, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise CurateError(f"{base}: cannot read the folder ({exc.strerror or exc})") \
                    from exc
            skip(prefix[:-1], f"unreadable folder: {exc.strerror or exc}; its files are not "
                              "listed")
            continue
        subdirs = []
        for entry in entries:
            rel = prefix + entry.name
            try:
                why = _unrecordable(rel, entry.is_dir(follow_symlinks=False))
                kind = why or leave_out.get(rel) or _entry_kind(entry, real_root, fenced)
            except OSError as exc:  # vanished or unreadable while being looked at
                kind = f"cannot be examined ({exc.strerror or exc}): not read"
            if kind == _DIR:
                subdirs.append((f"{rel}/", entry.path))
            elif kind == _FILE:
                yield rel
            else:
                skip(printable(rel), kind)
        stack.extend(reversed(subdirs))
