"""Recipes: YAML dataset definitions (``manifests/*.yaml``) — sources, ordered stages, exports.

A recipe is read with ``yaml.safe_load`` only, validated against
``schemas/recipe.schema.json``, and every stage's parameters are checked against that stage's
parameter dataclass before anything runs, so a typo fails at once with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from curate.core.errors import CurateError, stable_text
from curate.core.schemas import validate_recipe
from curate.engine.runner import make_params
from curate.stages import stage_class


@dataclass(frozen=True)
class RecipeSource:
    kind: str
    name: str
    category: str | None
    options: dict[str, Any]
    folder_names: tuple[str, ...]
    required: bool


@dataclass(frozen=True)
class RecipeStage:
    stage: str
    params: Any  # the stage's Params dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    origin: str
    seed: int
    sources: list[RecipeSource]
    stages: list[RecipeStage]
    exports: list[str] = field(default_factory=list)


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("curate.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(ref: str) -> Recipe:
    """A recipe by built-in name (``hss-iad``) or by path to a YAML file."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text, origin = path.read_text("utf-8"), str(path)
        except OSError as exc:
            raise CurateError(f"{path}: cannot read the recipe ({stable_text(exc)})") from exc
    elif ref in builtin_recipes():
        text = resources.files("curate.recipes").joinpath(f"{ref}.yaml").read_text("utf-8")
        origin = f"manifests/{ref}.yaml"
    else:
        raise CurateError(f"no recipe {ref!r}: give a YAML file or one of "
                          f"{', '.join(builtin_recipes())}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CurateError(f"{origin}: not valid YAML ({stable_text(exc)})") from exc
    validate_recipe(doc, origin)
    sources = []
    for s in doc["sources"]:
        sources.append(RecipeSource(
            kind=s["kind"], name=s.get("name", s["kind"]), category=s.get("category"),
            options=dict(s.get("options", {})), folder_names=tuple(s.get("folder_names", ())),
            required=bool(s.get("required", False))))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise CurateError(f"{origin}: two sources share a name; give each a distinct 'name'")
    stages = []
    for k, entry in enumerate(doc["stages"]):
        cls = stage_class(entry["stage"])
        try:
            params = make_params(cls, dict(entry.get("params", {})))
        except CurateError as exc:
            raise CurateError(f"{origin}: stages[{k}]: {exc}") from exc
        stages.append(RecipeStage(entry["stage"], params))
    return Recipe(name=doc["name"], version=doc["version"], origin=origin,
                  seed=int(doc.get("seed", 0)), sources=sources, stages=stages,
                  exports=list(doc.get("export", {}).get("formats", ["mvtec"])))
