"""DRAEM / RealNet anomaly masks and blending, and a procedural anomaly texture.

The code lives in :mod:`detectors.synthesis` (numpy + OpenCV only), which the RealNet detector
uses too (``detectors`` never imports ``curate``); this module re-exports it unchanged for
``curate sdas blend``:

- :func:`perlin_noise`: 2-D gradient (Perlin) noise, DRAEM's ``rand_perlin_2d_np`` formula.
- :func:`perlin_mask`: scales ``2^kx``, ``2^ky`` (RealNet: k ∈ 0..5 per axis), a rotation by
  U(−90°, 90°) about the centre, the threshold 0.5.
- :func:`blend`: ``A = (1 − M)·I + (1 − δ)·M·I + δ·M·P``.
- :func:`procedural_texture`: the anomaly source when no SDAS bank is available.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from detectors.synthesis import blend, perlin_mask, perlin_noise, procedural_texture, rotate

__all__ = ["blend", "perlin_mask", "perlin_noise", "procedural_texture", "rotate"]
