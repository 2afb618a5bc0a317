"""Metrics: detectors.metrics against anomalib's exact AUPRO and scikit-learn, side by side.

    .venv/bin/python benchmarks/metrics.py [--maps 200] [--size 256] [--repeats 5] [--seed 0]

Data: ``--maps`` smooth random anomaly maps of ``--size`` squared pixels (Gaussian-filtered
noise, float32); about half of the images get 1-3 ground-truth blobs (rotated ellipses with
ragged borders, radius 1.5 to 40 pixels, so single-pixel and large components both occur),
and the scores rise smoothly over the blobs by a random strength per image. Image scores are
the map maxima.

Timed (median of ``--repeats``, the runs alternating within each repeat):

* ours: ``detectors.metrics.aupro`` alone, and ``evaluate`` (all seven metrics, one call);
* anomalib's exact AUPRO (``anomalib.metrics.AUPRO``'s torchmetrics metric, which sorts every
  pixel once; torch runs on its default threads), skipped with a message if anomalib is not
  installed;
* an independent numpy reference AUPRO of the MVTec AD definition (float64 argsort of all
  pixels, cumulative sums, one point per distinct score, trapezoids to 0.3);
* scikit-learn's ``roc_auc_score`` and ``average_precision_score`` on the pooled pixels.

Agreement: the AUPROs against the reference (and each other), on the maps as they are and on
the same maps quantised to 256 levels (heavy ties); P-AUROC / P-AP against scikit-learn.
Targets (issue 7): our AUPRO >= 10x faster than anomalib's at <= 1e-6 difference; the whole
suite faster than scikit-learn's pixel AUROC alone.

anomalib is installed for this benchmark only (it is no dependency of curate):
`.venv/bin/pip install --no-deps anomalib` plus what its import asks for (torchmetrics,
lightning-utilities, lightning, omegaconf, jsonargparse, kornia, platformdirs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from scipy import ndimage

from detectors import metrics as M


def make_data(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, size, size), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0, 4, 4))
    noise /= noise.std()
    ragged = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 2)
    ragged /= ragged.std()
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for i in np.flatnonzero(rng.random(n) < 0.5):
        for _ in range(rng.integers(1, 4)):
            r = float(np.exp(rng.uniform(np.log(1.5), np.log(40))))
            cy, cx = rng.uniform(0, size, 2)
            a, b = r, r * rng.uniform(0.3, 1.0)
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            shift = rng.integers(0, size, 2)
            edge = 0.25 * np.roll(ragged, tuple(shift), axis=(0, 1))
            masks[i] |= (u / a) ** 2 + (v / b) ** 2 + edge < 1
    strength = rng.uniform(0.5, 3.0, (n, 1, 1)).astype(np.float32)
    signal = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
    maps = (noise + strength * signal).astype(np.float32)
    return maps, masks


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The MVTec AD definition, vectorised the obvious way (sorts all pixels, float64)."""
    scores = maps.astype(np.float64).ravel()
    normal = ~masks.ravel()
    pro_change = np.zeros(scores.size)
    regions = 0
    for i in range(len(masks)):
        lab, k = ndimage.label(masks[i], structure=np.ones((3, 3), int))
        if k:
            sizes = np.bincount(lab.ravel())
            inside = lab > 0
            pro_change.reshape(masks.shape)[i][inside] = 1.0 / sizes[lab[inside]]
            regions += k
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(pro_change[order]) / regions
    last = np.append(s[1:] != s[:-1], True)  # the last pixel of every tie group
    x = np.concatenate([[0.0], fpr[last]])
    y = np.concatenate([[0.0], pro[last]])
    i = int(np.searchsorted(x, fpr_limit, side="left"))  # x[i - 1] < limit <= x[i]
    area = float(np.sum((x[1:i] - x[:i - 1]) * (y[1:i] + y[:i - 1]) / 2))
    y_lim = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
    area += (fpr_limit - x[i - 1]) * (y[i - 1] + y_lim) / 2
    return area / fpr_limit


def anomalib_aupro():
    """anomalib's exact AUPRO as a function, or None (with the reason) if it is missing."""
    try:
        import anomalib
        import torch
        from anomalib.metrics.aupro import _AUPRO  # what anomalib.metrics.AUPRO wraps
    except ImportError as exc:
        return None, f"anomalib not installed ({exc})"

    def run(maps: np.ndarray, masks: np.ndarray) -> float:
        metric = _AUPRO(fpr_limit=0.3)
        metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int32)))
        return float(metric.compute())

    return run, (f"anomalib {anomalib.__version__}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, numpy {np.__version__}")

    maps, masks = make_data(args.maps, args.size, args.seed)
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3), int))[1] for m in masks)
    print(f"data: {args.maps} maps {args.size}x{args.size} ({maps.size / 1e6:.1f} M pixels), "
          f"{labels.sum()} anomalous images, {n_regions} regions, "
          f"{masks.mean() * 100:.2f}% anomalous pixels; seed {args.seed}")

    from sklearn import __version__ as sk_version
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = masks.ravel(), maps.ravel()
    anomalib_run, anomalib_note = anomalib_aupro()
    runs = {
        "ours: aupro": lambda: M.aupro(maps, masks),
        "ours: evaluate (all 7 metrics)": lambda: M.evaluate(scores, labels, maps, masks),
        "numpy reference AUPRO (argsort)": lambda: reference_aupro(maps, masks),
        f"sklearn {sk_version} roc_auc_score (pixels)": lambda: roc_auc_score(y, s),
        f"sklearn {sk_version} average_precision_score (pixels)":
            lambda: average_precision_score(y, s),
    }
    if anomalib_run is not None:
        runs[f"anomalib AUPRO ({anomalib_note})"] = lambda: anomalib_run(maps, masks)
    else:
        print(f"anomalib comparison skipped: {anomalib_note}. "
              "Install it with `.venv/bin/pip install --no-deps anomalib` and its few imports.")

    small_maps, small_masks = make_data(4, 32, 1)  # compile / warm up outside the timing
    M.evaluate(small_maps.max(axis=(1, 2)), small_masks.any(axis=(1, 2)), small_maps, small_masks)
    if anomalib_run is not None:
        anomalib_run(small_maps, small_masks)

    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, object] = {}
    for rep in range(args.repeats):
        names = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in names:
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
        print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    ours = med["ours: aupro"]
    print(f"\ntimes, median of {args.repeats} (ours: one thread)")
    print("| run | median | / ours aupro |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {med[name]:.3f} s | {med[name] / ours:.1f} |")

    suite = results["ours: evaluate (all 7 metrics)"]
    ref = results["numpy reference AUPRO (argsort)"]
    print("\nagreement")
    print(f"  AUPRO ours {suite['aupro']:.12f}, numpy reference {ref:.12f}: "
          f"|diff| {abs(suite['aupro'] - ref):.2e}")
    sk_auroc = results[f"sklearn {sk_version} roc_auc_score (pixels)"]
    sk_ap = results[f"sklearn {sk_version} average_precision_score (pixels)"]
    print(f"  P-AUROC |ours - sklearn| {abs(suite['p_auroc'] - sk_auroc):.2e}, "
          f"P-AP |ours - sklearn| {abs(suite['p_ap'] - sk_ap):.2e}")
    diffs_anomalib = []
    if anomalib_run is not None:
        a = results[f"anomalib AUPRO ({anomalib_note})"]
        diffs_anomalib.append(abs(a - suite["aupro"]))
        print(f"  AUPRO anomalib {a:.12f}: |anomalib - ours| {abs(a - suite['aupro']):.2e}, "
              f"|anomalib - reference| {abs(a - ref):.2e}")
    q_maps = np.round(maps * 32) / 32  # 8-bit-like levels: heavy ties
    q_ours, q_ref = M.aupro(q_maps, masks), reference_aupro(q_maps, masks)
    print(f"  quantised maps ({np.unique(q_maps).size} levels): AUPRO ours {q_ours:.12f}, "
          f"|ours - reference| {abs(q_ours - q_ref):.2e}", end="")
    if anomalib_run is not None:
        q_a = anomalib_run(q_maps, masks)
        diffs_anomalib.append(abs(q_a - q_ours))
        print(f", |anomalib - ours| {abs(q_a - q_ours):.2e}, |anomalib - reference| "
              f"{abs(q_a - q_ref):.2e}")
    else:
        print()

    print("\ntargets")
    if anomalib_run is not None:
        speed = med[f"anomalib AUPRO ({anomalib_note})"] / ours
        worst = max(diffs_anomalib)
        met = speed >= 10 and worst <= 1e-6
        print(f"  AUPRO >= 10x faster than anomalib at <= 1e-6: {speed:.1f}x, max |diff| "
              f"{worst:.1e} -> {'met' if met else 'NOT met'}")
    auroc_time = med[f"sklearn {sk_version} roc_auc_score (pixels)"]
    suite_time = med["ours: evaluate (all 7 metrics)"]
    print(f"  all 7 metrics faster than sklearn's pixel AUROC alone: {suite_time:.3f} s vs "
          f"{auroc_time:.3f} s ({auroc_time / suite_time:.1f}x) -> "
          f"{'met' if suite_time < auroc_time else 'NOT met'}")


if __name__ == "__main__":
    main()
