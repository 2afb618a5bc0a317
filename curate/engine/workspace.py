"""A workspace: the folder that holds a build's manifests, artifact store and stage cache.

    W/
      workspace.json          marks the folder as a curate workspace (format version)
      HEAD                    id of the manifest the last command produced
      lock                    held by the command writing the workspace (see curate.core.lock)
      manifests/<id>.parquet  immutable manifests (content only, byte-identical between runs)
      manifests/<id>.run.json run record: when, how long, on which executor with how many
                              jobs, source folders
      store/ab/<sha256>.png   content-addressed artifacts (see curate.engine.store)
      cache/<key>             stage cache: (input ids, stage, version, params, seed) -> output id
      facts/<extractor>/      per-image facts by content (see curate.engine.facts)

HEAD moves last: a manifest, its run record and its cache entry are written first, so a save
that fails half way (a full disk) leaves HEAD where it was and removes what it had written.

HEAD (``latest``) follows the *dataset line* only. A manifest whose every source is synthetic
(a bank of ``curate sdas sample``, a blend of ``curate sdas blend``, or anything derived from
one alone, e.g. a review of a blend) is a *side product*: it is saved, cached and listed like
any other, but saving it leaves HEAD where it was, so the next stage, export or review still
runs on the dataset, not on a few hundred synthetic rows. A side product is named by its id;
a manifest that mixes synthetic and real sources (a merge) is on the dataset line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.core.canonical import sha256_hex
from curate.core.errors import CurateError, ManifestError, stable_text
from curate.core.files import atomic_write_text, source_file_path
from curate.core.lock import WorkspaceLock
from curate.core.manifest import HEADER_KEY, Manifest
from curate.engine.facts import FactStore
from curate.engine.store import Store

WORKSPACE_FORMAT = "curate-workspace/1"
LOCK_FILE = "lock"
#: Source kinds of synthetic rows (``curate.stages.sdas.stage``): a bank and a blend.
BANK_KIND, BLEND_KIND = "sdas", "sdas_blend"
SIDE_PRODUCT_KINDS = frozenset({BANK_KIND, BLEND_KIND})


def is_side_product(header: dict[str, Any]) -> bool:
    """Whether the manifest with this header is a side product (every source synthetic): one
    that never becomes HEAD (see the module docstring)."""
    kinds = {spec.get("kind") for spec in header["sources"].values()}
    return bool(kinds) and kinds <= SIDE_PRODUCT_KINDS


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
    #: Why the manifest could not be read (a truncated file), None when it could.
    problem: str | None = None
    #: A side product (bank, blend): never HEAD, see :func:`is_side_product`.
    side_product: bool = False


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.manifests_dir = root / "manifests"
        self.cache_dir = root / "cache"
        self.store = Store(root / "store")
        self.facts = FactStore(root / "facts")
        #: "folder" or "contents" when this process created the workspace (the folder itself,
        #: or inside an empty folder): what :meth:`discard_if_unused` removes.
        self.created: str | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True) -> Workspace:
        root = Path(path).absolute()
        marker = root / "workspace.json"
        if marker.is_file():
            try:
                fmt = json.loads(marker.read_text("utf-8")).get("format")
            except (OSError, ValueError) as exc:
                raise CurateError(f"{marker}: unreadable workspace marker "
                                  f"({stable_text(exc)})") from exc
            if fmt != WORKSPACE_FORMAT:
                raise CurateError(f"{marker}: workspace format {fmt!r}, expected "
                                  f"{WORKSPACE_FORMAT!r}")
        elif not create:
            raise CurateError(f"{root} is not a curate workspace (no workspace.json); "
                              "create one with any command that writes, e.g. `curate ingest`")
        elif root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
            # (A lock file alone: another command is creating this workspace right now.)
            raise CurateError(f"{root} exists and is not empty, and is not a curate workspace: "
                              "choose another --workspace")
        else:
            existed = root.exists()
            root.mkdir(parents=True, exist_ok=True)
            created = "contents" if existed else "folder"
        ws = cls(root)
        if not marker.is_file() and _create_marker(marker):
            ws.created = created
        if create:
            for d in (ws.manifests_dir, ws.cache_dir, ws.store.root):
                d.mkdir(parents=True, exist_ok=True)
        return ws

    def lock(self, command: str, on_wait: Callable[[str], None] | None = None
             ) -> WorkspaceLock:
        """The writer lock of this workspace (not taken yet): see :mod:`curate.core.lock`."""
        return WorkspaceLock(self.root / LOCK_FILE, command, on_wait=on_wait)

    def discard_if_unused(self) -> None:
        """Undo the creation of this workspace by this process when the command that created
        it failed before saving any manifest: a failed command leaves no trace, not even an
        empty workspace where there was nothing (or an empty folder) before."""
        if self.created is None or self.ids() or self.head() is not None:
            return
        if self.created == "folder":
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

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
             executor: str = "local", from_cache: bool = False,
             cache_key: str | None = None) -> None:
        """Write ``manifest`` (if new), its run record and the cache entry ``cache_key`` (if
        given), then make it HEAD unless it is a side product (:func:`is_side_product`). If a
        write fails (OSError: a full disk), the files this call created are removed again and
        HEAD stays where it was."""
        created: list[Path] = []

        def write_new(path: Path, write: Callable[[Path], None]) -> None:
            existed = path.exists()
            write(path)
            if not existed:
                created.append(path)

        try:
            path = self.manifest_path(manifest.id)
            if not path.exists():
                write_new(path, manifest.write)
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
            text = json.dumps(record, indent=1, sort_keys=True) + "\n"
            write_new(self.record_path(manifest.id), lambda p: atomic_write_text(p, text))
            if cache_key is not None:
                write_new(self.cache_dir / cache_key,
                          lambda p: atomic_write_text(p, manifest.id + "\n"))
            if not is_side_product(manifest.header):
                self.set_head(manifest.id)
        except OSError:
            for path in reversed(created):
                path.unlink(missing_ok=True)
            raise

    def _record(self, manifest_id: str) -> dict[str, Any] | None:
        path = self.record_path(manifest_id)
        try:
            record = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: unreadable run record ({stable_text(exc)})") from exc
        if not isinstance(record, dict):
            raise ManifestError(f"{path}: a run record is a JSON object, found "
                                f"{type(record).__name__}")
        return record

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
        """What ``curate manifest list`` shows of one manifest. A damaged manifest or run
        record is not an exception here: its ``problem`` says what is wrong with it."""
        path = self.manifest_path(manifest_id)
        record: dict[str, Any] = {}
        try:
            record = self._record(manifest_id) or {}
            # Only the schema's metadata is read, not the rows: listing stays fast for big
            # manifests.
            try:
                meta = pq.read_schema(path).metadata or {}
            except (OSError, pa.ArrowException) as exc:
                raise ManifestError(f"{path}: not a readable Parquet manifest "
                                    f"({stable_text(exc)})") from exc
            try:
                header = json.loads(meta[HEADER_KEY])
                counts = header["counts"]
                return ManifestInfo(
                    id=manifest_id, stage=header["stage"]["name"],
                    parents=list(header["parents"]), samples=counts["samples"],
                    kept=counts["kept"], dropped=counts["dropped"],
                    created_at=str(record.get("created_at", "?")),
                    side_product=is_side_product(header),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(f"{path}: Parquet file without a readable curate header "
                                    f"({type(exc).__name__}: {exc})") from exc
        except ManifestError as exc:
            return ManifestInfo(id=manifest_id, stage="?", parents=[], samples=0, kept=0,
                                dropped=0, created_at=str(record.get("created_at", "?")),
                                problem=str(exc))

    def list(self) -> list[ManifestInfo]:
        """All manifests, oldest first (unreadable ones too, with their ``problem``)."""
        return sorted((self.info(i) for i in self.ids()), key=lambda m: (m.created_at, m.id))

    # ------------------------------------------------------------------ stage cache
    def cache_lookup(self, key: str) -> str | None:
        """The manifest id cached for ``key``, if its manifest is still in the workspace."""
        try:
            manifest_id = (self.cache_dir / key).read_text("utf-8").strip()
        except FileNotFoundError:
            return None
        return manifest_id if self.manifest_path(manifest_id).exists() else None

    # ------------------------------------------------------------------ sources
    def source_file(self, manifest: Manifest, source: str, rel: str) -> Path:
        """Absolute path of file ``rel`` of source ``source`` of ``manifest`` (see
        :func:`source_file`)."""
        return source_file(manifest.roots, source, rel)


def source_file(roots: Mapping[str, str], source: str, rel: str) -> Path:
    """Absolute path of file ``rel`` of source ``source``, whose folder ``roots`` gives,
    checked to be still inside that folder (see ``curate.core.files.source_file_path``)."""
    root = roots.get(source)
    if root is None:
        raise CurateError(f"no folder is known for source {source!r}: ingest it again in "
                          "this workspace")
    return source_file_path(root, rel, what=f"path in source {source!r}")


def _create_marker(marker: Path) -> bool:
    """Write the workspace marker unless it exists: of two commands creating one workspace at
    once, the first marker (and its id) stands; the file appears whole or not at all. True if
    this call wrote it."""
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"format": WORKSPACE_FORMAT, "id": uuid.uuid4().hex}) + "\n",
                       "utf-8")
        os.link(tmp, marker)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
