"""Dataset recipes shipped with curate (YAML files validated by schemas/recipe.schema.json)."""
