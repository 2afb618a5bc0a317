"""Export a manifest in the MVTec-AD layout, which most anomaly-detection code reads.

    <out>/<Category>/train/good/<name>.png
    <out>/<Category>/test/good/<name>.png
    <out>/<Category>/test/<defect>/<name>.png
    <out>/<Category>/ground_truth/<defect>/<name>_mask.png
    <out>/<Category>/foreground/<split>/<label>/<name>.png   when the foreground stage ran
    <out>/curate-export.json      which manifest, and which sample each file came from

Kept samples only. A sample goes to its ``split`` (``test`` while no split has been assigned).
Images are written as PNG (official loaders glob ``*.png``), channels as in the source; with
``images="keep"`` they are copied byte for byte instead, keeping their format and extension
(several times faster: no decoding or encoding, but only for loaders that accept any format).
File names come from the source path: the shortest tail of it that is unique within the
folder (``exp1_num_10181``, ``kos01_Part0``), so every exported file can be traced back by eye;
``curate-export.json`` maps each one to its sample id, source path and sha256.

The export is written to a temporary folder beside ``out`` and moved into place at the end, so
an interrupted export never leaves a half-written tree where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from curate import __version__
from curate.errors import CurateError
from curate.files import atomic_write_bytes, atomic_write_text
from curate.imageio import decode, encode_png
from curate.manifest import KEPT, Manifest
from curate.runner import Context, SampleEnv
from curate.sources.base import GOOD

MARKER = "curate-export.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


IMAGE_MODES = ("png", "keep")


@dataclass(frozen=True)
class ExportParams:
    out: str  # the temporary folder being written
    images: str = "png"


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "x"


def unique_names(rows: list[dict[str, Any]]) -> list[str]:
    """For rows sharing one folder: the shortest unique tail of each source path, '_'-joined.

    Two samples with the very same source path (from two sources) get the source name in front.
    """
    parts = [[*PurePosixPath(r["path"]).parent.parts, PurePosixPath(r["path"]).stem]
             for r in rows]
    depth = [1] * len(rows)
    while True:
        names = ["_".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clash = Counter(names)
        grow = [i for i, n in enumerate(names) if clash[n] > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    clash = Counter(names)
    names = [f"{r['source']}_{n}" if clash[n] > 1 else n for r, n in zip(rows, names, strict=True)]
    return [_safe(n) for n in names]


def _plan(manifest: Manifest, images: str) -> list[dict[str, Any]]:
    """One job per kept sample: the row plus where its image (and mask) go."""
    kept = [r for r in manifest.rows() if r["status"] == KEPT]
    if kept and not any("labels.mask_fraction" in r["measures"] for r in kept):
        raise CurateError(f"manifest {manifest.id} has no masks yet: run `curate labels` on it "
                          "before exporting")
    folders: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in kept:
        label = _safe(row["label"] or GOOD)
        folders.setdefault((_safe(row["category"]), row["split"] or "test", label), []).append(row)
    jobs = []
    for (category, split, label), rows in sorted(folders.items()):
        for row, name in zip(rows, unique_names(rows), strict=True):
            job = dict(row)
            ext = ".png" if images == "png" else PurePosixPath(row["path"]).suffix.lower()
            job["export_image"] = f"{category}/{split}/{label}/{name}{ext}"
            job["export_mask"] = (f"{category}/ground_truth/{label}/{name}_mask.png"
                                  if label != GOOD else None)
            job["export_foreground"] = (f"{category}/foreground/{split}/{label}/{name}.png"
                                        if "foreground" in row["artifacts"] else None)
            jobs.append(job)
    return jobs


def export_sample(job: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """Write one sample's image (and mask). Returns what was written, or why it was skipped."""
    out = Path(env.params.out)
    if job["export_mask"] is not None and "mask" not in job["artifacts"]:
        return {"skipped": f"{job['path']}: labelled {job['label']!r} but has no mask"}
    data = env.read_source(job)
    if env.params.images == "png":
        data = encode_png(decode(data))
    atomic_write_bytes(out / job["export_image"], data)
    written = {"image": job["export_image"]}
    if job["export_mask"] is not None:
        # The store already holds the mask as a 0/255 PNG: copy it, no need to re-encode.
        shutil.copyfile(env.store.path(job["artifacts"]["mask"]), out / job["export_mask"])
        written["mask"] = job["export_mask"]
    if job["export_foreground"] is not None:
        shutil.copyfile(env.store.path(job["artifacts"]["foreground"]),
                        out / job["export_foreground"])
        written["foreground"] = job["export_foreground"]
    return written


def export_mvtec(manifest: Manifest, out: str | os.PathLike, ctx: Context, *,
                 overwrite: bool = False, images: str = "png") -> dict[str, Any]:
    """Write ``manifest`` to ``out`` in the MVTec-AD layout; returns the export report."""
    if images not in IMAGE_MODES:
        raise CurateError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MARKER).is_file():
            raise CurateError(f"{out} exists and is not an earlier curate export: "
                              "choose an empty or new folder")
        if not overwrite:
            raise CurateError(f"{out} already holds a curate export: pass --overwrite to "
                              "replace it")
    jobs = _plan(manifest, images)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.curate-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        folders = {str(PurePosixPath(j[k]).parent) for j in jobs
                   for k in ("export_image", "export_mask", "export_foreground") if j[k]}
        for folder in sorted(folders):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        env = ctx.env("export", ExportParams(out=str(tmp), images=images), manifest.roots)
        results = ctx.map(export_sample, jobs, env, "export mvtec")
        report = _report(manifest, jobs, results, images)
        atomic_write_text(tmp / MARKER, json.dumps(report, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.curate-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _report(manifest: Manifest, jobs: list[dict], results: list[dict], images: str
            ) -> dict[str, Any]:
    files, skipped = [], []
    counts: Counter[tuple[str, str, str]] = Counter()
    for job, res in zip(jobs, results, strict=True):
        if "image" not in res:
            why = res.get("skipped") or "; ".join(d for _, d in res.get("drop", []))
            skipped.append({"sample_id": job["sample_id"], "path": job["path"], "why": why})
            continue
        category, split, label = res["image"].split("/")[:3]
        counts[(category, split, label)] += 1
        files.append({"file": res["image"], "mask": res.get("mask"),
                      "foreground": res.get("foreground"),
                      "sample_id": job["sample_id"], "source": job["source"],
                      "path": job["path"], "sha256": job["sha256"]})
    tree: dict[str, dict[str, dict[str, int]]] = {}
    for (category, split, label), n in sorted(counts.items()):
        tree.setdefault(category, {}).setdefault(split, {})[label] = n
    return {
        "format": "mvtec",
        "images": images,
        "manifest": manifest.id,
        "curate_version": __version__,
        "written": len(files),
        "skipped": skipped,
        "counts": tree,
        "files": files,
    }
