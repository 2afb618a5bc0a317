"""Export a manifest in the MVTec-AD layout, which most anomaly-detection code reads.

    <out>/<Category>/train/good/000.png
    <out>/<Category>/test/good/000.png
    <out>/<Category>/test/<defect>/000.png
    <out>/<Category>/ground_truth/<defect>/000_mask.png
    <out>/foreground/<Category>/<split>/<label>/000.png   when the foreground stage ran
    <out>/curate-export.json      which manifest, and which sample each file came from

Kept samples only. A good sample goes to its ``split`` (``test`` while no split has been
assigned); a defective one always goes to ``test/<defect>``: the MVTec layout and its loaders
know no anomalous training images (anomalib gives masks only to test images and fails on a
defect folder under ``train/``), so a defect the manifest puts in train (a synthetic
``sdas blend`` image, a reviewer's ``move:train``) is exported as a test anomaly.

Images are written as PNG (official loaders glob ``*.png``), channels as in the source; with
``images="keep"`` they are copied byte for byte instead, keeping their format and extension
(no decoding or encoding, but only for loaders that accept any format).

Where PNGs come from: a build's look (:mod:`curate.engine.facts`) stores each image's PNG in the
workspace's store from the decode every stage shares, so the export decodes nothing; an image
without one (a manifest made by single stage commands) is decoded and encoded here. Store files — those PNGs, masks,
foregrounds — are hard-linked into the tree (``link``, the default; a copy across file
systems): no byte is written twice, and the tree costs no disk space the workspace does not
already use. Store files are read-only and named by their content, so a tool that rewrites an
exported file in place is refused instead of silently changing the store (``curate verify``
checks the store); ``link=False`` (``--copy``) writes independent copies.

File names are zero-padded indices per folder, as in MVTec AD itself (``000.png`` and its mask
``000_mask.png``; more digits where a folder holds more than 1,000 images), given in order of
source and source path. Loaders pair images with masks by sorting both lists (anomalib's
``MVTecAD`` and ``Folder``): names of one length sort the same with and without ``_mask``,
which source stems of different lengths do not (``a_1.png`` < ``a_12.png`` but
``a_1_mask.png`` > ``a_12_mask.png``). Names are unique by construction, also when case is
ignored. ``curate-export.json`` maps each file (image, mask, foreground) to its sample id,
source, source path and sha256, so every exported file can be traced back.

Foreground masks live in their own top-level tree, mirroring the images' paths: anomalib's
``MVTecAD`` globs every file under a category folder and would read foreground masks kept
there as more images; no MVTec loader looks outside ``<out>/<Category>``, so a category may
not be called ``foreground``.

A defective sample without a usable mask, none at all or an empty one (a reviewer's ``keep``
on a ``defect_without_mask`` sample), is never exported as a test anomaly: loaders would
count it as a defect with no defect pixel. It is left out and listed under ``skipped`` in the
report with the reason, and the CLI prints it.

All or nothing: each original is checked against the sha256 recorded at ingest, the tree is
written to a temporary folder beside ``out``, checked to hold exactly the files the report
lists, and only then moved into place (:mod:`curate.export.staging`). An original that is
missing or changed, a file that cannot be written (full disk, permissions) fail the whole
export with one sentence naming the file. The only samples left out are those that cannot be
exported by nature (a defective sample without a usable mask): the report lists them as
skipped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from curate import __version__
from curate.core.errors import CurateError
from curate.core.files import atomic_write_bytes, atomic_write_text, sha256_bytes, walk_files
from curate.core.manifest import GOOD, Manifest
from curate.core.measures import LABELS_MASK_FRACTION
from curate.engine.facts import StoredPng
from curate.engine.mask_facts import MaskStats, look_masks
from curate.engine.runner import Context, SampleEnv, kept_rows
from curate.export.staging import staged, write_failure
from curate.imaging.io import decode, encode_png

MARKER = "curate-export.json"
#: The top-level folder of the foreground masks (beside the categories, outside their trees).
FOREGROUND = "foreground"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Fewest digits of an exported file's index, as in MVTec AD (``000.png``).
MIN_DIGITS = 3


IMAGE_MODES = ("png", "keep")


@dataclass(frozen=True)
class ExportParams:
    out: str  # the temporary folder being written
    images: str = "png"
    link: bool = True  # files from the store as hard links (see place_artifact)


#: Why a hard link cannot be made, where a copy can: another file system, too many links to
#: one file (every same-sized whole-frame foreground is one stored file), no link support.
_NO_LINK = {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


def place_artifact(stored: Path, target: Path, link: bool) -> None:
    """Put a file of the workspace's store at ``target``: a hard link where allowed (no data
    written: the store's files are read-only and content-addressed, so the export shares
    them safely), else a copy."""
    if link:
        try:
            os.link(stored, target)
            return
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
    shutil.copyfile(stored, target)


def clean_folder_name(name: str) -> str:
    """A category or label as a portable folder name (ASCII letters, digits, '.', '_', '-'):
    the SIA bank export names its class folders the same way, so RealNet's ``{}`` matches."""
    return _UNSAFE.sub("_", name).strip("._") or "x"


def indexed_names(count: int) -> list[str]:
    """The file names (without extension) of a folder of ``count`` images: ``000``, ``001``...
    all of one length (at least :data:`MIN_DIGITS`), so they sort as their indices do, with or
    without a ``_mask`` suffix."""
    digits = max(MIN_DIGITS, len(str(count - 1)))
    return [f"{i:0{digits}d}" for i in range(count)]


def _folder(value: str, what: str, taken: dict[str, str], where: str) -> str:
    """The cleaned folder name for a category or label, refusing two values that would share
    one folder (after cleaning, or ignoring case): their samples would be mixed up."""
    folder = clean_folder_name(value)
    other = taken.setdefault(folder.casefold(), value)
    if other != value:
        raise CurateError(f"{what} {other!r} and {value!r}{where} would both be exported to "
                          f"the folder {folder!r} (names are cleaned to letters, digits, '.', "
                          f"'-', '_' and compared ignoring case): rename one of them")
    return folder


def split_and_label(row: dict[str, Any]) -> tuple[str, str]:
    """Where the export files a kept row, as (split, label): no label means ``good``; a good
    image goes to its split (``test`` while none is assigned), a defective one always to
    ``test`` (see the module docstring). The dataset card counts images by the same rule."""
    label = row["label"] or GOOD
    return ((row["split"] or "test") if label == GOOD else "test"), label


#: The row columns an export reads (whole rows would hold every measure and note in memory).
JOB_COLUMNS = ("sample_id", "source", "path", "sha256", "category", "label", "split",
               "artifacts")


def _has_masks(manifest: Manifest, kept: list[dict[str, Any]], positions: list[int]) -> bool:
    """Whether masks were made for these rows: a stage stored one (``labels``, ``sdas
    blend``), or the labels stage measured them (and found every mask empty)."""
    if any("mask" in r["artifacts"] for r in kept):
        return True
    measures = manifest.column_values("measures")
    return any(LABELS_MASK_FRACTION in measures[i] for i in positions)


def _unusable(defects: list[dict[str, Any]], ctx: Context) -> dict[str, str]:
    """sample id -> why, for the defective rows without a usable mask: none, or one without a
    defect pixel (by the mask's facts, :mod:`curate.engine.mask_facts`: no mask is decoded
    when ``labels`` recorded them). The reason is what the report and the CLI show beside the
    sample's path."""
    stats = MaskStats()
    keys = [row["artifacts"].get("mask") for row in defects]
    # An export only reads the workspace (it takes no lock): facts it has to compute are kept
    # in memory, not written.
    persist, ctx.persist_facts = ctx.persist_facts, False
    try:
        looked = look_masks(ctx, "export", [k for k in keys if k is not None], [stats],
                            desc="export: masks")
    finally:
        ctx.persist_facts = persist
    # Stop at the first defect (in export order) whose mask cannot be read, naming it.
    _raise_failures([{"drop": looked.drop(key, row["path"])}
                     for row, key in zip(defects, keys, strict=True) if key in looked.failed])
    known = [k for k in dict.fromkeys(keys) if k is not None]
    pixels = dict(zip(known, looked[stats].column(known, "pixels"), strict=True))
    unusable = {}
    for row, key in zip(defects, keys, strict=True):
        if key is None:
            unusable[row["sample_id"]] = f"labelled {row['label']!r} but has no mask"
        elif pixels[key] == 0:
            unusable[row["sample_id"]] = f"labelled {row['label']!r} but its mask is empty"
    return unusable


def _plan(manifest: Manifest, images: str, ctx: Context
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One job per exported sample (the row plus where its image, mask and foreground go),
    and the samples skipped for want of a usable mask (sample id, path, why)."""
    positions, kept = kept_rows(manifest, JOB_COLUMNS)
    if kept and not _has_masks(manifest, kept, positions):
        raise CurateError(f"manifest {manifest.id} has no masks yet: run `curate labels` on it "
                          "before exporting")
    unusable = _unusable([r for r in kept if (r["label"] or GOOD) != GOOD], ctx)
    skipped = [{"sample_id": r["sample_id"], "path": r["path"], "why": unusable[r["sample_id"]]}
               for r in sorted(kept, key=lambda r: (r["source"], r["path"]))
               if r["sample_id"] in unusable]
    categories: dict[str, str] = {}
    # GOOD holds its folder from the start: a defect label that cleans to it ("Good",
    # "good!") would otherwise be exported as normal, without its mask.
    labels: dict[str, dict[str, str]] = {}
    folders: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in sorted(kept, key=lambda r: (r["category"], r["label"] or GOOD)):
        category = _folder(row["category"], "categories", categories, "")
        if category.casefold() == FOREGROUND:
            raise CurateError(f"category {row['category']!r} has the name of the folder the "
                              f"export keeps foreground masks in ({FOREGROUND}/): rename the "
                              "category")
        split, label_name = split_and_label(row)
        label = _folder(label_name, "labels", labels.setdefault(category, {GOOD: GOOD}),
                        f" of category {row['category']!r}")
        if row["sample_id"] in unusable:
            continue
        folders.setdefault((category, split, label), []).append(row)
    jobs = []
    for (category, split, label), rows in sorted(folders.items()):
        rows = sorted(rows, key=lambda r: (r["source"], r["path"]))
        for row, name in zip(rows, indexed_names(len(rows)), strict=True):
            job = dict(row)
            ext = ".png" if images == "png" else PurePosixPath(row["path"]).suffix.lower()
            job["export_image"] = f"{category}/{split}/{label}/{name}{ext}"
            job["export_mask"] = (f"{category}/ground_truth/{label}/{name}_mask.png"
                                  if label != GOOD else None)
            job["export_foreground"] = (f"{FOREGROUND}/{category}/{split}/{label}/{name}.png"
                                        if "foreground" in row["artifacts"] else None)
            jobs.append(job)
    return jobs, skipped


def export_sample(job: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """Write one sample's image (and mask, foreground). Returns what was written or, under
    ``failed``, why the export cannot be completed: an original that is missing or changed
    since ingest, a file that cannot be written."""
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
    image: bytes | Path = data
    if env.params.images == "png":
        # The PNG a look stored: the same bytes as encoding again (a store file removed by
        # hand is made again).
        stored = env.store.path(job["png"]) if "png" in job else None
        image = stored if stored is not None and stored.is_file() else encode_png(decode(data))
    files: dict[str, tuple[str, bytes | Path]] = {"image": (job["export_image"], image)}
    # The store already holds masks and foregrounds as PNG: linked or copied, not re-encoded.
    for kind in ("mask", "foreground"):
        if job[f"export_{kind}"] is not None:
            key = job["artifacts"][kind]
            if not env.store.has(key):
                raise CurateError(f"artifact {key} is missing from the store at "
                                  f"{env.store.root}")
            files[kind] = (job[f"export_{kind}"], env.store.path(key))
    for rel, content in files.values():
        target = Path(env.params.out) / rel
        try:
            if isinstance(content, Path):
                place_artifact(content, target, env.params.link)
            else:
                atomic_write_bytes(target, content)
        except OSError as exc:
            return {"failed": write_failure(exc, target)}
    return {kind: rel for kind, (rel, _) in files.items()}


def export_mvtec(manifest: Manifest, out: str | os.PathLike, ctx: Context, *,
                 overwrite: bool = False, images: str = "png", link: bool = True
                 ) -> dict[str, Any]:
    """Write ``manifest`` to ``out`` in the MVTec-AD layout; returns the export report.

    All or nothing: on any failure ``out`` is left as it was (see :mod:`.staging`)."""
    with staged(out, marker=MARKER, overwrite=overwrite, manifest=manifest.id) as tmp:
        return write_mvtec(manifest, tmp, ctx, images=images, link=link)


def write_mvtec(manifest: Manifest, folder: Path, ctx: Context, *, images: str = "png",
                link: bool = True) -> dict[str, Any]:
    """Write the MVTec-AD tree and its report into the empty ``folder``, check that the tree
    holds exactly what the report lists, and return the report. Any sample that cannot be
    exported raises :class:`CurateError`, naming the file."""
    if images not in IMAGE_MODES:
        raise CurateError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    jobs, skipped = _plan(manifest, images, ctx)
    for parent in sorted({str(PurePosixPath(j[k]).parent) for j in jobs
                          for k in ("export_image", "export_mask", "export_foreground") if j[k]}):
        (folder / parent).mkdir(parents=True, exist_ok=True)
    if images == "png":
        _stored_pngs(jobs, ctx)
    env = ctx.env("export", ExportParams(out=str(folder), images=images, link=link),
                  manifest.roots)
    results = ctx.map(export_sample, jobs, env, "export mvtec")
    _raise_failures(results)
    report = _report(manifest, jobs, results, skipped, images)
    _check_tree(folder, report)
    try:
        atomic_write_text(folder / MARKER, json.dumps(report, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise CurateError(write_failure(exc, folder / MARKER)) from None
    return report


def _stored_pngs(jobs: list[dict[str, Any]], ctx: Context) -> None:
    """Each job's image as a PNG in the store (``job["png"]``) where a look of the build made
    one from its decode. Only read: an export writes nothing into the workspace (it takes no
    lock), so an image without one is encoded by :func:`export_sample`."""
    stored = ctx.workspace.facts.read(StoredPng())
    found = [job for job in jobs if job["sha256"] in stored]
    for job, key in zip(found, stored.column([j["sha256"] for j in found], "png"), strict=True):
        job["png"] = key


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
                  f"{FOREGROUND}/{category}/{split}/{label}/{stem}.png"}
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


def _report(manifest: Manifest, jobs: list[dict], results: list[dict],
            skipped: list[dict[str, Any]], images: str) -> dict[str, Any]:
    files = []
    counts: Counter[tuple[str, str, str]] = Counter()
    for job, res in zip(jobs, results, strict=True):
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
