"""CRAS speed: training step and inference of detectors.cras, optionally side by side with the
authors' code (an extracted checkout: `git -C <mirror> archive HEAD | tar -x -C /tmp/cras_official`).

    .venv/bin/python benchmarks/detectors_cras.py [--official /tmp/cras_official] [--device cuda]

Random backbone weights (WRN-50-2, same seed on both sides), input 288×288. With --official the
official model is built with the same backbone, adapter, discriminator and centres (copied into
ours with `load_official_cras`, which is exercised that way) and the outputs are compared on a
batch whose images all match the same class (the official tester uses the batch's mode). Figures
are medians over --repeats, ours and the official alternating. Peak memory: the rise of the peak
resident set (CPU, VmHWM reset per phase) or of torch's peak allocation (CUDA) during the phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MTD = ROOT.parent / "shared" / "data" / "mtd"


from _memory import Peak, sync  # noqa: E402  (benchmarks/ is on sys.path when run)


def images(count: int, folder: str) -> list[Path]:
    found = sorted((MTD / folder / "Imgs").glob("*.jpg"))
    if len(found) < count:
        raise SystemExit(f"need {count} images in {MTD / folder / 'Imgs'}, found {len(found)}")
    return found[:count]


def batch_of(detector, paths) -> torch.Tensor:
    from detectors.data import read_image

    return torch.stack([detector.geometry.to_input(read_image(p)) for p in paths])


def timed(fn, device) -> tuple[float, float]:
    peak = Peak(device)
    with peak:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - start
    return took, peak.value


# ------------------------------------------------------------------------------ official


def build_official(path: Path, ours, device, seed: int):
    """The authors' CRAS with our backbone's random weights; adapter, discriminator and centres
    are then copied from it into a fresh detector of ours through load_official_cras."""
    from torchvision.models import resnet

    from detectors.cras import load_official_cras

    stub = types.ModuleType("torch.utils.tensorboard")
    stub.SummaryWriter = lambda *a, **k: types.SimpleNamespace(add_scalar=lambda *a, **k: None)
    sys.modules["torch.utils.tensorboard"] = stub
    sys.path.insert(0, str(path))
    import cras as official_cras  # noqa: E402  (the authors' module)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as detectors.backbones builds the random WRN-50-2
        wrn = resnet.wide_resnet50_2(weights=None)
    clean = {k: v.clone() for k, v in wrn.state_dict().items()}
    off = official_cras.CRAS(device)
    off.load(backbone=wrn, layers_to_extract_from=["layer2", "layer3"], device=device,
             input_shape=(3, 288, 288), pretrain_embed_dimension=1536,
             target_embed_dimension=1536, patchsize=3, meta_epochs=1, eval_epochs=1,
             dsc_layers=3, pre_proj=1, noise=0.015, k=0.3, lr=1e-4, limit=-1)
    # The official load() runs one forward pass with the backbone in training mode (its feature
    # dimension probe), which moves the BatchNorm running statistics; restore the clean weights.
    wrn.load_state_dict(clean)
    off.logger = types.SimpleNamespace(logger=types.SimpleNamespace(
        add_scalar=lambda *a, **k: None), step=lambda: None, g_iter=0)
    off.c2 = ours.centres.vectors.to(device)
    off.c1 = off.c2
    state = {"discriminator": off.discriminator.state_dict(),
             "pre_projection": off.pre_projection.state_dict(), "center": off.c2.cpu()}
    twin = load_official_cras(state, backbone=ours.backbone.name, weights="random", seed=seed,
                              categories=ours.classes, device=device, image_score="patch")
    return off, twin


def official_train_step(off, x, names):
    batch = [{"image": x, "image_path": [f"/d/{n}/train/good/{i}.png" for i, n in
                                         enumerate(names)]}]
    off.class_names = sorted(set(names))
    bar = types.SimpleNamespace(set_description_str=lambda *a, **k: None)
    off._train_discriminator(batch, 0, bar, "")


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--train-repeats", type=int, default=None,
                        help="repeats for the batch-32 step (default: --repeats)")
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--official", type=Path, default=None,
                        help="an extracted checkout of github.com/cqylunlun/CRAS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from detectors import create_detector

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads"))
    ours = create_detector("cras", backbone="wide_resnet50_2", weights="random", seed=args.seed,
                           device=device)
    biggest = max([*args.train_batches, args.infer_batch])
    free = images(biggest, "MT_Free")
    ours.compute_centres(free[:8], ["MT_Free"] * 8, ["MT_Free"], 8, progress=False)
    x_all = batch_of(ours, free)

    off = twin = None
    if args.official is not None:
        off, twin = build_official(args.official, ours, device, args.seed)
        ours = twin  # same weights on both sides from here on

    rows: list[tuple[str, str, float, float]] = []

    def record(label, who, times, peaks, per=None):
        med = statistics.median(times)
        rows.append((label, who, med, statistics.median(peaks) / 2 ** 20))
        extra = f"  ({per / med:.2f} img/s)" if per else ""
        print(f"{label:<28} {who:<9} median {med:8.3f} s  peak +{rows[-1][3]:8.0f} MiB{extra}"
              f"  [{', '.join(f'{t:.2f}' for t in times)}]", flush=True)

    # -------------------------------------------------------------- inference (+ equality)
    xb = x_all[:args.infer_batch]
    if off is not None:
        with torch.no_grad():
            classes, _ = ours.match(ours.adapter(ours.features(ours.input_tensor(xb))))
        print(f"matched classes in the comparison batch: {sorted(set(classes.tolist()))}")
        off_scores, off_maps = off._predict(xb)
        with ours.autocast():
            our_scores, our_maps = ours.predict_batch(ours.input_tensor(xb))
        with torch.no_grad():
            feats_off = off._embed(xb.to(device), evaluation=True)[0]
            feats_ours = ours.features(ours.input_tensor(xb)).reshape(-1, 1536)
            patches_ours = ours.patch_scores(ours.input_tensor(xb))
        score_diff = np.abs(np.asarray(off_scores).reshape(-1)
                            - our_scores.float().cpu().numpy()).max()
        map_diff = np.abs(np.stack(off_maps) - our_maps.float().cpu().numpy()).max()
        feat_diff = (feats_off - feats_ours).abs().max().item()
        print(f"max |diff| features {feat_diff:.3g}, image scores (max patch score) "
              f"{score_diff:.3g}, maps {map_diff:.3g}  (patch scores range "
              f"{patches_ours.min().item():.3f}..{patches_ours.max().item():.3f})")

    ours_t, ours_m, off_t, off_m = [], [], [], []
    for _ in range(args.repeats + 1):
        t, m = timed(lambda: ours.predict_batch(ours.input_tensor(xb)), device)
        ours_t.append(t), ours_m.append(m)
        if off is not None:
            t, m = timed(lambda: off._predict(xb), device)
            off_t.append(t), off_m.append(m)
    label = f"inference batch {args.infer_batch} (maps)"
    record(label, "ours", ours_t[1:], ours_m[1:], per=args.infer_batch)
    if off is not None:
        record(label, "official", off_t[1:], off_m[1:], per=args.infer_batch)

    paths = free[:args.infer_batch]
    times = []
    for _ in range(args.repeats + 1):
        times.append(timed(lambda: ours.predict(paths, batch_size=args.infer_batch), device)[0])
    record(f"predict() {args.infer_batch} JPEG files", "ours", times[1:], [0.0],
           per=args.infer_batch)

    # --------------------------------------------------------------------------- training
    o = ours.options
    optimizers = [torch.optim.AdamW(ours.adapter.parameters(), lr=o["adapter_lr"],
                                    weight_decay=o["adapter_weight_decay"]),
                  torch.optim.Adam(ours.discriminator.parameters(), lr=o["discriminator_lr"],
                                   weight_decay=o["discriminator_weight_decay"])]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for size in args.train_batches:
        xt = x_all[:size]
        names = ["MT_Free"] * size
        repeats = args.train_repeats if (args.train_repeats and size > 8) else args.repeats
        ours_t, ours_m, off_t, off_m = [], [], [], []
        ours.adapter.train(), ours.discriminator.train()
        for _ in range(repeats + 1):
            t, m = timed(lambda xt=xt: ours.train_step(xt, optimizers, generator), device)
            ours_t.append(t), ours_m.append(m)
            if off is not None:
                t, m = timed(lambda xt=xt, names=names: official_train_step(off, xt, names),
                             device)
                off_t.append(t), off_m.append(m)
        record(f"train step batch {size}", "ours", ours_t[1:], ours_m[1:])
        if off is not None:
            record(f"train step batch {size}", "official", off_t[1:], off_m[1:])

    if off is not None:
        print("\nspeed ratio (official time / ours):")
        for label in dict.fromkeys(r[0] for r in rows):
            pair = {who: t for lab, who, t, _ in rows if lab == label}
            if "official" in pair:
                print(f"  {label:<28} {pair['official'] / pair['ours']:.2f}x")


if __name__ == "__main__":
    main()
