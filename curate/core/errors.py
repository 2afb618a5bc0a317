"""The exceptions curate raises on purpose.

A :class:`CurateError` is the "one clear sentence" a command stops with when nothing sensible
can continue; the CLI prints it without a traceback and exits 1. Problems with a single sample
are not exceptions: the sample is dropped with a reason (see :func:`curate.core.manifest.drop`).
"""

import re

# "<_io.BytesIO object at 0x7f49...>": an address differs between runs and processes.
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


def stable_text(exc: BaseException) -> str:
    """``str(exc)`` on one line and without memory addresses, for quoting a library's error
    in a reason or a message: a failure is one line (YAML's and XML's errors span several,
    with a caret drawing), and a manifest must be byte-identical between runs and whatever
    process wrote it."""
    return " ".join(_ADDRESS.sub("", str(exc)).split())


class CurateError(Exception):
    """A user-facing failure: the message names the file and what was expected."""


class ManifestError(CurateError):
    """A manifest that cannot be read, fails its schema, or does not match its id."""


class UnsafePathError(CurateError):
    """A path inside a manifest or an annotation file that would escape its root."""


class UsageError(CurateError):
    """Bad usage found past argument parsing (an option value a reader or stage refuses): the
    CLI prints it as one sentence and exits 2, like click's own usage errors."""
