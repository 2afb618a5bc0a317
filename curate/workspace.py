"""A workspace: the folder that holds a build's manifests, artifact store and stage cache.

    W/
      workspace.json          marks the folder as a curate workspace (format version)
      HEAD                    id of the manifest the last command produced
      manifests/<id>.parquet  immutable manifests (content only, byte-identical between runs)
      manifests/<id>.run.json run record: when, how long, on which executor with how many
                              jobs, source folders
      store/ab/<sha256>.png   content-addressed artifacts (see curate.store)
      cache/<key>             stage cache: (input ids, stage, version, params, seed) -> output id
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curate import __version__
from curate.canonical import sha256_hex
from curate.errors import CurateError, ManifestError
from curate.files import atomic_write_text, source_file_path
from curate.manifest import HEADER_KEY, Manifest
from curate.store import Store

WORKSPACE_FORMAT = "curate-workspace/1"


@dataclass(frozen=True)
class ManifestInfo:
    """What ``curate manifest list`` shows of one manifest, read without loading its rows."""

    id: str
    stage: str
    parents: list[str]
    samples: int
    kept: int
    dropped: int
    created_at: str


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.manifests_dir = root / "manifests"
        self.cache_dir = root / "cache"
        self.store = Store(root / "store")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True) -> Workspace:
        root = Path(path).absolute()
        marker = root / "workspace.json"
        if marker.is_file():
            try:
                fmt = json.loads(marker.read_text("utf-8")).get("format")
            except (OSError, ValueError) as exc:
                raise CurateError(f"{marker}: unreadable workspace marker ({exc})") from exc
            if fmt != WORKSPACE_FORMAT:
                raise CurateError(f"{marker}: workspace format {fmt!r}, expected "
                                  f"{WORKSPACE_FORMAT!r}")
        elif not create:
            raise CurateError(f"{root} is not a curate workspace (no workspace.json); "
                              "create one with any command that writes, e.g. `curate ingest`")
        elif root.exists() and any(root.iterdir()):
            raise CurateError(f"{root} exists and is not empty, and is not a curate workspace: "
                              "choose another --workspace")
        ws = cls(root)
        if not marker.is_file():
            for d in (ws.manifests_dir, ws.cache_dir, ws.store.root):
                d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"format": WORKSPACE_FORMAT,
                                                  "id": uuid.uuid4().hex}) + "\n")
        return ws

    @property
    def id(self) -> str:
        """A random id given at creation: tells this workspace from a copy elsewhere (review
        datasets remember which workspace pushed them)."""
        marker = json.loads((self.root / "workspace.json").read_text("utf-8"))
        return marker.get("id") or sha256_hex(str(self.root))[:32]

    # ------------------------------------------------------------------ manifests
    def manifest_path(self, manifest_id: str) -> Path:
        return self.manifests_dir / f"{manifest_id}.parquet"

    def record_path(self, manifest_id: str) -> Path:
        return self.manifests_dir / f"{manifest_id}.run.json"

    def save(self, manifest: Manifest, *, elapsed_s: float = 0.0, jobs: int = 1,
             executor: str = "local", from_cache: bool = False) -> None:
        """Write ``manifest`` (if new) and its run record, and make it HEAD."""
        path = self.manifest_path(manifest.id)
        if not path.exists():
            manifest.write(path)
        record_path = self.record_path(manifest.id)
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        record = self._record(manifest.id) or {"id": manifest.id, "created_at": now}
        record.update({
            "stage": manifest.stage,
            "curate_version": __version__,
            "roots": manifest.roots,
            "last_produced_at": now,
        })
        if not from_cache:
            record.update({"elapsed_s": round(elapsed_s, 3), "jobs": jobs,
                           "executor": executor})
        atomic_write_text(record_path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        self.set_head(manifest.id)

    def _record(self, manifest_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(manifest_id).read_text("utf-8"))
        except FileNotFoundError:
            return None

    def set_head(self, manifest_id: str) -> None:
        atomic_write_text(self.root / "HEAD", manifest_id + "\n")

    def head(self) -> str | None:
        try:
            return (self.root / "HEAD").read_text("utf-8").strip() or None
        except FileNotFoundError:
            return None

    def ids(self) -> list[str]:
        return sorted(p.name[: -len(".parquet")] for p in self.manifests_dir.glob("*.parquet"))

    def resolve(self, ref: str | None) -> str:
        """A full manifest id from ``ref``: None/'HEAD'/'latest', a full id or a unique prefix."""
        if ref in (None, "", "HEAD", "latest", "head"):
            head = self.head()
            if head is None:
                raise CurateError(f"workspace {self.root} has no manifests yet: run "
                                  "`curate ingest` first")
            return head
        matches = [i for i in self.ids() if i.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CurateError(f"no manifest {ref!r} in workspace {self.root} "
                              "(`curate manifest list` shows them)")
        raise CurateError(f"manifest prefix {ref!r} is ambiguous: {', '.join(matches[:5])}")

    def load(self, ref: str | None = None) -> Manifest:
        manifest_id = self.resolve(ref)
        record = self._record(manifest_id) or {}
        manifest = Manifest.read(self.manifest_path(manifest_id), roots=record.get("roots", {}))
        if manifest.id != manifest_id:
            raise ManifestError(f"{self.manifest_path(manifest_id)}: file name says "
                                f"{manifest_id} but its header says {manifest.id}")
        return manifest

    def info(self, manifest_id: str) -> ManifestInfo:
        # Only the schema's metadata is read, not the rows: listing stays fast for big manifests.
        meta = pq.read_schema(self.manifest_path(manifest_id)).metadata or {}
        header = json.loads(meta.get(HEADER_KEY, b"{}"))
        counts = header.get("counts", {})
        record = self._record(manifest_id) or {}
        return ManifestInfo(
            id=manifest_id, stage=header.get("stage", {}).get("name", "?"),
            parents=header.get("parents", []), samples=counts.get("samples", 0),
            kept=counts.get("kept", 0), dropped=counts.get("dropped", 0),
            created_at=record.get("created_at", "?"),
        )

    def list(self) -> list[ManifestInfo]:
        """All manifests, oldest first."""
        return sorted((self.info(i) for i in self.ids()), key=lambda m: (m.created_at, m.id))

    # ------------------------------------------------------------------ stage cache
    def cache_lookup(self, key: str) -> str | None:
        """The manifest id cached for ``key``, if its manifest is still in the workspace."""
        try:
            manifest_id = (self.cache_dir / key).read_text("utf-8").strip()
        except FileNotFoundError:
            return None
        return manifest_id if self.manifest_path(manifest_id).exists() else None

    def cache_store(self, key: str, manifest_id: str) -> None:
        atomic_write_text(self.cache_dir / key, manifest_id + "\n")

    # ------------------------------------------------------------------ sources
    def source_file(self, manifest: Manifest, source: str, rel: str) -> Path:
        """Absolute path of file ``rel`` of source ``source`` (rejects paths escaping the root)."""
        root = manifest.roots.get(source)
        if root is None:
            raise CurateError(f"manifest {manifest.id} does not know where source {source!r} "
                              "lives: ingest it again in this workspace")
        return source_file_path(root, rel, what=f"path in source {source!r}")
