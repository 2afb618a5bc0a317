"""Canonical forms, so that equal content always hashes equal.

Manifest ids, stage cache keys and per-sample seeds are all hashes of canonical JSON: keys
sorted, no whitespace, floats rounded to a fixed number of significant digits (so a value
computed on another machine that differs in the last bit still hashes the same), NaN as null.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# Ten significant digits: far finer than any measurement we record, coarse enough that
# last-bit differences between machines (SIMD, libm) vanish before hashing.
FLOAT_DIGITS = 10


def canonical_float(x: float) -> float | None:
    """Round ``x`` to :data:`FLOAT_DIGITS` significant digits; NaN and infinities become None."""
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0  # also folds -0.0 into 0.0
    return float(f"{x:.{FLOAT_DIGITS}g}")


def canonicalize(value: Any) -> Any:
    """Return ``value`` with every float made canonical and every container made plain.

    Tuples become lists, numpy scalars become Python numbers, mapping keys become strings.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return canonical_float(value)
    if isinstance(value, dict):
        return {str(k): canonicalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonicalize(v) for v in value]
    # numpy scalars and arrays without importing numpy here
    if hasattr(value, "tolist"):
        return canonicalize(value.tolist())
    if hasattr(value, "item"):
        return canonicalize(value.item())
    raise TypeError(f"cannot canonicalize a value of type {type(value).__name__}: {value!r}")


def dumps_canonical(value: Any) -> str:
    """Compact JSON with sorted keys of a value that is already canonical."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys of the canonical form of ``value``."""
    return dumps_canonical(canonicalize(value))


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def content_hash(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))
