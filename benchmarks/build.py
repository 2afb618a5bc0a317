"""`curate build hss-iad` on a large generated MTD, against decoding every image once.

    .venv/bin/python benchmarks/build.py [--mtd ../shared/data/mtd] [--sizes 1000,10000]
        [--jobs 2] [--scratch DIR]

The dataset: the real MTD plus altered copies of its images (JPEG re-encoded, brightened,
contrast-stretched, resized, cropped, flipped, blurred: curate.testing.planting), in MTD's own layout,
cut to the sizes asked for. For each size, one fresh build (a new workspace: nothing cached)
runs as a subprocess — the whole command, with its exports and dataset card — while its
process tree's resident memory is sampled every 50 ms; then every image of the same set is
decoded once with OpenCV on one thread, for reference. Prints wall times, their ratio, and the
peak memory (the largest single process and the whole tree). Targets (issue 5): wall <= 2x
the decode, peak RSS <= 2 GB and about flat between 1k and 10k images.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from curate.testing.planting import write_planted_mtd

DEFAULT_MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"
KINDS = ["jpeg", "brightness", "contrast", "resize", "crop", "hflip", "blur"]


def make_dataset(mtd: Path, out: Path, size: int) -> int:
    """Originals first, then their copies kind by kind, until ``size`` images."""
    images = sorted(p.relative_to(mtd).as_posix() for p in mtd.glob("MT_*/Imgs/*.jpg"))
    count = 0
    for rel in images[:size]:
        write_planted_mtd(mtd, out, [rel], [])
        count += 1
    for kind in KINDS:
        for rel in images:
            if count >= size:
                return count
            write_planted_mtd(mtd, out, [rel], [kind])
            # write_planted_mtd copies the original again; it is already there, unchanged.
            count += 1
    return count


def tree_rss(pid: int) -> tuple[int, int]:
    """(largest process, sum) of resident memory in bytes over ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    stack, seen = [pid], []
    while stack:
        p = stack.pop()
        seen.append(p)
        stack.extend(children.get(p, []))
    values = [rss.get(p, 0) for p in seen]
    return max(values, default=0), sum(values)


def timed_build(root: Path, scratch: Path, jobs: int) -> tuple[float, int, int]:
    cmd = [sys.executable, "-m", "curate.app.cli", "build", "hss-iad", "--source", f"mtd={root}",
           "-w", str(scratch / "ws"), "--out", str(scratch / "export"), "-j", str(jobs)]
    peaks = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def sample():
        while proc.poll() is None:
            one, total = tree_rss(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], one), max(peaks[1], total)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"build failed: {err.decode()[-2000:]}")
    return elapsed, peaks[0], peaks[1]


def decode_all(root: Path) -> float:
    paths = sorted(root.glob("MT_*/Imgs/*.jpg"))
    start = time.perf_counter()
    for path in paths:
        assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtd", type=Path, default=DEFAULT_MTD)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    if not (args.mtd / "MT_Free").is_dir():
        sys.exit(f"MTD not found at {args.mtd}: pass --mtd")
    cv2.setNumThreads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; build with --jobs {args.jobs}")
    for size in (int(s) for s in args.sizes.split(",")):
        scratch = Path(tempfile.mkdtemp(prefix="curate-build-", dir=args.scratch))
        try:
            n = make_dataset(args.mtd, scratch / "mtd", size)
            os.sync()
            decode_all(scratch / "mtd")  # page cache warm for both sides
            wall, one, total = timed_build(scratch / "mtd", scratch, args.jobs)
            decode = decode_all(scratch / "mtd")
            print(f"  {n:>6} images: build {wall:7.2f} s, decode once {decode:6.2f} s, "
                  f"ratio {wall / decode:5.2f}x; peak RSS largest process "
                  f"{one / 2**20:6.0f} MiB, whole tree {total / 2**20:6.0f} MiB", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
