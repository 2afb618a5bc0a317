"""Finding the sources a recipe needs under one folder of downloads.

Each source is found by its folder name as distributed (``KolektorSDD``,
``Magnetic-tile-defect-datasets.``, ``severstal-steel-defect-detection`` …, compared
case-insensitively, common aliases included: ``curate.sources.catalog``), or else by
recognising its layout in a sub-folder; ``--source KIND=PATH`` names one explicitly. A source
that is not found is reported, not an error: the build goes on without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from curate.core.errors import CurateError
from curate.sources.catalog import CATALOG


def _has(path: Path, pattern: str) -> bool:
    return next(path.glob(pattern), None) is not None


def _casting_like(path: Path) -> bool:
    return (_has(path, "**/*.xml") or _has(path, "**/*.json") or _has(path, "labels/**/*.txt")) \
        and (_has(path, "**/*.jpg") or _has(path, "**/*.png"))


#: Cheap checks that a folder holds a source in its distributed layout (directory listings
#: only; nothing is opened). Ordered from the most to the least specific.
LOOKS_LIKE: dict[str, Callable[[Path], bool]] = {
    "mtd": lambda p: _has(p, "MT_*/Imgs"),
    "severstal": lambda p: (p / "train_images").is_dir() and any(
        f.name.lower() == "train.csv" for f in p.iterdir()),
    "kolektorsdd": lambda p: any(d.is_dir() and re.fullmatch(r"kos\d+", d.name)
                                 for d in p.iterdir()),
    "kolektorsdd2": lambda p: (p / "train").is_dir() and _has(p / "train", "*_GT.png"),
    "mvtec": lambda p: _has(p, "*/train/good") or (p / "train" / "good").is_dir(),
    "casting": _casting_like,
}


def _looks_like(kind: str, path: Path) -> bool:
    """``LOOKS_LIKE[kind]``, where a folder that cannot be listed looks like nothing."""
    try:
        return LOOKS_LIKE[kind](path)
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
