"""Source readers, one module per source dataset, registered by kind."""

from __future__ import annotations

from collections.abc import Mapping

from curate.core.errors import CurateError
from curate.sources.base import Reader
from curate.sources.casting import CastingReader
from curate.sources.catalog import SourceInfo
from curate.sources.kolektorsdd import KolektorSDDReader
from curate.sources.kolektorsdd2 import KolektorSDD2Reader
from curate.sources.mtd import MTDReader
from curate.sources.mvtec import MVTecReader
from curate.sources.severstal import SeverstalReader

READERS: dict[str, type[Reader]] = {r.kind: r for r in (
    MTDReader, KolektorSDDReader, KolektorSDD2Reader, SeverstalReader, CastingReader,
    MVTecReader,
)}
#: What is known about each source (kind -> its reader's ``info``).
CATALOG: dict[str, SourceInfo] = {kind: reader.info for kind, reader in READERS.items()}


def get_reader(kind: str, leave_out: Mapping[str, str] | None = None) -> Reader:
    """The reader of ``kind``; its walk does not enter the folders of ``leave_out``."""
    try:
        return READERS[kind](leave_out)
    except KeyError:
        raise CurateError(f"unknown source kind {kind!r}; known kinds: "
                          f"{', '.join(sorted(READERS))}") from None
