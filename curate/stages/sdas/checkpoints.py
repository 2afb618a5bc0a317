"""Reading diffusion checkpoints: the authors' pickles, safely, and our own safetensors.

RealNet's released SDAS checkpoints are ``torch.save`` pickles of ``{'epoch', 'arch': EasyDict,
'state_dict', 'loss': numpy float}`` whose state-dict keys carry a ``module.`` prefix (saved from
an EMA copy of a DistributedDataParallel model). ``torch.load(weights_only=True)`` refuses the
EasyDict, and an unrestricted ``pickle`` load would run whatever the file names. So
:func:`read_pickle_checkpoint` unpickles with :class:`RestrictedUnpickler`: it resolves only the
globals that torch's own weights-only loader trusts (tensor rebuilders, storages, dtypes,
``OrderedDict``), plus ``easydict.EasyDict`` (read as a plain dict) and numpy scalars of plain
(non-object) dtypes (read as Python numbers). Any other global, ``os.system`` for one, stops the
load with a :class:`CheckpointError` before anything is called.

:func:`load_adm_checkpoint` strips the prefix, builds the matching :class:`~curate.stages.sdas.adm.
ADMUNet` and loads with ``strict=True``; where the official loader silently skips keys whose
shapes differ, this one names every missing, unexpected and mismatched key.
"""

from __future__ import annotations

import io
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.core.errors import CurateError, stable_text
from curate.core.files import sha256_file


class CheckpointError(CurateError):
    """A checkpoint that is missing, refused by the restricted unpickler, or does not fit."""


class _EasyDict(dict):
    """Stand-in for ``easydict.EasyDict`` while unpickling: its pickled attribute state only
    mirrors its items, so the state is ignored (and nothing of easydict is imported)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """``numpy.core.multiarray.scalar`` for plain dtypes only (an object dtype would unpickle
    an arbitrary object)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or data is None:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_EXTRA_GLOBALS: dict[str, Any] = {
    "easydict.EasyDict": _EasyDict,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
}


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return {**_weights_only_unpickler._get_allowed_globals(), **_EXTRA_GLOBALS}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_globals().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a "
                                         "checkpoint")
        return found


def _restricted_load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: What ``torch.load(pickle_module=...)`` needs of a pickle module.
RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="curate_restricted_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load)


def _plain(obj: Any) -> Any:
    """EasyDicts to dicts and numpy scalars to Python numbers, recursively."""
    if isinstance(obj, dict):  # EasyDict and OrderedDict alike
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_pickle_checkpoint(path: str | Path) -> Any:
    """The content of a ``torch.save`` file, read with :class:`RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                         pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load ({stable_text(exc)}); only tensors, plain "
                              "containers, EasyDict and numpy numbers are accepted") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({stable_text(exc)})") from exc
    return _plain(obj)


def extract_state_dict(obj: Any, *, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (``state_dict``, ``model``, ``ema`` or the dict itself),
    ``prefix`` removed from keys that carry it."""
    if isinstance(obj, dict):
        for key in ("state_dict", "ema", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the checkpoint holds no state dict (a mapping of names to "
                              "tensors under 'state_dict', 'ema', 'model' or at the top)")
    return {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in obj.items()}


@dataclass
class LayoutReport:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint, model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        parts = []
        if self.mismatched:
            shown = ", ".join(f"{k} {list(a)} (model {list(b)})"
                              for k, a, b in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} key(s) with other shapes: {shown}")
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} key(s): {', '.join(keys[:limit])}")
        return "; ".join(parts) or "the layout matches"


def compare_layout(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LayoutReport:
    """How ``state`` differs from ``model``'s state dict (names and shapes)."""
    own = model.state_dict()
    return LayoutReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=[(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape)],
    )


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)``, failing with every differing key named."""
    report = compare_layout(model, state)
    if not report.ok:
        raise CheckpointError(f"{source} does not fit the model: {report.describe()}")
    model.load_state_dict(state, strict=True)


def adm_config_for(state: dict[str, torch.Tensor], arch: dict | None = None):
    """The ADM configuration of a state dict: sizes read off the tensors, the rest from the
    checkpoint's ``arch['unet']`` (RealNet) or RealNet's MVTec configuration."""
    from curate.stages.sdas.adm import ADMConfig, realnet_config

    base = realnet_config().to_dict()
    unet = (arch or {}).get("unet") if isinstance(arch, dict) else None
    if isinstance(unet, dict):
        for ours, theirs in (("channel_mult", "channel_mult"), ("attention_ds",
                             "attention_resolutions"), ("num_heads", "num_heads"),
                             ("num_head_channels", "num_head_channels"),
                             ("use_scale_shift_norm", "use_scale_shift_norm"),
                             ("resblock_updown", "resblock_updown"),
                             ("image_size", "image_size")):
            if theirs in unet:
                base[ours] = unet[theirs]
    try:
        base["model_channels"] = state["time_embed.0.weight"].shape[1]
        base["in_channels"] = state["input_blocks.0.0.weight"].shape[1]
        base["out_channels"] = state["out.2.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not an ADM (guided-diffusion) UNet state dict: no {exc}") from exc
    base["num_classes"] = state["label_emb.weight"].shape[0] if "label_emb.weight" in state \
        else None
    return ADMConfig.from_dict(base)


def load_adm_checkpoint(path: str | Path, config=None):
    """An official ADM checkpoint (RealNet's or OpenAI's) as an :class:`ADMUNet` in eval mode.

    Returns ``(model, info)`` with ``info = {'sha256', 'epoch', 'config'}``.
    """
    from curate.stages.sdas.adm import ADMUNet

    obj = read_pickle_checkpoint(path)
    try:
        state = extract_state_dict(obj)
        arch = obj.get("arch") if isinstance(obj, dict) else None
        config = config or adm_config_for(state, arch)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; expected an ADM (guided-diffusion) checkpoint "
                              "such as RealNet's released SDAS weights") from None
    model = ADMUNet(config)
    load_strict(model, state, str(path))
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return model.eval(), {"sha256": sha256_file(path), "epoch": epoch,
                          "config": config.to_dict()}
