"""The HSS-IAD stages on their own: label filter, foreground, casting reclassification, split."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
from helpers import by_path, ingest, labels

from curate.core.errors import CurateError
from curate.core.manifest import Manifest, new_row
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.stages.foreground.stage import Foreground, ForegroundParams, otsu_foreground
from curate.stages.label_filter import LabelFilter, LabelFilterParams
from curate.stages.reclassify import Reclassify, ReclassifyParams
from curate.stages.split import Split, SplitParams, assign
from curate.testing import fixtures


# ------------------------------------------------------------------------- label filter
@pytest.mark.slow
def test_label_filter_on_the_real_mtd(tmp_path, mtd_root):
    with Context(Workspace.open(tmp_path / "ws"), jobs=2, progress=False) as ctx:
        labelled = labels(ctx, ingest(ctx, "mtd", mtd_root))
        result = run_stage(LabelFilter(), [labelled], LabelFilterParams(), ctx)
    rows = by_path(result.manifest)
    without = sorted(p.split("/")[-1] for p, r in rows.items()
                     if any(n["code"] == "defect_without_mask" for n in r["reasons"]))
    assert without == ["exp3_num_45042.jpg", "exp4_num_124690.jpg", "exp4_num_352527.jpg",
                       "exp4_num_45057.jpg"]
    assert all(rows[p]["path"].startswith("MT_Uneven/") for p in rows
               if any(n["code"] == "defect_without_mask" for n in rows[p]["reasons"]))
    vanished = [p for p, r in rows.items()
                if any(n["code"] == "mask_vanishes" for n in r["reasons"])]
    assert vanished == ["MT_Uneven/Imgs/exp3_num_24829.jpg"]
    oversize = {p: r for p, r in rows.items() if any(f["code"] == "mask_oversize"
                                                     for f in r["flags"])}
    assert all(r["status"] == "kept" for r in oversize.values())  # flagged, for review
    assert max(r["measures"]["labels.mask_fraction"] for r in oversize.values()) > 0.48
    assert result.dropped == {"defect_without_mask": 4, "mask_too_small": 2, "mask_vanishes": 1}


def rows_with_masks(workspace, specs):
    """Rows with stored masks: (label, mask or None, category) each."""
    rows = []
    for k, (label, mask, category) in enumerate(specs):
        row = new_row(source="s", path=f"img{k:03d}.png", category=category, label=label,
                      width=40, height=30, measures={"labels.mask_fraction": 0.0})
        if mask is not None:
            row["artifacts"] = {"mask": workspace.store.put_mask(mask)}
        rows.append(row)
    return Manifest.build(rows, stage="labels", stage_version="1", roots={"s": "/nowhere"})


def box(y0, y1, x0, x1, shape=(30, 40)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_label_filter_rules_and_actions(ctx, workspace):
    specs = [("scratch", box(5, 10, 5, 10), "A"), ("scratch", np.zeros((30, 40), bool), "A"),
             ("scratch", None, "A"), ("good", box(0, 2, 0, 2), "A"),
             ("scratch", box(0, 30, 0, 40), "A"), ("scratch", box(3, 4, 3, 5), "A"),
             ("scratch", box(0, 5, 0, 5, shape=(20, 40)), "A"), ("good", None, "A")]
    m = rows_with_masks(workspace, specs)
    out = by_path(run_stage(LabelFilter(), [m], LabelFilterParams(train_size=16), ctx).manifest)
    codes = {p: ([n["code"] for n in r["reasons"]], [f["code"] for f in r["flags"]])
             for p, r in out.items()}
    assert codes == {
        "img000.png": ([], []),
        "img001.png": (["defect_without_mask"], []),
        "img002.png": (["defect_without_mask"], []),
        "img003.png": (["good_with_mask"], []),
        "img004.png": ([], ["mask_oversize"]),
        "img005.png": (["mask_vanishes", "mask_too_small"], []),
        "img006.png": (["mask_size_mismatch"], []),
        "img007.png": ([], []),
    }
    assert out["img000.png"]["measures"]["label_filter.train_pixels"] > 0
    flagged_only = LabelFilterParams(train_size=16, actions={"defect_without_mask": "flag"})
    out = by_path(run_stage(LabelFilter(), [m], flagged_only, ctx).manifest)
    assert out["img001.png"]["status"] == "kept"
    assert out["img001.png"]["flags"][0]["code"] == "defect_without_mask"
    with pytest.raises(ValueError, match="unknown rules"):
        LabelFilterParams(actions={"too_pretty": "drop"})


def test_label_filter_per_category_limit_and_robust_outlier(ctx, workspace):
    rng = np.random.default_rng(0)
    specs = []
    for _ in range(40):  # small defects around 1% of the image
        side = int(rng.integers(3, 5))
        specs.append(("dent", box(2, 2 + side, 2, 2 + side), "B"))
    specs.append(("dent", box(0, 18, 0, 20), "B"))  # 30%: under 40%, but a robust outlier
    specs.append(("dent", box(0, 10, 0, 20), "C"))  # 17%: over C's own limit of 10%
    m = rows_with_masks(workspace, specs)
    params = LabelFilterParams(train_size=40, max_fraction_by_category={"C": 0.10})
    out = by_path(run_stage(LabelFilter(), [m], params, ctx).manifest)
    outlier = out["img040.png"]["flags"][0]
    assert outlier["code"] == "mask_oversize" and "robust deviations" in outlier["detail"]
    assert "limit 10% for C" in out["img041.png"]["flags"][0]["detail"]
    assert sum(bool(r["flags"]) for r in out.values()) == 2


# ------------------------------------------------------------------------- foreground
def test_otsu_finds_an_object_and_says_how_sure_it_is():
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(60, 8, (120, 160)), 0, 255).astype(np.uint8)
    truth = np.zeros((120, 160), np.uint8)
    cv2.ellipse(truth, (80, 60), (50, 35), 20, 0, 360, 1, -1)
    image[truth > 0] = np.clip(rng.normal(190, 10, int(truth.sum())), 0, 255).astype(np.uint8)
    image[55:65, 75:85] = 60  # a dark hole in the object: filled in the mask
    mask, confidence = otsu_foreground(image)
    iou = (mask & (truth > 0)).sum() / (mask | (truth > 0)).sum()
    assert iou > 0.95 and confidence > 0.8
    blank, confidence = otsu_foreground(np.full((50, 50), 128, np.uint8))
    assert confidence == 0.0


def test_foreground_stage_by_category_policy(ctx, tmp_path):
    sources = fixtures.write_all(tmp_path / "sources", seed=2)
    m = ingest(ctx, "casting", sources["casting"])
    m = run_stage(Foreground(), [m], ForegroundParams(), ctx).manifest
    for row in m.rows():
        fg = ctx.workspace.store.read_mask(row["artifacts"]["foreground"])
        assert fg.shape == (row["height"], row["width"])
        assert 0 < row["measures"]["foreground.fraction"] < 1  # an object, not the frame
    texture = ForegroundParams(policy={"Casting": "texture"})
    m2 = run_stage(Foreground(), [ingest(ctx, "casting", sources["casting"])], texture,
                   ctx).manifest
    assert {r["measures"]["foreground.fraction"] for r in m2.rows()} == {1.0}


def test_foreground_flags_uncertain_masks(ctx, tmp_path):
    root = tmp_path / "mtd"
    img = root / "MT_Free" / "Imgs"
    img.mkdir(parents=True)
    for k in range(2):
        cv2.imwrite(str(img / f"flat_{k}.jpg"), np.full((80, 80), 120, np.uint8))
        cv2.imwrite(str(img / f"flat_{k}.png"), np.zeros((80, 80), np.uint8))
    m = ingest(ctx, "mtd", root)
    params = ForegroundParams(policy={"Magnetic-tile-defect": "object"})
    out = run_stage(Foreground(), [m], params, ctx)
    assert out.flagged == {"foreground_uncertain": 2}


def test_isnet_backend_needs_its_weights(ctx, tmp_path):
    with pytest.raises(ValueError, match="needs weights"):
        ForegroundParams(backend="isnet")
    m = Manifest.build([], stage="ingest", stage_version="1")
    with pytest.raises(CurateError, match="isnet-general-use.pth"):
        run_stage(Foreground(), [m], ForegroundParams(backend="isnet",
                                                       weights=str(tmp_path / "no.pth")), ctx)


def test_isnet_backend_runs_on_random_weights(ctx, tmp_path):
    torch = pytest.importorskip("torch", reason="the IS-Net backend needs torch")
    from curate.stages.foreground.isnet import ISNetDIS

    torch.manual_seed(0)
    weights = tmp_path / "isnet-random.pth"
    torch.save(ISNetDIS().state_dict(), weights)
    sources = fixtures.write_all(tmp_path / "sources", seed=3)
    m = ingest(ctx, "kolektorsdd2", sources["kolektorsdd2"])
    params = ForegroundParams(backend="isnet", weights=str(weights), size=64)
    out = run_stage(Foreground(), [m], params, ctx).manifest
    assert out.header["stage"]["params"]["weights"].startswith("sha256:")
    for row in out.rows():
        assert row["artifacts"]["foreground"].endswith(".png")
        assert 0 <= row["measures"]["foreground.confidence"] <= 1


# ------------------------------------------------------------------------- reclassify
def test_casting_scenes_are_sorted_into_their_classes(ctx, tmp_path):
    fixture = fixtures.write_casting(tmp_path / "casting", seed=4)
    m = run_stage(Reclassify(), [ingest(ctx, "casting", fixture.root)], ReclassifyParams(),
                  ctx).manifest
    rows = by_path(m)
    for path, drawn in fixture.samples.items():
        assert rows[path]["category"] == f"Casting_{drawn.casting_class}", path
        measures = rows[path]["measures"]
        assert {"reclassify.holes", "reclassify.machined", "reclassify.clutter"} <= set(measures)
        assert measures["reclassify.rule"] == "features"
    assert all(rows[p]["measures"]["reclassify.holes"] >= 2 for p, d in fixture.samples.items()
               if d.casting_class == "C2")


def test_override_file_always_wins(ctx, tmp_path):
    fixture = fixtures.write_casting(tmp_path / "casting", seed=4)
    m = ingest(ctx, "casting", fixture.root)
    c1 = next(r for r in m.rows() if fixture.samples[r["path"]].casting_class == "C1")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(f"{c1['sample_id']}: {{class: C3, note: oil film hides the face}}\n")
    out = by_path(run_stage(Reclassify(), [m], ReclassifyParams(overrides=str(overrides)),
                            ctx).manifest)
    row = out[c1["path"]]
    assert row["category"] == "Casting_C3"
    assert row["measures"]["reclassify.rule"] == "override"
    assert row["measures"]["reclassify.note"] == "oil film hides the face"
    overrides.write_text("0123456789abcdef: {class: C1}\n")
    with pytest.raises(CurateError, match="no Casting sample with id 0123456789abcdef"):
        run_stage(Reclassify(), [m], ReclassifyParams(overrides=str(overrides)), ctx)
    overrides.write_text(f"{c1['sample_id']}: {{class: C9}}\n")
    with pytest.raises(CurateError, match="C9"):
        run_stage(Reclassify(), [m], ReclassifyParams(overrides=str(overrides)), ctx)


def test_other_categories_are_untouched(ctx, tmp_path):
    sources = fixtures.write_all(tmp_path / "sources", seed=5)
    m = ingest(ctx, "kolektorsdd", sources["kolektorsdd"])
    out = run_stage(Reclassify(), [m], ReclassifyParams(), ctx).manifest
    assert [r["category"] for r in out.rows()] == [r["category"] for r in m.rows()]
    assert all(not r["measures"] for r in out.rows())


# ------------------------------------------------------------------------- split
def split_rows(n_good=60, n_bad=10, groups=None, flags=None):
    rows = []
    for k in range(n_good + n_bad):
        label = "good" if k < n_good else "dent"
        row = new_row(source="s", path=f"x{k:03d}.png", category="A" if k % 2 else "B",
                      label=label, source_split="train" if k % 3 == 0 else None)
        row["group"] = (groups or {}).get(k)
        row["flags"] = [{"stage": "ssfilter", "code": c, "detail": ""}
                        for c in (flags or {}).get(k, [])]
        rows.append(row)
    return rows


def test_split_puts_only_normals_in_train_and_keeps_groups_together():
    groups = {k: f"g{k // 4}" for k in range(40)}  # groups of four normal images
    groups |= {61: "g0", 62: "g1"}  # two defects share groups with normal images
    rows = split_rows(groups=groups, flags={50: ["hard_normal"]})
    out = assign(rows, 0.25, seed=7)
    assert all(out[k][0] == "test" for k in range(60, 70))  # every anomaly in test
    assert out[50][0] == "test"  # hard normal
    by_group: dict[str, set[str]] = {}
    for k, (split, _) in out.items():
        by_group.setdefault(rows[k]["group"] or rows[k]["sample_id"], set()).add(split)
    assert all(len(sides) == 1 for sides in by_group.values())
    assert {out[k][0] for k in range(0, 8)} == {"test"}  # g0, g1 follow their defects
    misfiled = [k for k, (_, flags) in out.items() if flags]
    assert misfiled == [k for k in range(60, 70) if k % 3 == 0]
    for category in ("A", "B"):
        normals = [k for k in range(60) if rows[k]["category"] == category and k != 50]
        in_test = sum(out[k][0] == "test" for k in normals)
        assert 0.15 * len(normals) <= in_test <= 0.45 * len(normals)


def test_split_is_deterministic_and_order_free():
    rows = split_rows()
    a = assign(rows, 0.2, seed=1)
    shuffled = list(reversed(rows))
    b = assign(shuffled, 0.2, seed=1)
    assert {rows[k]["path"]: s for k, (s, _) in a.items()} == \
        {shuffled[k]["path"]: s for k, (s, _) in b.items()}
    c = assign(rows, 0.2, seed=2)
    assert a != c
    counts = Counter(s for s, _ in a.values())
    assert counts["test"] == 10 + round(0.2 * 30) * 2


def test_split_stage_sets_every_kept_sample(ctx):
    rows = split_rows()
    rows[0]["status"] = "dropped"
    rows[0]["reasons"] = [{"stage": "quality", "code": "blurry", "detail": "x"}]
    m = Manifest.build(rows, stage="labels", stage_version="1", roots={"s": "/x"})
    out = run_stage(Split(), [m], SplitParams(test_fraction=0.3), ctx).manifest
    assert [r["split"] is None for r in out.rows()].count(True) == 1
    assert out.header["seed"] == 0
    with pytest.raises(ValueError):
        SplitParams(test_fraction=1.5)
