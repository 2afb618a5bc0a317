"""The one metric suite for every detector: image-, pixel- and region-level, all exact.

Seven metrics, in this order (``METRIC_NAMES``; ``evaluate`` returns them under ``METRIC_KEYS``),
all as fractions in 0..1:

* **I-AUROC, I-AP, I-F1max** on one score per image against the image's binary label.
* **P-AUROC, P-AP, P-F1max** on every pixel of a category's test maps, pooled into one set.
* **AUPRO** (area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3), the MVTec AD definition (Bergmann et al., IJCV 2021):

  - the regions are the connected components of each ground-truth mask, found with
    ``scipy.ndimage.label`` and a 3x3 all-ones structure: **8-connectivity** (diagonal
    neighbours belong to the same region), as in MVTec AD's reference evaluation code;
    components never span two images;
  - for a threshold t, PRO(t) = the mean over all components of all images of the fraction of
    the component's pixels with score >= t, and FPR(t) = the fraction of normal pixels
    (mask == 0, pooled over all images) with score >= t;
  - the curve has one point per *distinct* score value (tied pixels enter together) and
    starts at (0, 0); PRO(FPR) is integrated from FPR 0 to ``fpr_limit`` with the trapezoid
    rule, the last segment interpolated linearly at exactly FPR = ``fpr_limit``, and the area
    is divided by ``fpr_limit``. A constant map therefore scores 0.15 (the diagonal), a
    perfect one 1.0.

Why exact. The public detector repositories report four different AUPROs, none of them this
one: one divides the area by the largest FPR it reached instead of by 0.3 (the value can
exceed 1), one dilates the prediction with a 5x5 kernel before counting overlaps (which
inflates PRO), and two sample the curve at a grid of 200 or of 1000 thresholds spread evenly
over min..max of the scores (an error that depends on the score distribution: a few outlier
scores stretch the grid and leave the bulk of the pixels to a few thresholds). Numbers
computed those ways are not comparable with each other or with papers that use MVTec's
definition. Here
nothing is sampled: the curve is walked through every distinct score value, so the result is
the exact area of the exact curve (to float64 rounding, about 1e-12), and the tests hold it to
a slow, obviously correct reference to 1e-6.

How (one sort shared by the four pixel metrics). Scores are mapped to unsigned integers that
sort in the same order (the IEEE-754 bit pattern with the sign handled; -0.0 is folded into
+0.0, so equal floats are equal keys) and split into normal and anomalous samples; both sets
are LSD-radix-sorted (numba, single thread), the anomalous one together with each pixel's
weight 1 / (component size x number of components), so that a running sum of weights is PRO.
The sorted normal keys are merged into the distinct anomalous values (how many normal
samples tie with each, how many lie between two of them: in between, TP and PRO are constant
and every curve is a straight segment), and one walk from the highest value down, one tie
group per distinct value, yields every metric at once:

* AUROC: the trapezoid area of the ROC curve through the tie groups (equivalently the
  Mann-Whitney U with ties counted one half), in integer arithmetic;
* AP: the sum over distinct thresholds of (recall step) x precision — scikit-learn's
  ``average_precision_score`` definition (no interpolation);
* F1max: the largest 2PR / (P + R) over the distinct thresholds (= 2 TP / (TP + FP + #pos));
* AUPRO: the trapezoids of the PRO curve, stopping at ``fpr_limit``.

Ties match scikit-learn exactly, the tests check it on heavily tied scores. Cost: linear in the
number of pixels (13 M pixels, all seven metrics: about 0.25-0.35 s on one core of the
development container, see benchmarks/metrics.py). The kernels are compiled by numba on first
use (a few seconds once; then cached next to this file).

Edge cases (documented behaviour, tested):

* NaN scores raise ``ValueError``; +-inf are ordinary (extreme) scores.
* No anomalous sample (an image set without anomalous images, or masks with no anomalous
  pixel): AUROC, AP, F1max and AUPRO are NaN — undefined, not 0 and not 1.
* No normal sample: AUROC and AUPRO are NaN (no false-positive rate exists); AP and F1max are
  1.0 (every threshold has precision 1).
* A constant map: AUROC 0.5, AP = the anomalous share, F1max = 2P / (2P + N), AUPRO 0.15.
* ``mean_over_categories`` averages each metric over the categories where it is defined
  (NaN-skipping mean) and warns, naming the categories and metrics it skipped; a metric
  that is NaN everywhere stays NaN.
* Maps and masks must agree in number and shape; a mismatch raises ``ValueError`` naming
  both shapes. Maps may be float16/32/64 (float64 is kept exact, on a slower 64-bit sort),
  integer or bool; masks bool, 0/1 or 0/255 (any non-zero value is anomalous).

This module must not import ``curate``: the detectors are usable on their own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numba
import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_KEYS",
    "METRIC_NAMES",
    "aupro",
    "evaluate",
    "image_metrics",
    "mean_over_categories",
    "pixel_metrics",
]

#: The seven metrics in table order (image level, pixel level, region level).
METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
#: The keys ``evaluate`` returns, in the same order as ``METRIC_NAMES``.
METRIC_KEYS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")

#: scipy.ndimage.label structure: 8-connectivity, as MVTec AD's reference evaluation.
CONNECTIVITY = np.ones((3, 3), dtype=bool)

_RADIX_BITS = 11  # 2048 buckets a pass: 3 passes for 32-bit keys, 6 for 64-bit keys


# ---------------------------------------------------------------------------------------------
# compiled kernels (work on order-preserving unsigned integer keys; ties = equal keys)


@numba.njit(cache=True, nogil=True)
def _key(b, sign, ones):  # pragma: no cover - compiled
    """The order-preserving unsigned key of an IEEE-754 bit pattern; -0.0 maps to +0.0.

    (numba widens uint32 arithmetic to uint64, so no ``~``: xor with ``ones``, the all-ones
    value of the key type, keeps the value inside the key's width.)"""
    if b == sign:  # -0.0
        return sign
    if (b & sign) != 0:  # negative: flip every bit
        return b ^ ones
    return b | sign


@numba.njit(cache=True, nogil=True)
def _split_keys(bits, is_pos, sign, ones, n_pos, shifts, digit_mask):  # pragma: no cover
    """Keys of the normal and of the anomalous samples (input order), and the radix digit
    histograms of the normal keys, in one pass."""
    n = bits.size
    npass = shifts.size
    neg = np.empty(n - n_pos, bits.dtype)
    pos = np.empty(n_pos, bits.dtype)
    hist = np.zeros((npass, 2048), np.int64)
    a = 0
    b = 0
    for i in range(n):
        k = _key(bits[i], sign, ones)
        if is_pos[i]:
            pos[b] = k
            b += 1
        else:
            neg[a] = k
            a += 1
            for p in range(npass):
                hist[p, np.int64((k >> shifts[p]) & digit_mask)] += 1
    return neg, pos, hist


@numba.njit(cache=True, nogil=True)
def _histograms(keys, shifts, digit_mask):  # pragma: no cover - compiled
    hist = np.zeros((shifts.size, 2048), np.int64)
    for i in range(keys.size):
        k = keys[i]
        for p in range(shifts.size):
            hist[p, np.int64((k >> shifts[p]) & digit_mask)] += 1
    return hist


@numba.njit(cache=True, nogil=True)
def _radix_sort(keys, payload, hist, shifts, digit_mask):  # pragma: no cover - compiled
    """LSD radix sort of unsigned keys, ascending, in 11-bit digits, given the digit
    histograms; ``payload`` (same length, or empty) follows. Inputs are used as scratch."""
    n = keys.size
    carry = payload.size == n
    src = keys
    dst = np.empty_like(src)
    psrc = payload
    pdst = np.empty_like(psrc)
    for p in range(shifts.size):
        h = hist[p].copy()
        if n == 0 or h[np.int64((src[0] >> shifts[p]) & digit_mask)] == n:
            continue  # every key has the same digit here: nothing to move
        total = 0
        for b in range(2048):
            c = h[b]
            h[b] = total
            total += c
        s = shifts[p]
        if carry:
            for i in range(n):
                k = src[i]
                d = np.int64((k >> s) & digit_mask)
                j = h[d]
                dst[j] = k
                pdst[j] = psrc[i]
                h[d] = j + 1
            psrc, pdst = pdst, psrc
        else:
            for i in range(n):
                k = src[i]
                d = np.int64((k >> s) & digit_mask)
                j = h[d]
                dst[j] = k
                h[d] = j + 1
        src, dst = dst, src
    return src, psrc


@numba.njit(cache=True, nogil=True)
def _groups(keys, weights):  # pragma: no cover - compiled
    """Distinct values of sorted keys, with their counts and weight sums."""
    n = keys.size
    m = 0
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            m += 1
    u = np.empty(m, keys.dtype)
    cnt = np.zeros(m, np.int64)
    wsum = np.zeros(m, np.float64)
    g = -1
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            g += 1
            u[g] = keys[i]
        cnt[g] += 1
        wsum[g] += weights[i]
    return u, cnt, wsum


@numba.njit(cache=True, nogil=True)
def _count_negatives(neg, u):  # pragma: no cover - compiled
    """Merge the sorted normal keys into the sorted distinct anomalous keys ``u``: ``eq[k]``
    normal samples tie with u[k], ``below[k]`` lie strictly between u[k-1] and u[k]
    (``below[m]``: above every u). Between two anomalous values the curves are straight, so
    these counts are all the walk needs."""
    m = u.size
    eq = np.zeros(m, np.int64)
    below = np.zeros(m + 1, np.int64)
    g = 0
    for i in range(neg.size):
        k = neg[i]
        while g < m and u[g] < k:
            g += 1
        if g < m and u[g] == k:
            eq[g] += 1
        else:
            below[g] += 1
    return eq, below


@numba.njit(cache=True, nogil=True)
def _walk(cnt, wsum, eq, below, n_pos, n_neg, fpr_limit):  # pragma: no cover - compiled
    """Walk the thresholds from the highest value down, one step per tie group.

    Step k (descending) first takes the group of samples equal to the k-th distinct
    anomalous value (``cnt[k]`` anomalous with PRO weight ``wsum[k]``, ``eq[k]`` normal) and
    then the ``below[k]`` normal samples down to the next anomalous value, over which TP and
    PRO are constant: merging them into one straight segment changes no area and no
    maximum. Returns (auroc, ap, f1max, aupro); NaN where undefined."""
    m = cnt.size
    tp = 0
    fp = 0
    auc2 = 0  # twice the ROC area in (anomalous x normal) pairs: integers, exact
    ap = 0.0
    f1 = 0.0
    pro = 0.0
    area = 0.0
    pro_done = n_neg == 0
    for k in range(m, -1, -1):
        for part in range(2):
            if part == 0:
                if k == m:
                    continue
                cp = cnt[k]
                cn = eq[k]
                w = wsum[k]
            else:
                cp = 0
                cn = below[k]
                w = 0.0
            if cp == 0 and cn == 0:
                continue
            auc2 += cn * (2 * tp + cp)
            fp_before = fp
            tp += cp
            fp += cn
            if cp > 0:
                ap += cp * (tp / (tp + fp))
                f = 2.0 * tp / (tp + fp + n_pos)
                if f > f1:
                    f1 = f
            if not pro_done and cn > 0:
                x0 = fp_before / n_neg
                x1 = fp / n_neg
                if x1 >= fpr_limit:  # the segment crossing the limit: interpolate there
                    y = pro + w * (fpr_limit - x0) / (x1 - x0)
                    area += (fpr_limit - x0) * (pro + y) * 0.5
                    pro_done = True
                else:
                    area += (x1 - x0) * (pro + pro + w) * 0.5
            pro += w
    nan = math.nan
    if n_pos == 0:
        return nan, nan, nan, nan
    if n_neg == 0:
        return nan, ap / n_pos, f1, nan
    return auc2 / (2.0 * n_pos * n_neg), ap / n_pos, f1, area / fpr_limit


# ---------------------------------------------------------------------------------------------
# input handling


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """The float type scores are ranked in: float32 unless float64 is needed to stay exact."""
    if dtype == np.float64 or (dtype.kind in "iu" and dtype.itemsize > 2):
        return np.dtype(np.float64)
    if dtype.kind in "fiub":
        return np.dtype(np.float32)
    raise TypeError(f"scores must be real numbers, got dtype {dtype}")


def _check_nan(scores: np.ndarray, what: str) -> None:
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError(f"{what} contain NaN")


def _ranked(
    scores: np.ndarray, is_pos: np.ndarray, pos_w: np.ndarray | None, fpr_limit: float
) -> tuple[float, float, float, float]:
    """AUROC, AP, F1max, AUPRO of flat scores against flat binary truth.

    ``pos_w``: the PRO weight of each anomalous sample, in input order (None: no AUPRO)."""
    fdtype = _float_dtype(scores.dtype)
    scores = np.ascontiguousarray(scores, dtype=fdtype)
    is_pos = np.ascontiguousarray(is_pos, dtype=bool)
    nbits = 8 * fdtype.itemsize
    utype = np.uint32 if nbits == 32 else np.uint64
    sign = utype(1) << utype(nbits - 1)
    shifts = np.arange(0, nbits, _RADIX_BITS).astype(utype)
    bits = scores.view(utype)
    n_pos = int(np.count_nonzero(is_pos))
    n_neg = scores.size - n_pos
    ones = utype(~utype(0))
    digit_mask = utype((1 << _RADIX_BITS) - 1)
    neg, pos, hist = _split_keys(bits, is_pos, sign, ones, n_pos, shifts, digit_mask)
    neg, _ = _radix_sort(neg, np.empty(0, neg.dtype), hist, shifts, digit_mask)
    weights = np.zeros(n_pos) if pos_w is None else np.array(pos_w, dtype=np.float64)
    pos, weights = _radix_sort(pos, weights, _histograms(pos, shifts, digit_mask), shifts,
                               digit_mask)
    u, cnt, wsum = _groups(pos, weights)
    eq, below = _count_negatives(neg, u)
    return _walk(cnt, wsum, eq, below, n_pos, n_neg, float(fpr_limit))


def _as_binary(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == bool else x != 0


def _stack(maps, masks) -> tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int]]]]:
    """Flatten maps and masks (N x H x W arrays, or sequences of H x W arrays) into 1-D scores
    and binary truth, checking the shapes; returns the per-image (offset, shape) too."""
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray):
        if maps.shape != masks.shape:
            raise ValueError(f"maps and masks differ in shape: maps {maps.shape}, "
                             f"masks {masks.shape}")
        if maps.ndim == 2:
            maps, masks = maps[None], masks[None]
        if maps.ndim != 3:
            raise ValueError(f"maps must be N x H x W (or one H x W map), got shape {maps.shape}"
                             " (squeeze a channel axis first)")
        n, h, w = maps.shape
        layout = [(k * h * w, (h, w)) for k in range(n)]
        return maps.reshape(-1), _as_binary(masks).reshape(-1), layout
    maps = list(maps) if not isinstance(maps, np.ndarray) or maps.ndim == 3 else [maps]
    masks = list(masks) if not isinstance(masks, np.ndarray) or masks.ndim == 3 else [masks]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    layout, offset = [], 0
    for k, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = np.asarray(m), np.asarray(g)
        if m.shape != g.shape:
            raise ValueError(f"image {k}: map shape {m.shape} differs from mask shape {g.shape}")
        if m.ndim != 2:
            raise ValueError(f"image {k}: maps must be H x W, got shape {m.shape}")
        layout.append((offset, m.shape))
        offset += m.size
    if not maps:
        return np.empty(0, np.float32), np.empty(0, bool), []
    scores = np.concatenate([np.asarray(m).reshape(-1) for m in maps])
    truth = np.concatenate([_as_binary(np.asarray(g)).reshape(-1) for g in masks])
    return scores, truth, layout


def _region_weights(truth: np.ndarray, layout) -> np.ndarray:
    """The PRO weight 1 / (component size x number of components) of every anomalous pixel,
    in input (raster) order; components are 8-connected and never span two images."""
    parts, total = [], 0
    for offset, shape in layout:
        gt = truth[offset:offset + shape[0] * shape[1]]
        if not gt.any():
            continue
        lab, n = ndimage.label(gt.reshape(shape), structure=CONNECTIVITY)
        lab = lab.reshape(-1)[gt]
        parts.append(1.0 / np.bincount(lab)[lab])
        total += n
    if not parts:
        return np.zeros(0)
    return np.concatenate(parts) / total


# ---------------------------------------------------------------------------------------------
# public API


def image_metrics(scores, labels) -> dict[str, float]:
    """I-AUROC, I-AP and I-F1max of per-image scores against binary labels (1 = anomalous).

    NaN where undefined (no anomalous image, or no normal image for the AUROC).
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be 1-D of one length: scores {scores.shape}, "
                         f"labels {labels.shape}")
    _check_nan(scores, "image scores")
    auroc, ap, f1, _ = _ranked(scores, _as_binary(labels), None, 1.0)
    return {"i_auroc": auroc, "i_ap": ap, "i_f1max": f1}


def pixel_metrics(maps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
    """P-AUROC, P-AP, P-F1max on all pixels pooled, and AUPRO up to ``fpr_limit``.

    ``maps``: N x H x W array or a sequence of H x W arrays (sizes may differ between images);
    ``masks``: the same shapes, bool / 0-1 / 0-255. Returns keys ``p_auroc, p_ap, p_f1max,
    aupro``; see the module docstring for definitions and edge cases.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, truth, layout = _stack(maps, masks)
    _check_nan(scores, "anomaly maps")
    auroc, ap, f1, apro = _ranked(scores, truth, _region_weights(truth, layout), fpr_limit)
    return {"p_auroc": auroc, "p_ap": ap, "p_f1max": f1, "aupro": apro}


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """The exact AUPRO (MVTec AD definition, 8-connected regions) up to ``fpr_limit``,
    normalised by ``fpr_limit``. NaN without anomalous or without normal pixels."""
    return pixel_metrics(maps, masks, fpr_limit)["aupro"]


def evaluate(scores, labels, maps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
    """All seven metrics of one category, keyed by ``METRIC_KEYS`` (fractions, not percent)."""
    out = image_metrics(scores, labels)
    out.update(pixel_metrics(maps, masks, fpr_limit))
    return {key: float(out[key]) for key in METRIC_KEYS}


def mean_over_categories(results: Mapping[str, Mapping[str, float]],
                         keys: Sequence[str] = METRIC_KEYS) -> dict[str, float]:
    """The per-metric mean over categories (HSS-IAD Tables III/IV), skipping NaN.

    A category where a metric is undefined (NaN, e.g. no anomalous image) is left out of that
    metric's mean, with a ``RuntimeWarning`` naming it; a metric NaN in every category is NaN.
    """
    if not results:
        raise ValueError("no categories to average")
    out, skipped = {}, []
    for key in keys:
        values = np.array([float(r[key]) for r in results.values()], dtype=np.float64)
        nan = np.isnan(values)
        skipped += [f"{name}:{key}" for name, bad in zip(results, nan, strict=True) if bad]
        out[key] = float(values[~nan].mean()) if (~nan).any() else math.nan
    if skipped:
        warnings.warn("mean over categories skips undefined (NaN) values: "
                      + ", ".join(skipped), RuntimeWarning, stacklevel=2)
    return out
