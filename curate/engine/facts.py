"""Look once: per-image facts, computed in one decode and kept by content.

A *fact* is a pure function of an image's bytes — its perceptual hashes, its sharpness and
exposure, the digest of its pixels, its PNG in the store — computed by an :class:`Extractor`
and kept in the workspace keyed by (the image's sha256, the extractor's name, version and
parameters). A stage that needs facts asks :func:`look` for them: what is already known is read
from the fact store; every image that lacks any of them is read, checked against its ingested
sha256 and **decoded once**, and every missing extractor runs on that one decode. So dedup and
quality read no pixels of their own: they are decisions over fact columns.

``ctx.prefetch`` (set by ``curate build`` from the recipe's later stages and exports) names
extractors that ride along: when an image has to be decoded anyway, their facts are computed
from the same decode, so the stages after find them ready. A fact never depends on a path, a
label or another image (decisions do, and stay in the stages), so reusing it is always safe:
a build over a superset of images decodes only the new ones, and a manifest is byte-identical
whether its facts were computed now or found.

Layout: ``W/facts/<name>-<version>-<params digest>/<content sha256>.parquet``, one segment per
look (a ``key`` column, then the extractor's fields), written atomically: a look killed half
way loses only its own segment, which the next run computes again. Images that cannot be
decoded get no fact (their failure is a drop reason, given again each time).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.canonical import content_hash
from curate.core.errors import CurateError
from curate.core.files import sha256_bytes
from curate.engine.store import Store, pixel_digest
from curate.imaging import stats
from curate.imaging.io import decode

if TYPE_CHECKING:
    from curate.engine.runner import Context, SampleEnv

#: Segments of one extractor beyond this many are merged into one on the next write, so that
#: reading an extractor's facts stays one or a few files however many builds added to it.
MAX_SEGMENTS = 16


# --------------------------------------------------------------------------- the decoded image
class Look:
    """One image, read once: its bytes, decoded at most once at full size (``pixels``), and the
    views extractors share. ``decodes`` counts the decodes made (full or reduced)."""

    def __init__(self, data: bytes, row: dict[str, Any], store: Store):
        self.data = data
        self.row = row
        self.store = store
        self.decodes = 0

    @cached_property
    def pixels(self) -> np.ndarray:
        """uint8, H x W or H x W x 3/4 in RGB(A) order (:func:`curate.imaging.io.decode`)."""
        self.decodes += 1
        return decode(self.data)

    @cached_property
    def grey(self) -> np.ndarray:
        """H x W uint8, converted exactly as Pillow's ``convert("L")`` converts (ITU-R 601-2
        luma in 16-bit fixed point), so hashes of it are imagehash's bit for bit."""
        pixels = self.pixels
        if pixels.ndim == 2:
            return pixels
        r, g, b = (pixels[..., c].astype(np.uint32) for c in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)

    @cached_property
    def sharpness(self) -> float:
        """Variance of the Laplacian of :attr:`grey` (:func:`curate.imaging.stats.sharpness`),
        shared by the extractors that need it."""
        return stats.sharpness(self.grey)

    def count_decode(self) -> None:
        """For an extractor that decodes by another path (a reduced JPEG decode)."""
        self.decodes += 1


# --------------------------------------------------------------------------- extractors
#: Metadata of an extractor field that only says which images want the fact (the categories
#: :meth:`Extractor.wants` reads), not how it is computed: left out of the key, so that a fact
#: found for an image is reused whichever stage or policy asked for it.
WANTS_ONLY = {"wants_only": True}


@dataclass(frozen=True)
class Extractor(abc.ABC):
    """A fact about one image. Subclasses are frozen dataclasses (their fields are the
    parameters, part of the key, except those marked :data:`WANTS_ONLY`), with a ``name``, a
    ``version`` (bump it when the computation changes) and ``fields``: the Arrow type of each
    value :meth:`compute` returns."""

    name: ClassVar[str]
    version: ClassVar[str]
    fields: ClassVar[tuple[tuple[str, pa.DataType], ...]]
    #: What it looks at: "image" here; mask facts (curate.engine.mask_facts) say "mask".
    kind: ClassVar[str] = "image"

    @abc.abstractmethod
    def compute(self, look: Look) -> dict[str, Any]:
        """The fact's values for the image in ``look`` (raise to fail the sample)."""

    def wants(self, row: dict[str, Any]) -> bool:
        """Whether this fact is wanted for the image of ``row`` (a dict of
        :data:`LOOK_COLUMNS`): an extractor for some categories only says so here, so that a
        look computing it along (``ctx.prefetch``) leaves the other images alone."""
        return True

    @cached_property
    def key(self) -> str:
        """Folder name of its facts: name, version and a digest of the parameters (not of the
        :data:`WANTS_ONLY` fields)."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.metadata.get("wants_only")}
        return f"{self.name}-{self.version}-{content_hash(params)[:12]}"

    @cached_property
    def schema(self) -> pa.Schema:
        return pa.schema([("key", pa.string()), *self.fields])


@dataclass(frozen=True)
class PixelDigest(Extractor):
    """sha256 of the decoded pixels (:func:`curate.engine.store.pixel_digest`): equal for
    images of identical pixels whatever their encoding."""

    name = "image.pixels"
    version = "1"
    fields = (("digest", pa.string()),)

    def compute(self, look: Look) -> dict[str, Any]:
        return {"digest": pixel_digest(look.pixels)}


@dataclass(frozen=True)
class StoredPng(Extractor):
    """The image as a PNG in the workspace's store (its key hashes the pixels): what an
    export with ``images="png"`` copies, instead of decoding and encoding the image again."""

    name = "image.png"
    version = "1"
    fields = (("png", pa.string()),)

    def compute(self, look: Look) -> dict[str, Any]:
        return {"png": look.store.put_pixels(look.pixels)}


# --------------------------------------------------------------------------- the fact store
class FactTable:
    """An extractor's facts for some images: columns aligned with a list of keys."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._index = {k: i for i, k in enumerate(table.column("key").to_pylist())}

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def take(self, keys: Sequence[str]) -> pa.Table:
        """The facts of ``keys``, in that order (every key must have facts)."""
        return self.table.take(pa.array([self._index[k] for k in keys], pa.int64()))

    def column(self, keys: Sequence[str], field: str) -> list[Any]:
        return self.take(keys).column(field).to_pylist()

    def record(self, key: str) -> dict[str, Any]:
        return self.take([key]).to_pylist()[0]


class FactStore:
    """The facts of a workspace (``W/facts``), one folder of Parquet segments per extractor.

    Facts added with ``persist=False`` (by a dry run, which writes nothing) are kept in memory,
    read like the others, and written with the next persisting :meth:`add` or :meth:`flush`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._loaded: dict[str, tuple[tuple[tuple[str, int, int], ...], FactTable]] = {}
        self._unsaved: dict[str, pa.Table] = {}

    def folder(self, extractor: Extractor) -> Path:
        return self.root / extractor.key

    def read(self, extractor: Extractor) -> FactTable:
        """Every fact of this extractor (kept in memory while the segments are unchanged)."""
        folder = self.folder(extractor)
        # The segments as they are now (a segment's name is its content's hash; size and
        # modification time tell a file damaged in place).
        names = tuple(sorted(_segments(folder)))
        cached = self._loaded.get(extractor.key)
        if cached is not None and cached[0] == names:
            return cached[1]
        tables = []
        for name, _, _ in names:
            try:
                table = pq.read_table(folder / name)
            except (OSError, pa.ArrowException):  # damaged, or merged away: ignore, recompute
                continue
            if table.schema.equals(extractor.schema):
                tables.append(table)
        if extractor.key in self._unsaved:
            tables.append(self._unsaved[extractor.key])
        table = pa.concat_tables(tables) if tables else extractor.schema.empty_table()
        facts = FactTable(table)
        self._loaded[extractor.key] = (names, facts)
        return facts

    def add(self, extractor: Extractor, records: dict[str, dict[str, Any]], *,
            persist: bool = True) -> None:
        """Add facts (image key -> values) as one new segment (with any unsaved ones); merge
        the segments into one when there are many. ``persist=False``: in memory only."""
        keys = sorted(records)
        table = pa.Table.from_pydict(
            {"key": keys, **{f: [records[k][f] for k in keys] for f, _ in extractor.fields}},
            schema=extractor.schema)
        unsaved = self._unsaved.pop(extractor.key, None)
        if unsaved is not None:
            table = pa.concat_tables([unsaved, table])
        self._loaded.pop(extractor.key, None)
        if table.num_rows == 0:
            return
        if not persist:
            self._unsaved[extractor.key] = table
            return
        folder = self.folder(extractor)
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(folder.glob("*.parquet"))
        if len(old) >= MAX_SEGMENTS:
            table = pa.concat_tables([self.read(extractor).table, table])
        _write_segment(folder, table)
        if len(old) >= MAX_SEGMENTS:
            for path in old:  # everything they held is in the new segment
                path.unlink(missing_ok=True)

    def flush(self, extractor: Extractor) -> None:
        """Write the facts a dry run kept in memory."""
        if extractor.key in self._unsaved:
            self.add(extractor, {})


def _segments(folder: Path) -> Iterator[tuple[str, int, int]]:
    """(name, size, mtime) of each segment; one merged away meanwhile (by a reader such as an
    export, which holds no lock) is passed over: its facts are in the merged one."""
    for path in folder.glob("*.parquet"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        yield path.name, st.st_size, st.st_mtime_ns


def _write_segment(folder: Path, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    target = folder / f"{hashlib.sha256(data).hexdigest()}.parquet"
    if target.is_file() and target.read_bytes() == data:
        return  # (a damaged file of that name is replaced)
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- looking
@dataclass(frozen=True)
class LookJob:
    """What the workers of one look run; each row names (by index) the extractors it needs."""

    extractors: tuple[Extractor, ...]


#: The row columns a look reads (the rest of a row is not sent to the workers).
LOOK_COLUMNS = ("sample_id", "source", "path", "sha256", "category")


def look_sample(row: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """Read one image, check it is the one ingested, decode it once, run the extractors."""
    data = env.read_source(row)
    digest = sha256_bytes(data)
    if digest != row["sha256"]:
        raise CurateError(f"changed since ingest (sha256 {digest}, expected {row['sha256']}): "
                          "ingest it again")
    look = Look(data, row, env.store)
    job: LookJob = env.params
    return {"facts": {ex.key: ex.compute(look)
                      for ex in (job.extractors[k] for k in row["extractors"])},
            "decoded": look.decodes}


@dataclass
class Looked:
    """What :func:`look` found: each extractor's facts (by image sha256) and the rows whose
    image could not be looked at (row position -> the drop update the runner made)."""

    facts: dict[str, FactTable]
    failed: dict[int, dict[str, Any]]

    def __getitem__(self, extractor: Extractor) -> FactTable:
        return self.facts[extractor.key]


def look(ctx: Context, stage: str, rows: Sequence[dict[str, Any]], roots: dict[str, str],
         extractors: Sequence[Extractor], *, desc: str | None = None) -> Looked:
    """The facts of ``extractors`` for the images of ``rows`` (dicts with at least
    :data:`LOOK_COLUMNS`) that each extractor :meth:`~Extractor.wants`, computing the missing
    ones in one decode per image (plus whatever of ``ctx.prefetch`` those images lack).
    Decodes are added to ``ctx.counts["decoded"]``."""
    store: FactStore = ctx.workspace.facts
    wanted = list(dict.fromkeys(extractors))
    extra = [ex for ex in dict.fromkeys(ctx.prefetch)
             if ex not in wanted and ex.kind == "image"]  # (mask facts: mask_facts.look_masks)
    known = {ex.key: store.read(ex) for ex in [*wanted, *extra]}
    todo: dict[str, int] = {}  # image sha256 -> the first row that shows it
    for i, row in enumerate(rows):
        if row["sha256"] not in todo and any(row["sha256"] not in known[ex.key]
                                             for ex in wanted if ex.wants(row)):
            todo[row["sha256"]] = i
    failed_by_sha: dict[str, dict[str, Any]] = {}
    if todo:
        missing = [ex for ex in [*wanted, *extra]
                   if any(sha not in known[ex.key] and ex.wants(rows[i])
                          for sha, i in todo.items())]
        # Each image gets only the extractors whose facts it lacks (and that want it).
        jobs = [{**{c: rows[i][c] for c in LOOK_COLUMNS},
                 "extractors": tuple(k for k, ex in enumerate(missing)
                                     if sha not in known[ex.key] and ex.wants(rows[i]))}
                for sha, i in todo.items()]
        env = ctx.env(stage, LookJob(tuple(missing)), roots)
        results = ctx.map(look_sample, jobs, env, desc or f"{stage}: looking")
        new: dict[str, dict[str, dict[str, Any]]] = {ex.key: {} for ex in missing}
        for sha, res in zip(todo, results, strict=True):
            if "facts" not in res:
                failed_by_sha[sha] = res
                continue
            ctx.counts["decoded"] += res["decoded"]
            for key, values in res["facts"].items():
                new[key][sha] = values
        for ex in missing:
            store.add(ex, new[ex.key], persist=ctx.persist_facts)
            known[ex.key] = store.read(ex)
    if ctx.persist_facts:
        for ex in wanted:  # facts an earlier dry run found, kept now
            store.flush(ex)
    failed: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        bad = failed_by_sha.get(row["sha256"])
        if bad is not None:
            # The runner's reason names the row that was read ("path: why"); another row with
            # the same bytes fails the same way, under its own name.
            read = rows[todo[row["sha256"]]]["path"]
            failed[i] = {"drop": [(code, row["path"] + detail[len(read):]
                                   if detail.startswith(f"{read}: ") else detail)
                                  for code, detail in bad["drop"]]}
    return Looked({ex.key: known[ex.key] for ex in wanted}, failed)
