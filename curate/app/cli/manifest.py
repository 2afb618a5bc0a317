"""The manifest commands: list, show, diff and verify the manifests of a workspace."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from curate.core.manifest import diff
from curate.engine.workspace import Workspace

from .options import json_option, open_context, parallel_options, workspace_of, workspace_option
from .output import emit_json, stderr, stdout


@click.group("manifest")
def manifest_group() -> None:
    """List, show, diff and verify manifests."""


@manifest_group.command("list")
@workspace_option
@json_option
def manifest_list(workspace: Path, as_json: bool) -> None:
    """All manifests in the workspace, oldest first (* marks the latest).

    Banks and blends (`curate sdas`) are side products: never the latest.

    \b
    Example:
      curate manifest list --workspace ws
    """
    ws = Workspace.open(workspace, create=False)
    infos = ws.list()
    head = ws.head()
    # A damaged manifest does not hide the others (listing is how one looks into a damaged
    # workspace): it is listed as unreadable, named on stderr, and the exit status is 1.
    if as_json:
        emit_json([vars(i) | {"latest": i.id == head} for i in infos])
    else:
        table = Table()
        for col in ("", "id", "stage", "parents", "samples", "kept", "dropped", "created"):
            table.add_column(col)
        for i in infos:
            if i.problem:
                table.add_row("*" if i.id == head else "", i.id, "[red]unreadable[/]",
                              "-", "-", "-", "-", "-")
                continue
            stage = f"{i.stage} (side product)" if i.side_product else i.stage
            table.add_row("*" if i.id == head else "", i.id, stage,
                          " ".join(p[:12] for p in i.parents) or "-", str(i.samples),
                          str(i.kept), str(i.dropped), i.created_at[:19].replace("T", " "))
        stdout.print(table)
    problems = [i.problem for i in infos if i.problem]
    for problem in problems:
        stderr.print(f"[bold red]error:[/] {escape(problem)}", highlight=False)
    if problems:
        sys.exit(1)


@manifest_group.command("show")
@click.argument("manifest", required=False)
@click.option("--rows", "n_rows", type=click.IntRange(min=0), default=0,
              help="Also print the first N rows.")
@workspace_option
@json_option
def manifest_show(manifest: str | None, n_rows: int, workspace: Path, as_json: bool) -> None:
    """Header, counts and inventory of one manifest (default: the latest).

    \b
    Example:
      curate manifest show latest --rows 5 --workspace ws
    """
    m = Workspace.open(workspace, create=False).load(manifest)
    rows = [r for _, r in zip(range(n_rows), m.rows(), strict=False)]
    if as_json:
        emit_json({"header": m.header, "roots": m.roots, "rows": rows})
        return
    h = m.header
    stdout.print(f"[bold]{m.id}[/]  stage {h['stage']['name']} v{h['stage']['version']}  "
                 f"params {json.dumps(h['stage']['params'], sort_keys=True)}")
    stdout.print(f"parents: {', '.join(h['parents']) or '-'}   seed: {h['seed']}")
    for name, spec in h["sources"].items():
        stdout.print(f"source {name}: {spec['kind']} {json.dumps(spec['options'])} at "
                     f"{m.roots.get(name, '?')}")
    c = h["counts"]
    stdout.print(f"samples {c['samples']}: kept {c['kept']}, dropped {c['dropped']}")
    for code, n in c["reasons"].items():
        stdout.print(f"  dropped {code}: {n}")
    for code, n in c["flags"].items():
        stdout.print(f"  flagged {code}: {n}")
    for category, labels_ in c["kept_by_category"].items():
        stdout.print(f"  {category}: " + ", ".join(f"{k} {v}" for k, v in labels_.items()))
    for source, inv in h["inventory"].items():
        for kind in ("unpaired", "ignored", "rejected"):
            for entry in inv[kind]:
                stdout.print(f"  {source} {kind}: {entry['path']} ({entry['why']})",
                             highlight=False)
    for row in rows:
        stdout.print(json.dumps(row, sort_keys=True), highlight=False)


@manifest_group.command("diff")
@click.argument("old")
@click.argument("new", required=False)
@workspace_option
@json_option
def manifest_diff(old: str, new: str | None, workspace: Path, as_json: bool) -> None:
    """Samples added, removed and changed (field by field) from OLD to NEW (default: latest).

    \b
    Example:
      curate manifest diff 3f2a9c latest --workspace ws
    """
    ws = Workspace.open(workspace, create=False)
    d = diff(ws.load(old), ws.load(new))
    if as_json:
        emit_json(d)
        return
    stdout.print(f"{d['old']} -> {d['new']}: {len(d['added'])} added, "
                 f"{len(d['removed'])} removed, {len(d['changed'])} changed")
    for kind in ("added", "removed"):
        for r in d[kind]:
            stdout.print(f"  {kind} {r['source']}:{r['path']}", highlight=False)
    for c in d["changed"]:
        fields = ", ".join(f"{k}: {_brief(v['old'])} -> {_brief(v['new'])}"
                           for k, v in c["changes"].items())
        stdout.print(f"  changed {c['source']}:{c['path']}  {fields}", highlight=False)


def _brief(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


@manifest_group.command("verify")
@click.argument("manifest", required=False)
@click.option("--no-originals", is_flag=True,
              help="Skip re-hashing the original files (manifest and store only).")
@workspace_option
@parallel_options
@json_option
def manifest_verify(manifest: str | None, no_originals: bool, workspace: Path, jobs: int,
                    as_json: bool) -> None:
    """Check a manifest's integrity, its artifacts and (by default) the original files.

    Exit status 1 if anything is wrong.

    \b
    Example:
      curate manifest verify latest --workspace ws
    """
    from curate.engine.verify import verify

    with open_context(workspace, jobs=jobs, create=False, write=False) as ctx:
        m = workspace_of(ctx).load(manifest)
        problems = verify(m, ctx, originals=not no_originals)
    if as_json:
        emit_json({"manifest": m.id, "ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            stderr.print(f"[red]problem:[/] {p}", highlight=False)
    else:
        stdout.print(f"manifest {m.id}: OK ({len(m)} samples"
                     f"{'' if no_originals else ', originals re-hashed'})")
    if problems:
        sys.exit(1)
