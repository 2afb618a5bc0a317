"""The exceptions curate raises on purpose.

A :class:`CurateError` is the "one clear sentence" a command stops with when nothing sensible
can continue; the CLI prints it without a traceback and exits 1. Problems with a single sample
are not exceptions: the sample is dropped with a reason (see ``curate.manifest.Reason``).
"""

import re

# "<_io.BytesIO object at 0x7f49...>": an address differs between runs and processes.
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


def stable_text(exc: BaseException) -> str:
    """``str(exc)`` without memory addresses: exception texts end up in drop reasons, and a
    manifest must be byte-identical between runs and whatever process wrote it."""
    return _ADDRESS.sub("", str(exc))


class CurateError(Exception):
    """A user-facing failure: the message names the file and what was expected."""


class ManifestError(CurateError):
    """A manifest that cannot be read, fails its schema, or does not match its id."""


class UnsafePathError(CurateError):
    """A path inside a manifest or an annotation file that would escape its root."""


class UsageError(CurateError):
    """Bad usage found past argument parsing (an option value a reader or stage refuses): the
    CLI prints it as one sentence and exits 2, like click's own usage errors."""
