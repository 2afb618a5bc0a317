"""Banks of SDAS synthetic anomalies, written where RealNet reads them.

    <out>/<Category>/000000.png     every image of the category's bank, flat, by index
    <out>/<Category>/000001.png
    <out>/curate-sdas.json          which banks, and each file's sample id, seed and strength

RealNet's config names the bank of a class ``sdas_dir: data/<dataset>/sdas/{}`` (``{}``: the
class name, as in ``meta_file: .../train_{}.json``), so ``<out>`` is what goes in place of
``data/<dataset>/sdas``. What RealNet does with it (github.com/cnulab/RealNet,
``datasets/realnet_dataset.py``): ``RealNetDataset`` lists ``glob(os.path.join(sdas_dir, '*'))``
-- every entry of the class folder whatever its name, not recursive, dot-files left out -- and
``_sdas_source`` reads a random one with ``cv2.imread`` (colour, BGR turned to RGB) and resizes
it to ``input_size``. Anything else in the class folder would be read as an image (and crash
``cvtColor`` on ``None``), so the class folders hold images only and the index sits beside them.

RealNet's own sampler (``sample.py``) writes ``rank<r>_<i>.jpg`` JPEGs; the glob accepts any
name and ``cv2.imread`` reads PNG, so the files here are the bank's images exactly as sampled
(PNG, lossless: each file's sha256 is its row's), named by their index in the bank. The class
folder is the bank's category cleaned as the MVTec export cleans category folders, so ``{}`` is
the same name in ``sdas_dir`` and in the sample lists of an export of the dataset.

All or nothing (:mod:`curate.export.staging`): every image is checked against the sha256 its
row recorded, the tree is written beside ``out``, checked to hold exactly the indexed files,
and only then moved into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from curate import __version__
from curate.core.errors import CurateError, UsageError
from curate.core.files import atomic_write_bytes, atomic_write_text, sha256_bytes, walk_files
from curate.core.manifest import KEPT, Manifest
from curate.core.measures import (
    SDAS_CHECKPOINT,
    SDAS_INDEX,
    SDAS_SAMPLER,
    SDAS_SEED,
    SDAS_STEPS,
    SDAS_STRENGTH,
)
from curate.engine.workspace import BANK_KIND, Workspace
from curate.export.mvtec import clean_folder_name
from curate.export.staging import staged

MARKER = "curate-sdas.json"
FORMAT = "realnet-sdas"


def bank_category(bank: Manifest) -> str:
    """The category of a bank manifest; a manifest that is not a bank is bad usage."""
    sources = bank.header["sources"]
    if bank.stage != "sdas_sample" or [s.get("kind") for s in sources.values()] != [BANK_KIND]:
        raise UsageError(f"manifest {bank.id} is not a bank of synthetic anomalies (stage "
                         f"{bank.stage}): give the id `curate sdas sample` printed")
    (spec,) = sources.values()
    return str(spec["options"]["category"])


def _plan(banks: list[Manifest]) -> list[dict[str, Any]]:
    """One entry per image to write: the bank, the row and its place in the export."""
    folders: dict[str, Manifest] = {}
    plan = []
    for bank in banks:
        category = bank_category(bank)
        folder = clean_folder_name(category)
        other = folders.setdefault(folder.casefold(), bank)
        if other is not bank:
            raise UsageError(f"banks {other.id[:12]} and {bank.id[:12]} would both be exported "
                             f"to the folder {folder!r}: RealNet reads one bank per class, "
                             "export one bank per category")
        rows = [r for r in bank.rows() if r["status"] == KEPT and "image" in r["artifacts"]]
        if not rows:
            raise CurateError(f"bank {bank.id} holds no synthetic images")
        for row in sorted(rows, key=lambda r: r["measures"][SDAS_INDEX]):
            index = row["measures"][SDAS_INDEX]
            plan.append({"bank": bank, "row": row, "category": category,
                         "file": f"{folder}/{index:06d}.png"})
    return plan


def export_banks(workspace: Workspace, banks: list[Manifest], out: str | os.PathLike, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write ``banks`` (one per category) to ``out`` in RealNet's SDAS layout; returns the
    index written as ``curate-sdas.json``. On any failure ``out`` is left as it was."""
    if not banks:
        raise UsageError("give at least one bank: --bank <id of a `curate sdas sample` manifest>")
    plan = _plan(banks)
    with staged(out, marker=MARKER, overwrite=overwrite) as tmp:
        for entry in plan:
            _write_image(workspace, entry, tmp)
        index = _index(plan)
        _check_tree(tmp, index)
        atomic_write_text(tmp / MARKER, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def _write_image(workspace: Workspace, entry: dict[str, Any], folder: Path) -> None:
    """Copy one bank image from the store, refusing one that is not what sampling stored."""
    row, key = entry["row"], entry["row"]["artifacts"]["image"]
    data = workspace.store.read_bytes(key)
    digest = sha256_bytes(data)
    if digest != row["sha256"]:
        raise CurateError(f"{workspace.store.path(key)} changed since bank {entry['bank'].id} "
                          f"was sampled (sha256 {digest}, expected {row['sha256']}): sample "
                          "the bank again; nothing was exported")
    target = folder / entry["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)


def _index(plan: list[dict[str, Any]]) -> dict[str, Any]:
    banks: dict[str, dict[str, Any]] = {}
    files = []
    for entry in plan:
        bank, row = entry["bank"], entry["row"]
        measures = row["measures"]
        banks.setdefault(bank.id, {"manifest": bank.id, "category": entry["category"],
                                   "folder": entry["file"].split("/")[0],
                                   "checkpoint": measures[SDAS_CHECKPOINT],
                                   "sampler": measures[SDAS_SAMPLER],
                                   "steps": measures[SDAS_STEPS], "images": 0})
        banks[bank.id]["images"] += 1
        files.append({"file": entry["file"], "manifest": bank.id,
                      "sample_id": row["sample_id"], "index": measures[SDAS_INDEX],
                      "seed": measures[SDAS_SEED], "strength": measures[SDAS_STRENGTH],
                      "sha256": row["sha256"]})
    return {"format": FORMAT, "curate_version": __version__, "written": len(files),
            "banks": list(banks.values()), "files": files}


def _check_tree(folder: Path, index: dict[str, Any]) -> None:
    """The written tree must be exactly the indexed files: anything more in a class folder
    would be read by RealNet as a synthetic anomaly."""
    listed = {entry["file"] for entry in index["files"]}
    on_disk = set(walk_files(folder))
    for rel in sorted(listed - on_disk):
        raise CurateError(f"{folder / rel} is listed in {MARKER} but was not written")
    for rel in sorted(on_disk - listed):
        raise CurateError(f"{folder / rel} was written but is not listed in {MARKER}")
