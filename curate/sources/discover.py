"""Finding the sources a recipe needs under one folder of downloads.

Each source is found by its folder name as distributed (``KolektorSDD``,
``Magnetic-tile-defect-datasets.``, ``severstal-steel-defect-detection`` …, compared
case-insensitively, common aliases included: each reader's ``info``), or else by
recognising its layout in a sub-folder (the reader's ``looks_like``); ``--source KIND=PATH`` names one explicitly. A source
that is not found is reported, not an error: the build goes on without it.
"""

from __future__ import annotations

from pathlib import Path

from curate.core.errors import CurateError
from curate.sources import CATALOG, READERS


def _looks_like(kind: str, path: Path) -> bool:
    """The reader's :meth:`~curate.sources.base.Reader.looks_like`, where a folder that cannot
    be listed looks like nothing."""
    try:
        return READERS[kind].looks_like(path)
    except OSError:
        return False


def discover(folder: Path | None, kinds: list[str], folder_names: dict[str, tuple[str, ...]],
             explicit: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """(kind -> folder found, kind -> why not found) for each of ``kinds``; ``folder`` None
    means only the explicit ones."""
    found: dict[str, Path] = {}
    missing: dict[str, str] = {}
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir()) \
            if folder is not None and folder.is_dir() else []
    except OSError as exc:
        raise CurateError(f"{folder}: cannot list the folder of sources "
                          f"({exc.strerror or exc})") from exc
    by_name = {p.name.lower(): p for p in children}
    claimed: set[Path] = set(explicit.values())
    for kind in kinds:
        if kind in explicit:
            found[kind] = explicit[kind]
            continue
        names = folder_names.get(kind) or CATALOG[kind].folder_names
        match = next((by_name[n.lower()] for n in names if n.lower() in by_name), None)
        if match is not None:
            found[kind] = match
            claimed.add(match)
    for kind in kinds:  # then by layout, among the folders no name claimed
        if kind in found:
            continue
        match = next((p for p in children if p not in claimed and _looks_like(kind, p)), None)
        if match is not None:
            found[kind] = match
            claimed.add(match)
        else:
            names = folder_names.get(kind) or CATALOG[kind].folder_names
            if folder is None:
                missing[kind] = (f"not given: pass --source {kind}=PATH, or --sources with a "
                                 f"folder named {' / '.join(names[:3])} in it; download it from "
                                 f"{CATALOG[kind].url}")
                continue
            missing[kind] = (f"no folder named {' / '.join(names[:3])} under {folder}, and no "
                             f"sub-folder with its layout; download it from {CATALOG[kind].url}"
                             f" or pass --source {kind}=PATH")
    return found, missing
