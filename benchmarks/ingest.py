"""Ingest + labels + MVTec export on the real MTD, against decoding every image once.

"keep" exports the original image files instead of re-encoding them as PNG
(`curate export mvtec --images keep`). Both are measured side by side in one run, alternating, and the medians are compared as a
ratio (machines here are shared and noisy; absolute seconds move, ratios much less). Each
pipeline repeat starts from an empty workspace and an empty export folder: nothing is cached.

    .venv/bin/python benchmarks/ingest.py [--mtd ../shared/data/mtd] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.export.mvtec import export_mvtec
from curate.stages.ingest import Ingest, IngestParams
from curate.stages.labels import Labels, LabelsParams

DEFAULT_MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"


def decode_all(images: list[Path]) -> float:
    """Read and decode every image once with OpenCV, one thread: the reference cost."""
    start = time.perf_counter()
    for path in images:
        pixels = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        assert pixels is not None, path
    return time.perf_counter() - start


def pipeline(root: Path, jobs: int, scratch: Path, images: str = "png") -> float:
    # A fresh folder per run, and dirty pages of earlier runs flushed first (untimed): on this
    # ext4 mount, deleting or flushing the previous run's 100 MB slows the next one down.
    scratch = Path(tempfile.mkdtemp(dir=scratch))
    ws_dir, out = scratch / "ws", scratch / "export"
    os.sync()
    start = time.perf_counter()
    with Context(Workspace.open(ws_dir), jobs=jobs, progress=False) as ctx:
        ingested = run_stage(Ingest(root), [], IngestParams(kind="mtd"), ctx).manifest
        labelled = run_stage(Labels(), [ingested], LabelsParams(), ctx).manifest
        report = export_mvtec(labelled, out, ctx, images=images)
    elapsed = time.perf_counter() - start
    assert report["written"] == len(labelled), report["skipped"]
    shutil.rmtree(scratch)
    os.sync()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtd", type=Path, default=DEFAULT_MTD)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="Where workspaces and exports are written (default: the system "
                             "temporary folder; /dev/shm takes the disk out of the measurement)")
    args = parser.parse_args()
    if not (args.mtd / "MT_Free").is_dir():
        sys.exit(f"MTD not found at {args.mtd}: pass --mtd")
    cv2.setNumThreads(1)
    images = sorted(args.mtd.glob("MT_*/Imgs/*.jpg"))
    variants = {  # name -> (jobs, export image mode)
        "pipeline --jobs 1": (1, "png"),
        "pipeline --jobs 2": (2, "png"),
        "pipeline --jobs 2, keep": (2, "keep"),
    }
    times: dict[str, list[float]] = {"decode once (1 thread)": []} | {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="curate-bench-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        decode_all(images)  # warm the page cache so neither side pays for the disk
        for _ in range(args.repeats):
            os.sync()
            times["decode once (1 thread)"].append(decode_all(images))
            for name, (jobs, mode) in variants.items():
                times[name].append(pipeline(args.mtd, jobs, scratch, mode))
    base = statistics.median(times["decode once (1 thread)"])
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"MTD: {len(images)} images, {args.repeats} repeats, medians; writing to "
          f"{args.scratch or tempfile.gettempdir()}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<26} {med:7.3f} s   {med / base:5.2f}x decode   "
              f"({len(images) / med:7.0f} img/s)")


if __name__ == "__main__":
    main()
