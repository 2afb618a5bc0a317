"""`curate build hss-iad` on a large generated MTD, against decoding every image once.

    .venv/bin/python benchmarks/build.py [--mtd ../shared/data/mtd] [--sizes 1000,10000]
        [--jobs 2] [--scratch DIR] [--baseline CHECKOUT] [--repeats N]

The dataset: the real MTD plus altered copies of its images (JPEG re-encoded, brightened,
contrast-stretched, resized, cropped, flipped, blurred: curate.testing.planting), in MTD's own layout,
cut to the sizes asked for. For each size, one fresh build (a new workspace: nothing cached)
runs as a subprocess — the whole command, with its exports and dataset card — while its
process tree's resident memory is sampled every 50 ms; then every image of the same set is
decoded once with OpenCV on one thread, for reference. Prints wall times, their ratio, and the
peak memory (the largest single process and the whole tree), the time of each stage and the
images the build decoded (its ``--json`` report). With ``--baseline CHECKOUT`` (another
checkout of curate, e.g. a ``git worktree`` of an older commit) the same build runs from it
too, on the same images, alternating with this one (``--repeats`` times each), so that old and
new are compared side by side. Targets (issues 5 and 19): wall <= 2x the decode, peak RSS
<= 2 GB and about flat from 10k to 100k images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
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
    """Originals first, then their copies kind by kind (10,752 images in all), then rounds of
    re-encoded, slightly re-toned copies of those (round r: JPEG quality and a brightness
    offset that depend on r) until ``size`` images: a large set of real pictures in which
    every image has near duplicates, as in MTD's own exposure series."""
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
    first = sorted(p.relative_to(out).as_posix() for p in out.glob("MT_*/Imgs/*.jpg"))
    for r in itertools.count(1):
        quality, offset = 55 + (7 * r) % 40, (r % 7) - 3
        for rel in first:
            if count >= size:
                return count
            pixels = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED).astype(np.int16)
            pixels = np.clip(pixels + offset, 0, 255).astype(np.uint8)
            target = out / f"{rel[:-4]}__r{r}.jpg"
            cv2.imwrite(str(target), pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            shutil.copyfile(out / f"{rel[:-4]}.png", target.with_suffix(".png"))
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


def timed_build(root: Path, scratch: Path, jobs: int, checkout: Path | None = None
                ) -> tuple[float, int, int, dict]:
    """One fresh build (new workspace and export); (wall s, peak RSS of the largest process,
    of the whole tree, the build's --json report). ``checkout``: run that curate instead."""
    shutil.rmtree(scratch / "ws", ignore_errors=True)
    shutil.rmtree(scratch / "export", ignore_errors=True)
    cmd = [sys.executable, "-m", "curate.app.cli", "build", "hss-iad", "--source", f"mtd={root}",
           "-w", str(scratch / "ws"), "--out", str(scratch / "export"), "-j", str(jobs),
           "--json"]
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    # `python -m` puts the working folder first on sys.path: run from the checkout's root.
    cwd = checkout if checkout is not None else Path(__file__).resolve().parents[1]
    peaks = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=cwd)

    def sample():
        while proc.poll() is None:
            one, total = tree_rss(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], one), max(peaks[1], total)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"build failed: {err.decode()[-2000:]}")
    return elapsed, peaks[0], peaks[1], json.loads(out)


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
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another curate checkout to run side by side (e.g. an older commit)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not (args.mtd / "MT_Free").is_dir():
        sys.exit(f"MTD not found at {args.mtd}: pass --mtd")
    cv2.setNumThreads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; build with --jobs {args.jobs}")
    runs = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    for size in (int(s) for s in args.sizes.split(",")):
        scratch = Path(tempfile.mkdtemp(prefix="curate-build-", dir=args.scratch))
        try:
            n = make_dataset(args.mtd, scratch / "mtd", size)
            os.sync()
            decode_all(scratch / "mtd")  # page cache warm for both sides
            results: dict[str, list] = {name: [] for name, _ in runs}
            decodes = []
            for _ in range(args.repeats):
                for name, checkout in runs:
                    results[name].append(timed_build(scratch / "mtd", scratch, args.jobs,
                                                     checkout))
                    decodes.append(decode_all(scratch / "mtd"))
            decode = statistics.median(decodes)
            print(f"  {n:>6} images: decode once {decode:6.2f} s (median of {len(decodes)})")
            for name, _ in runs:
                walls = [r[0] for r in results[name]]
                wall = statistics.median(walls)
                one = max(r[1] for r in results[name])
                total = max(r[2] for r in results[name])
                report = results[name][-1][3]
                stages = ", ".join(f"{s['stage']} {s['elapsed_s']:.2f}"
                                   for s in report["stages"] if s["stage"] != "ingest")
                ingest = sum(s["elapsed_s"] for s in report["stages"] if s["stage"] == "ingest")
                print(f"    {name:>8}: build {wall:7.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}), "
                      f"ratio {wall / decode:5.2f}x; peak RSS largest process "
                      f"{one / 2**20:6.0f} MiB, whole tree {total / 2**20:6.0f} MiB; "
                      f"decoded {report.get('decoded', 'n/a')}; manifest {report['manifest'][:12]}",
                      flush=True)
                print(f"              stages: ingest {ingest:.2f}, {stages}", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
