"""The embedded default job: ``curate build hss-iad`` on a generated sample of every source
layout (with the real MTD instead of the generated one when asked for), then verify.

It is what README command 1 runs on a fresh machine, and doubles as a smoke test of the whole
chain on every reader and every stage. It works from any folder of any install: the real MTD
is used when the user names it (``--mtd PATH``), or when the demo runs, as README command 1
does, from the root of a curate checkout that has the development data beside it
(``../shared/data/mtd``); everywhere else the generated MTD sample stands in, and the demo
says which one it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.app.build import BuildResult, build, export_all
from curate.app.recipe import Recipe, load_recipe
from curate.engine.runner import Context
from curate.engine.verify import verify
from curate.testing import fixtures

#: The recipe the demo builds.
RECIPE = "hss-iad"
#: Where the real MTD lies beside a checkout, in the development layout README command 1 uses.
CHECKOUT_MTD = Path("shared", "data", "mtd")


def checkout_mtd(cwd: Path | None = None) -> Path | None:
    """The real MTD beside the curate checkout that ``cwd`` (default: the current folder) is
    the root of, when this curate runs from that checkout; None anywhere else (another folder,
    an installed package, no data there)."""
    checkout = Path(__file__).resolve().parents[2]
    here = (cwd or Path.cwd()).resolve()
    if here != checkout or not (checkout / "pyproject.toml").is_file():
        return None
    mtd = checkout.parent / CHECKOUT_MTD
    return mtd if (mtd / "MT_Free").is_dir() else None


def choose_mtd(given: Path | None, generated_only: bool, cwd: Path | None = None
               ) -> tuple[Path | None, str]:
    """Which MTD the demo builds from (None: the generated sample), and a sentence saying so."""
    if generated_only:
        return None, "MTD: the generated sample (--no-mtd)"
    if given is not None:
        return given.absolute(), f"MTD: the real one at {given} (--mtd)"
    found = checkout_mtd(cwd)
    if found is not None:
        return found, f"MTD: the real one beside this checkout, {found}"
    return None, "MTD: the generated sample (pass --mtd PATH to build from the real MTD)"


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
    export_all(result, recipe, ctx, out / "export", overwrite=True)  # the demo's own folder
    return DemoResult(result, verify(result.manifest, ctx))
