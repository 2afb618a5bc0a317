"""The names of the per-sample measures a manifest row records (its ``measures`` column).

Each name is ``<stage>.<quantity>``, written by that stage and read by later stages, the
exports, the dataset card and review. They are part of the manifest's content, so of its id:
renaming one changes every manifest that records it. One constant per measure, grouped by the
stage that writes it.
"""

# dedup
#: Perceptual hash of the untransformed image, hex.
DEDUP_HASH = "dedup.hash"
#: Variance of the Laplacian relative to the image's own variance (the keep rule's tie-break).
DEDUP_SHARPNESS = "dedup.sharpness"
#: Id of the duplicate cluster, on the kept sample of each cluster.
DEDUP_CLUSTER = "dedup.cluster"

# quality
#: Variance of the Laplacian of the grey image.
QUALITY_SHARPNESS = "quality.sharpness"
#: Robust z-score of log10 sharpness within the category (categories large enough only).
QUALITY_BLUR_Z = "quality.blur_z"
#: Share of pixels at grey level 5 or below.
QUALITY_DARK_FRACTION = "quality.dark_fraction"
#: Share of pixels at grey level 250 or above.
QUALITY_BRIGHT_FRACTION = "quality.bright_fraction"
#: Range of grey levels from the 1st to the 99th percentile.
QUALITY_CONTRAST = "quality.contrast"

# labels
#: Defect pixels / all pixels of the union mask.
LABELS_MASK_FRACTION = "labels.mask_fraction"
#: Grey level at which a mask file was binarised.
LABELS_THRESHOLD = "labels.threshold"
#: Pixels of a mask file neither 0 nor full value (> 0: the mask was anti-aliased).
LABELS_GREY_PIXELS = "labels.grey_pixels"

# label_filter
#: Defect pixels of the stored mask.
LABEL_FILTER_MASK_PIXELS = "label_filter.mask_pixels"
#: Defect pixels left once the mask is resized to the training size.
LABEL_FILTER_TRAIN_PIXELS = "label_filter.train_pixels"

# reclassify
#: Threaded holes found (dark circles).
RECLASSIFY_HOLES = "reclassify.holes"
#: Share of the image that is machined surface (bright and smooth).
RECLASSIFY_MACHINED = "reclassify.machined"
#: Edge density outside the holes (interference).
RECLASSIFY_CLUTTER = "reclassify.clutter"
#: What decided the class: "features" or "override".
RECLASSIFY_RULE = "reclassify.rule"
#: The override file's note, on overridden samples.
RECLASSIFY_NOTE = "reclassify.note"

# foreground
#: Share of the image that is foreground.
FOREGROUND_FRACTION = "foreground.fraction"
#: How decided the foreground mask is, 0..1.
FOREGROUND_CONFIDENCE = "foreground.confidence"

# ssfilter
#: Mean batch score over the shufflings (higher: more anomalous).
SSFILTER_SCORE = "ssfilter.score"
#: Shufflings in which the sample was judged normal.
SSFILTER_VOTES = "ssfilter.votes"
#: Mean over the shufflings of the model's dropout uncertainty (full mode only).
SSFILTER_UNCERTAINTY = "ssfilter.uncertainty"

# sdas_sample (bank rows)
#: Slot of the image in its bank.
SDAS_INDEX = "sdas.index"
#: The image's own sampling seed.
SDAS_SEED = "sdas.seed"
#: The image's SDAS strength.
SDAS_STRENGTH = "sdas.strength"
#: Diffusion steps sampled.
SDAS_STEPS = "sdas.steps"
#: Sampler name.
SDAS_SAMPLER = "sdas.sampler"
#: sha256 of the checkpoint's weights file.
SDAS_CHECKPOINT = "sdas.checkpoint"

# sdas_blend (blended rows)
#: Slot of the image among the blends.
SDAS_BLEND_INDEX = "sdas_blend.index"
#: Blend weight of the anomaly source inside the mask.
SDAS_BLEND_DELTA = "sdas_blend.delta"
#: Share of the image covered by the anomaly mask.
SDAS_BLEND_MASK_FRACTION = "sdas_blend.mask_fraction"
#: Perlin noise cells along x (a power of two).
SDAS_BLEND_SCALE_X = "sdas_blend.scale_x"
#: Perlin noise cells along y (a power of two).
SDAS_BLEND_SCALE_Y = "sdas_blend.scale_y"
#: Rotation of the Perlin noise, degrees.
SDAS_BLEND_ANGLE = "sdas_blend.angle"
#: Sample id of the normal image blended into.
SDAS_BLEND_BASE = "sdas_blend.base"
#: Store key of the anomaly source image, or "procedural".
SDAS_BLEND_SOURCE = "sdas_blend.source"
