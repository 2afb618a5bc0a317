"""split: train / test per category, the way unsupervised anomaly detection needs it.

- Train holds normal (``good``) images only; test holds normal and anomalous images.
- Every anomalous image goes to test — including those a source filed under its own training
  split (KolektorSDD2's train folder has defective images): they are flagged
  ``misfiled_anomaly`` (the paper's "misfiled samples") so the move is visible.
- Groups never straddle the split: all samples of one ``group`` (set by dedup: near duplicates,
  the same object under another exposure) go to the same side. A group with an anomalous
  member goes to test whole.
- Of the normal images, ``test_fraction`` go to test, chosen per category by whole groups in an
  order fixed by the seed (a hash of seed, category and group id, so neither the input order
  nor ``--jobs`` matters): groups are taken in that order until the category's normal test
  images reach the target count (rounded to the nearest image; a group is taken only if that
  brings the count closer to the target). Normal images already bound for test (their group
  holds an anomaly) count towards it. A group spanning categories goes where the first of its
  categories, in name order, sends it.
- Samples flagged ``hard_normal`` (normal images that look anomalous, HSS-IAD III-A) go to test.

Every kept sample gets ``split``; dropped samples keep none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from curate.core.manifest import GOOD, KEPT, Manifest
from curate.engine.runner import Context, Stage

HARD_NORMAL = "hard_normal"


@dataclass(frozen=True)
class SplitParams:
    test_fraction: float = 0.2

    def __post_init__(self):
        if not 0 <= self.test_fraction <= 1:
            raise ValueError(f"test_fraction must be in [0, 1], got {self.test_fraction}")


def _order(seed: int, category: str, group: str) -> str:
    return hashlib.sha256(f"{seed}\x00{category}\x00{group}".encode()).hexdigest()


def assign(rows: list[dict[str, Any]], test_fraction: float, seed: int
           ) -> dict[int, tuple[str, list[tuple[str, str]]]]:
    """Row index -> (split, flags) for the kept rows of ``rows``."""
    out: dict[int, tuple[str, list[tuple[str, str]]]] = {}
    members: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row["status"] == KEPT:
            members.setdefault(row["group"] or row["sample_id"], []).append(i)
    # A group goes to one side whole, even when it spans categories (the same picture filed
    # twice): anything anomalous in it sends all of it to test; otherwise the first category
    # (in name order) to reach it decides, and the others follow and count it in their quota.
    side: dict[str, str] = {}
    for group, idx in members.items():
        if any(rows[i]["label"] != GOOD or any(f["code"] == HARD_NORMAL for f in rows[i]["flags"])
               for i in idx):
            side[group] = "test"
    by_category: dict[str, dict[str, list[int]]] = {}
    for group, idx in members.items():
        for i in idx:
            by_category.setdefault(rows[i]["category"], {}).setdefault(group, []).append(i)
    for category, groups in sorted(by_category.items()):
        # The category's normal images, and those of them already bound for test (their group
        # holds an anomaly or a hard normal, or another category sent it there).
        good = {g: sum(rows[i]["label"] == GOOD for i in idx) for g, idx in groups.items()}
        target = round(test_fraction * sum(good.values()))
        taken = sum(n for g, n in good.items() if side.get(g) == "test")
        for group in sorted(groups, key=lambda g: _order(seed, category, g)):
            if group in side:
                continue
            size = good[group]
            to_test = taken < target and abs(taken + size - target) <= abs(taken - target)
            taken += size if to_test else 0
            side[group] = "test" if to_test else "train"
    for group, idx in members.items():
        for i in idx:
            out[i] = (side[group], _misfiled(rows[i]) if side[group] == "test" else [])
    return out


def _misfiled(row: dict[str, Any]) -> list[tuple[str, str]]:
    if row["label"] != GOOD and row["source_split"] == "train":
        return [("misfiled_anomaly", f"{row['path']}: labelled {row['label']!r} in the "
                                     "source's training split; moved to test")]
    return []


class Split(Stage[SplitParams]):
    name = "split"
    version = "1"
    Params = SplitParams
    uses_seed = True

    def run(self, inputs: list[Manifest], params: SplitParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        changes = []
        for i, (split, flags) in assign(manifest.row_list(), params.test_fraction,
                                        ctx.seed).items():
            update: dict[str, Any] = {"split": split}
            if flags:
                update["flags"] = flags
            changes.append((i, update))
        return self.output_updates(manifest, changes, params, ctx)
