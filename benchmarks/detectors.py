"""All detector speed benchmarks in one go: Dinomaly ViT-S and ViT-B, CRAS, RealNet.

    .venv/bin/python benchmarks/detectors.py [--device cpu|cuda] [--threads 2]
        [--official-dinomaly /tmp/dinomaly_official] [--official-cras /tmp/cras_official]
        [--only dinomaly-vits,dinomaly-vitb,cras,realnet]

Each detector has its own script (benchmarks/detectors_<name>.py: train-step time, inference
img/s with maps, peak memory, and with an official checkout the side-by-side output check and
speed ratio). This runs them one after another in fresh processes, so one's memory does not
inflate the next one's peak, and prints their reports. Official checkouts are extracted outside
the repository (`git -C <mirror> archive HEAD | tar -x -C /tmp/<name>_official`); none of their
code is copied in.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-dinomaly", type=Path, default=None)
    parser.add_argument("--official-cras", type=Path, default=None)
    parser.add_argument("--only", default="dinomaly-vits,dinomaly-vitb,cras,realnet")
    args = parser.parse_args()
    common = ["--device", args.device, "--threads", str(args.threads),
              "--repeats", str(args.repeats)]
    runs = {
        "dinomaly-vits": ["detectors_dinomaly.py", "--backbone", "vits", "--batch", "8"],
        "dinomaly-vitb": ["detectors_dinomaly.py", "--backbone", "vitb", "--batch", "8"],
        "cras": ["detectors_cras.py", "--infer-batch", "8", "--train-batches", "8"],
        "realnet": ["detectors_realnet.py"],
    }
    if args.official_dinomaly:
        for key in ("dinomaly-vits", "dinomaly-vitb"):
            runs[key] += ["--official", str(args.official_dinomaly)]
    if args.official_cras:
        runs["cras"] += ["--official", str(args.official_cras)]
    failed = []
    for name in args.only.split(","):
        script, *extra = runs[name]
        print(f"\n===== {name}: {script} {' '.join(extra + common)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / script), *extra, *common])
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
