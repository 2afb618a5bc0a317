"""An MVTec export's report (``curate-export.json``) as the images it lists, for the exporters
that list its files.

Loaders such as RealNet's and Real-IAD's take a list of samples instead of walking folders.
Those lists are written from the report rather than from the tree on disk: the report says
exactly which files this export wrote (a stray file dropped into the tree later is not
listed), and it is the same document whatever the image format. A build hands the lists and
the card the report it has just written; a standalone command reads it back with
:func:`read_report`. :func:`exported_images` checks what the lists rely on and turns each
``files`` entry into an :class:`ExportedImage`; :func:`write_lists` writes the lists into a
folder of the export root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from curate.core.errors import CurateError, UnsafePathError, stable_text
from curate.core.files import atomic_write_text, check_relative
from curate.core.manifest import GOOD
from curate.export.mvtec import MARKER
from curate.export.staging import write_failure

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ExportedImage:
    """One image of the export; paths are POSIX and relative to the export root."""

    file: str  # <Category>/<split>/<label>/<name>.<ext>
    mask: str | None  # <Category>/ground_truth/<label>/<name>_mask.png, or None
    category: str
    split: str
    label: str

    @property
    def good(self) -> bool:
        return self.label == GOOD


def read_report(export_dir: str | os.PathLike) -> dict[str, Any]:
    """``<export_dir>/curate-export.json`` as a dict, checked to be a curate MVTec export
    report (format "mvtec" and a "files" list)."""
    path = Path(export_dir) / MARKER
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurateError(f"{path} not found: expected the report of a curate MVTec export "
                          "(run `curate export mvtec` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CurateError(f"{path} cannot be read as JSON "
                          f"({stable_text(exc)}): expected the report of a "
                          "curate MVTec export") from None
    if not isinstance(report, dict) or report.get("format") != "mvtec" \
            or not isinstance(report.get("files"), list):
        raise CurateError(f"{path}: expected an object with \"format\": \"mvtec\" and a "
                          "\"files\" list")
    return report


def exported_images(report: dict[str, Any], export_dir: str | os.PathLike
                    ) -> list[ExportedImage]:
    """Every image ``report`` (the report of the export at ``export_dir``) lists, sorted by
    file.

    Raises :class:`CurateError` naming the report when it lists an image outside the
    ``<Category>/<train|test>/<label>/<name>`` layout, twice, or with a mask path that is not
    a relative path inside the image's category folder.
    """
    path = Path(export_dir) / MARKER
    images = sorted((_image(entry, path) for entry in report["files"]), key=lambda i: i.file)
    for a, b in zip(images, images[1:], strict=False):
        if a.file == b.file:
            raise CurateError(f"{path}: {a.file!r} is listed twice in \"files\"")
    return images


def _image(entry: Any, path: Path) -> ExportedImage:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or "mask" not in entry or not isinstance(entry["mask"], str | None):
        raise CurateError(f"{path}: each \"files\" entry must be an object with a \"file\" "
                          f"string and a \"mask\" string or null, got {entry!r}")
    try:
        file = check_relative(entry["file"], "file")
        mask = None if entry["mask"] is None else check_relative(entry["mask"], "mask")
    except UnsafePathError as exc:
        raise CurateError(f"{path}: {exc}") from None
    parts = PurePosixPath(file).parts
    if len(parts) != 4 or parts[1] not in SPLITS:
        raise CurateError(f"{path}: file {file!r} is not <Category>/<train|test>/<label>/<name>")
    if mask is not None and PurePosixPath(mask).parts[0] != parts[0]:
        raise CurateError(f"{path}: mask {mask!r} of {file!r} is outside its category folder")
    return ExportedImage(file=file, mask=mask, category=parts[0], split=parts[1], label=parts[2])


def write_lists(folder: Path, texts: dict[str, str]) -> list[Path]:
    """Write each ``name -> text`` into ``folder`` (created if needed), each file atomically,
    so a loader never reads half a list; returns the paths written, sorted. A write that
    fails (full disk, permissions) raises :class:`CurateError` naming the file."""
    for name, text in texts.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / name, text)
        except OSError as exc:
            raise CurateError(write_failure(exc, folder / name)) from None
    return sorted(folder / name for name in texts)
