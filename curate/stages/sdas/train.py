"""Training a diffusion model on a category's normal images (``curate sdas train``).

The objective is guided-diffusion's for a learned-range variance (Nichol & Dhariwal's hybrid
loss, as RealNet trains its ADM): the epsilon MSE plus the variational bound term, computed
with the predicted mean frozen so that it trains only the variance; uniform timesteps over the
T = 1000 linear-beta schedule. Adam (lr 1e-4, as RealNet), gradient norm clipped at 1, an EMA of
the weights (decay 0.9999, as RealNet) is what sampling uses; bf16 autocast on a GPU.

Everything random in step k (which images, which timesteps, which noise) comes from a generator
seeded by (seed, k), so a run resumed from its last checkpoint continues exactly as an
uninterrupted run would. A checkpoint is committed by writing ``state.json`` last; the weight
files it names carry the step in their names, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from curate.core.errors import CurateError
from curate.core.files import atomic_write_bytes, atomic_write_text
from curate.stages.sdas.models import (
    DEFAULT_SCHEDULE,
    build_model,
    predict,
    preset,
    write_model_json,
)
from curate.stages.sdas.sampler import base_betas


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "unet2d"
    image_size: int = 256
    steps: int = 100_000
    batch_size: int = 8
    lr: float = 1e-4
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    save_every: int = 1000
    seed: int = 0
    device: str = "cpu"

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (all but the length and
        the device)."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "device")}


def prepare_images(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 images (grey or RGB(A), any size) -> float [N, 3, size, size] in [-1, 1]."""
    out = []
    for img in images:
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        img = cv2.resize(img[..., :3], (size, size), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) +
                  (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_nll(x, mean, log_scale):
    """−log p(x) of 8-bit data (x in [−1, 1]) under a Gaussian discretised to bins of 2/255."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centred + 1.0 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (centred - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


class HybridLoss:
    """L_simple + L_vb for a model that outputs [epsilon | v] (learned-range variance)."""

    def __init__(self, schedule: dict[str, Any], device: torch.device):
        betas = base_betas(schedule)
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)

        def t32(a):
            return torch.tensor(a, dtype=torch.float32, device=device)

        self.num_timesteps = len(betas)
        self.sqrt_acp, self.sqrt_1m_acp = t32(np.sqrt(acp)), t32(np.sqrt(1.0 - acp))
        self.coef1 = t32(betas * np.sqrt(acp_prev) / (1.0 - acp))
        self.coef2 = t32((1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp))
        self.post_log_var = t32(np.log(np.append(post_var[1], post_var[1:])))
        self.log_betas = t32(np.log(betas))

    def __call__(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        def at(a):
            return a[t].view(-1, 1, 1, 1)

        c = x0.shape[1]
        eps, v = out[:, :c].float(), out[:, c:].float()
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # The bound trains the variance only: the mean comes from the frozen epsilon.
        x0_pred = (xt - at(self.sqrt_1m_acp) * eps.detach()) / at(self.sqrt_acp)
        mean = at(self.coef1) * x0_pred + at(self.coef2) * xt
        frac = (v + 1.0) / 2.0
        log_var = frac * at(self.log_betas) + (1.0 - frac) * at(self.post_log_var)
        true_mean = at(self.coef1) * x0 + at(self.coef2) * xt
        kl = _normal_kl(true_mean, at(self.post_log_var), mean, log_var).mean(dim=(1, 2, 3))
        nll = _discretized_nll(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (mse + vb).mean()


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainResult:
    out: Path
    step: int
    resumed_from: int
    losses: list[float]


def train(images: Sequence[np.ndarray], out: str | Path, config: TrainConfig, *,
          info: dict[str, Any] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume training) into folder ``out`` until ``config.steps`` steps are done.

    ``info`` goes into ``model.json`` (what the model was trained on); ``on_step(step, loss)``
    is called after every step (the CLI's progress bar).
    """
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not images:
        raise CurateError("no images to train on")
    device = torch.device(config.device)
    arch, arch_config = preset(config.preset)
    torch.manual_seed(config.seed)  # the initial weights
    model = build_model(arch, arch_config, config.image_size).to(device)
    ema = build_model(arch, arch_config, config.image_size).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0.0)
    state_path = out / "state.json"
    step, losses = 0, []
    if state_path.is_file():
        state = json.loads(state_path.read_text("utf-8"))
        if state["config"] != config.identity():
            raise CurateError(f"{out} holds a training run with other settings "
                              f"({state['config']}); choose another --out")
        model.load_state_dict(load_file(out / state["files"]["model"], device=str(device)))
        ema.load_state_dict(load_file(out / state["files"]["ema"], device=str(device)))
        optimizer.load_state_dict(torch.load(out / state["files"]["optimizer"],
                                             map_location=device, weights_only=True))
        step, losses = state["step"], state["losses"]
    resumed_from = step
    write_model_json(out, arch, arch_config, config.image_size, {"trained_on": info or {}})
    data = prepare_images(images, config.image_size)
    loss_fn = HybridLoss(DEFAULT_SCHEDULE, device)
    autocast = device.type == "cuda"
    model.train()
    while step < config.steps:
        gen = _step_generator(config.seed, step)
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        t = torch.randint(loss_fn.num_timesteps, (config.batch_size,), generator=gen)
        noise = torch.randn((config.batch_size, *data.shape[1:]), generator=gen)
        x0, t, noise = data[idx].to(device), t.to(device), noise.to(device)
        xt = loss_fn.sqrt_acp[t].view(-1, 1, 1, 1) * x0 + \
            loss_fn.sqrt_1m_acp[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            output = predict(model, xt, t)
        loss = loss_fn(output, x0, xt, t, noise)
        if not torch.isfinite(loss):
            raise CurateError(f"training diverged at step {step} (loss {loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1.0 - config.ema_decay)
        step += 1
        losses.append(round(loss.item(), 6))
        if on_step is not None:
            on_step(step, losses[-1])
        if step % config.save_every == 0 or step == config.steps:
            _save(out, step, model, ema, optimizer, config, losses, save_file)
    return TrainResult(out, step, resumed_from, losses)


def _save(out: Path, step: int, model, ema, optimizer, config: TrainConfig, losses, save_file):
    import io

    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    files = {"model": f"checkpoints/model-{step:08d}.safetensors",
             "ema": f"checkpoints/ema-{step:08d}.safetensors",
             "optimizer": f"checkpoints/optimizer-{step:08d}.pt"}
    ema_state = {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
    for name, module in (("model", model), ("ema", ema)):
        tmp = out / f"{files[name]}.tmp"
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(tmp))
        tmp.replace(out / files[name])
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    atomic_write_bytes(out / files["optimizer"], buf.getvalue())
    tmp = out / "ema.safetensors.tmp"
    save_file(ema_state, str(tmp), metadata={"step": str(step)})
    tmp.replace(out / "ema.safetensors")
    atomic_write_text(out / "state.json", json.dumps(
        {"step": step, "files": files, "config": config.identity(), "losses": losses},
        indent=1, sort_keys=True) + "\n")
    keep = set(files.values())
    for old in ckpt.iterdir():
        if f"checkpoints/{old.name}" not in keep:
            old.unlink()
