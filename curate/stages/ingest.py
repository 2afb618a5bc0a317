"""ingest: a source folder -> the first manifest of a chain.

The reader (``curate.sources``) pairs files by name and builds candidate rows; this stage then
reads every candidate image once, in parallel: sha256 of the original bytes, format, size and
channels from the header, and a completeness check (see ``curate.imaging.io.probe``). Pixels are
not decoded here. Where a source defines the label by its mask (KolektorSDD, KolektorSDD2),
the reader leaves the label empty and this stage reads the mask to decide good / defect.

Originals are only ever opened for reading. A workspace inside the source folder is left out
of the walk (and listed in the inventory as ignored): its files are curate's own, and change
at every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.core.canonical import content_hash
from curate.core.errors import CurateError, UsageError
from curate.core.files import sha256_bytes, walk_files
from curate.core.manifest import DEFECT, GOOD, Manifest
from curate.engine.runner import Context, SampleEnv, Stage, Update, apply_update
from curate.imaging.io import BadImage, probe
from curate.imaging.masks import AnnotationError, read_mask
from curate.sources import get_reader


@dataclass(frozen=True)
class IngestParams:
    kind: str
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def probe_sample(row: dict[str, Any], env: SampleEnv) -> Update:
    """Hash and probe one candidate image (and its mask file, if it has one)."""
    data = env.read_source(row)
    update: Update = {"sha256": sha256_bytes(data)}
    try:
        info = probe(data)
    except BadImage as exc:
        update["drop"] = [("unreadable_image",
                           f"{row['path']}: {exc}; expected a complete JPEG, PNG, BMP or TIFF")]
        return update
    update.update(format=info.format, width=info.width, height=info.height,
                  channels=info.channels)
    mask_rel = row["annotation"].get("mask")
    if mask_rel is not None:
        mask_bytes = env.read_source(row, mask_rel)
        update["annotation"] = {**row["annotation"], "mask_sha256": sha256_bytes(mask_bytes)}
        if row["label"] is None:
            try:
                defective = bool(read_mask(mask_bytes).mask.any())
            except AnnotationError as exc:
                update["drop"] = [(exc.code, f"mask {mask_rel} {exc}")]
                return update
            update["label"] = DEFECT if defective else GOOD
            update["defect_classes"] = [DEFECT] if defective else []
    return update


def source_fingerprint(root: Path, leave_out: dict[str, str]) -> str:
    """Hash of every file's path, size and modification time, and of every entry the walk
    leaves out (it is in the inventory): cheap change detection."""
    entries: list[list[Any]] = []
    base = os.fspath(root)
    for rel in walk_files(base, on_skip=lambda rel, why: entries.append([rel, why]),
                          leave_out=leave_out):
        st = os.stat(os.path.join(base, rel))
        entries.append([rel, st.st_size, st.st_mtime_ns])
    return content_hash(entries)


class Ingest(Stage[IngestParams]):
    name = "ingest"
    version = "1"
    Params = IngestParams

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    def _source(self, params: IngestParams) -> str:
        return params.source or params.kind

    def _leave_out(self, ctx: Context) -> dict[str, str]:
        """The workspace folder, when it lies inside the source folder: not part of the source."""
        workspace = os.path.realpath(ctx.workspace.root)
        root = os.path.realpath(self.root)
        if workspace == root:
            raise UsageError(f"{ctx.workspace.root}: the workspace is the source folder itself; "
                             "choose a workspace folder outside the source")
        if not workspace.startswith(root.rstrip(os.sep) + os.sep):
            return {}
        return {Path(os.path.relpath(workspace, root)).as_posix():
                "the curate workspace of this ingest: curate's own files, not the source's"}

    def cache_key(self, inputs: list[Manifest], params: IngestParams, ctx: Context
                  ) -> str | None:
        if not self.root.is_dir():
            return None  # let run() say what is wrong
        return content_hash({
            "stage": self.name, "version": self.version, "kind": params.kind,
            "source": self._source(params), "options": params.options,
            "root": str(self.root),
            "files": source_fingerprint(self.root, self._leave_out(ctx)),
        })

    def roots(self, inputs: list[Manifest], params: IngestParams) -> dict[str, str]:
        return {self._source(params): str(self.root)}

    def run(self, inputs: list[Manifest], params: IngestParams, ctx: Context) -> Manifest:
        if inputs:
            raise CurateError("ingest reads a source folder, not a manifest")
        reader = get_reader(params.kind, leave_out=self._leave_out(ctx))
        source = self._source(params)
        options = reader.check_options(dict(params.options))
        scan = reader.scan(self.root, source, options)
        # Rows the reader already dropped are probed too: their provenance is recorded all the same.
        env = ctx.env(self.name, params, self.roots(inputs, params))
        updates = ctx.map(probe_sample, scan.rows, env, f"ingest {source}")
        rows = [apply_update(r, u, self.name) for r, u in zip(scan.rows, updates, strict=True)]
        return Manifest.build(
            rows, stage=self.name, stage_version=self.version,
            params={"kind": params.kind, "source": source, "options": options},
            sources={source: {"kind": params.kind, "options": options}},
            inventory={source: scan.inventory.to_dict()},
            roots=self.roots(inputs, params),
        )
