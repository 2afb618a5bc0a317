"""All-or-nothing exports: write beside the destination, move into place only when complete.

An export is written into ``.<name>.curate-tmp-<host>-<pid>`` beside ``out`` and renamed to
``out`` only after everything in it was written and checked. Any failure on the way (a full
disk, a file too large, a folder without write permission) leaves ``out`` as it was: no tree,
or the earlier export untouched. A run that is killed outright (``kill -9``, power loss)
cannot clean up after itself, so every export first removes the folders that a run no
longer alive on this host left beside the same ``out``; the host is in the name because a
folder on shared storage may belong to a live export on another machine. (A dead run's pid
taken since by another process only delays the removal to a later run.)

An earlier export is replaced only with ``overwrite`` (``--overwrite`` on ``curate export`` and
``curate build``), except one of the same manifest: it is made again from the same data, so
nothing is lost (a build run again, or resumed after a crash, ends as it would have). A folder
that is not a curate export is never replaced.

Replacing an earlier export takes two renames (``out`` to ``.<name>.curate-old-<host>-<pid>``,
then the new tree to ``out``). Killed between the two, ``out`` is missing and the old
folder holds the only complete export: the next run puts it back rather than removing it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from curate.core.errors import CurateError

TMP = "curate-tmp"  # a tree being written
OLD = "curate-old"  # an earlier export being replaced
HOST = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname()) or "host"


def aside(out: Path, kind: str, pid: int) -> Path:
    """The temporary folder of kind ``TMP`` or ``OLD`` that process ``pid`` of this host
    keeps beside ``out``."""
    return out.parent / f".{out.name}.{kind}-{HOST}-{pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_orphans(out: Path) -> None:
    """Remove the temporary folders of dead exports to ``out`` on this host (put a replaced
    export back at ``out`` first if the run died before the new tree took its place)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({TMP}|{OLD})-{re.escape(HOST)}-(\d+)$")
    try:
        entries = sorted(os.listdir(out.parent))
    except FileNotFoundError:
        return
    for name in entries:
        match = pattern.match(name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        folder = out.parent / name
        if match.group(1) == OLD and not out.exists():
            os.replace(folder, out)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def exported_manifest(out: Path, marker: str) -> str | None:
    """The manifest id recorded in the export at ``out``, or None if it cannot be read."""
    try:
        report = json.loads((out / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    manifest = report.get("manifest") if isinstance(report, dict) else None
    return manifest if isinstance(manifest, str) else None


def check_destination(out: Path, marker: str, overwrite: bool, manifest: str | None = None
                      ) -> None:
    """``out`` must be new, empty, an earlier export (holding ``marker``) of the same
    ``manifest``, or (with ``overwrite``) any earlier export: an export never replaces a
    folder it did not write, nor another manifest's export unless told to."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / marker).is_file():
            raise CurateError(f"{out} exists and is not an earlier curate export: "
                              "choose an empty or new folder")
        earlier = exported_manifest(out, marker)
        if not overwrite and (manifest is None or earlier != manifest):
            of = f" of manifest {earlier[:12]}" if earlier else ""
            raise CurateError(f"{out} already holds a curate export{of}: pass --overwrite to "
                              "replace it")


def write_failure(exc: OSError, path: str | os.PathLike) -> str:
    """The sentence for a failed write of ``path``: what the system said, not a traceback."""
    return f"cannot write {path}: {exc.strerror or exc}"


@contextmanager
def staged(out: str | os.PathLike, *, marker: str, overwrite: bool,
           manifest: str | None = None) -> Iterator[Path]:
    """Yield an empty folder to write an export into; when the block finishes, the folder
    replaces ``out`` (which :func:`check_destination` allows for ``manifest``, the id of the
    manifest exported). If the block raises, ``out`` is left as it was and the folder is
    removed; an ``OSError`` becomes a :class:`CurateError` naming the file, and messages name
    files by their place in ``out``."""
    out = Path(out).absolute()
    tmp = aside(out, TMP, os.getpid())
    try:
        remove_orphans(out)
        check_destination(out, marker, overwrite, manifest)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _replace(tmp, out)
    except OSError as exc:
        raise CurateError(_public(write_failure(exc, exc.filename or tmp), tmp, out)) from None
    except CurateError as exc:
        message = _public(str(exc), tmp, out)
        if message == str(exc):
            raise
        raise type(exc)(message) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _public(message: str, tmp: Path, out: Path) -> str:
    """``message`` naming the files where they would be in ``out``, not in ``tmp``: the
    temporary folder means nothing to the user (and is gone when the message is shown)."""
    return message.replace(str(tmp), str(out))


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = aside(out, OLD, os.getpid())
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the earlier export back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new export is in place: a leftover is harmless
