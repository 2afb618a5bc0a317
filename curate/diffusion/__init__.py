"""Diffusion models for SDAS anomaly synthesis (RealNet's strength-controllable sampler).

- :mod:`curate.diffusion.adm` — the guided-diffusion ADM UNet, laid out so that the authors'
  released checkpoints load with ``strict=True``;
- :mod:`curate.diffusion.checkpoints` — loading those checkpoints without an unrestricted
  unpickler, and our own checkpoints (safetensors + JSON);
- :mod:`curate.diffusion.models` — the model presets (diffusers ``UNet2DModel`` by default, ADM)
  and one call shape for all of them;
- :mod:`curate.diffusion.sampler` — the respaced schedule and the SDAS sampler (ancestral and
  DDIM), one seed and one strength per image;
- :mod:`curate.diffusion.train` — training on a category's normal images (seeded, EMA,
  resumable);
- :mod:`curate.diffusion.perlin` — DRAEM-style Perlin masks, the blending formula and a
  procedural texture source.

Everything here needs the ``detectors`` extra (torch, diffusers, safetensors), imported lazily
by the stages and the CLI.
"""
