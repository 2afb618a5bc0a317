"""The package's layers (docs/architecture.md): each layer imports only the layers below it.

The rule is read from the source with :mod:`ast`, not from what Python happens to have imported,
so an import inside a function counts as much as one at the top of a module, and so do the
modules named by string: the ``"module:Class"`` registries (stages, detectors) and the
``require("module", ...)`` / ``import_module("module")`` calls that load optional parts late.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layer -> the layers its modules may import (itself included). ``app`` may import anything.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": ("core",),
    "imaging": ("core", "imaging"),
    "engine": ("core", "imaging", "engine"),
    "sources": ("core", "imaging", "engine", "sources"),
    "stages": ("core", "imaging", "engine", "sources", "stages"),
    "export": ("core", "imaging", "engine", "sources", "stages", "export"),
    "testing": ("core", "imaging", "sources", "testing"),
}
LAYERS = (*ALLOWED, "app")

#: Calls whose first argument, a string, names a module that is imported late.
LOADERS = {"require", "import_module", "_sdas_import"}
#: A registry entry: "package.module:Class".
REGISTRY_ENTRY = re.compile(r"^((?:curate|detectors)(?:\.\w+)+):\w+$")


@dataclass(frozen=True)
class Arrow:
    """One import: ``source`` (a file, relative to the tree's root) names module ``target``."""

    source: str
    line: int
    target: str


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(root: Path, name: str) -> bool:
    """Whether ``name`` is a module or package of the tree (``from pkg import x``: x may be
    either a module or a name defined in pkg)."""
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a ``from <dots><name> import`` in ``module`` refers to."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def arrows(root: Path, path: Path) -> list[Arrow]:
    """Every module of the tree that the file at ``path`` imports, however it names it."""
    source = path.relative_to(root).as_posix()
    module = module_name(root, path)
    is_package = path.name == "__init__.py"
    found: list[Arrow] = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Arrow(source, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module or "")
            for alias in node.names:
                # `from curate import core` imports the module curate.core, not the package.
                submodule = f"{base}.{alias.name}"
                target = submodule if is_module(root, submodule) else base
                found.append(Arrow(source, node.lineno, target))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (called in LOADERS and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                found.append(Arrow(source, node.lineno, first.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = REGISTRY_ENTRY.match(node.value)
            if match:
                found.append(Arrow(source, node.lineno, match.group(1)))
    return sorted(found, key=lambda a: a.line)


def layer_of(module: str) -> str | None:
    """``curate.<layer>...`` -> layer; None for modules outside the layers (the package root,
    which holds only the version, and resource packages such as curate.schemas)."""
    parts = module.split(".")
    if parts[0] != "curate" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1]


def violation(arrow: Arrow, importer: str) -> str | None:
    """Why ``arrow`` out of module ``importer`` breaks the layer rule, or None."""
    where = f"{arrow.source}:{arrow.line} imports {arrow.target}"
    top = arrow.target.split(".")[0]
    if importer.split(".")[0] == "detectors":
        return f"{where}: detectors never imports curate" if top == "curate" else None
    source_layer, target_layer = layer_of(importer), layer_of(arrow.target)
    if source_layer is None or source_layer == "app" or target_layer is None:
        return None
    allowed = ALLOWED[source_layer]
    if target_layer in allowed:
        return None
    return f"{where}: {source_layer} may import only {', '.join(allowed)}"


def violations(root: Path) -> list[str]:
    """Every import under ``root``/curate and ``root``/detectors that breaks the layer rule."""
    found: list[str] = []
    for package in ("curate", "detectors"):
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(root, path)
            found += filter(None, (violation(a, importer) for a in arrows(root, path)))
    return found


def test_the_package_keeps_its_layers():
    assert violations(ROOT) == []


def test_every_layer_has_a_folder():
    """A renamed or new layer folder must be added to the rule, or the rule would skip it."""
    folders = {p.name for p in (ROOT / "curate").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)


def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


def test_the_checker_finds_each_way_of_naming_a_module(tmp_path):
    for package in ("curate", "curate/core", "curate/engine", "curate/imaging", "curate/stages",
                    "curate/export", "curate/testing", "curate/app", "detectors"):
        write(tmp_path, f"{package}/__init__.py")
    write(tmp_path, "curate/core/errors.py")
    write(tmp_path, "curate/engine/store.py")
    write(tmp_path, "curate/export/mvtec.py")
    write(tmp_path, "curate/core/bad.py", "\n".join([
        "import curate.engine.store",                       # 1: plain import
        "from curate.core import errors",                   # 2: allowed
        "def late():",
        "    from ..engine import store",                   # 4: relative, in a function
        "    return require('curate.export.mvtec', 'x')",   # 5: a late optional import
        "STAGES = {'x': 'curate.stages.x:X'}",              # 6: a registry entry
        "NOT_A_MODULE = 'curate.header'",                   # 7: a string, not an import
    ]))
    write(tmp_path, "curate/testing/planting.py", "from curate.engine import store\n")
    write(tmp_path, "curate/app/cli.py", "import curate.export.mvtec\nimport detectors\n")
    write(tmp_path, "detectors/base.py", "from curate.core import errors\n")
    write(tmp_path, "curate/stages/uses_detectors.py", "import detectors.base\n")

    assert violations(tmp_path) == [
        "curate/core/bad.py:1 imports curate.engine.store: core may import only core",
        "curate/core/bad.py:4 imports curate.engine.store: core may import only core",
        "curate/core/bad.py:5 imports curate.export.mvtec: core may import only core",
        "curate/core/bad.py:6 imports curate.stages.x: core may import only core",
        "curate/testing/planting.py:1 imports curate.engine.store: "
        "testing may import only core, imaging, sources, testing",
        "detectors/base.py:1 imports curate.core.errors: detectors never imports curate",
    ]
