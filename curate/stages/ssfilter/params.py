"""SSFilter's parameters, apart from the stage so that the command line (which builds its
options from them) and a base install without PyTorch can read them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Patch descriptors that need no pretrained weights.
WEIGHT_FREE = ("randconv", "texture")
DEFAULT_DESCRIPTOR = "randconv"


@dataclass(frozen=True)
class SSFilterParams:
    mode: str = field(default="lite", metadata={
        "choices": ("lite", "full"),
        "help": "lite: patch comparison only (no training); full: a Dinomaly-style model with "
                "dropout uncertainty, trained on the set (a DINOv2 backbone, or a decoder over "
                "the randconv / texture descriptor)."})
    kappa1: int = field(default=20, metadata={
        "min": 1, "help": "Random shufflings of the set (voting rounds)."})
    kappa2: int = field(default=5, metadata={
        "min": 0, "help": "Keep a sample judged normal in more than this many shufflings."})
    batch_size: int = field(default=32, metadata={"min": 2})
    backbone: str = field(default=DEFAULT_DESCRIPTOR, metadata={
        "help": "Patch descriptor: randconv or texture (no weights), or a bundled backbone "
                "(dinov2_vits14_reg, wide_resnet50_2, ...)."})
    weights: str | None = field(default=None, metadata={
        "help": "Backbone weight file or folder (default: local caches; 'random' for tests)."})
    image_size: int | None = field(default=None, metadata={
        "min": 16, "help": "Square size images are resized to  [default: 256, 224 for DINOv2]"})
    sim_ratio: float = 0.001
    #: Share of an image's patch scores averaged into its score; None: the descriptor's
    #: (1 % of the 16×16 backbone grid as in the paper, 5 % of randconv's 8×8 grid).
    image_ratio: float | None = None
    border: float = field(default=0.04, metadata={
        "min": 0, "max": 0.5, "max_open": True,
        "help": "randconv: share of each side of an image left out of its patches (fixture "
                "edges and dark strips along a side outrank real defects)."})
    #: None: the lower half only (on the command line: a negative number).
    recall_tau: float | None = field(default=3.0, metadata={
        "help": "Lite: also judge normal the upper-half samples within this many standard "
                "deviations of the lower half's mean (negative: lower half only)."})
    hard_normals: int = field(default=0, metadata={
        "min": 0,
        "help": "Flag the K kept normal images that look most anomalous (per category)."})
    drop: bool = field(default=True, metadata={"help": "Manifest mode: score and flag only."})
    # full mode
    iterations: int = field(default=2000, metadata={
        "min": 1, "help": "Full mode: training iterations."})
    cold_start: int = field(default=1000, metadata={
        "min": 0, "help": "Full mode: iterations before uncertainty joins the score."})
    passes: int = 10
    dropout: float = 0.2
    device: str | None = field(default=None, metadata={
        "help": "torch device (default: cuda if present). With --executor ray, 'cuda' makes "
                "each category a Ray task that asks for one GPU."})

    def __post_init__(self):
        if self.mode not in ("lite", "full"):
            raise ValueError(f"mode must be 'lite' or 'full', got {self.mode!r}")
        if self.kappa1 < 1 or not 0 <= self.kappa2 < self.kappa1:
            raise ValueError(f"need kappa1 >= 1 and 0 <= kappa2 < kappa1, got {self.kappa1}, "
                             f"{self.kappa2}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if not (0 < self.sim_ratio <= 1 and 0 < (self.image_ratio or 1) <= 1):
            raise ValueError("sim_ratio and image_ratio must be in (0, 1]")
        if not 0 <= self.border < 0.5:
            raise ValueError(f"border must be in [0, 0.5), got {self.border}")
        if self.hard_normals < 0:
            raise ValueError(f"hard_normals must be >= 0, got {self.hard_normals}")
        if self.mode == "full":
            if not (self.backbone.startswith("dinov2") or self.backbone in WEIGHT_FREE):
                raise ValueError("mode 'full' trains a Dinomaly-style model: it needs a DINOv2 "
                                 "backbone (e.g. dinov2_vits14_reg with --weights) or a "
                                 f"weight-free descriptor ({', '.join(WEIGHT_FREE)}), not "
                                 f"{self.backbone!r}")
            if self.passes < 2:
                raise ValueError(f"passes must be at least 2, got {self.passes}")
