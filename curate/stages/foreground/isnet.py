"""IS-Net (DIS, Qin et al., ECCV 2022): the foreground probability of a whole image.

IS-Net is a U-Net whose stages are themselves small U-Nets ("residual U-blocks", RSU): a
strided 3x3 convolution halves the image, six encoder stages (RSU7, RSU6, RSU5, RSU4 and two
RSU4F, which dilate instead of pooling) go down to 1/64, five decoder stages come back up, and
a 3x3 side convolution on each decoder level (and on the deepest encoder stage) gives a map that
is upsampled to the input size and passed through a sigmoid. Inference uses the first, finest
side map. :class:`ISNetDIS` has exactly the state-dict layout (names, shapes, order) of the
official ``ISNetDIS(in_ch=3, out_ch=1)``, so the released ``isnet-general-use.pth`` loads with
``strict=True``; its forward returns the official pair ``(side maps, decoder features)``.

Preprocessing follows the official inference script: RGB resized bilinearly to 1024x1024,
rounded down to whole grey levels (the official script casts the resized image back to uint8),
divided by 255 and normalised with mean 0.5 and std 1.0 per channel. Grey images are repeated
to three channels (the official script fails on them).

The official script then min-max normalises each output map. We do not: that stretches any map
to the full [0, 1] range, so a blank image gets as "confident" a foreground as a real object.
:func:`foreground_probability` returns the absolute sigmoid probability, which the caller
thresholds, and :func:`confidence` says how decided a map is.

The weights are not shipped with curate and never downloaded by it: the user downloads
``isnet-general-use.pth`` from the release of the DIS repository (github.com/xuebinqin/DIS)
and passes its path to :func:`load_isnet`, which reads it with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curate.core.errors import CurateError

#: How many offending keys a "does not fit" message lists per kind.
_SHOWN_KEYS = 5


def _resize_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # The official code uses F.upsample(mode="bilinear"), i.e. align_corners=False; at an equal
    # size that is the identity, so it is skipped.
    if x.shape[2:] == ref.shape[2:]:
        return x
    return F.interpolate(x, size=ref.shape[2:], mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    # ceil_mode keeps odd sizes' last row and column, as in the official code.
    return F.max_pool2d(x, 2, stride=2, ceil_mode=True)


class ConvBNReLU(nn.Module):
    """3x3 convolution (padding = dilation, so the size is kept), batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1):
        super().__init__()
        # Attribute names are the official ones: they are the checkpoint's keys.
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of ``height`` levels: the official RSU7 ... RSU4 and RSU4F in one class.

    Levels 1 .. height-1 are encoder convolutions and level ``height`` the dilated bottom; the
    decoder runs back from level height-1 to 1, each on the concatenation of the level below and
    the encoder skip. Plain blocks max-pool after levels 1 .. height-2 and dilate only the bottom
    (by 2); ``dilated`` blocks (RSU4F) never pool and dilate level k by 2**(k-1), in the decoder
    too. The output is added to the input convolution's (the residual).
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False):
        super().__init__()
        self.height = height
        self.dilated = dilated
        levels = range(1, height + 1)
        dilation = {k: 2 ** (k - 1) if dilated else (2 if k == height else 1) for k in levels}
        # Registration order is state_dict() order: in, 1 .. height, (height-1)d .. 1d.
        self.rebnconvin = ConvBNReLU(in_ch, out_ch)
        for k in levels:
            self.add_module(f"rebnconv{k}", ConvBNReLU(out_ch if k == 1 else mid_ch, mid_ch,
                                                       dilation[k]))
        for k in reversed(range(1, height)):
            self.add_module(f"rebnconv{k}d", ConvBNReLU(2 * mid_ch, out_ch if k == 1 else mid_ch,
                                                        dilation[k]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = []
        hx = hxin
        for k in range(1, self.height):
            hx = getattr(self, f"rebnconv{k}")(hx)
            skips.append(hx)
            if not self.dilated and k < self.height - 1:
                hx = _pool(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)
        for k in reversed(range(1, self.height)):
            skip = skips[k - 1]
            hx = getattr(self, f"rebnconv{k}d")(torch.cat((_resize_like(hx, skip), skip), 1))
        return hx + hxin


class ISNetDIS(nn.Module):
    """The IS-Net segmentation network, state-dict compatible with the official ``ISNetDIS``."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1):
        super().__init__()
        # The official class also defines an unused `pool_in`; having no parameters, it leaves
        # no trace in the state dict, so it is left out.
        self.conv_in = nn.Conv2d(in_ch, 64, 3, stride=2, padding=1)
        self.stage1 = RSU(7, 64, 32, 64)
        self.stage2 = RSU(6, 64, 32, 128)
        self.stage3 = RSU(5, 128, 64, 256)
        self.stage4 = RSU(4, 256, 128, 512)
        self.stage5 = RSU(4, 512, 256, 512, dilated=True)
        self.stage6 = RSU(4, 512, 256, 512, dilated=True)
        self.stage5d = RSU(4, 1024, 256, 512, dilated=True)
        self.stage4d = RSU(4, 1024, 128, 256)
        self.stage3d = RSU(5, 512, 64, 128)
        self.stage2d = RSU(6, 256, 32, 64)
        self.stage1d = RSU(7, 128, 16, 64)
        for i, ch in enumerate((64, 64, 128, 256, 512, 512), start=1):
            self.add_module(f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``([sigmoid side maps 1..6, each N x out_ch x H x W], [decoder features])``.

        The features are the official ``[hx1d, hx2d, hx3d, hx4d, hx5d, hx6]`` (used in training
        by the official feature-consistency loss); inference needs only the first side map.
        """
        encoded = []
        hx = self.conv_in(x)
        for i in range(1, 7):
            if i > 1:
                hx = _pool(hx)
            hx = getattr(self, f"stage{i}")(hx)
            encoded.append(hx)
        decoded = [hx]  # the deepest stage is also the coarsest "decoder" feature
        for i in range(5, 0, -1):
            skip = encoded[i - 1]
            hx = getattr(self, f"stage{i}d")(torch.cat((_resize_like(hx, skip), skip), 1))
            decoded.insert(0, hx)
        sides = [
            torch.sigmoid(_resize_like(getattr(self, f"side{i}")(feat), x))
            for i, feat in enumerate(decoded, start=1)
        ]
        return sides, decoded


def _fit_problems(state: Mapping[str, object], model: nn.Module) -> list[str]:
    """Why ``state`` would not load into ``model`` with strict=True (a few keys of each kind)."""
    expected = model.state_dict()
    # strict=True fills in a missing BatchNorm step counter (checkpoints older than PyTorch
    # 0.4.1 lack it), so its absence is no misfit.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} "
        f"(expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected
        and not (isinstance(v, torch.Tensor) and v.shape == expected[k].shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOWN_KEYS])}{more}")
    return problems


def _load_failure(exc: Exception) -> str:
    """One clause for why torch.load(weights_only=True) failed, without torch's long advice."""
    text = str(exc)
    lines = text.splitlines()
    if text.startswith("Weights only load failed"):
        # The culprit is on the line naming a GLOBAL, e.g. "Trying to load unsupported GLOBAL
        # posix.mkdir whose module posix is blocked." (its wording varies between causes).
        culprit = next((line.split("error:")[-1].split(". ")[0].strip(" .")
                        for line in lines if "GLOBAL" in line), "")
        return ("refused: the checkpoint pickles objects other than tensors and plain "
                "containers, which a weights-only load does not run"
                + (f" ({culprit})" if culprit else ""))
    first = lines[0].split(". ")[0].strip() if lines else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"not a readable PyTorch checkpoint ({reason})"


def load_isnet(path: str | Path) -> ISNetDIS:
    """Load IS-Net weights (e.g. ``isnet-general-use.pth``) on the CPU, in eval mode.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``,
    with or without the ``module.`` prefix of a DataParallel copy. The file is read with
    ``weights_only=True``: a checkpoint that pickles anything but tensors and plain containers
    is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CurateError(
            f"{path}: IS-Net weights not found; download isnet-general-use.pth from the release "
            "of the DIS repository (github.com/xuebinqin/DIS) and pass its path."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # A file that is not a checkpoint fails in many ways (UnpicklingError, RuntimeError from the
    # zip reader, KeyError or EOFError from the legacy format): all mean "not loadable".
    except Exception as exc:
        raise CurateError(f"{path}: {_load_failure(exc)}") from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise CurateError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in obj.items()}

    model = ISNetDIS()
    problems = _fit_problems(state, model)
    if problems:
        raise CurateError(f"{path}: does not fit IS-Net (ISNetDIS(3, 1)): {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def foreground_probability(model: ISNetDIS, image: np.ndarray, size: int = 1024,
                           device: str | torch.device = "cpu") -> np.ndarray:
    """Per-pixel foreground probability of an H x W (grey) or H x W x 3 (RGB) uint8 image.

    Returns float32 H x W in [0, 1]: side map 1, resized back to the image, without the official
    per-image min-max stretch (see the module docstring). ``model`` must be in eval mode and on
    ``device``; ``size`` is the square the network sees (1024 as in the official pipeline).
    """
    if model.training:
        raise ValueError("model is in training mode (batch norm would use this image's "
                         "statistics); call model.eval()")
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an H x W or H x W x 3 uint8 image, got {image.dtype} "
                         f"{image.shape}")
    height, width = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).float()
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # The official script casts the resized image to uint8 (rounding down) before dividing.
    x = x.floor() / 255.0 - 0.5
    x = x.expand(-1, 3, -1, -1)  # grey -> 3 channels; a no-op for RGB
    with torch.inference_mode():
        side1 = model(x)[0][0]
        prob = F.interpolate(side1, size=(height, width), mode="bilinear", align_corners=False)
    return prob[0, 0].float().cpu().numpy()


def confidence(prob: np.ndarray, threshold: float = 0.5) -> float:
    """How decided a probability map is, in [0, 1]: 0 if every pixel sits on the threshold.

    Each pixel scores its distance from ``threshold`` as a fraction of the room on its side,
    ``(p - t) / (1 - t)`` above and ``(t - p) / t`` below, so a pixel at exactly 0 or 1 scores
    1; the confidence is the mean over pixels. At t = 0.5 this is the mean of ``|2p - 1|``. A
    map of hesitant pixels (p near t) scores low, whichever side of t they fall on; a map of
    near-0 and near-1 pixels scores high. Pixels count equally, so a small uncertain object on
    a clear background still scores high: it measures the whole map, not the object.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    p = np.asarray(prob, dtype=np.float64)
    if p.size == 0:
        raise ValueError("confidence of an empty map")
    score = np.where(p >= threshold, (p - threshold) / (1.0 - threshold),
                     (threshold - p) / threshold)
    return float(score.mean())
