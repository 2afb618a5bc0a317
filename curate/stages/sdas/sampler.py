"""The SDAS sampler: respaced reverse diffusion with a per-image strength and seed.

RealNet's strength-controllable diffusion anomaly synthesis changes only the variance of each
reverse step: ``x_{t-1} ~ N(mu_theta(x_t, t), (1 + s) Sigma_theta(x_t, t))``, with no noise at
the last step, so ``s = 0`` is ordinary ancestral sampling. The DDIM variant adds
``N(0, s Sigma_theta)`` to the deterministic DDIM (eta = 0) update.

- The schedule is respaced to K steps the way guided-diffusion does it
  (:func:`space_timesteps`): the respaced betas come from the base ``alphas_cumprod`` at the
  kept timesteps, and the model is called with the original timestep. ``spacing='ddim'`` keeps
  ``0, T/K, 2T/K, …`` (RealNet's ``section_counts: ddim20``; for K dividing T this is also
  diffusers' ``"leading"`` spacing); ``spacing='even'`` keeps K rounded, evenly spaced steps
  from 0 to T − 1 (guided-diffusion's plain integer sections).
- Learned-range variance: the model's second half of channels ``v ∈ [−1, 1]`` interpolates the
  log variance between the posterior variance (clipped at the first step) and beta.
- Every image has its own ``torch.Generator`` (on the CPU, so a seed gives the same noise on
  any device) for its starting noise and each step's noise, and its own strength: an image
  depends on its seed and strength only, never on the other images of its batch (up to the
  arithmetic of batched kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from curate.stages.sdas.models import DEFAULT_SCHEDULE, predict

METHODS = ("ddpm", "ddim")
SPACINGS = ("ddim", "even")
#: Strength ranges: the paper's U(0.1, 0.2) for ancestral sampling; RealNet's sample.py
#: suggests s in [0.01, 0.03] for DDIM.
DEFAULT_STRENGTH = {"ddpm": (0.1, 0.2), "ddim": (0.01, 0.03)}


def base_betas(schedule: dict | None = None) -> np.ndarray:
    """The base betas (float64) of a schedule dict like :data:`DEFAULT_SCHEDULE`."""
    s = {**DEFAULT_SCHEDULE, **(schedule or {})}
    if s["beta_schedule"] != "linear":
        raise ValueError(f"only the linear beta schedule is supported, got {s['beta_schedule']!r}")
    return np.linspace(s["beta_start"], s["beta_end"], s["num_train_timesteps"], dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "ddim") -> list[int]:
    """The original timesteps kept when respacing ``num_timesteps`` to ``steps`` (ascending)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if spacing == "ddim":
        for stride in range(1, num_timesteps + 1):
            kept = list(range(0, num_timesteps, stride))
            if len(kept) == steps:
                return kept
        raise ValueError(f"no integer stride gives exactly {steps} of {num_timesteps} steps "
                         "with spacing 'ddim'; use spacing 'even'")
    if spacing == "even":
        if steps == 1:
            return [0]
        frac = (num_timesteps - 1) / (steps - 1)
        return sorted({round(i * frac) for i in range(steps)})
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


@dataclass(frozen=True)
class RespacedSchedule:
    """Per respaced step i (ascending): original timestep and the diffusion coefficients."""

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    betas: np.ndarray
    posterior_log_variance: np.ndarray  # clipped: step 0 uses step 1's value (it is 0)

    @classmethod
    def build(cls, betas: np.ndarray, steps: int, spacing: str = "ddim") -> RespacedSchedule:
        acp_base = np.cumprod(1.0 - betas)
        kept = space_timesteps(len(betas), steps, spacing)
        acp = acp_base[kept]
        acp_prev = np.append(1.0, acp[:-1])
        new_betas = 1.0 - acp / acp_prev
        post_var = new_betas * (1.0 - acp_prev) / (1.0 - acp)
        post_log = np.log(np.append(post_var[1], post_var[1:]) if len(post_var) > 1
                          else new_betas)
        return cls(np.asarray(kept, dtype=np.int64), acp, acp_prev, new_betas, post_log)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def _per_image_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...],
                     device: torch.device) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def sample(model: torch.nn.Module, schedule: RespacedSchedule, seeds: Sequence[int],
           strengths: Sequence[float], *, shape: tuple[int, int, int], method: str = "ddpm",
           labels: torch.Tensor | None = None, clip_denoised: bool = True,
           autocast: torch.dtype | None = None,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """SDAS samples, one per seed, as a float32 [B, C, H, W] tensor in [-1, 1] on the CPU.

    ``strengths[i]`` is image i's s; ``method`` is 'ddpm' (ancestral, (1 + s) Sigma) or 'ddim'
    (eta = 0 plus s Sigma). ``autocast`` runs the model in that dtype (bf16 / fp16 on a GPU);
    the update itself is always float32.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(seeds) != len(strengths):
        raise ValueError("one strength per seed")
    device = next(model.parameters()).device
    channels = shape[0]
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    x = _per_image_noise(gens, shape, device)
    s = torch.tensor(list(strengths), dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    noise_scale = torch.sqrt(1.0 + s) if method == "ddpm" else torch.sqrt(s)
    batch = len(seeds)
    for i in reversed(range(schedule.steps)):
        t = torch.full((batch,), int(schedule.timesteps[i]), device=device, dtype=torch.long)
        if autocast is None:  # entering even a disabled autocast costs seconds the first time
            out = predict(model, x, t, labels)
        else:
            with torch.autocast(device.type, dtype=autocast):
                out = predict(model, x, t, labels)
        out = out.float()
        eps, v = out[:, :channels], out[:, channels:]
        acp, acp_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        x0 = (x - (1.0 - acp) ** 0.5 * eps) / acp ** 0.5
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if method == "ddpm":
            beta = float(schedule.betas[i])
            mean = (acp_prev ** 0.5 * beta / (1.0 - acp)) * x0 + \
                ((1.0 - beta) ** 0.5 * (1.0 - acp_prev) / (1.0 - acp)) * x
        else:
            eps = (x - acp ** 0.5 * x0) / (1.0 - acp) ** 0.5  # re-derived from the clipped x0
            mean = acp_prev ** 0.5 * x0 + (1.0 - acp_prev) ** 0.5 * eps
        if i > 0:
            frac = (v + 1.0) / 2.0
            log_var = frac * float(np.log(schedule.betas[i])) + \
                (1.0 - frac) * float(schedule.posterior_log_variance[i])
            z = _per_image_noise(gens, shape, device)
            x = mean + noise_scale * torch.exp(0.5 * log_var) * z
        else:
            x = mean
        if on_step is not None:
            on_step(schedule.steps - i)
    return x.cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C] (RealNet's rounding: truncation of
    (x + 1) * 127.5 after clipping)."""
    arr = ((images.float().clamp(-1, 1) + 1.0) * 127.5).permute(0, 2, 3, 1).numpy()
    return np.clip(arr, 0, 255).astype(np.uint8)
