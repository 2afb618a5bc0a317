"""Source readers, one module per source dataset, registered by kind."""

from __future__ import annotations

from curate.errors import CurateError
from curate.sources.base import Reader
from curate.sources.mtd import MTDReader

READERS: dict[str, type[Reader]] = {r.kind: r for r in (MTDReader,)}


def get_reader(kind: str) -> Reader:
    try:
        return READERS[kind]()
    except KeyError:
        raise CurateError(f"unknown source kind {kind!r}; known kinds: "
                          f"{', '.join(sorted(READERS))}") from None
