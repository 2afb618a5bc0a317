"""SDAS sampling throughput: images per second at K reverse steps, per UNet and batch size.

What is timed: :func:`curate.stages.sdas.sampler.sample` end to end (per-image CPU generators,
every model call, the SDAS update, the copy back), after warm-up runs. For models too slow to
run K steps here (the full ADM on a CPU), ``--steps`` can be smaller: the per-step time is
measured and the throughput at ``--at`` steps (20) is projected from it.

The reference is the official RealNet sampler on the same ADM (552.8M parameters, 256 px, fp32,
20 steps): 2.40 img/s with its classifier guidance, 3.19 without, batch 16 on an H100 (figures
from the issue). It needs CUDA and a file missing from the authors' repository
(``samples/spaced_sample.py``), so it is not run here; the target on a GPU is >= 3x 3.19 img/s.

    .venv/bin/python benchmarks/sdas.py --model unet2d-small --image-size 64 --batch-sizes 1,4
    .venv/bin/python benchmarks/sdas.py --model adm-realnet --batch-sizes 1,2 --steps 2
    .venv/bin/python benchmarks/sdas.py --model adm-realnet --device cuda --precision bf16 \\
        --batch-sizes 16,32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.stages.sdas.adm import ADMUNet, realnet_config  # noqa: E402
from curate.stages.sdas.models import PRESETS, build_model, preset  # noqa: E402
from curate.stages.sdas.sampler import RespacedSchedule, base_betas, sample  # noqa: E402

OFFICIAL_NO_GUIDANCE = 3.19  # img/s, H100, ADM 256 px, batch 16, fp32, 20 steps


def make_model(name: str, image_size: int) -> tuple[torch.nn.Module, int | None]:
    if name == "adm-realnet":  # the released architecture: class-conditional, 15 classes
        return ADMUNet(realnet_config(num_classes=15)), 15
    return build_model(*preset(name), image_size), None


def time_sampling(model, batch: int, steps: int, size: int, method: str, labels, autocast
                  ) -> float:
    """Seconds to sample ``batch`` images with ``steps`` reverse steps."""
    device = next(model.parameters()).device
    schedule = RespacedSchedule.build(base_betas(), steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        sample(model, schedule, list(range(batch)), [0.15] * batch, shape=(3, size, size),
               method=method, labels=labels, autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unet2d-small",
                    choices=["adm-realnet", *PRESETS], help="UNet to time (random weights).")
    ap.add_argument("--image-size", type=int, default=None,
                    help="Square size (default: 256 for adm-realnet, else 64).")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--steps", type=int, default=20, help="Steps actually run per timing.")
    ap.add_argument("--at", type=int, default=20, help="Steps the throughput is reported at.")
    ap.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch default).")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size or (256 if args.model == "adm-realnet" else 64)
    model, classes = make_model(args.model, size)
    model = model.to(args.device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    params = sum(p.numel() for p in model.parameters())
    device = torch.device(args.device)
    print(f"model {args.model} ({params / 1e6:.1f}M parameters), {size} px, {args.sampler}, "
          f"{args.precision}, device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"| batch | steps run | median s | s / step | img/s at {args.at} steps |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        labels = torch.zeros(batch, dtype=torch.long, device=device) if classes else None

        def run(steps: int, batch: int = batch, labels=labels) -> float:
            return time_sampling(model, batch, steps, size, args.sampler, labels, autocast)

        for _ in range(2):  # warm-up: kernels, caches, allocator
            run(min(2, args.steps))
        times = [run(args.steps) for _ in range(args.repeats)]
        med = statistics.median(times)
        per_step = med / args.steps
        print(f"| {batch} | {args.steps} | {med:.3f} | {per_step:.4f} | "
              f"{batch / (per_step * args.at):.4g} |", flush=True)
    if device.type == "cuda" and args.model == "adm-realnet":
        print(f"target: >= {3 * OFFICIAL_NO_GUIDANCE:.2f} img/s (3x the official sampler "
              f"without guidance, {OFFICIAL_NO_GUIDANCE} img/s on an H100, batch 16, fp32)")


if __name__ == "__main__":
    main()
