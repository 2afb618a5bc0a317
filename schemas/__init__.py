"""JSON Schemas shipped with curate (header, sample row, recipe)."""
