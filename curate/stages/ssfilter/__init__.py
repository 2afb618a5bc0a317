"""SSFilter: scoring every image of a \"normal\" set by how anomalous it looks among the others,
and dropping the outliers (as a stage on a manifest, or on a plain folder)."""
