"""StableAdamW: AdamW whose step is shrunk, per tensor, when its RMS exceeds a threshold.

What Dinomaly trains with (Wortsman et al. 2023, "Stable and low-precision training for
large-scale vision-language models"; the Dinomaly repository's `optimizers/StableAdamW.py`).
For every parameter tensor, in this order:

1. decoupled weight decay: ``p ← p · (1 − lr · wd)``;
2. Adam moments: ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) g²``; with AMSGrad the
   denominator uses ``v̂ = max(v̂, v)`` instead of ``v``;
3. ``denom = sqrt(v or v̂) / sqrt(1 − β2^t) + eps``;
4. the update-RMS clip: ``s = max(1, rms(g / denom) / clip_threshold)`` where
   ``rms(x) = ‖x‖₂ / sqrt(numel)``;
5. ``p ← p − lr / (1 − β1^t) / s · m / denom``.

On a GPU nothing here synchronises with the host (the clip factor stays a tensor).
"""

from __future__ import annotations

import math

import torch


class StableAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 clip_threshold: float = 1.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError("StableAdamW: lr, eps, weight_decay must be ≥ 0, clip_threshold > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"StableAdamW: betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                p.mul_(1.0 - lr * wd)
                state["step"] += 1
                step = state["step"]
                correction1 = 1.0 - beta1 ** step
                correction2 = 1.0 - beta2 ** step
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                  out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(correction2)).add_(eps)
                rms = (grad / denom).norm(2) / math.sqrt(grad.numel())
                if p.device.type == "cpu":  # a scalar costs nothing here: one fused update
                    scale = max(1.0, float(rms) / group["clip_threshold"])
                    p.addcdiv_(exp_avg, denom, value=-(lr / correction1) / scale)
                else:  # no host sync: the clip factor stays on the device
                    scale = torch.clamp(rms / group["clip_threshold"], min=1.0)
                    p.add_(exp_avg / denom * (-(lr / correction1) / scale))
        return loss
