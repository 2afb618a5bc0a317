"""What every source reader shares: the scan result, the inventory, pairing by name.

A reader looks at a source folder *as distributed* and returns a :class:`Scan`: one candidate
row per sample image (category, label, annotation as read; possibly already dropped with a
reason) and an :class:`Inventory` that accounts for every other file under the root. Readers
do not open images: the ingest stage hashes and probes every candidate afterwards, in parallel.

Conventions all readers follow:
- pair images with masks/annotations by name, never by sorted position;
- compare extensions case-insensitively (``.JPG`` is a JPEG);
- every file under the root is a sample image, a mask/annotation file of one, or listed in the
  inventory as unpaired or ignored, with why;
- files are listed by :meth:`Reader.walk` alone (``curate.core.files.walk_files``): it never
  follows a link out of the root, and lists what it leaves out (links leading outside, broken
  links, FIFOs, unreadable folders, names that are not UTF-8 ...) as ignored, with why;
- a layout that cannot be recognised at all stops the command with one sentence saying what
  was expected; anything smaller drops one sample with a reason.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from curate.core.errors import CurateError, UsageError
from curate.core.files import walk_files
from curate.core.manifest import GOOD
from curate.imaging.io import is_image_name
from curate.sources.catalog import SourceInfo

COMBINED = "combined"  # MVTec AD's name for an image with several defect types


def has_match(path: Path, pattern: str) -> bool:
    """Whether anything under ``path`` matches the glob ``pattern`` (stops at the first)."""
    return next(path.glob(pattern), None) is not None


@dataclass
class Inventory:
    """Every file under a source root that is not a sample image, with why.

    ``files`` counts the entries the walk found under the root: every file listed, plus every
    entry it left out (each of those is one ``ignored`` line, a folder left out standing for
    everything inside it). So each of the ``files`` entries is exactly once a row's image, a
    row's mask or annotation file, an annotation file, unpaired or ignored.
    """

    files: int = 0
    annotation_files: list[str] = field(default_factory=list)
    unpaired: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def unpair(self, path: str, why: str) -> None:
        self.unpaired.append({"path": path, "why": why})

    def ignore(self, path: str, why: str) -> None:
        self.ignored.append({"path": path, "why": why})

    def reject(self, path: str, why: str) -> None:
        """An annotation *entry* (a CSV line, a COCO image record) that cannot be used."""
        self.rejected.append({"path": path, "why": why})

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "annotation_files": sorted(set(self.annotation_files)),
            "unpaired": sorted(self.unpaired, key=lambda d: (d["path"], d["why"])),
            "ignored": sorted(self.ignored, key=lambda d: (d["path"], d["why"])),
            "rejected": sorted(self.rejected, key=lambda d: (d["path"], d["why"])),
        }


@dataclass
class Scan:
    rows: list[dict[str, Any]]
    inventory: Inventory


class Reader(abc.ABC):
    """A source reader. Subclasses set the class attributes and implement :meth:`scan`."""

    kind: ClassVar[str]
    #: Where the source is distributed, its licence and citation, the folder names it comes
    #: under (``curate.sources.CATALOG`` and discovery read them from here).
    info: ClassVar[SourceInfo]
    #: Category given to the source's samples unless the ``category`` option overrides it.
    category: ClassVar[str]
    #: One sentence describing the expected layout, used in errors.
    layout: ClassVar[str]
    #: Option name -> default value; anything else is refused.
    options: ClassVar[dict[str, Any]] = {}
    #: Option name -> its allowed values (a tuple) or its type. ``category`` is a string; an
    #: option whose default is None may also be left None.
    option_values: ClassVar[dict[str, tuple[Any, ...] | type]] = {}

    @staticmethod
    @abc.abstractmethod
    def looks_like(path: Path) -> bool:
        """Whether ``path`` holds this source in its distributed layout: a cheap check on
        directory listings (nothing is opened), used to find a source not under one of its
        folder names."""

    def __init__(self, leave_out: Mapping[str, str] | None = None):
        #: Folders under the root the walk must not enter (relative path -> why), such as a
        #: workspace inside the source folder.
        self.leave_out = dict(leave_out or {})

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option filled in; an unknown option or a refused value is bad usage."""
        allowed = {"category": self.category, **self.options}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise UsageError(f"the {self.kind} reader has no option(s) {', '.join(unknown)}; "
                             f"its options are: {', '.join(sorted(allowed))}")
        filled = {**allowed, **options}
        for name, expected in {"category": str, **self.option_values}.items():
            value = filled[name]
            if value is None and allowed[name] is None:
                continue
            if isinstance(expected, tuple):
                ok = any(type(value) is type(v) and value == v for v in expected)
                wanted = f"one of {', '.join(map(_option_text, expected))}"
            else:
                ok, wanted = isinstance(value, expected), _TYPE_WORDS[expected]
            if not ok:
                shown = _option_text(value) if isinstance(value, bool) else repr(value)
                raise UsageError(f"{self.kind} option {name}={shown}: expected {wanted}")
        return filled

    @abc.abstractmethod
    def scan(self, root: Path, source: str, options: dict[str, Any]) -> Scan:
        """Read the layout under ``root``; ``options`` has every option filled in."""

    def walk(self, root: Path) -> tuple[list[str], Inventory]:
        """Every file under ``root`` a reader may read, and an inventory that already lists
        what the walk left out (see ``curate.core.files.walk_files``) and counts every entry.
        Stops with one sentence if there is no file at all."""
        if not root.is_dir():
            raise CurateError(f"{root}: not a folder; expected a {self.kind} source folder "
                              f"({self.layout})")
        inv = Inventory()
        files = list(walk_files(root, on_skip=inv.ignore, leave_out=self.leave_out))
        inv.files = len(files) + len(inv.ignored)
        if not files:
            if inv.ignored:
                first = inv.ignored[0]
                raise CurateError(f"{root}: no file curate may read ({len(inv.ignored)} "
                                  f"entries left out, such as {first['path']}: {first['why']}); "
                                  f"expected {self.layout}")
            raise CurateError(f"{root}: the folder is empty; expected {self.layout}")
        return files, inv

    def unrecognised(self, root: Path) -> CurateError:
        return CurateError(f"{root}: no {self.kind} layout found; expected {self.layout}")


_TYPE_WORDS = {str: "a string", bool: "true or false"}


def _option_text(value: Any) -> str:
    """An option value as it is written on the command line (``true``, not ``True``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def stem_and_ext(rel: str) -> tuple[str, str]:
    """``('a/b/name', '.jpg')`` for ``'a/b/name.JPG'``: the path without its extension, and the
    extension lower-cased."""
    p = PurePosixPath(rel)
    return str(p.with_suffix("")), p.suffix.lower()


def is_image(rel: str) -> bool:
    return is_image_name(rel)


def pair_masks_beside(files: Iterable[str], inv: Inventory, *, folder: re.Pattern[str],
                      mask_suffix: str, elsewhere: str) -> list[tuple[str, str, str | None]]:
    """Pair each image with the mask beside it named ``<stem><mask_suffix>.<ext>``.

    The KolektorSDD convention (``PartN_label.bmp``, KolektorSDD2's ``<id>_GT.png``). Returns
    ``(stem, image, mask or None)`` sorted by stem. Files that are not images in a folder
    matching ``folder`` are ignored (``elsewhere`` says why); a second file for the same sample
    and a mask without its image are listed as unpaired.
    """
    images: dict[str, str] = {}
    masks: dict[str, str] = {}  # keyed by the stem of the image the mask belongs to
    for rel in files:
        if not folder.match(rel) or not is_image(rel):
            inv.ignore(rel, elsewhere)
            continue
        stem, _ext = stem_and_ext(rel)
        is_mask = stem.endswith(mask_suffix)
        key = stem.removesuffix(mask_suffix) if is_mask else stem
        found = masks if is_mask else images
        if key in found:
            inv.unpair(rel, f"a second file for sample {key}, besides {found[key]}")
        else:
            found[key] = rel
    for key, mask in masks.items():
        if key not in images:
            inv.unpair(mask, "mask without an image of the same stem")
    return [(stem, image, masks.get(stem)) for stem, image in sorted(images.items())]


def ignore_rest(inventory: Inventory, files: Iterable[str], used: set[str], why: str) -> None:
    """Put every file of ``files`` not in ``used`` into the inventory as ignored."""
    for rel in files:
        if rel not in used:
            inventory.ignore(rel, why)


def label_for(classes: list[str]) -> str:
    """The sample label for a list of defect classes: good, the class, or 'combined'."""
    distinct = sorted(set(classes))
    if not distinct:
        return GOOD
    return distinct[0] if len(distinct) == 1 else COMBINED
