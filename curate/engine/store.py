"""The content-addressed artifact store of a workspace (masks, foregrounds, synthetic images).

Every artifact is written once, atomically and read-only, under ``store/ab/abcdef….ext`` and
named by a hash of its content. For pixel arrays the hash is taken over the pixels (shape, dtype and bytes),
not over the encoded file, so the same mask gets the same key whichever PNG encoder wrote it:
manifest ids then do not depend on library versions.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from curate.core.errors import CurateError, stable_text
from curate.core.files import atomic_write_bytes
from curate.imaging.io import decode, encode_png

KEY_RE = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]+$")


def pixel_digest(pixels: np.ndarray) -> str:
    """sha256 over dtype, shape and raw bytes of an array (C order)."""
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{pixels.dtype.str}:{'x'.join(map(str, pixels.shape))}\n".encode())
    h.update(pixels.data.cast("B"))  # the array's own buffer: no copy of a large image
    return h.hexdigest()


def mask_pixels(mask: np.ndarray) -> np.ndarray:
    """The canonical stored form of a binary mask: uint8, 0 or 255, H x W."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is H x W, got shape {mask.shape}")
    return np.where(mask.astype(bool), np.uint8(255), np.uint8(0))


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if not KEY_RE.match(key):
            raise CurateError(f"{key!r} is not a store key (expected <sha256>.<ext>)")
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def _put(self, key: str, data: bytes) -> str:
        target = self.path(key)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Read-only: exports hard-link store files, and an in-place edit of an exported
            # file must not change what a key names.
            atomic_write_bytes(target, data, read_only=True)
        return key

    def put_bytes(self, data: bytes, ext: str) -> str:
        """Store raw bytes (JSON reports and the like); key = sha256 of the bytes.

        PNGs go through :meth:`put_pixels`, whose keys hash pixels, not bytes.
        """
        if ext == "png":
            raise ValueError("store PNG images with put_pixels (their key hashes the pixels)")
        return self._put(f"{hashlib.sha256(data).hexdigest()}.{ext}", data)

    def put_pixels(self, pixels: np.ndarray) -> str:
        """Store uint8 pixels as PNG; key = :func:`pixel_digest`."""
        return self._put(f"{pixel_digest(pixels)}.png", encode_png(pixels))

    def put_mask(self, mask: np.ndarray) -> str:
        """Store a binary mask as a 0/255 PNG."""
        return self.put_pixels(mask_pixels(mask))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise CurateError(f"artifact {key} is missing from the store at {self.root}") from None

    def read_pixels(self, key: str) -> np.ndarray:
        return decode(self.read_bytes(key))

    def read_mask(self, key: str) -> np.ndarray:
        return self.read_pixels(key) > 127

    def check(self, key: str) -> str | None:
        """None if the artifact exists and its content matches its key, else the problem."""
        path = self.path(key)
        if not path.is_file():
            return f"artifact {key} is missing ({path})"
        data = path.read_bytes()
        digest = key.split(".")[0]
        if key.endswith(".png"):
            try:
                actual = pixel_digest(decode(data))
            except ValueError as exc:
                return f"artifact {key} does not decode ({stable_text(exc)})"
        else:
            actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            return f"artifact {key} has changed on disk (content hashes to {actual[:16]}…)"
        return None
