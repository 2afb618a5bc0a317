"""dedup + quality on many generated images: the process pool, Ray tasks and Ray Data, side by side.

Generates N small grayscale PNG textures (64×64, seeded, one in 50 an exact copy of another so
dedup has work) in an MVTec layout once under --scratch, ingests them, then times dedup +
quality on a fresh workspace per executor, each executor in its own subprocess so that its peak
memory is its own. Peak memory: the largest RSS sum over the process tree (driver, pool workers,
and for Ray its raylet, GCS and workers), sampled every 0.2 s; shared memory (Ray's object store)
is counted in every process that maps it, so the Ray figure is an upper bound.

    .venv/bin/python -u benchmarks/scale.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

CATEGORIES = 4


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """N images in <root>/c<k>/train/good/; reused when already complete."""
    done = root / f".complete-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    bases = [cv2.resize(rng.integers(40, 215, (8, 8), dtype=np.uint8), (64, 64),
                        interpolation=cv2.INTER_CUBIC) for _ in range(CATEGORIES)]
    for k in range(CATEGORIES):
        (root / f"c{k}" / "train" / "good").mkdir(parents=True, exist_ok=True)
    previous = None
    for i in range(n):
        k = i % CATEGORIES
        if i % 50 == 49 and previous is not None:
            img = previous
        else:
            img = np.clip(bases[k].astype(np.int16) + rng.integers(-24, 25, (64, 64)),
                          0, 255).astype(np.uint8)
            img = np.roll(img, (int(rng.integers(64)), int(rng.integers(64))), axis=(0, 1))
        cv2.imwrite(str(root / f"c{k}" / "train" / "good" / f"{i:07d}.png"), img)
        previous = img
    done.touch()
    return root


class PeakRSS:
    """Largest RSS sum over this process and all its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(executor: str, source: Path, scratch: Path, jobs: int) -> dict:
    """Ingest (untimed for the comparison), then dedup + quality, timed; in this process."""
    from curate.engine.runner import Context, run_stage
    from curate.engine.workspace import Workspace
    from curate.stages.dedup import Dedup, DedupParams
    from curate.stages.ingest import Ingest, IngestParams
    from curate.stages.quality import Quality, QualityParams

    ws = Workspace.open(Path(tempfile.mkdtemp(prefix=f"ws-{executor}-", dir=scratch)))
    out: dict = {"executor": executor}
    with PeakRSS() as peak:
        t = time.perf_counter()
        on_ray = executor.startswith("ray")
        if on_ray:
            import ray

            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
        out["startup_s"] = time.perf_counter() - t
        with Context(ws, jobs=jobs, executor="ray" if on_ray else executor,
                     ray_data=executor == "ray-data", progress=False) as ctx:
            # As `curate build` runs them: dedup's look computes quality's facts from the
            # same decode (ctx.prefetch), so quality decides without decoding.
            ctx.prefetch = Quality().facts(QualityParams())
            def stage(name, fn):
                with PeakRSS() as stage_peak:
                    t = time.perf_counter()
                    result = fn()
                    out[f"{name}_s"] = time.perf_counter() - t
                out[f"{name}_rss_mb"] = stage_peak.peak / 2**20
                return result

            m = stage("ingest", lambda: run_stage(Ingest(source), [], IngestParams(kind="mvtec"),
                                                  ctx).manifest)
            d = stage("dedup", lambda: run_stage(Dedup(), [m], DedupParams(), ctx).manifest)
            q = stage("quality", lambda: run_stage(Quality(), [d], QualityParams(),
                                                   ctx).manifest)
            out["decoded"] = ctx.counts["decoded"]
        if on_ray:
            ray.shutdown()
    out.update(peak_rss_mb=peak.peak / 2**20, samples=m.header["counts"]["samples"],
               kept=q.header["counts"]["kept"], manifest=q.id,
               manifest_bytes=os.path.getsize(ws.root / "manifests" / f"{q.id}.parquet"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "curate-scale")
    ap.add_argument("--executors", default="process,ray,ray-data",
                    help="ray: rows as Ray tasks; ray-data: --ray-data (Ray Data reads the "
                         "saved manifests)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one executor, print JSON
    args = ap.parse_args()
    source = args.scratch / f"images-{args.n}"
    if args.one:
        print(json.dumps(run_one(args.one, source, args.scratch, args.jobs)))
        return
    t = time.perf_counter()
    generate(source, args.n)
    print(f"{args.n} images under {source} ({time.perf_counter() - t:.1f} s to make or find)")
    results = []
    for executor in args.executors.split(","):
        proc = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--jobs",
                               str(args.jobs), "--scratch", str(args.scratch), "--one", executor],
                              check=True, capture_output=True, text=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\n{'executor':<9} {'start s':>8} {'ingest s':>9} {'dedup s':>8} {'quality s':>10} "
          f"{'dedup+quality img/s':>20} {'peak RSS MB':>12}  manifest")
    for r in results:
        r["throughput"] = r["samples"] / (r["dedup_s"] + r["quality_s"])
        print(f"{r['executor']:<9} {r['startup_s']:>8.2f} {r['ingest_s']:>9.2f} "
              f"{r['dedup_s']:>8.2f} {r['quality_s']:>10.2f} {r['throughput']:>20.0f} "
              f"{r['peak_rss_mb']:>12.0f}  {r['manifest'][:12]}")
        print(f"{'':<9} peak RSS per stage (MB): ingest {r['ingest_rss_mb']:.0f}, dedup "
              f"{r['dedup_rss_mb']:.0f}, quality {r['quality_rss_mb']:.0f}; images decoded "
              f"{r['decoded']:,}")
    base = results[0]
    for other in results[1:]:
        print(f"\n{other['executor']} / {base['executor']} throughput: "
              f"{other['throughput'] / base['throughput']:.2f} (target ≥ 0.80); same manifest: "
              f"{base['manifest'] == other['manifest']}")
    print(f"manifest {base['manifest_bytes']:,} bytes for {base['samples']:,} rows "
          f"({base['manifest_bytes'] / base['samples']:.0f} B/row)")

if __name__ == "__main__":
    main()
