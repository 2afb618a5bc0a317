"""The embedded default job: ``curate build hss-iad`` on a generated sample of every source
layout (with the real MTD instead of the generated one when it is there), then verify.

It is what README command 1 runs on a fresh machine, and doubles as a smoke test of the whole
chain on every reader and every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate import fixtures
from curate.build import BuildResult, build, export_all
from curate.recipe import Recipe, load_recipe
from curate.runner import Context
from curate.verify import verify

#: The recipe the demo builds.
RECIPE = "hss-iad"


@dataclass
class DemoResult:
    build: BuildResult
    problems: list[str]


def run_demo(ctx: Context, out: Path, *, mtd: Path | None, seed: int = 0,
             recipe: Recipe | None = None) -> DemoResult:
    """Generate the samples under ``out/sources`` from ``seed``, build :data:`RECIPE` (or
    ``recipe``, loaded already) and export to ``out/export``. The build runs with ``ctx``'s
    seed: give it the recipe's, as ``curate build`` does, to build what it would."""
    fixtures.write_all(out / "sources", seed=seed)
    recipe = recipe or load_recipe(RECIPE)
    result = build(recipe, ctx, out / "sources", {"mtd": mtd} if mtd is not None else {})
    export_all(result, recipe, ctx, out / "export")
    return DemoResult(result, verify(result.manifest, ctx))
