"""What every bundled detector shares: construction, image geometry, batching, save/load.

A detector is built by `create_detector(name, backbone=…, weights=…, seed=…, **options)`, trained
with `fit(images, categories=None)` (normal images only; paths or H×W×3 uint8 RGB arrays) and
applied with `predict(images) → Prediction(scores, maps)`, each map at its input image's size.

Training keeps the last state only: nothing here looks at test data, so no checkpoint can be
selected on it (two official repositories do that; see docs/methods.md).

`save(path)` writes one safetensors file: the learned tensors, plus a JSON header with the
detector's name and options, the backbone's name and the sha256 of its weight file, the seed and
the iterations trained. `Detector.load(path)` rebuilds the detector, refuses a backbone whose
weights hash differs from the recorded one, and loads the tensors with strict key checking.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, build_backbone
from .data import read_image
from .errors import DetectorConfigError

FORMAT = "curate-detector/1"
ImageLike = str | Path | np.ndarray


@dataclass
class Prediction:
    scores: np.ndarray  # (N,) float32, higher = more anomalous
    maps: list[np.ndarray]  # N maps, each H×W float32 at its input image's size


@dataclass(frozen=True)
class Geometry:
    """How an image becomes the network's input: resize, then centre crop.

    `resize` is (height, width) for a square-style resize, or an int for "shorter side to this
    length" (torchvision's Resize(int)). The crop is torchvision's centre crop.
    """

    resize: int | tuple[int, int]
    crop: int

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.resize, int):
            if height <= width:
                return self.resize, int(self.resize * width / height)
            return int(self.resize * height / width), self.resize
        resized_height, resized_width = self.resize
        return resized_height, resized_width

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        rh, rw = self.resized_size(height, width)
        top = int(round((rh - self.crop) / 2.0))
        left = int(round((rw - self.crop) / 2.0))
        return top, left, rh, rw

    def to_input(self, image: np.ndarray) -> torch.Tensor:
        """H×W×3 uint8 RGB → 3×crop×crop float, ImageNet-normalised."""
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        height, width = image.shape[:2]
        top, left, rh, rw = self.crop_box(height, width)
        if (rh, rw) != (height, width):
            tensor = F.interpolate(tensor[None], size=(rh, rw), mode="bilinear",
                                   align_corners=False, antialias=True)[0]
        if top < 0 or left < 0:
            raise ValueError(f"image of {width}×{height} resizes to {rw}×{rh}, smaller than the "
                             f"{self.crop}-pixel crop")
        tensor = tensor[:, top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (tensor - mean) / std

    def to_image(self, amap: torch.Tensor, height: int, width: int) -> np.ndarray:
        """A map over the crop (any resolution) → a map over the whole H×W input image.

        The crop's map is resized to the crop, its border replicated over the strip the crop cut
        off (those pixels were never seen), and the result resized to the input's size.
        """
        top, left, rh, rw = self.crop_box(height, width)
        amap = amap.float().reshape(1, 1, *amap.shape[-2:])
        if amap.shape[-2:] != (self.crop, self.crop):
            amap = F.interpolate(amap, size=(self.crop, self.crop), mode="bilinear",
                                 align_corners=False)
        pad = (left, rw - left - self.crop, top, rh - top - self.crop)
        if any(pad):
            amap = F.pad(amap, pad, mode="replicate")
        if (rh, rw) != (height, width):
            amap = F.interpolate(amap, size=(height, width), mode="bilinear", align_corners=False)
        return amap[0, 0].cpu().numpy().astype(np.float32)


def _as_array(image: ImageLike) -> np.ndarray:
    return read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)


class _Inputs(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[ImageLike], geometry: Geometry):
        self.images, self.geometry = images, geometry

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.geometry.to_input(_as_array(self.images[index])), index


def _check_option_type(detector: str, key: str, value: Any, default: Any) -> None:
    """An option given by the user has its default's JSON type (an integer also does for a
    number), so that ``--option crop=abc`` is named here, not found deep in the model."""
    if default is None:
        return
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, list | tuple):
        ok, expected = isinstance(value, list | tuple), "a list"
    else:
        return
    if not ok:
        raise DetectorConfigError(f"{detector}: option {key} must be {expected} (like its "
                                  f"default {json.dumps(default)}), not {value!r}")


class Detector(ABC):
    """Base class of the bundled detectors; subclasses fill in the model."""

    name: ClassVar[str]
    default_backbone: ClassVar[str]
    backbones: ClassVar[tuple[str, ...]]  # names this detector accepts
    defaults: ClassVar[dict[str, Any]]  # every option and its default (JSON values)

    def __init__(self, backbone: str | None = None, weights=None, *, seed: int = 0,
                 device: str | torch.device | None = None, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise DetectorConfigError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                                      f"known: {', '.join(sorted(self.defaults))}")
        for key, value in options.items():
            _check_option_type(self.name, key, value, self.defaults[key])
        self.options = {**self.defaults, **options}
        backbone = backbone or self.default_backbone
        if backbone not in self.backbones:
            raise DetectorConfigError(f"{self.name} runs on {', '.join(self.backbones)}, not {backbone!r}")
        self.seed = int(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone: Backbone = build_backbone(backbone, weights, seed=self.seed,
                                                 **self.backbone_options())
        self.iterations_done = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.build()
        self.to(self.device)

    # ---------------------------------------------------------------- for subclasses

    def backbone_options(self) -> dict[str, Any]:
        """Extra keyword arguments for build_backbone (e.g. Dinomaly's position interpolation)."""
        return {}

    @property
    @abstractmethod
    def geometry(self) -> Geometry: ...

    @abstractmethod
    def build(self) -> None:
        """Create the learned modules (the RNG is already seeded)."""

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """The learned modules by name; their state dicts are what `save` writes."""

    @abstractmethod
    def fit(self, images: Sequence[ImageLike], categories: Sequence[str] | None = None, *,
            iterations: int | None = None, batch_size: int | None = None,
            progress: bool = True) -> list[float]:
        """Train on normal images; returns the loss of every iteration."""

    @abstractmethod
    def predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, crop, crop) normalised input → (scores (B,), maps (B, h, w) over the crop)."""

    # ---------------------------------------------------------------------- common

    def to(self, device) -> Detector:
        self.device = torch.device(device)
        self.backbone.module.to(self.device)
        for module in self.modules().values():
            module.to(self.device)
        if self.device.type == "cuda":
            self.backbone.module.to(memory_format=torch.channels_last)
        return self

    def autocast(self):
        """bf16 autocast on a GPU; full precision on a CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loader(self, images: Sequence[ImageLike], batch_size: int, *, shuffle: bool,
               seed: int | None = None, workers: int = 0) -> torch.utils.data.DataLoader:
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return torch.utils.data.DataLoader(
            _Inputs(images, self.geometry), batch_size=batch_size, shuffle=shuffle,
            generator=generator, num_workers=workers, drop_last=False,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )

    def endless(self, images: Sequence[ImageLike], batch_size: int, *,
                workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Seeded shuffled batches for ever (iteration-based training): epoch e uses seed+e."""
        epoch = 0
        while True:
            yield from self.loader(images, batch_size, shuffle=True, seed=self.seed + epoch,
                                   workers=workers)
            epoch += 1

    def input_tensor(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def progress(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)

    def train_loop(self, total: int, step, progress: bool) -> list[float]:
        """Run ``step(i) -> loss`` for i in 0..total-1 with a progress bar showing the loss,
        counting ``iterations_done``; returns the losses (the shared loop of every ``fit``)."""
        losses: list[float] = []
        bar = self.progress(total, f"{self.name} fit", progress)
        for i in range(total):
            loss = float(step(i))
            losses.append(loss)
            self.iterations_done += 1
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
        bar.close()
        return losses

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike], *, batch_size: int = 8,
                progress: bool = False) -> Prediction:
        for module in self.modules().values():
            module.eval()
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        bar = self.progress(len(images), f"{self.name} predict", progress)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            arrays = [_as_array(image) for image in chunk]
            batch = torch.stack([self.geometry.to_input(a) for a in arrays])
            with self.autocast():
                batch_scores, batch_maps = self.predict_batch(self.input_tensor(batch))
            scores.append(batch_scores.float().cpu().numpy())
            for array, amap in zip(arrays, batch_maps, strict=True):
                maps.append(self.geometry.to_image(amap, *array.shape[:2]))
            bar.update(len(chunk))
        bar.close()
        return Prediction(np.concatenate(scores).astype(np.float32) if scores
                          else np.zeros(0, np.float32), maps)

    # ---------------------------------------------------------------- persistence

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for prefix, module in self.modules().items():
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
        return tensors

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "detector": self.name, "options": self.options,
            "backbone": self.backbone.describe(), "seed": self.seed,
            "iterations": self.iterations_done,
        }

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.state_tensors(), str(tmp),
                  metadata={"curate.detector": json.dumps(self.header(), sort_keys=True)})
        tmp.replace(path)
        return path

    @staticmethod
    def read_header(path: str | Path) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "curate.detector" not in meta:
            raise DetectorConfigError(
                f"{path}: not a curate detector file (no 'curate.detector' header)")
        header = json.loads(meta["curate.detector"])
        if header.get("format") != FORMAT:
            raise DetectorConfigError(
                f"{path}: detector format {header.get('format')!r}, expected {FORMAT}")
        return header

    @classmethod
    def load(cls, path: str | Path, weights=None, *, device=None) -> Detector:
        """Rebuild a saved detector. `weights` defaults to the backbone file recorded at save."""
        from safetensors.torch import load_file

        from . import create_detector

        header = cls.read_header(path)
        recorded = header["backbone"]
        if weights is None:
            weights = "random" if recorded["weights"] == "random" else recorded["weights"]
        detector = create_detector(header["detector"], backbone=recorded["name"], weights=weights,
                                   seed=header["seed"], device=device, **header["options"])
        if detector.backbone.sha256 != recorded["sha256"]:
            raise ValueError(
                f"{path}: trained on backbone weights {recorded['sha256'][:16]}… "
                f"({recorded['weights']}), but {detector.backbone.weights} hashes to "
                f"{detector.backbone.sha256[:16]}…")
        tensors = load_file(str(path))
        for prefix, module in detector.modules().items():
            own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own, strict=True)
        extra = [k for k in tensors if k.split(".", 1)[0] not in detector.modules()]
        if extra:
            raise ValueError(f"{path}: unexpected tensors {', '.join(extra[:5])}")
        detector.iterations_done = int(header.get("iterations", 0))
        detector.loaded_from(header)
        detector.to(detector.device)
        return detector

    def loaded_from(self, header: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Hook for state kept outside module state dicts (none by default)."""

