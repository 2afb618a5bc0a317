"""SSFilter's memory does not grow with the set: peak RSS at N and 5·N generated images.

Lite mode over N small generated textures (decoded on the fly: no files), one shuffling
(κ1 = 1, the cost of one is the cost of every one), 64-px images (randconv's 8×8 grid is kept),
batch 32. Each size runs in a fresh subprocess. Patch features are kept as float16 in memory up
to 2 GiB and in a temporary memory-mapped file beyond (`FeatureBank`): at 100,000 images they
take 100,000 × 64 × 224 × 2 B = 2.9 GB, so the larger run exercises the file. Pages of a mapped
file count in RSS while resident, though the kernel can drop them at will; so besides the peak
RSS (VmHWM) the peak of anonymous memory (RssAnon, sampled every 0.1 s) is printed: that is the
memory the process really needs.

    .venv/bin/python benchmarks/ssfilter_memory.py --sizes 20000 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def texture(i: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(i)
    level = rng.uniform(90, 160)
    return np.clip(level + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)


def status(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in
                Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))


def run_one(n: int) -> dict:
    import torch

    from curate.stages.ssfilter.params import SSFilterParams
    from curate.stages.ssfilter.stage import run_filter

    torch.set_num_threads(2)
    params = SSFilterParams(kappa1=1, kappa2=0, image_size=64)
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = run_filter(texture, n, params, seed=0, device="cpu")
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"n": n, "seconds": elapsed, "peak_rss_mb": status("VmHWM") / 2**20,
            "peak_anon_mb": peak_anon[0] / 2**20,
            "scored": int(np.isfinite(result.scores).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    print("| images | scored | time | peak RSS | peak anonymous |\n|---|---|---|---|---|")
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n)], check=True,
                              capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {r['n']:,} | {r['scored']:,} | {r['seconds']:.0f} s | "
              f"{r['peak_rss_mb']:,.0f} MB | {r['peak_anon_mb']:,.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
