"""Dinomaly: train-step time, inference img/s (maps included) and peak memory, ours vs official.

    .venv/bin/python benchmarks/detectors_dinomaly.py [--backbone vits|vitb|vitl] [--batch 8]
        [--steps 2] [--repeats 3] [--device cpu] [--threads 2] [--official /tmp/dinomaly_official]

Paper settings: 392×392 crop (28×28 tokens), random weights (speed does not depend on them).
With ``--official PATH`` (an extracted checkout of github.com/guojiajeremy/Dinomaly:
``git archive HEAD | tar -x -C PATH``), the official ViTill is built with the same weights
(ours mapped onto its state dict, strictly) and both run side by side on the same input
tensors: the maximum absolute difference of the 256×256 maps and of the image scores (target
≤ 1e-4), and the same for a few training steps with dropout off (losses, then maps), then the
timings, alternated, medians over repeats. Peak memory is measured in a fresh subprocess per
implementation and phase (freed heap is not returned to the OS, so one process cannot measure
phases apart): the process's peak RSS during one inference batch / one training step, and its
growth over the RSS after building the model; on a GPU, torch.cuda.max_memory_allocated.
The official code needs scikit-learn, OpenCV, scikit-image, pandas and matplotlib to import.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors import create_detector  # noqa: E402
from detectors.dinomaly import official_state_dict, warm_cosine_lr  # noqa: E402

SIZES = {"vits": ("dinov2_vits14_reg", "vit_small", 384, 6),
         "vitb": ("dinov2_vitb14_reg", "vit_base", 768, 12),
         "vitl": ("dinov2_vitl14_reg", "vit_large", 1024, 16)}


# ------------------------------------------------------------------------------ memory


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args, size: str, impl: str, phase: str) -> None:
    """Build one implementation, run one phase once, print its peak memory (one JSON line)."""
    import json

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, 392, 392, generator=gen).to(device)
    if impl == "ours":
        ours = create_detector("dinomaly", backbone=SIZES[size][0], weights="random", seed=0,
                               device=device)
        if phase == "infer":
            def run():
                return ours.predict_batch(x)
        else:
            opt = ours.make_optimizer()
            for module in ours.modules().values():
                module.train()

            def run():
                return ours.train_step(x, opt, 500, 10000).item()
    else:
        _, predict, make_opt, step = build_official(args.official, size, None, device)
        if phase == "infer":
            def run():
                return predict(x)
        else:
            opt = make_opt()

            def run():
                return step(x, opt, 1e-3, 0.45).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _rss_mib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        except OSError:
            pass
        run()
        peak = _rss_mib("VmHWM")
    print("MEMORY " + json.dumps({"peak": peak, "base": base}))


def measure_memory(argv: list[str], impl: str, phase: str) -> dict[str, float]:
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, *argv, "--worker", f"{impl}:{phase}"],
                         capture_output=True, text=True, check=True).stdout
    line = [li for li in out.splitlines() if li.startswith("MEMORY ")][-1]
    return json.loads(line[len("MEMORY "):])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- official


def build_official(path: Path, size: str, ours_state: dict, device: torch.device):
    sys.path.insert(0, str(path))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.models import vision_transformer as v2
        from models.uad import ViTill
        from models.vision_transformer import Block, LinearAttention2, bMlp
        from utils import cal_anomaly_maps, get_gaussian_kernel, global_cosine_hm_percent

    # optimizers/__init__.py imports every optimiser (one needs colorama): load the one file.
    spec = importlib.util.spec_from_file_location("official_stableadamw",
                                                  path / "optimizers" / "StableAdamW.py")
    stable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stable)
    StableAdamW = stable.StableAdamW  # noqa: N806

    _, arch, dim, heads = SIZES[size]
    encoder = getattr(v2, arch)(patch_size=14, img_size=518, block_chunks=0, init_values=1e-8,
                                num_register_tokens=4, interpolate_antialias=False,
                                interpolate_offset=0.1)
    bottleneck = nn.ModuleList([bMlp(dim, dim * 4, dim, drop=0.2)])
    decoder = nn.ModuleList(Block(dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                                  norm_layer=partial(nn.LayerNorm, eps=1e-8),
                                  attn=LinearAttention2) for _ in range(8))
    targets = list(range(4, 19, 2)) if size == "vitl" else list(range(2, 10))
    model = ViTill(encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=targets,
                   mask_neighbor_size=0, fuse_layer_encoder=[[0, 1, 2, 3], [4, 5, 6, 7]],
                   fuse_layer_decoder=[[0, 1, 2, 3], [4, 5, 6, 7]])
    if ours_state is not None:
        model.load_state_dict(ours_state, strict=True)
    model.to(device).eval()
    gauss = get_gaussian_kernel(kernel_size=5, sigma=4).to(device)

    @torch.no_grad()
    def predict(x):
        en, de = model(x)
        amap, _ = cal_anomaly_maps(en, de, x.shape[-1])
        amap = F.interpolate(amap, size=256, mode="bilinear", align_corners=False)
        amap = gauss(amap)
        flat = amap.flatten(1)
        top = torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * 0.01)]
        return top.mean(dim=1), amap[:, 0]

    trainable = nn.ModuleList([bottleneck, decoder])

    def optimizer():
        return StableAdamW([{"params": trainable.parameters()}], lr=2e-3, betas=(0.9, 0.999),
                           weight_decay=1e-4, amsgrad=True, eps=1e-10)

    def train_step(x, opt, lr, p):
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        en, de = model(x)
        loss = global_cosine_hm_percent(en, de, p=p, factor=0.1)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)
        opt.step()
        return loss.detach()

    return model, predict, optimizer, train_step


# --------------------------------------------------------------------------------- main


def randomise(detector, seed: int) -> None:
    """Weights of order one in the trainable modules, so that maps are not near-constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in detector.modules().values():
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=gen).to(param.device)
                if name.endswith("weight") and param.ndim == 1:  # LayerNorm
                    param.copy_(1.0 + 0.1 * noise)
                else:
                    param.copy_(0.02 * noise)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vits", help="vits, vitb, vitl (or the full name)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="training steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=2,
                        help="training steps compared with the official code (dropout off)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    parser.add_argument("--official", type=Path, default=None)
    parser.add_argument("--skip-timing", action="store_true", help="checks and memory only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    size = next((k for k, v in SIZES.items() if args.backbone in (k, v[0])), None)
    if size is None:
        parser.error(f"unknown backbone {args.backbone!r}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.worker:
        memory_worker(args, size, *args.worker.split(":"))
        return 0
    backbone = SIZES[size][0]
    print(f"Dinomaly {backbone}, 392 crop, batch {args.batch}, device {device}"
          f"{f' ({args.threads} threads)' if device.type == 'cpu' else ''}, torch {torch.__version__},"
          f" {platform.processor() or platform.machine()}")

    ours = create_detector("dinomaly", backbone=backbone, weights="random", seed=0, device=device)
    randomise(ours, 1)
    for module in ours.modules().values():
        module.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, 392, 392, generator=gen).to(device)
    x_train = torch.randn(args.batch, 3, 392, 392, generator=gen).to(device)

    official = None
    if args.official is not None:
        state = official_state_dict(ours)
        official = build_official(args.official, size, state, device)
        model, off_predict, off_optimizer, off_step = official
        s_ours, m_ours = ours.predict_batch(x)
        s_off, m_off = off_predict(x)
        print(f"inference  max |Δ map| = {(m_ours - m_off).abs().max().item():.2e}   "
              f"max |Δ score| = {(s_ours - s_off).abs().max().item():.2e}   "
              f"(map range {m_off.min().item():.3f}..{m_off.max().item():.3f})")

        # Training with the same weights, data, lr and hard-mining share, dropout off.
        if args.check_steps > 0:
            twin = copy.deepcopy(ours)
            twin.bottleneck.drop.p = 0.0
            model_state = copy.deepcopy(model.state_dict())
            model.bottleneck[0].drop.p = 0.0
            opt_ours, opt_off = twin.make_optimizer(), off_optimizer()
            for module in twin.modules().values():
                module.train()
            diffs = []
            for i in range(args.check_steps):
                step = 1000 + i  # past the warm-up and the hard-mining ramp: p = 0.9
                lr = warm_cosine_lr(step, 10000, 100, 2e-3, 2e-4)
                lo = twin.train_step(x_train, opt_ours, step, 10000).item()
                lf = off_step(x_train, opt_off, lr, 0.9).item()
                diffs.append(abs(lo - lf))
            for module in twin.modules().values():
                module.eval()
            model.eval()
            s1, m1 = twin.predict_batch(x)
            s2, m2 = off_predict(x)
            print(f"training   {args.check_steps} steps, max |Δ loss| = {max(diffs):.2e}, then "
                  f"max |Δ map| = {(m1 - m2).abs().max().item():.2e}   "
                  f"max |Δ score| = {(s1 - s2).abs().max().item():.2e}")
            model.load_state_dict(model_state)
            model.bottleneck[0].drop.p = 0.2
            del twin, opt_ours, opt_off

    # ------------------------------------------------------------------ inference timing
    runs = {"ours": lambda: ours.predict_batch(x)}
    if official is not None:
        runs["official"] = lambda: official[1](x)
    results: dict[str, dict[str, float]] = {name: {} for name in runs}
    if args.skip_timing:
        runs = {}
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device)[0])
    for name in runs:
        results[name]["img_s"] = args.batch / statistics.median(times[name])

    # ------------------------------------------------------------------- training timing
    opt = ours.make_optimizer()

    def ours_step():
        for module in ours.modules().values():
            module.train()
        return ours.train_step(x_train, opt, 500, 10000).item()

    steps = {"ours": ours_step}
    if official is not None:
        off_opt = official[2]()
        steps["official"] = lambda: official[3](x_train, off_opt,
                                                warm_cosine_lr(500, 10000, 100, 2e-3, 2e-4),
                                                0.45).item()
    if args.skip_timing:
        steps = {}
    for fn in steps.values():  # warm-up
        fn()
    step_times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            per = [timed(fn, device)[0] for _ in range(args.steps)]
            step_times[name].append(statistics.median(per))
    for name in steps:
        results[name]["step_s"] = statistics.median(step_times[name])

    # -------------------------------------------------------------------- peak memory
    passed = list(argv if argv is not None else sys.argv[1:])
    what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    for name in results:
        for phase in ("infer", "train"):
            mem = measure_memory(passed, name, phase)
            results[name][f"{phase}_mem"] = mem["peak"]
            results[name][f"{phase}_grow"] = mem["peak"] - mem["base"]

    timing = not args.skip_timing
    print(f"\n{'':10s} {'infer img/s':>12s} {'train s/step':>13s} {'infer MiB':>16s} "
          f"{'train MiB':>16s}   ({what} (growth over the built model), fresh process per "
          f"cell; times: medians of {args.repeats})")
    for name, r in results.items():
        img_s = f"{r['img_s']:12.2f}" if timing else f"{'-':>12s}"
        step_s = f"{r['step_s']:13.2f}" if timing else f"{'-':>13s}"
        print(f"{name:10s} {img_s} {step_s} "
              f"{r['infer_mem']:8.0f} ({r['infer_grow']:5.0f}) "
              f"{r['train_mem']:8.0f} ({r['train_grow']:5.0f})")
    if timing and "official" in results:
        o, f = results["ours"], results["official"]
        print(f"{'ratio':10s} {o['img_s'] / f['img_s']:11.2f}× {f['step_s'] / o['step_s']:12.2f}×"
              "   (ours faster when > 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
