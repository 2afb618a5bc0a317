"""``curate filter-noise FOLDER --out OUT``: SSFilter on a plain folder of images.

The folder is only read. ``OUT`` gets links to the kept images at their relative paths (a hard
link or a copy where symlinks are not allowed), ``ssfilter-report.csv`` (every image: score,
votes, kept, rank, hard normal, reason) and contact sheets of the removed images and of the
hard normals, most suspicious first.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from curate.core.errors import CurateError
from curate.core.files import walk_files
from curate.imaging.io import decode, is_image_name
from curate.stages.ssfilter.params import SSFilterParams
from curate.stages.ssfilter.scoring import FilterResult, ImageSource, Progress
from curate.stages.ssfilter.stage import NOISE_FILTER, run_filter

REPORT = "ssfilter-report.csv"
REMOVED_SHEET = "removed.png"
HARD_SHEET = "hard-normals.png"


@dataclass
class FolderReport:
    images: int
    kept: int
    removed: int
    unreadable: int
    hard_normals: int
    out: Path
    report: Path
    sheet: Path | None
    hard_sheet: Path | None
    link_kind: str

    def summary(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def filter_folder(folder: str | os.PathLike, out: str | os.PathLike, params: SSFilterParams,
                  seed: int = 0, *, device: str | None = None,
                  progress: Progress | None = None) -> FolderReport:
    """Filter the images under ``folder`` (read only) into ``out``: links to the kept images
    at their relative paths, ``ssfilter-report.csv`` and a contact sheet of the removed ones."""
    folder, out = Path(folder).resolve(), Path(out).absolute()
    if not folder.is_dir():
        raise CurateError(f"{folder}: not a folder of images")
    if out.resolve() == folder or folder in out.resolve().parents:
        raise CurateError(f"{out}: the output folder must not be inside the input folder "
                          f"{folder} (the input is never modified)")
    if out.exists() and any(out.iterdir()):
        if not (out / REPORT).is_file():
            raise CurateError(f"{out}: exists and is not an earlier filter-noise output "
                              f"(no {REPORT}); choose an empty or new folder")
        shutil.rmtree(out)
    paths = [rel for rel in walk_files(folder) if is_image_name(rel)]
    if not paths:
        raise CurateError(f"{folder}: no images found (looked for "
                          f"{', '.join(('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff'))})")

    def read(k: int) -> np.ndarray:
        return decode((folder / paths[k]).read_bytes())

    result = run_filter(read, len(paths), params, seed, device=device or params.device,
                        progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    ranks = result.ranks()
    hard = set(result.hard_normals(params.hard_normals).tolist()) if params.hard_normals else set()
    link_kind = ""
    with open(out / REPORT, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "votes", "kept", "rank", "hard_normal", "reason"])
        for k, rel in enumerate(paths):
            if k in result.failed:
                reason = f"unreadable_image: {result.failed[k]}"
            elif not result.kept[k]:
                reason = (f"{NOISE_FILTER}: judged normal in {result.votes[k]} of "
                          f"{params.kappa1} shufflings (needs more than {params.kappa2})")
            else:
                reason = ""
                link_kind = _link(folder / rel, out / rel) or link_kind
            score = "" if not np.isfinite(result.scores[k]) else f"{result.scores[k]:.6g}"
            writer.writerow([rel, score, int(result.votes[k]), bool(result.kept[k] and k not in
                             result.failed), int(ranks[k]), k in hard, reason])
    removed = [k for k in np.argsort(-np.nan_to_num(result.scores, nan=-np.inf), kind="stable")
               if not result.kept[k] and k not in result.failed]
    sheet = _contact_sheet(read, removed, paths, result, out / REMOVED_SHEET) if removed else None
    hard_order = [k for k in result.hard_normals(params.hard_normals)] if hard else []
    hard_sheet = _contact_sheet(read, hard_order, paths, result, out / HARD_SHEET) \
        if hard_order else None
    kept = int(sum(result.kept[k] and k not in result.failed for k in range(len(paths))))
    return FolderReport(len(paths), kept, len(removed), len(result.failed), len(hard_order), out,
                        out / REPORT, sheet, hard_sheet, link_kind or "none")


def _link(src: Path, dst: Path) -> str:
    """Symlink ``dst`` -> ``src``; a hard link or a copy where symlinks are not allowed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dst)
        return "symlink"
    except OSError:
        pass
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _contact_sheet(read: ImageSource, order: Sequence[int], paths: list[str],
                   result: FilterResult, path: Path, *, limit: int = 100, tile: int = 160,
                   columns: int = 8) -> Path:
    """A grid of thumbnails in ``order`` (most suspicious first), each labelled with its rank,
    score and votes; at most ``limit`` images (the CSV lists all)."""
    order = list(order)[:limit]
    ranks = result.ranks()
    label_h = 34
    rows = math.ceil(len(order) / columns)
    sheet = np.full((rows * (tile + label_h), columns * tile, 3), 255, np.uint8)
    for n, k in enumerate(order):
        image = read(k)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        image = image[:, :, :3]
        scale = tile / max(image.shape[:2])
        thumb = cv2.resize(image, (max(1, int(image.shape[1] * scale)),
                                   max(1, int(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        r, c = divmod(n, columns)
        y, x = r * (tile + label_h), c * tile
        sheet[y:y + thumb.shape[0], x:x + thumb.shape[1]] = thumb
        text = [f"#{ranks[k]} s={result.scores[k]:.3f} v={result.votes[k]}",
                Path(paths[k]).name[:24]]
        for line, t in enumerate(text):
            cv2.putText(sheet, t, (x + 3, y + tile + 13 + 14 * line), cv2.FONT_HERSHEY_SIMPLEX,
                        0.38, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path
