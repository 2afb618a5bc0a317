"""Diffusion models for SDAS anomaly synthesis (RealNet's strength-controllable sampler).

- :mod:`curate.stages.sdas.adm` — the guided-diffusion ADM UNet, laid out so that the authors'
  released checkpoints load with ``strict=True``;
- :mod:`curate.stages.sdas.checkpoints` — loading those checkpoints without an unrestricted
  unpickler, and our own checkpoints (safetensors + JSON);
- :mod:`curate.stages.sdas.models` — the model presets (diffusers ``UNet2DModel`` by default, ADM)
  and one call shape for all of them;
- :mod:`curate.stages.sdas.sampler` — the respaced schedule and the SDAS sampler (ancestral and
  DDIM), one seed and one strength per image;
- :mod:`curate.stages.sdas.train` — training on a category's normal images (seeded, EMA,
  resumable);
- :mod:`detectors.synthesis` — DRAEM-style Perlin masks, the blending formula and a
  procedural texture source.

Everything here needs the ``detectors`` extra (torch, diffusers, safetensors), imported lazily
by the stages and the CLI.
"""
