"""Review sessions: a manifest in the FiftyOne App, people tag samples, curate pulls the tags
back as a new manifest version (stage ``review``, parent: the pushed manifest).

The reviewers' vocabulary (sample tags in the App):

===================  =========================================================================
``drop``             drop the sample (reason ``reviewer_drop``)
``keep``             keep it: on a dropped sample, undo the drop (its reasons become
                     ``overruled`` flags); on a kept one, nothing changes. A dropped
                     defective sample without a usable mask (none, or an empty one, as
                     ``defect_without_mask`` finds) can be kept only as ``good``, with
                     ``relabel:good``: an export would otherwise hold a test anomaly whose
                     mask marks nothing
``mask-bad``         drop it because its mask is wrong (reason ``mask_bad``)
``relabel:<label>``  set the label (``good`` or a defect name); flagged ``relabelled``
``move:train``       put it in the training split (normal images only); flagged ``moved``
``move:test``        put it in the test split; flagged ``moved``
``category:<name>``  move it to another category; flagged ``recategorised``
===================  =========================================================================

curate's own tags on pushed samples (``dropped``, ``reason:<code>``, ``flag:<code>``) are
ignored. Any other tag is an error listing it; so are contradictions on one sample (``drop``
with ``keep``, ``keep`` with ``mask-bad``, both moves, two labels, two categories) and an
anomalous image sent to train, each naming the samples; so is a ``keep`` that would bring back
a defective image without a usable mask. A dataset pushed from another
workspace is refused: its manifest and store are not here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from curate.core.errors import CurateError
from curate.core.manifest import DROPPED, GOOD, KEPT, Manifest, drop, note
from curate.core.optional import require
from curate.engine.runner import Context, Stage, StageResult, run_stage
from curate.engine.store import Store

STAGE = "review"
_VALUE_TAG = re.compile(r"^(relabel|move|category):(.+)$")
SIMPLE_TAGS = ("drop", "keep", "mask-bad")


#: The tags curate itself puts on a pushed sample (a reviewer's decisions are all others).
CURATE_TAGS = re.compile(r"^(dropped|reason:[a-z0-9_]+|flag:[a-z0-9_]+)$")


def fiftyone_module():
    """``import fiftyone``, with curate's defaults for its environment, or a clear error."""
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    return require("fiftyone", "curate review")


def reviewer_tags(tags: list[str] | None) -> list[str]:
    """The tags of one sample that belong to the reviewers' vocabulary (sorted). FiftyOne
    reads a sample whose tags were unset in the database back as None: no tags."""
    return sorted(t for t in tags or [] if not CURATE_TAGS.match(t))


def check_decisions(decisions: dict[str, list[str]], rows: dict[str, dict[str, Any]],
                    dataset: str) -> None:
    """Raise one CurateError for unknown tags, or one for contradictory tags, naming them."""
    unknown: Counter[str] = Counter()
    for tags in decisions.values():
        for tag in tags:
            m = _VALUE_TAG.match(tag)
            if tag not in SIMPLE_TAGS and not (m and (m.group(1) != "move"
                                                      or m.group(2) in ("train", "test"))):
                unknown[tag] += 1
    if unknown:
        listed = ", ".join(f"{t!r} ({n})" for t, n in sorted(unknown.items()))
        raise CurateError(f"FiftyOne dataset {dataset!r} has tags outside the review "
                          f"vocabulary: {listed}; use drop, keep, mask-bad, relabel:<label>, "
                          "move:train, move:test or category:<name>")
    clashes = []
    for sample_id, tags in sorted(decisions.items()):
        kinds = Counter(t.split(":")[0] for t in tags)
        row = rows[sample_id]
        label = next((t.split(":", 1)[1] for t in tags if t.startswith("relabel:")),
                     row["label"])
        problem = None
        if "drop" in tags and "keep" in tags:
            problem = "drop and keep"
        elif "keep" in tags and "mask-bad" in tags:
            problem = "keep and mask-bad"
        elif kinds["move"] > 1 or kinds["relabel"] > 1 or kinds["category"] > 1:
            problem = "two values of one kind: " + ", ".join(t for t in tags if ":" in t)
        elif label != GOOD and ("move:train" in tags or
                                ("move:test" not in tags and row["split"] == "train")):
            problem = (f"an image labelled {label!r} would be in train (train holds normal "
                       "images; add move:test)")
        if problem:
            clashes.append(f"{row['source']}:{row['path']} ({problem})")
    if clashes:
        raise CurateError(f"FiftyOne dataset {dataset!r} has contradictory tags on "
                          f"{len(clashes)} sample(s): {'; '.join(clashes[:10])}"
                          + (" …" if len(clashes) > 10 else ""))


def missing_mask(row: dict[str, Any], store: Store) -> str | None:
    """Why ``row`` has no usable defect mask ("no mask", "an empty mask"), or None."""
    key = row["artifacts"].get("mask")
    if key is None:
        return "no mask"
    return None if store.read_mask(key).any() else "an empty mask"


def check_keeps(decisions: dict[str, list[str]], rows: dict[str, dict[str, Any]],
                store: Store, dataset: str) -> None:
    """Raise one CurateError naming every ``keep`` that would bring a dropped defective image
    back without a usable mask (unless it is relabelled ``good`` with it)."""
    refused = []
    for sample_id, tags in sorted(decisions.items()):
        row = rows[sample_id]
        label = next((t.split(":", 1)[1] for t in tags if t.startswith("relabel:")),
                     row["label"])
        if "keep" not in tags or row["status"] != DROPPED or label == GOOD:
            continue
        why = missing_mask(row, store)
        if why:
            refused.append(f"{row['source']}:{row['path']} (labelled {label!r}, {why})")
    if refused:
        raise CurateError(f"FiftyOne dataset {dataset!r} keeps {len(refused)} defective "
                          f"sample(s) without a usable mask: {'; '.join(refused[:10])}"
                          + (" …" if len(refused) > 10 else "")
                          + "; an export would hold anomalies whose masks mark nothing: add "
                            "relabel:good to keep them as normal images, or take the keep off")


def apply_decisions(row: dict[str, Any], tags: list[str], dataset: str) -> dict[str, Any]:
    """The row after the reviewers' tags (see the module docstring)."""
    row = dict(row)
    where = f"by a reviewer in FiftyOne dataset {dataset!r}"

    def flag(code: str, detail: str) -> None:
        row["flags"] = [*row["flags"], note(STAGE, code, detail)]

    for tag in tags:
        kind, _, value = tag.partition(":")
        if tag == "keep" and row["status"] == DROPPED:
            for reason in row["reasons"]:
                flag("overruled", f"kept {where} despite {reason['stage']}:{reason['code']}: "
                                  f"{reason['detail']}")
            row["status"], row["reasons"] = KEPT, []
        elif kind == "relabel" and value != row["label"]:
            flag("relabelled", f"label {row['label']!r} -> {value!r} {where}")
            row["label"] = value
            row["defect_classes"] = [] if value == GOOD else [value]
        elif kind == "move" and value != row["split"]:
            flag("moved", f"split {row['split']!r} -> {value!r} {where}")
            row["split"] = value
        elif kind == "category" and value != row["category"]:
            flag("recategorised", f"category {row['category']!r} -> {value!r} {where}")
            row["category"] = value
    # Drops last, so that a relabelled and dropped sample keeps both facts.
    if row["status"] == KEPT:
        if "drop" in tags:
            drop(row, STAGE, "reviewer_drop", f"{row['path']}: dropped {where}")
        elif "mask-bad" in tags:
            drop(row, STAGE, "mask_bad", f"{row['path']}: mask marked wrong {where}")
    return row


@dataclass(frozen=True)
class ReviewParams:
    dataset: str
    #: sample id -> the reviewers' tags on it (only samples with any).
    decisions: dict[str, list[str]] = field(default_factory=dict)


class Review(Stage[ReviewParams]):
    """The reviewers' decisions as a stage: recorded in the header, cached like any other."""

    name = STAGE
    version = "1"
    Params = ReviewParams

    def run(self, inputs: list[Manifest], params: ReviewParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        rows = [apply_decisions(r, params.decisions[r["sample_id"]], params.dataset)
                if r["sample_id"] in params.decisions else r for r in manifest.rows()]
        return self.output(manifest, rows, params, ctx)


def pull(ctx: Context, name: str) -> StageResult:
    """Read the reviewers' tags of dataset ``name`` into a new manifest version."""
    fo = fiftyone_module()
    ws = ctx.workspace
    assert ws is not None, "pull loads the pushed manifest from the Context's workspace"
    if not fo.dataset_exists(name):
        raise CurateError(f"no FiftyOne dataset {name!r} (`curate review push` makes one; "
                          f"existing: {', '.join(fo.list_datasets()) or 'none'})")
    dataset = fo.load_dataset(name)
    info = dataset.info or {}
    if info.get("curate_workspace") != ws.id:
        raise CurateError(f"FiftyOne dataset {name!r} was pushed from another workspace "
                          f"({info.get('curate_workspace') or 'not by curate'}), not from "
                          f"{ws.root} ({ws.id}): pull it in the workspace that pushed it")
    manifest = ws.load(info["curate_manifest"])
    rows = {r["sample_id"]: r for r in manifest.rows()}
    decisions = {}
    for sample_id, tags in zip(dataset.values("sample_id"), dataset.values("tags"),
                               strict=True):
        if sample_id not in rows:
            raise CurateError(f"FiftyOne dataset {name!r} has a sample {sample_id} that "
                              f"manifest {manifest.id} does not")
        mine = reviewer_tags(tags)
        if mine:
            decisions[sample_id] = mine
    check_decisions(decisions, rows, name)
    check_keeps(decisions, rows, ws.store, name)
    return run_stage(Review(), [manifest], ReviewParams(dataset=name, decisions=decisions), ctx)

