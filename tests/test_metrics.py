"""detectors.metrics against slow, obviously correct references and scikit-learn.

The references loop over every distinct threshold and count directly; they share no code with
the module (its connected components included: only the 3x3 all-ones structure is the same,
and the 8-connectivity itself is checked against a hand-computed value).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from detectors import metrics as M

TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# slow references


def ref_f1max(scores, labels) -> float:
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        if tp:
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def ref_aupro(maps, masks, fpr_limit=0.3) -> float:
    """MVTec AD's AUPRO by its definition: one curve point per distinct score, PRO as the mean
    per-component overlap, FPR over all normal pixels, trapezoids up to the interpolated limit."""
    maps = [np.asarray(m, np.float64) for m in maps]
    masks = [np.asarray(g) > 0 for g in masks]
    regions = []  # the scores of each 8-connected ground-truth component
    for m, g in zip(maps, masks, strict=True):
        lab, n = ndimage.label(g, structure=np.ones((3, 3), int))
        regions += [m[lab == c] for c in range(1, n + 1)]
    normal = np.concatenate([m[~g] for m, g in zip(maps, masks, strict=True)])
    if not regions or normal.size == 0:
        return math.nan
    xs, ys = [0.0], [0.0]
    for t in sorted(set(np.concatenate([m.ravel() for m in maps]).tolist()), reverse=True):
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y) / 2
            break
    return area / fpr_limit


def random_case(rng, n=4, h=12, w=10, decimals=None, p_anomalous=0.5):
    """Smooth-ish maps with blob masks in some images; scores correlated with the masks."""
    maps = ndimage.uniform_filter(rng.random((n, h, w)), size=(1, 3, 3))
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        if rng.random() < p_anomalous:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                y0, x0 = max(0, y - rng.integers(0, 3)), max(0, x - rng.integers(0, 3))
                masks[i, y0:y + 1, x0:x + 1] = True
    maps = maps + 0.3 * masks + 0.1 * rng.standard_normal(maps.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks


def check_pixel(maps, masks, fpr_limit=0.3):
    got = M.pixel_metrics(maps, masks, fpr_limit)
    y = np.concatenate([np.asarray(g).ravel() for g in masks]) > 0
    s = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    if y.any() and not y.all():
        assert got["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
        assert got["p_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
        assert got["p_f1max"] == pytest.approx(ref_f1max(s, y), abs=TOL)
    want = ref_aupro(maps, masks, fpr_limit)
    if math.isnan(want):
        assert math.isnan(got["aupro"])
    else:
        assert got["aupro"] == pytest.approx(want, abs=TOL)
    return got


# ---------------------------------------------------------------------------------------------
# image level


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_image_metrics_match_sklearn(decimals, dtype):
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.4
    scores = rng.random(300) + 0.4 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties (decimals=0: three values)
    scores = scores.astype(dtype)
    got = M.image_metrics(scores, labels)
    assert got["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["i_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["i_f1max"] == pytest.approx(ref_f1max(scores, labels), abs=1e-12)


def test_image_metrics_integer_and_01_labels():
    scores = np.array([3, 1, 2, 2, 5, 0])
    labels = np.array([1, 0, 1, 0, 1, 0])
    got = M.image_metrics(scores, labels)
    assert got["i_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["i_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert M.image_metrics(scores, labels * 255) == got


def test_image_metrics_without_anomalous_image_is_nan():
    got = M.image_metrics([0.1, 0.5, 0.3], [0, 0, 0])
    assert all(math.isnan(v) for v in got.values())


def test_image_metrics_without_normal_image():
    got = M.image_metrics([0.1, 0.5, 0.3], [1, 1, 1])
    assert math.isnan(got["i_auroc"])
    assert got["i_ap"] == 1.0 and got["i_f1max"] == 1.0


def test_image_metrics_bad_input():
    with pytest.raises(ValueError, match=r"scores \(3,\).*labels \(2,\)"):
        M.image_metrics([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        M.image_metrics([0.1, np.nan, 0.3], [0, 1, 1])


def test_signed_zero_and_infinities():
    # -0.0 == 0.0: one tie group (an order between them would move the AUROC by 2 pairs)
    scores = np.array([-0.0, 0.0, -0.0, 0.0, np.inf, -np.inf, 1.0, -1.0])
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 1])
    finite = np.nan_to_num(scores, posinf=1e300, neginf=-1e300)
    for dtype in (np.float32, np.float64):
        got = M.image_metrics(scores.astype(dtype), labels)
        assert got["i_auroc"] == pytest.approx(roc_auc_score(labels, finite))
        assert got["i_ap"] == pytest.approx(average_precision_score(labels, finite))


def test_float64_keeps_distinctions_float32_would_lose():
    scores = 1.0 + np.arange(6) * 1e-12  # all equal in float32
    labels = np.array([0, 1, 0, 1, 1, 1])
    want = roc_auc_score(labels, scores)
    assert M.image_metrics(scores, labels)["i_auroc"] == pytest.approx(want)
    assert M.image_metrics(scores.astype(np.float32), labels)["i_auroc"] == 0.5


# ---------------------------------------------------------------------------------------------
# pixel level and AUPRO against the references


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_pixel_metrics_match_references(seed, decimals):
    maps, masks = random_case(np.random.default_rng(seed), decimals=decimals)
    for limit in (0.3, 0.05, 1.0):
        check_pixel(maps, masks, limit)
    check_pixel(maps.astype(np.float32), masks)


def test_pixel_metrics_larger_case_with_ties():
    maps, masks = random_case(np.random.default_rng(7), n=12, h=48, w=40, decimals=2)
    got = check_pixel(maps.astype(np.float32), (masks * 255).astype(np.uint8))
    assert 0.5 < got["aupro"] < 1.0


def test_aupro_hand_computed():
    # one row: two single-pixel components (scores 5 and 3), normals 4, 2, 1.
    # curve (0,0) (0,.5) (1/3,.5) (1/3,1) (2/3,1) (1,1)
    maps = np.array([[[5.0, 4.0, 3.0, 2.0, 1.0]]])
    masks = np.array([[[1, 0, 1, 0, 0]]])
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert M.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(5 / 6, abs=1e-12)


def test_aupro_uses_8_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[[0, 1, 2], [0, 1, 2]] = True  # a diagonal line: one region with 8-connectivity
    mask[4, 3:5] = True  # a second region
    scores = np.arange(25, dtype=np.float64).reshape(5, 5) + 1.0
    scores[mask] = -1.0
    scores[0, 0] = 100.0  # only one pixel of the diagonal region is ever found early
    # 8-connected: PRO = (1/3) / 2 up to FPR 1; with 4-connectivity it would be 1/4
    assert M.aupro(scores[None], mask[None]) == pytest.approx(1 / 6, abs=1e-12)
    assert ref_aupro(scores[None], mask[None]) == pytest.approx(1 / 6, abs=1e-12)


def test_perfect_and_inverted_maps():
    maps, masks = random_case(np.random.default_rng(3))
    perfect = masks.astype(np.float32) + 0.01 * np.random.default_rng(0).random(masks.shape)
    got = M.pixel_metrics(perfect, masks)
    assert got == pytest.approx({"p_auroc": 1.0, "p_ap": 1.0, "p_f1max": 1.0, "aupro": 1.0})
    got = M.pixel_metrics(-perfect, masks)
    assert got["p_auroc"] == 0.0 and got["aupro"] == 0.0


def test_constant_maps():
    _, masks = random_case(np.random.default_rng(5))
    p, n = masks.sum(), (~masks).sum()
    for value in (0.0, 0.7, -3.0):
        got = check_pixel(np.full(masks.shape, value, np.float32), masks)
        assert got["p_auroc"] == 0.5
        assert got["p_ap"] == pytest.approx(p / (p + n))
        assert got["p_f1max"] == pytest.approx(2 * p / (2 * p + n))
        assert got["aupro"] == pytest.approx(0.15)  # the diagonal: 0.3^2 / 2 / 0.3


def test_category_without_anomalies():
    maps, _ = random_case(np.random.default_rng(2))
    masks = np.zeros(maps.shape, bool)
    got = M.pixel_metrics(maps, masks)
    assert all(math.isnan(v) for v in got.values())
    result = M.evaluate(maps.max(axis=(1, 2)), np.zeros(len(maps)), maps, masks)
    assert list(result) == list(M.METRIC_KEYS)
    assert all(math.isnan(v) for v in result.values())


def test_no_normal_pixels():
    maps = np.random.default_rng(0).random((2, 5, 5))
    got = M.pixel_metrics(maps, np.ones(maps.shape, bool))
    assert math.isnan(got["p_auroc"]) and math.isnan(got["aupro"])
    assert got["p_ap"] == 1.0 and got["p_f1max"] == 1.0


def test_single_huge_component():
    rng = np.random.default_rng(4)
    maps = ndimage.uniform_filter(rng.random((3, 30, 30)), 5).round(3)
    masks = np.zeros(maps.shape, bool)
    masks[1, 1:-1, 1:-1] = True  # one component of 784 pixels; normals elsewhere
    maps[1, 1:-1, 1:-1] += 0.05
    check_pixel(maps, masks)


def test_single_pixel_component():
    rng = np.random.default_rng(6)
    maps = rng.random((3, 9, 9)).round(2)
    masks = np.zeros(maps.shape, bool)
    masks[2, 4, 4] = True
    check_pixel(maps, masks)
    maps[2, 4, 4] = 2.0  # the highest score: found before any false positive
    assert M.aupro(maps, masks) == 1.0
    maps[2, 4, 4] = -1.0  # the lowest: not found before FPR 1
    assert M.aupro(maps, masks) == 0.0
    masks[0, 0, 0] = True  # plus a second single-pixel component, found at the top
    maps[0, 0, 0] = 3.0
    assert M.aupro(maps, masks) == pytest.approx(0.5)


def test_lists_of_maps_of_different_sizes():
    rng = np.random.default_rng(8)
    maps = [rng.random((6, 9)).round(1), rng.random((4, 4)).round(1), rng.random((10, 3)).round(1)]
    masks = [m > 0.7 for m in maps]
    got = check_pixel(maps, masks)
    assert M.pixel_metrics(maps[::-1], masks[::-1]) == pytest.approx(got, abs=1e-12)


def test_shape_mismatch_is_a_clear_error():
    maps = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"maps \(3, 8, 8\), masks \(3, 16, 16\)"):
        M.pixel_metrics(maps, np.zeros((3, 16, 16), bool))
    with pytest.raises(ValueError, match=r"image 1: map shape \(8, 8\) differs from mask shape "
                                         r"\(8, 9\)"):
        M.pixel_metrics(list(maps), [np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8))])
    with pytest.raises(ValueError, match="3 maps but 2 masks"):
        M.pixel_metrics(list(maps), [np.zeros((8, 8))] * 2)
    with pytest.raises(ValueError, match="squeeze"):
        M.pixel_metrics(maps[:, None], np.zeros((3, 1, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_metrics(np.full((1, 2, 2), np.nan), np.eye(2)[None])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(maps, maps > 0, fpr_limit=0.0)


def test_evaluate_keys_and_names():
    assert M.METRIC_NAMES == ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
    maps, masks = random_case(np.random.default_rng(9), n=6)
    labels = masks.any(axis=(1, 2))
    result = M.evaluate(maps.max(axis=(1, 2)), labels, maps, masks)
    assert tuple(result) == M.METRIC_KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    assert result["aupro"] == pytest.approx(ref_aupro(maps, masks), abs=TOL)


def test_mean_over_categories_skips_nan_and_says_so():
    a = dict.fromkeys(M.METRIC_KEYS, 0.5)
    b = dict.fromkeys(M.METRIC_KEYS, 1.0)
    c = dict.fromkeys(M.METRIC_KEYS, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.mean_over_categories({"a": a, "b": b}) == dict.fromkeys(M.METRIC_KEYS, 0.75)
    with pytest.warns(RuntimeWarning, match="c:i_auroc"):
        mean = M.mean_over_categories({"a": a, "b": b, "c": c})
    assert mean == dict.fromkeys(M.METRIC_KEYS, 0.75)
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(v) for v in M.mean_over_categories({"c": c}).values())


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    levels = draw(st.sampled_from([3, 10, 1000]))  # few levels: ties everywhere
    maps = draw(hnp.arrays(np.int16, (n, h, w), elements=st.integers(0, levels - 1)))
    masks = draw(hnp.arrays(np.bool_, (n, h, w)))
    return maps.astype(np.float64) / levels, masks


@given(cases(), st.sampled_from([0.3, 0.1, 1.0]))
def test_property_matches_references(case, fpr_limit):
    maps, masks = case
    got = check_pixel(maps, masks, fpr_limit)
    if masks.any() and not masks.all():
        assert 0.0 <= got["aupro"] <= 1.0
    # the image order does not matter
    again = M.pixel_metrics(maps[::-1], masks[::-1], fpr_limit)
    assert again == pytest.approx(got, abs=1e-12, nan_ok=True)
