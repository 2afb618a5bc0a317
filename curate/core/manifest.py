"""Manifests: immutable, content-addressed tables of samples.

A manifest is one Parquet file: a table with one row per sample and a JSON header stored in the
file's metadata. Its id is a hash of its canonical content (header fields that describe content,
plus the digest of every column, rows in canonical order: :mod:`curate.core.columns`), so the
same inputs give the same id on any machine and with any number of jobs. Hashing by column lets
:meth:`Manifest.derive_columns` derive a version in which some columns changed without touching
the rows: only those columns are converted, validated and hashed (format 2; format-1 manifests,
hashed row by row, are still read and checked). Nothing volatile (creation time, elapsed time, absolute paths of the source
folders) is stored in the file: those go to a small run record beside it (see
``curate.engine.workspace``), which keeps the Parquet bytes identical between identical runs.

Rows are dictionaries with the columns of :data:`COLUMNS`. Three columns hold small JSON objects
(``annotation``, ``artifacts``, ``measures``); in Python they are dicts, on disk canonical JSON.
A stage never deletes a row: dropping is ``status = "dropped"`` with entries in ``reasons``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.canonical import canonical_json, canonicalize, dumps_canonical, sha256_hex
from curate.core.columns import column_digest
from curate.core.errors import ManifestError, stable_text
from curate.core.failure import writing
from curate.core.schemas import validate_column, validate_header, validate_rows

FORMAT = "curate-manifest/2"
#: Manifests of format 1 (ids hashed row by row as canonical JSON) are still read and checked.
FORMAT_1 = "curate-manifest/1"
HEADER_KEY = b"curate.header"
ID_LENGTH = 24  # hex digits of sha256 kept as the id: 96 bits, no realistic collision

_NOTE = pa.struct([("stage", pa.string()), ("code", pa.string()), ("detail", pa.string())])

#: Column name -> Arrow type, in canonical order. ``*_json`` semantics are noted in JSON_COLUMNS.
COLUMNS: dict[str, pa.DataType] = {
    "sample_id": pa.string(),
    "source": pa.string(),
    "path": pa.string(),
    "sha256": pa.string(),
    "format": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "channels": pa.int32(),
    "category": pa.string(),
    "source_split": pa.string(),
    "split": pa.string(),
    "label": pa.string(),
    "defect_classes": pa.list_(pa.string()),
    "group": pa.string(),
    "annotation": pa.string(),
    "artifacts": pa.string(),
    "measures": pa.string(),
    "status": pa.string(),
    "reasons": pa.list_(_NOTE),
    "flags": pa.list_(_NOTE),
}
JSON_COLUMNS = ("annotation", "artifacts", "measures")
ARROW_SCHEMA = pa.schema([pa.field(name, typ) for name, typ in COLUMNS.items()])

KEPT, DROPPED = "kept", "dropped"
#: The label of a normal sample; a defective one carries its defect class (or DEFECT, for
#: sources whose masks alone say that a sample is defective).
GOOD, DEFECT = "good", "defect"


def sample_id_for(source: str, path: str) -> str:
    """The stable id of the sample at ``path`` in source ``source``."""
    return sha256_hex(f"{source}\x00{path}")[:16]


def note(stage: str, code: str, detail: str) -> dict[str, str]:
    """A drop reason or a review flag: which stage, a short code, and a sentence with values."""
    return {"stage": stage, "code": code, "detail": detail}


def new_row(*, source: str, path: str, category: str, **fields: Any) -> dict[str, Any]:
    """A row with every column present, defaults filled in."""
    row: dict[str, Any] = {
        "sample_id": sample_id_for(source, path),
        "source": source,
        "path": path,
        "sha256": None,
        "format": None,
        "width": None,
        "height": None,
        "channels": None,
        "category": category,
        "source_split": None,
        "split": None,
        "label": None,
        "defect_classes": [],
        "group": None,
        "annotation": {},
        "artifacts": {},
        "measures": {},
        "status": KEPT,
        "reasons": [],
        "flags": [],
    }
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown manifest columns: {sorted(unknown)}")
    row.update(fields)
    return row


def drop(row: dict[str, Any], stage: str, code: str, detail: str) -> dict[str, Any]:
    """Mark ``row`` dropped (in place) with one more reason; returns the row."""
    row["status"] = DROPPED
    row["reasons"] = [*row["reasons"], note(stage, code, detail)]
    return row


def _canonical_row(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The canonical Python form of a row, and its on-disk form (JSON columns as text)."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ManifestError(f"sample {row.get('source')}:{row.get('path')} lacks the "
                            f"column(s) {', '.join(missing)}")
    canon, stored = {}, {}
    for name in COLUMNS:
        value = row[name]
        # Fast path for the common scalar columns; nested values go through canonicalize.
        if value is None or type(value) is str or type(value) is int:
            canon[name] = stored[name] = value
        elif name in JSON_COLUMNS:
            canon[name] = canonicalize(value)
            stored[name] = dumps_canonical(canon[name])
        else:
            canon[name] = stored[name] = canonicalize(value)
    return canon, stored


def manifest_row(stored: dict[str, Any]) -> dict[str, Any]:
    """A row as the Parquet table stores it (JSON columns as text) -> the row as a dict."""
    row = dict(stored)
    for name in JSON_COLUMNS:
        try:
            row[name] = json.loads(stored[name])
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"sample {stored.get('source')}:{stored.get('path')}: column "
                                f"{name} does not hold JSON ({stable_text(exc)})") from exc
    return row


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while many small row dicts are made (a context
    manager, or a decorator when called): they hold no cycles, and each collection would walk
    all of them (at 1M rows it doubles the cost of ``row_list()``). Reference counting still
    frees everything; the previous state comes back after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _sort_key(row: dict[str, Any]) -> tuple[str, str]:
    return (row["source"], row["path"])


@dataclass
class Manifest:
    """A manifest in memory: ``header`` (a dict) and ``table`` (Arrow, canonical row order).

    ``roots`` maps each source name to the folder its paths are relative to; it is not part of
    the content (the same files elsewhere give the same manifest) and lives in the run record.
    """

    header: dict[str, Any]
    table: pa.Table
    roots: dict[str, str]
    #: Column name -> :func:`~curate.core.columns.column_digest` of this table's column, kept
    #: so that a derived manifest rehashes only the columns it changed.
    _digests: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    # ----------------------------------------------------------------- building
    @classmethod
    @_gc_paused()
    def build(
        cls,
        rows: Iterable[dict[str, Any]],
        *,
        stage: str,
        stage_version: str,
        params: dict[str, Any] | None = None,
        parents: list[str] | None = None,
        sources: dict[str, dict[str, Any]] | None = None,
        inventory: dict[str, Any] | None = None,
        seed: int | None = None,
        roots: dict[str, str] | None = None,
    ) -> Manifest:
        """Validate ``rows``, put them in canonical order and compute the manifest id."""
        pairs = sorted((_canonical_row(r) for r in rows), key=lambda p: _sort_key(p[0]))
        ids = [canon["sample_id"] for canon, _ in pairs]
        if len(set(ids)) != len(ids):
            dup = [k for k, n in Counter(ids).items() if n > 1][:5]
            raise ManifestError(f"duplicate sample ids in manifest rows: {dup}")
        validate_rows(canon for canon, _ in pairs)
        stored = [s for _, s in pairs]
        table = pa.Table.from_pylist(stored, schema=ARROW_SCHEMA)
        header: dict[str, Any] = {
            "format": FORMAT,
            "id": "",
            "parents": list(parents or []),
            "stage": {"name": stage, "version": stage_version,
                      "params": canonicalize(params or {})},
            "seed": seed,
            "sources": canonicalize(sources or {}),
            "inventory": canonicalize(inventory or {}),
            "counts": _counts(stored),
        }
        manifest = cls(header=header, table=table, roots=dict(roots or {}))
        header["id"] = _content_id(header, manifest.column_digests())
        validate_header(header)
        return manifest

    def derive(
        self,
        rows: Iterable[dict[str, Any]],
        *,
        stage: str,
        stage_version: str,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> Manifest:
        """A child manifest: same sources and inventory, this manifest as its parent."""
        return Manifest.build(
            rows, stage=stage, stage_version=stage_version, params=params,
            parents=[self.id], sources=self.header["sources"],
            inventory=self.header["inventory"], seed=seed, roots=self.roots,
        )

    def derive_columns(
        self,
        columns: Mapping[str, Sequence[Any] | pa.Array | pa.ChunkedArray],
        *,
        stage: str,
        stage_version: str,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> Manifest:
        """A child manifest in which ``columns`` (name -> one value per row, in this manifest's
        row order) replace this manifest's; the same manifest :meth:`derive` makes from rows
        with those values, without going through rows.

        Only the changed columns are converted, validated (against their part of
        ``schemas/sample.schema.json``) and hashed. ``sample_id``, ``source`` and ``path``
        identify and order the rows and cannot change this way. JSON columns (annotation,
        artifacts, measures) take Python values; the others Python values or Arrow arrays.
        """
        table = self.table
        fixed = {"sample_id", "source", "path"} & set(columns)
        if fixed:
            raise ManifestError(f"derive_columns cannot change {', '.join(sorted(fixed))}: "
                                "they identify and order the rows (derive from rows instead)")
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise ManifestError(f"unknown manifest columns: {sorted(unknown)}")
        digests = dict(self._digests)
        for name in sorted(columns, key=list(COLUMNS).index):
            array = _column_array(name, columns[name], table.num_rows)
            table = table.set_column(table.schema.get_field_index(name), ARROW_SCHEMA.field(name),
                                     array)
            digests.pop(name, None)
        if {"status", "reasons"} & set(columns):
            _check_drop_reasons(table)
        counted = {"status", "reasons", "flags", "category", "label"}
        counts = (_counts(table.select(sorted(counted)).to_pylist())
                  if counted & set(columns) else self.header["counts"])
        header: dict[str, Any] = {
            "format": FORMAT,
            "id": "",
            "parents": [self.id],
            "stage": {"name": stage, "version": stage_version,
                      "params": canonicalize(params or {})},
            "seed": seed,
            "sources": self.header["sources"],
            "inventory": self.header["inventory"],
            "counts": counts,
        }
        child = Manifest(header=header, table=table, roots=dict(self.roots), _digests=digests)
        header["id"] = _content_id(header, child.column_digests())
        validate_header(header)
        return child

    def column_digests(self) -> dict[str, bytes]:
        """Every column's digest, computed once per manifest in memory."""
        for name in COLUMNS:
            if name not in self._digests:
                self._digests[name] = column_digest(self.table.column(name))
        return self._digests

    # ----------------------------------------------------------------- reading
    @property
    def id(self) -> str:
        return self.header["id"]

    @property
    def stage(self) -> str:
        return self.header["stage"]["name"]

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row as a dict, JSON columns parsed, in canonical order."""
        for batch in self.table.to_batches(max_chunksize=4096):
            for stored in batch.to_pylist():
                yield manifest_row(stored)

    @_gc_paused()
    def row_list(self) -> list[dict[str, Any]]:
        return list(self.rows())

    @_gc_paused()
    def column_values(self, name: str) -> list[Any]:
        """One column as Python values in row order (JSON columns parsed)."""
        values = self.table.column(name).to_pylist()
        return [json.loads(v) for v in values] if name in JSON_COLUMNS else values

    def to_pandas(self):
        """The table as a pandas DataFrame (JSON columns left as strings)."""
        return self.table.to_pandas()

    # ----------------------------------------------------------------- files
    def write(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename)."""
        path = Path(path)
        meta = {HEADER_KEY: canonical_json(self.header).encode("utf-8")}
        table = self.table.replace_schema_metadata(meta)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with writing(path):
                pq.write_table(table, tmp, compression="zstd", write_statistics=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: str | os.PathLike, roots: dict[str, str] | None = None) -> Manifest:
        path = Path(path)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"{path}: not a readable Parquet manifest "
                                f"({stable_text(exc)})") from exc
        meta = table.schema.metadata or {}
        if HEADER_KEY not in meta:
            raise ManifestError(f"{path}: Parquet file has no curate header")
        try:
            header = json.loads(meta[HEADER_KEY])
        except ValueError as exc:
            raise ManifestError(f"{path}: the curate header is not JSON "
                                f"({stable_text(exc)})") from exc
        if not isinstance(header, dict):
            raise ManifestError(f"{path}: the curate header is not a JSON object")
        if header.get("format") not in (FORMAT, FORMAT_1):
            raise ManifestError(f"{path}: manifest format {header.get('format')!r}, "
                                f"expected {FORMAT!r}")
        table = table.replace_schema_metadata(None)
        if table.schema != ARROW_SCHEMA:
            raise ManifestError(f"{path}: columns do not match the manifest schema "
                                f"(got {table.schema.names})")
        return cls(header=header, table=table, roots=dict(roots or {}))

    # ----------------------------------------------------------------- integrity
    def recompute_id(self) -> str:
        """The id this manifest's content hashes to now (differs from ``id`` if edited): from
        the table as it is, never from digests kept in memory."""
        if self.header.get("format") == FORMAT_1:
            return _content_id_1(self.header, self.table.to_pylist())
        return _content_id(self.header, {name: column_digest(self.table.column(name))
                                         for name in COLUMNS})

    @_gc_paused()
    def check(self) -> list[str]:
        """Problems with this manifest's integrity: schema, counts, order, id. Empty if sound."""
        problems: list[str] = []
        try:
            validate_header(self.header)
        except ManifestError as exc:
            problems.append(str(exc))
        stored = self.table.to_pylist()
        try:
            validate_rows(manifest_row(r) for r in stored)
        except ManifestError as exc:
            problems.append(str(exc))
        if [_sort_key(r) for r in stored] != sorted(_sort_key(r) for r in stored):
            problems.append("rows are not in canonical (source, path) order")
        if self.header.get("counts") != _counts(stored):
            problems.append("header counts do not match the rows")
        actual = self.recompute_id()
        if actual != self.id:
            problems.append(f"content hashes to {actual}, but the header says {self.id}: "
                            "the manifest was changed after it was written")
        return problems


def _content_id(header: dict[str, Any], digests: Mapping[str, bytes]) -> str:
    """Hash of what the manifest says, leaving out the id itself and the derived counts: the
    header, then each column's digest in canonical column order."""
    h = hashlib.sha256()
    hashed = {k: v for k, v in header.items() if k not in ("id", "counts")}
    h.update(canonical_json(hashed).encode("utf-8"))
    for name in COLUMNS:
        h.update(f"\n{name}\n".encode())
        h.update(digests[name])
    return h.hexdigest()[:ID_LENGTH]


def _content_id_1(header: dict[str, Any], stored_rows: list[dict[str, Any]]) -> str:
    """The id of a format-1 manifest: the header, then every row's canonical JSON."""
    h = hashlib.sha256()
    hashed = {k: v for k, v in header.items() if k not in ("id", "counts")}
    h.update(canonical_json(hashed).encode("utf-8"))
    for row in stored_rows:
        h.update(b"\n")
        # Stored rows are canonical already (written so, or checked by the schema on read).
        h.update(dumps_canonical([row[c] for c in COLUMNS]).encode("utf-8"))
    return h.hexdigest()[:ID_LENGTH]


def _column_array(name: str, values: Any, num_rows: int) -> pa.Array:
    """``values`` as column ``name`` of the manifest schema, canonical and validated."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if name in JSON_COLUMNS:
        if isinstance(values, pa.Array):
            raise ManifestError(f"column {name} takes Python values (it is stored as JSON)")
        canon = [canonicalize(v) for v in values]
        validate_column(name, canon)
        array = pa.array([dumps_canonical(v) for v in canon], type=pa.string())
    else:
        if isinstance(values, pa.Array):
            if values.type != COLUMNS[name]:
                raise ManifestError(f"column {name} is {COLUMNS[name]}, got {values.type}")
            array = values
        else:
            array = pa.array([canonicalize(v) for v in values], type=COLUMNS[name])
        validate_column(name, array.to_pylist())
    if len(array) != num_rows:
        raise ManifestError(f"column {name} has {len(array)} values for {num_rows} rows")
    return array


def _check_drop_reasons(table: pa.Table) -> None:
    """The schema's rule across two columns: a dropped row has reasons, a kept row none."""
    dropped = pc.equal(table.column("status"), DROPPED)
    has_reasons = pc.greater(pc.list_value_length(table.column("reasons")), 0)
    bad = pc.not_equal(dropped, has_reasons)
    if pc.any(bad).as_py():
        index = pc.index(bad, True).as_py()
        row = table.slice(index, 1).to_pylist()[0]
        raise ManifestError(f"sample {row['source']}:{row['path']}: a dropped sample needs "
                            "reasons and a kept one has none")


def _counts(stored_rows: list[dict[str, Any]]) -> dict[str, Any]:
    status = Counter(r["status"] for r in stored_rows)
    reasons: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    categories: dict[str, Counter[str]] = {}
    for r in stored_rows:
        reasons.update({n["code"] for n in r["reasons"]})
        flags.update({n["code"] for n in r["flags"]})
        if r["status"] == KEPT:
            categories.setdefault(r["category"], Counter())[r["label"] or "unlabelled"] += 1
    return {
        "samples": len(stored_rows),
        "kept": status.get(KEPT, 0),
        "dropped": status.get(DROPPED, 0),
        "reasons": dict(sorted(reasons.items())),
        "flags": dict(sorted(flags.items())),
        "kept_by_category": {c: dict(sorted(v.items())) for c, v in sorted(categories.items())},
    }


# --------------------------------------------------------------------- diff
def diff(old: Manifest, new: Manifest) -> dict[str, Any]:
    """Samples added, removed and changed between two manifests, changes field by field."""
    a = {r["sample_id"]: r for r in old.rows()}
    b = {r["sample_id"]: r for r in new.rows()}
    changed = []
    for sid in sorted(a.keys() & b.keys(), key=lambda s: _sort_key(b[s])):
        ra, rb = a[sid], b[sid]
        fields = {}
        for name in COLUMNS:
            if canonicalize(ra[name]) != canonicalize(rb[name]):
                fields[name] = {"old": ra[name], "new": rb[name]}
        if fields:
            changed.append({"sample_id": sid, "source": rb["source"], "path": rb["path"],
                            "changes": fields})
    def brief(r):
        return {"sample_id": r["sample_id"], "source": r["source"], "path": r["path"]}
    return {
        "old": old.id,
        "new": new.id,
        "added": [brief(b[s]) for s in sorted(b.keys() - a.keys(), key=lambda s: _sort_key(b[s]))],
        "removed": [brief(a[s]) for s in sorted(a.keys() - b.keys(), key=lambda s: _sort_key(a[s]))],
        "changed": changed,
    }
