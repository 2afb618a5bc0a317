"""SSFilter on the real MTD: defective tiles hidden in the normal training set, then filtered.

The normal training set is ``MT_Free``; defective MTD images (all classes, drawn at random) are
injected so that they make up a fraction α of the training set: n_anomalous = α/(1−α)·n_normal
(α is the share of the *final* set, as in the paper's Real-IAD noise protocol). MTD has only 392
defective images, so at α = 0.4 the normal set is subsampled to 392·(1−α)/α = 588 images.

Per α and mode it reports: the fraction of injected images removed, the fraction of normal images
kept, and the image AUROC of the scores (injected = positive), against the no-filter baseline
(keeps everything: 0 % removed, 100 % kept, AUROC 0.5). Full mode trains its model on the
weight-free default descriptor (``randconv`` + the patch decoder) unless ``--weights`` names a
DINOv2 weight file, when it trains the Dinomaly model on that encoder as the paper does.

    .venv/bin/python benchmarks/ssfilter.py                       # lite, α 0.1 0.2 0.4
    .venv/bin/python benchmarks/ssfilter.py --alphas 0.1 --variant recall_tau=none
    .venv/bin/python benchmarks/ssfilter.py --modes lite full     # full on the weight-free descriptor
    .venv/bin/python benchmarks/ssfilter.py --modes lite full --weights ~/w/dinov2_vits14_reg4_pretrain.pth
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from curate.imaging.io import decode_file
from curate.stages.ssfilter.params import SSFilterParams
from curate.stages.ssfilter.stage import run_filter

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MTD = ROOT.parent / "shared" / "data" / "mtd"


def load_mtd(root: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    normal = [decode_file(p) for p in sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))]
    defect_paths = sorted(p for d in sorted(root.glob("MT_*")) if d.name != "MT_Free"
                          for p in (d / "Imgs").glob("*.jpg"))
    return normal, [decode_file(p) for p in defect_paths], [p.parent.parent.name[3:]
                                                            for p in defect_paths]


def training_set(normal, defects, classes, alpha: float, seed: int):
    """(images, is_injected, class of each image) with injected images a fraction ``alpha`` of
    the set, shuffled."""
    rng = np.random.default_rng(seed)
    n_normal = len(normal)
    n_anom = round(alpha / (1 - alpha) * n_normal)
    if n_anom > len(defects):
        n_anom = len(defects)
        n_normal = round(n_anom * (1 - alpha) / alpha)
    pick_n = rng.choice(len(normal), n_normal, replace=False)
    pick_a = rng.choice(len(defects), n_anom, replace=False)
    images = [normal[i] for i in pick_n] + [defects[i] for i in pick_a]
    truth = np.r_[np.zeros(n_normal, bool), np.ones(n_anom, bool)]
    labels = np.array(["Free"] * n_normal + [classes[i] for i in pick_a])
    order = rng.permutation(len(images))
    return [images[i] for i in order], truth[order], labels[order]


def parse_variant(text: str) -> dict:
    key, _, value = text.partition("=")
    value = yaml.safe_load(value)
    return {key: None if value == "none" else value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mtd", type=Path, default=DEFAULT_MTD)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--modes", nargs="+", default=["lite"], choices=["lite", "full"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kappa1", type=int, default=20)
    ap.add_argument("--kappa2", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default=None, help="descriptor or backbone (default: randconv; "
                    "dinov2_vits14_reg in full mode when --weights is given)")
    ap.add_argument("--weights", default=None, help="backbone weights (full mode: DINOv2)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                    help="extra lite rows with one parameter changed, e.g. recall_tau=none")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    start = time.perf_counter()
    normal, defects, classes = load_mtd(args.mtd)
    print(f"MTD: {len(normal)} normal (MT_Free), {len(defects)} defective images; "
          f"seed {args.seed}, kappa1 {args.kappa1}, kappa2 {args.kappa2}, "
          f"batch {args.batch_size}", flush=True)
    runs: list[tuple[str, dict]] = []
    for mode in args.modes:
        base = {"mode": mode, "kappa1": args.kappa1, "kappa2": args.kappa2,
                "batch_size": args.batch_size, "image_size": args.image_size}
        if mode == "full":
            default = "dinov2_vits14_reg" if args.weights else "randconv"
            base |= {"backbone": args.backbone or default, "weights": args.weights,
                     "iterations": args.iterations}
            mode = f"full ({base['backbone']})"
        elif args.backbone:
            base |= {"backbone": args.backbone, "weights": args.weights}
        runs.append((mode, base))
        if mode.startswith("lite"):
            for text in args.variant:
                change = parse_variant(text)
                runs.append((f"lite {text}", base | change))

    table = []
    for alpha in args.alphas:
        images, truth, labels = training_set(normal, defects, classes, alpha, args.seed)
        n_norm, n_anom = int((~truth).sum()), int(truth.sum())
        table.append((alpha, "no filter", n_norm, n_anom, 0.0, 1.0, 0.5, 0.0, {}))
        for name, values in runs:
            t0 = time.perf_counter()
            result = run_filter(lambda i, images=images: images[i], len(images),
                                SSFilterParams(**values), args.seed, device=args.device)
            removed = 1.0 - result.kept[truth].mean()
            kept = result.kept[~truth].mean()
            auroc = roc_auc_score(truth, result.scores)
            by_class = {c: 1.0 - result.kept[labels == c].mean()
                        for c in sorted(set(labels[truth]))}
            table.append((alpha, name, n_norm, n_anom, removed, kept, auroc,
                          time.perf_counter() - t0, by_class))
            print(f"alpha {alpha}: {name}: removed {removed:.1%} of {n_anom} injected, kept "
                  f"{kept:.1%} of {n_norm} normal, AUROC {auroc:.3f} "
                  f"({time.perf_counter() - t0:.0f} s); removed by class: "
                  + ", ".join(f"{c} {v:.0%}" for c, v in by_class.items()), flush=True)

    print()
    print("| alpha | method | normal | injected | injected removed | normal kept | "
          "image AUROC | time |")
    print("|---|---|---|---|---|---|---|---|")
    for alpha, name, n_norm, n_anom, removed, kept, auroc, secs, _ in table:
        print(f"| {alpha} | {name} | {n_norm} | {n_anom} | {removed:.1%} | {kept:.1%} | "
              f"{auroc:.3f} | {secs:.0f} s |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
