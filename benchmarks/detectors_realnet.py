"""RealNet speed at the paper's settings: training step and inference (scores + maps) of
detectors.realnet, with random WRN-50-2 weights (speed only; the features mean nothing).

    .venv/bin/python benchmarks/detectors_realnet.py [--device cuda] [--train-batches 16]

Input 256×256, layers 1–4, AFS 256/512/512/256, the paper's reconstruction UNets (524M learned
parameters) and RRS 256+256. Training batches are built by the real pipeline (MTD normal images,
Perlin × foreground masks, procedural-texture sources) before timing; the synthesis cost per
sample is reported separately. Figures are medians over --repeats after a warm-up. Peak memory:
the rise of the peak resident set (CPU, VmHWM reset per phase) or of torch's peak allocation
(CUDA) during the phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MTD = ROOT.parent / "shared" / "data" / "mtd"


from _memory import Peak, sync  # noqa: E402  (benchmarks/ is on sys.path when run)


def images(count: int) -> list:
    found = sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg"))
    if found:
        return [found[i % len(found)] for i in range(count)]
    import numpy as np  # no MTD here (e.g. the GPU machine): random images

    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(count)]


def median_time(fn, device, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    peak = Peak(device)
    with peak:
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batches", type=int, nargs="*", default=None,
                        help="training batch sizes (default: 2 on a CPU, 16 on a GPU)")
    parser.add_argument("--infer-batch", type=int, default=None,
                        help="inference batch size (default: 2 on a CPU, 16 on a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    train_batches = args.train_batches or ([16] if gpu else [2])
    infer_batch = args.infer_batch or (16 if gpu else 2)

    from detectors import create_detector
    from detectors.realnet import SyntheticAnomalies

    start = time.perf_counter()
    detector = create_detector("realnet", weights="random", device=device)
    built = time.perf_counter() - start
    learned = sum(p.numel() for m in detector.modules().values() for p in m.parameters())
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {args.threads} threads"
    print(f"RealNet, paper settings (256 px, WRN-50-2 random weights, layers 1-4, "
          f"AFS {detector.options['afs_channels']}, RRS {detector.options['rrs_numbers']}); "
          f"{name}; torch {torch.__version__}")
    print(f"build {built:.1f} s; learned parameters {learned / 1e6:.1f} M")

    paths = images(max(train_batches + [infer_batch]))
    data = SyntheticAnomalies(paths, detector.geometry, detector.options, seed=0, stream=1)
    start = time.perf_counter()
    samples = [data[i] for i in range(len(paths))]
    synth = (time.perf_counter() - start) / len(paths)
    print(f"data: {1000 * synth:.1f} ms per training sample (read, resize, Perlin mask, "
          f"texture, blend; one process)")

    def collate(n):
        parts = list(zip(*samples[:n], strict=True))
        return (torch.stack(parts[0]), torch.stack(parts[1]), torch.stack(parts[2]),
                torch.tensor(parts[3]))

    # AFS: one batch of backbone statistics (the paper runs 64)
    afs_data = SyntheticAnomalies(paths, detector.geometry, detector.options, seed=0, stream=3,
                                  anomaly_ratio=1.0)
    detector.options["afs_batches"] = 1
    took, mem = median_time(lambda: detector.select_features(afs_data, train_batches[0], False),
                            device, 1)
    print(f"AFS: {took:.2f} s per batch of {train_batches[0]} (×64 batches at the paper's "
          f"setting), peak +{mem / 2**20:.0f} MiB")

    optimizer = torch.optim.Adam([*detector.recon.parameters(), *detector.rrs.parameters()],
                                 lr=1e-4)
    detector.recon.train()
    detector.rrs.train()
    for n in train_batches:
        batch = collate(n)
        took, mem = median_time(lambda b=batch: detector.train_step(b, optimizer), device,
                                args.repeats)
        print(f"train step, batch {n}: {took:.3f} s ({n / took:.1f} img/s), "
              f"peak +{mem / 2**20:.0f} MiB")
    detector.recon.eval()
    detector.rrs.eval()
    x = collate(infer_batch)[0]

    def infer():
        with torch.no_grad(), detector.autocast():
            scores, maps = detector.predict_batch(x)
        scores.float().cpu(), maps.float().cpu()

    took, mem = median_time(infer, device, args.repeats)
    print(f"inference (scores + 256×256 maps), batch {infer_batch}: {took:.3f} s "
          f"({infer_batch / took:.1f} img/s), peak +{mem / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
