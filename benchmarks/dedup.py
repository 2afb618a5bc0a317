"""Dedup: Hamming search at scale, and end to end on MTD with planted duplicates vs imagededup.

    .venv/bin/python benchmarks/dedup.py [--mtd ../shared/data/mtd] [--repeats 3]
        [--skip-imagededup] [--sizes 10000,100000,1000000]

(a) search: all pairs within distance 10 among 1,000,000 random 64-bit hashes (plus 20,000
    planted near pairs), one core; recall against brute force for 1,000 sampled hashes.
(b) end to end on the real MTD plus planted copies (JPEG q60, 80% resize, +25 brightness,
    x1.25 contrast, 1% crop a side, horizontal and vertical flips) of 150 originals
    (``--planted 1344``: of every image, 10,752 images in all):
    curate's dedup stage (decode, hash, search, clusters) against imagededup's
    PHash().find_duplicates on the same image files with the same threshold (10). Recall: the
    share of planted (original, copy) pairs found as a pair; precision: the share of pairs found
    that were planted (MTD's own exposure series are near duplicates too, so precision is low
    for every method and says more about the data than about the tools).
(c) search time for 10k / 100k / 1M random hashes, and brute force where it is affordable.

imagededup is installed for this benchmark only: `.venv/bin/pip install imagededup`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from curate.engine.facts import look
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.imaging.hamming import brute_force_pairs, pairs_within
from curate.stages.dedup import Dedup, DedupParams, HashFacts, near_edges
from curate.stages.ingest import Ingest, IngestParams
from curate.testing.planting import write_planted_mtd

DEFAULT_MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"
KINDS = ["jpeg", "resize", "brightness", "contrast", "crop", "hflip", "vflip"]
RADIUS = 10


def random_hashes(n: int, planted: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    src = rng.choice(n, planted, replace=False)
    dst = rng.choice(n, planted, replace=False)
    for s, d in zip(src, dst, strict=True):
        bits = rng.choice(64, int(rng.integers(0, RADIUS + 1)), replace=False)
        hashes[d] = int(hashes[s]) ^ int(sum(1 << int(b) for b in bits))
    return hashes


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def imagededup_search(hashes: np.ndarray) -> float:
    """imagededup's own search (Cython brute force) over precomputed hashes."""
    from imagededup.methods import PHash

    encodings = {f"{k}.png": f"{int(h):016x}" for k, h in enumerate(hashes)}
    start = time.perf_counter()
    PHash(verbose=False).find_duplicates(encoding_map=encodings, max_distance_threshold=RADIUS)
    return time.perf_counter() - start


def search_benchmark(sizes: list[int], repeats: int, with_imagededup: bool) -> None:
    pairs_within(random_hashes(1000, 10, 0), RADIUS)  # compile outside the timing
    print(f"(a, c) all pairs within distance {RADIUS}, one core, median of {repeats}")
    for n in sizes:
        hashes = random_hashes(n, n // 50, seed=n)
        t, (i, j, d) = timed(lambda h=hashes: pairs_within(h, RADIUS), repeats)
        line = f"  {n:>9,} hashes: {t:7.3f} s, {i.size:,} pairs"
        if n <= 30_000:
            tb, ref = timed(lambda h=hashes: brute_force_pairs(h, RADIUS), 1)
            same = set(zip(i.tolist(), j.tolist(), strict=True)) == \
                set(zip(ref[0].tolist(), ref[1].tolist(), strict=True))
            line += f"; brute force {tb:.3f} s, identical: {same}"
        else:
            recall = sampled_recall(hashes, i, j)
            line += f"; recall vs brute force on 1,000 sampled hashes: {recall:.4f}"
        if with_imagededup and n <= 30_000:  # quadratic: 100k ran over 19 min, stopped
            line += f"; imagededup's search {imagededup_search(hashes):.3f} s"
        print(line, flush=True)


def sampled_recall(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> float:
    rng = np.random.default_rng(1)
    sample = rng.choice(hashes.size, 1000, replace=False)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    expected = hit = 0
    for q in sample.tolist():
        for k in np.flatnonzero(np.bitwise_count(hashes ^ hashes[q]) <= RADIUS).tolist():
            if k != q:
                expected += 1
                hit += (min(q, k), max(q, k)) in found
    return hit / expected if expected else 1.0


def planted_set(mtd: Path, scratch: Path, originals: int = 150
                ) -> tuple[Path, Path, list[tuple[str, str, str]]]:
    """MTD layout (for curate) and an images-only mirror (for imagededup), same files."""
    rng = np.random.default_rng(0)
    images = sorted(p.relative_to(mtd).as_posix() for p in mtd.glob("MT_*/Imgs/*.jpg"))
    chosen = set(rng.choice(len(images), min(originals, len(images)), replace=False).tolist())
    root = scratch / "mtd"
    planted = []
    for k, rel in enumerate(images):
        kinds = KINDS if k in chosen else []
        planted += write_planted_mtd(mtd, root, [rel], kinds)
    flat = scratch / "images-only"
    for path in root.glob("MT_*/Imgs/*.jpg"):
        target = flat / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return root, flat, planted


def score(found: set[tuple[str, str]], planted: list[tuple[str, str, str]], kinds=None):
    want = {tuple(sorted((o, c))) for o, c, k in planted if kinds is None or k in kinds}
    recall = len(want & found) / len(want)
    all_planted = {tuple(sorted((o, c))) for o, c, _ in planted}
    # Copies of one original are duplicates of each other too.
    by_original: dict[str, list[str]] = {}
    for o, c, _ in planted:
        by_original.setdefault(o, [o]).append(c)
    for group in by_original.values():
        all_planted |= {tuple(sorted((a, b))) for a in group for b in group if a < b}
    precision = len(found & all_planted) / len(found) if found else 1.0
    return recall, precision


def curate_pairs(manifest, ctx, params: DedupParams) -> set[tuple[str, str]]:
    """The near-duplicate pair relation the dedup stage clusters on, recomputed for scoring
    with the stage's own per-sample hashing."""
    rows = [r for r in manifest.rows() if r["status"] == "kept"]
    hashing = HashFacts(params.method, params.transforms, params.decode)
    facts = look(ctx, "dedup", rows, manifest.roots, [hashing], desc="scoring")[hashing]
    hashes = np.array(facts.column([r["sha256"] for r in rows], "hashes"), np.uint64)
    edges = near_edges(hashes, RADIUS)
    return {tuple(sorted((rows[a]["path"], rows[b]["path"])))
            for a, b in zip(edges.a.tolist(), edges.b.tolist(), strict=True)}


def end_to_end(mtd: Path, scratch: Path, repeats: int, with_imagededup: bool,
               originals: int) -> None:
    root, flat, planted = planted_set(mtd, scratch, originals)
    n_files = len(list(flat.rglob("*.jpg")))
    print(f"(b) end to end on MTD + {len(planted)} planted copies ({n_files} images), "
          f"threshold {RADIUS}, median of {repeats}")
    ws = Workspace.open(scratch / "ws")
    with Context(ws, jobs=2, progress=False) as ctx:
        ingested = run_stage(Ingest(root), [], IngestParams(kind="mtd"), ctx).manifest
    results = {}
    for decode in ("full", "reduced"):
        for transforms in ("none", "flips"):
            params = DedupParams(transforms=transforms, decode=decode)
            times = {}
            for jobs in (1, 2):
                def run(p=params, j=jobs):
                    # A new workspace object each time: the facts a dry run computes stay in
                    # memory only, so every run decodes every image (nothing cached).
                    fresh = Workspace.open(scratch / "ws", create=False)
                    with Context(fresh, jobs=j, progress=False) as ctx:
                        return run_stage(Dedup(), [ingested], p, ctx, save=False)
                times[jobs], _ = timed(run, repeats)
            results[(decode, transforms)] = times[2]
            with Context(Workspace.open(scratch / "ws", create=False), jobs=2,
                         progress=False) as ctx:
                found = curate_pairs(ingested, ctx, params)
            shutil.rmtree(scratch / "ws" / "facts", ignore_errors=True)  # the next runs: cold
            r_all, p = score(found, planted)
            r_flip, _ = score(found, planted, {"hflip", "vflip"})
            r_plain, _ = score(found, planted, set(KINDS) - {"hflip", "vflip"})
            print(f"  curate dedup decode={decode} transforms={transforms}: jobs 1 "
                  f"{times[1]:.2f} s, jobs 2 {times[2]:.2f} s; recall {r_all:.3f} (flips "
                  f"{r_flip:.3f}, others {r_plain:.3f}), precision {p:.3f}", flush=True)
    if not with_imagededup:
        return
    from imagededup.methods import PHash

    logging.getLogger("imagededup").setLevel(logging.ERROR)

    def theirs():
        return PHash(verbose=False).find_duplicates(image_dir=str(flat), recursive=True,
                                                     max_distance_threshold=RADIUS)
    t, dups = timed(theirs, repeats)
    found = {tuple(sorted((a, b))) for a, bs in dups.items() for b in bs}
    # imagededup names files relative to the folder it was given: the same paths as ours.
    r_all, p = score(found, planted)
    r_flip, _ = score(found, planted, {"hflip", "vflip"})
    r_plain, _ = score(found, planted, set(KINDS) - {"hflip", "vflip"})
    print(f"  imagededup PHash (its default workers): {t:.2f} s; recall {r_all:.3f} (flips "
          f"{r_flip:.3f}, others {r_plain:.3f}), precision {p:.3f}")
    for (decode, transforms), ours in results.items():
        print(f"  imagededup / curate (jobs 2, decode={decode}, transforms={transforms}): "
              f"{t / ours:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtd", type=Path, default=DEFAULT_MTD)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="10000,30000,100000,1000000")
    parser.add_argument("--skip-imagededup", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--planted", type=int, default=150,
                        help="MTD images that get the 7 altered copies (1344: a 10,752-image set)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    if not args.skip_search:
        search_benchmark([int(s) for s in args.sizes.split(",")], args.repeats,
                         not args.skip_imagededup)
    if not (args.mtd / "MT_Free").is_dir():
        sys.exit(f"MTD not found at {args.mtd}: pass --mtd")
    scratch = Path(tempfile.mkdtemp(prefix="curate-dedup-"))
    try:
        end_to_end(args.mtd, scratch, args.repeats, not args.skip_imagededup, args.planted)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
