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
File names come from the source path, cleaned to ASCII letters, digits, '.', '-' and '_': the
shortest tail of it that is unique within the folder (``exp1_num_10181``, ``kos01_Part0``), so
every exported file can be traced back by eye; names are unique by construction, also when
case is ignored (see :func:`unique_names`). ``curate-export.json`` maps each file to its
sample id, source path and sha256.

All or nothing: each original is checked against the sha256 recorded at ingest, the tree is
written to a temporary folder beside ``out``, checked to hold exactly the files the report
lists, and only then moved into place (:mod:`curate.export.staging`). An original that is
missing or changed, a file that cannot be written (full disk, permissions) fail the whole
export with one sentence naming the file. The only samples left out are those that cannot be
exported by nature (a defective sample without a mask): the report lists them as skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from curate import __version__
from curate.errors import CurateError
from curate.export.staging import staged, write_failure
from curate.files import atomic_write_bytes, atomic_write_text, sha256_bytes, walk_files
from curate.imageio import decode, encode_png
from curate.manifest import KEPT, Manifest
from curate.runner import Context, SampleEnv
from curate.sources.base import GOOD

MARKER = "curate-export.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Longest file name stem written: with "_mask.png", a "_<k>" suffix and the ".<pid>.tmp" of
#: an atomic write it stays far below the 255 bytes file systems allow.
MAX_NAME = 150


IMAGE_MODES = ("png", "keep")


@dataclass(frozen=True)
class ExportParams:
    out: str  # the temporary folder being written
    images: str = "png"


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "x"


def _fit(name: str) -> str:
    """``name`` cut to :data:`MAX_NAME` characters, keeping its end (the file's own stem)."""
    return name if len(name) <= MAX_NAME else _safe(name[-MAX_NAME:])


def unique_names(rows: list[dict[str, Any]]) -> list[str]:
    """For rows sharing one folder: a file name (without extension) for each, unique in the
    folder even where case is ignored (exports are copied to macOS and Windows).

    Names are cleaned first and made unique after, so two names that clean to the same one
    (``a b`` and ``a_b``, ``ä`` and ``ö``) cannot end up as one file. Each name is the shortest
    tail of the cleaned source path, '_'-joined, that tells it apart from the others
    (``exp1_num_10181``, ``kos01_Part0``); two samples with the same path in two sources get
    the source name in front; names still equal after that (files whose paths differ only in
    characters cleaned away or in their extension, ``000.png`` and ``000.bmp``) get ``_2``,
    ``_3``... in order of source and path, a name that needed no cleaning keeping its own.
    """
    paths = [PurePosixPath(r["path"]) for r in rows]
    raw = [[*p.parent.parts, p.stem] for p in paths]
    parts = [[_safe(part) for part in r] for r in raw]
    whole = [tuple(part.casefold() for part in p) for p in parts]
    depth = [1] * len(rows)
    while True:
        names = [_fit("_".join(p[-d:])) for p, d in zip(parts, depth, strict=True)]
        # Only names shared by different cleaned paths can be told apart by a longer tail.
        paths_named: dict[str, set[tuple[str, ...]]] = {}
        for name, key in zip(names, whole, strict=True):
            paths_named.setdefault(name.casefold(), set()).add(key)
        grow = [i for i, n in enumerate(names)
                if len(paths_named[n.casefold()]) > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    sources_named: dict[str, set[str]] = {}
    for name, row in zip(names, rows, strict=True):
        sources_named.setdefault(name.casefold(), set()).add(row["source"])
    names = [_fit(f"{_safe(r['source'])}_{n}") if len(sources_named[n.casefold()]) > 1 else n
             for r, n in zip(rows, names, strict=True)]
    faithful = ["_".join(r[-d:]) == n for r, d, n in zip(raw, depth, names, strict=True)]
    return _numbered(names, sorted(range(len(rows)), key=lambda i: (
        not faithful[i], rows[i]["source"], rows[i]["path"])))


def _numbered(names: list[str], order: list[int]) -> list[str]:
    """``names`` with every repeat (ignoring case) after the first, in ``order``, given the
    first free ``_<k>`` suffix: a suffix never takes a name that another row has."""
    wanted = {n.casefold() for n in names}
    used: set[str] = set()
    unique = list(names)
    for i in order:
        name, k = names[i], 1
        while name.casefold() in used or (k > 1 and name.casefold() in wanted):
            k += 1
            name = f"{names[i]}_{k}"
        used.add(name.casefold())
        unique[i] = name
    return unique


def _folder(value: str, what: str, taken: dict[str, str], where: str) -> str:
    """The cleaned folder name for a category or label, refusing two values that would share
    one folder (after cleaning, or ignoring case): their samples would be mixed up."""
    folder = _safe(value)
    other = taken.setdefault(folder.casefold(), value)
    if other != value:
        raise CurateError(f"{what} {other!r} and {value!r}{where} would both be exported to "
                          f"the folder {folder!r} (names are cleaned to letters, digits, '.', "
                          f"'-', '_' and compared ignoring case): rename one of them")
    return folder


def _plan(manifest: Manifest, images: str) -> list[dict[str, Any]]:
    """One job per kept sample: the row plus where its image (and mask) go."""
    kept = [r for r in manifest.rows() if r["status"] == KEPT]
    if kept and not any("labels.mask_fraction" in r["measures"] for r in kept):
        raise CurateError(f"manifest {manifest.id} has no masks yet: run `curate labels` on it "
                          "before exporting")
    categories: dict[str, str] = {}
    # GOOD holds its folder from the start: a defect label that cleans to it ("Good",
    # "good!") would otherwise be exported as normal, without its mask.
    labels: dict[str, dict[str, str]] = {}
    folders: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in sorted(kept, key=lambda r: (r["category"], r["label"] or GOOD)):
        category = _folder(row["category"], "categories", categories, "")
        label = _folder(row["label"] or GOOD, "labels", labels.setdefault(category, {GOOD: GOOD}),
                        f" of category {row['category']!r}")
        folders.setdefault((category, row["split"] or "test", label), []).append(row)
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
    """Write one sample's image (and mask, foreground). Returns what was written, why it was
    skipped (a labelled sample without a mask) or, under ``failed``, why the export cannot be
    completed: an original that is missing or changed since ingest, a file that cannot be
    written."""
    if job["export_mask"] is not None and "mask" not in job["artifacts"]:
        return {"skipped": f"{job['path']}: labelled {job['label']!r} but has no mask"}
    original = env.source_path(job)
    try:
        data = env.read_source(job)
    except FileNotFoundError:
        return {"failed": f"{original} is missing (ingested with sha256 {job['sha256']}): "
                          "ingest it again"}
    except OSError as exc:
        return {"failed": f"cannot read {original}: {exc.strerror or exc}"}
    digest = sha256_bytes(data)
    if digest != job["sha256"]:
        return {"failed": f"{original} changed since ingest (sha256 {digest}, expected "
                          f"{job['sha256']}): ingest it again"}
    if env.params.images == "png":
        data = encode_png(decode(data))
    files = {"image": (job["export_image"], data)}
    # The store already holds masks and foregrounds as PNG: copied, not re-encoded.
    for kind in ("mask", "foreground"):
        if job[f"export_{kind}"] is not None:
            files[kind] = (job[f"export_{kind}"], env.store.read_bytes(job["artifacts"][kind]))
    for rel, content in files.values():
        try:
            atomic_write_bytes(Path(env.params.out) / rel, content)
        except OSError as exc:
            return {"failed": write_failure(exc, Path(env.params.out) / rel)}
    return {kind: rel for kind, (rel, _) in files.items()}


def export_mvtec(manifest: Manifest, out: str | os.PathLike, ctx: Context, *,
                 overwrite: bool = False, images: str = "png") -> dict[str, Any]:
    """Write ``manifest`` to ``out`` in the MVTec-AD layout; returns the export report.

    All or nothing: on any failure ``out`` is left as it was (see :mod:`.staging`)."""
    with staged(out, marker=MARKER, overwrite=overwrite) as tmp:
        return write_mvtec(manifest, tmp, ctx, images=images)


def write_mvtec(manifest: Manifest, folder: Path, ctx: Context, *, images: str = "png"
                ) -> dict[str, Any]:
    """Write the MVTec-AD tree and its report into the empty ``folder``, check that the tree
    holds exactly what the report lists, and return the report. Any sample that cannot be
    exported raises :class:`CurateError`, naming the file."""
    if images not in IMAGE_MODES:
        raise CurateError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    jobs = _plan(manifest, images)
    for parent in sorted({str(PurePosixPath(j[k]).parent) for j in jobs
                          for k in ("export_image", "export_mask", "export_foreground") if j[k]}):
        (folder / parent).mkdir(parents=True, exist_ok=True)
    env = ctx.env("export", ExportParams(out=str(folder), images=images), manifest.roots)
    results = ctx.map(export_sample, jobs, env, "export mvtec")
    _raise_failures(results)
    report = _report(manifest, jobs, results, images)
    _check_tree(folder, report)
    try:
        atomic_write_text(folder / MARKER, json.dumps(report, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise CurateError(write_failure(exc, folder / MARKER)) from None
    return report


def _raise_failures(results: list[dict]) -> None:
    """Stop the export at the first sample (in export order) that failed: an I/O or integrity
    failure, or an exception the runner caught (recorded as a drop naming the sample)."""
    failures = [res["failed"] if "failed" in res else "; ".join(d for _, d in res["drop"])
                for res in results if "failed" in res or "drop" in res]
    if failures:
        more = f" ({len(failures) - 1} more samples failed)" if len(failures) > 1 else ""
        raise CurateError(f"{failures[0]}{more}; nothing was exported")


def _check_tree(folder: Path, report: dict[str, Any]) -> None:
    """The written tree must be exactly what the report says: one image per sample, its mask
    and foreground beside it, no path listed twice (ignoring case), every listed file present
    and no file that is not listed. A mismatch means names collided or a write went astray."""
    listed: dict[str, str] = {}  # casefolded path -> the path as listed
    for entry in report["files"]:
        category, split, label, name = PurePosixPath(entry["file"]).parts
        stem = PurePosixPath(name).stem
        beside = {"mask": None if label == GOOD
                  else f"{category}/ground_truth/{label}/{stem}_mask.png",
                  "foreground": entry["foreground"] and
                  f"{category}/foreground/{split}/{label}/{stem}.png"}
        for kind, expected in beside.items():
            if entry[kind] != expected:
                raise CurateError(f"{folder / entry['file']}: its {kind} is {entry[kind]!r}, "
                                  f"expected {expected!r}")
        for rel in (entry["file"], entry["mask"], entry["foreground"]):
            if rel is None:
                continue
            if rel.casefold() in listed:
                raise CurateError(f"{folder / rel}: written for two samples (as "
                                  f"{listed[rel.casefold()]!r} too, ignoring case)")
            listed[rel.casefold()] = rel
    on_disk = set(walk_files(folder))
    for rel in sorted(set(listed.values()) - on_disk):
        raise CurateError(f"{folder / rel} is listed in {MARKER} but was not written")
    for rel in sorted(on_disk - set(listed.values())):
        raise CurateError(f"{folder / rel} was written but is not listed in {MARKER}")


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
