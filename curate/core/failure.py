"""Which failures are the user's to fix, and the one sentence that says so.

The command line's exit policy (see ``curate.app.cli``) sorts every exception that reaches it:

- a :class:`~curate.core.errors.CurateError` already is one sentence naming the file and what was
  expected;
- an ``OSError`` the environment raised — a full disk or quota, a file-size limit, no
  permission, a read-only file system, a path that is not there — is not a bug either: the
  user can act on it, so :func:`environment_failure` turns it into one sentence naming the file
  and the system's reason;
- anything else is a bug in curate and keeps its traceback: hiding a programming error behind
  a tidy line would make it unreportable.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

#: errno values that mean "the system refused", not "curate is wrong".
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG,                       # no room to write
    errno.EACCES, errno.EPERM, errno.EROFS,                        # not allowed to
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,  # not there / not that
    errno.ELOOP, errno.EIO, errno.EMFILE, errno.ENFILE,            # broken disk, link, limits
})
#: Of those, the ones a write runs into: the sentence says "while writing".
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_ADVICE = {
    errno.ENOSPC: "free some space and run the command again (finished steps are cached)",
    errno.EDQUOT: "free some of your quota and run the command again (finished steps are cached)",
    errno.EFBIG: "the file system or the file-size limit (ulimit -f) allows no file "
                 "this large",
}


def environment_failure(exc: BaseException) -> str | None:
    """One sentence for an ``OSError`` the environment raised, or None when ``exc`` is
    something else (then it is a bug, and its traceback is what the user should see)."""
    if not isinstance(exc, OSError) or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    reason = os.strerror(exc.errno)
    reason = reason[:1].lower() + reason[1:]
    path = _file_named(exc)
    if exc.errno in _WRITE_ERRNOS:
        where = f"while writing {path}" if path else "while writing (the system did not say " \
                                                     "which file)"
        return f"{reason} {where}: {_ADVICE[exc.errno]}"
    if not path:
        return f"{reason} (the system did not say which file): {exc}"
    if exc.filename2 is not None:
        return f"{path} -> {os.fsdecode(exc.filename2)}: {reason}"
    return f"{path}: {reason}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Let an OSError raised while writing ``path`` name it: a library writing through its
    own file handle (pyarrow's Parquet writer) reports a full disk without saying which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), os.fspath(path)) from exc


def _file_named(exc: OSError) -> str | None:
    """The file the error is about: the one the system named, else the file the failing code
    had open (a ``write`` on an open file does not say which file it is)."""
    if exc.filename is not None:
        return os.fsdecode(exc.filename)
    return _open_file_in(exc.__traceback__)


def _open_file_in(tb: TracebackType | None) -> str | None:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first: the file being written, not its caller's
        for value in frame.f_locals.values():
            name = getattr(value, "name", None)
            if isinstance(value, io.IOBase) and isinstance(name, str) and not name.startswith("<"):
                return name
    return None
