"""Stages and the runner that executes them: caching, executors, per-sample randomness.

A stage is a small object with a ``name``, a ``version``, a ``Params`` dataclass and
``run(inputs, params, ctx) -> Manifest``. Work on single samples is a pure module-level function
``fn(row, env) -> update`` that :meth:`Context.map` runs inline, on a process pool or as Ray
tasks (the ``executor``: local, process, ray; with Ray and ``ray_data``, a saved input manifest
is streamed to the workers through Ray Data instead, :meth:`Context.map_manifest`; how each
runs is in :mod:`curate.engine.executors`); results come back in input order and all
randomness comes from ``env.rng(row)``, seeded by (seed, stage, sample id), so the output never
depends on ``--jobs``, the executor or scheduling.

An *update* is a dict: column name -> new value, plus the merge keys ``artifacts`` and
``measures`` (dicts merged into the row's), ``flags`` (a list of notes appended) and ``drop``
(a list of ``(code, detail)`` pairs: the sample is dropped with those reasons). A per-sample
function that raises does not stop the stage: that sample is dropped with the error as reason.

The runner caches: the output of (input ids, stage name and version, parameters, seed if the
stage uses one) is looked up in the workspace before running, so rerunning a build redoes only
what changed.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
from rich.console import Console

from curate.core.canonical import content_hash
from curate.core.errors import CurateError
from curate.core.files import sha256_file
from curate.core.lock import WorkspaceLock
from curate.core.manifest import COLUMNS, KEPT, Manifest, drop, note
from curate.engine.executors import ProcessPool, RayRuntime, map_inline
from curate.engine.facts import Extractor
from curate.engine.progress import ProgressBar
from curate.engine.store import Store
from curate.engine.workspace import Workspace, source_file

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Update = dict[str, Any]


# --------------------------------------------------------------------------- per-sample side
@dataclass(frozen=True)
class SampleEnv:
    """Everything a per-sample function may use besides its row. Picklable and small."""

    stage: str
    params: Any
    roots: dict[str, str]
    store_root: str
    seed: int | None = None

    @cached_property
    def store(self) -> Store:
        return Store(self.store_root)

    def source_path(self, row: dict[str, Any], rel: str | None = None) -> Path:
        """Absolute path of the row's image (or of ``rel`` in the row's source), checked to be
        still inside the source folder (see :func:`curate.engine.workspace.source_file`)."""
        return source_file(self.roots, row["source"], rel if rel is not None else row["path"])

    def read_source(self, row: dict[str, Any], rel: str | None = None) -> bytes:
        with open(self.source_path(row, rel), "rb") as fh:
            return fh.read()

    def rng(self, row: dict[str, Any]) -> np.random.Generator:
        """The sample's own random generator: depends only on (seed, stage, sample id)."""
        digest = hashlib.sha256(f"{self.seed}\x00{self.stage}\x00{row['sample_id']}".encode())
        return np.random.default_rng(int.from_bytes(digest.digest()[:16], "little"))


def apply_update(row: dict[str, Any], update: Update, stage: str) -> dict[str, Any]:
    """Return a copy of ``row`` with ``update`` applied (see the module docstring)."""
    row = dict(row)
    for key, value in update.items():
        if key == "artifacts":
            row["artifacts"] = {**row["artifacts"], **value}
        elif key == "measures":
            row["measures"] = {**row["measures"], **value}
        elif key == "flags":
            row["flags"] = [*row["flags"], *(note(stage, c, d) for c, d in value)]
        elif key == "drop":
            for code, detail in value:
                drop(row, stage, code, detail)
        elif key in COLUMNS and key not in ("sample_id", "source", "path", "status", "reasons"):
            row[key] = value
        else:
            raise ValueError(f"stage {stage!r} returned an update for {key!r}, "
                             "which a stage may not set")
    return row


def column_updates(parent: Manifest, updates: Iterable[tuple[int, Update]], stage: str
                   ) -> dict[str, list[Any]]:
    """The columns of ``parent`` that ``updates`` (row index, update) touch, with the updates
    applied by :func:`apply_update` (so with the same meaning); untouched columns are not read."""
    updates = list(updates)
    touched: set[str] = set()
    for _, update in updates:
        for key in update:
            touched |= {"status", "reasons"} if key == "drop" else {key}
    columns = {name: parent.column_values(name) for name in COLUMNS if name in touched}
    for index, update in updates:
        changed = apply_update({name: values[index] for name, values in columns.items()},
                               update, stage)
        for name, values in columns.items():
            values[index] = changed[name]
    return columns


# --------------------------------------------------------------------------- context
EXECUTORS = ("local", "process", "ray")


class Context:
    """How stages run: workspace, seed, executor and its workers, progress display.

    ``executor`` is ``local`` (inline), ``process`` (a pool of ``jobs`` forked processes) or
    ``ray`` (Ray tasks on the cluster at ``ray_address``, or on a local Ray runtime when None).
    With ``ray_data``, a stage whose input manifest is saved streams it to the workers through
    Ray Data instead of sending rows as tasks (:meth:`map_manifest`).
    None means ``ray`` when a ``ray_address`` is given, else ``process`` when ``jobs`` > 1, else
    ``local``. Every executor gives the same results in the same order, so the manifests do not
    depend on it. ``progress``: show progress bars (default: when the console is a terminal).
    """

    #: The executor kind: ``local``, ``process`` or ``ray``; a stage asks it whether its jobs
    #: run in this process (anything but ``ray``), where a callback such as progress can reach.
    executor: str

    def __init__(self, workspace: Workspace | None, *, jobs: int = 1, seed: int = 0,
                 progress: bool | None = None, console: Console | None = None,
                 executor: str | None = None, ray_address: str | None = None,
                 ray_data: bool = False):
        if jobs < 1:
            raise CurateError(f"--jobs must be at least 1, got {jobs}")
        if executor is None:
            executor = "ray" if ray_address else "process" if jobs > 1 else "local"
        if executor not in EXECUTORS:
            raise CurateError(f"unknown executor {executor!r}; choose one of "
                              f"{', '.join(EXECUTORS)}")
        if ray_address is not None and executor != "ray":
            raise CurateError("--ray-address needs --executor ray")
        if ray_data and executor != "ray":
            raise CurateError("--ray-data needs --executor ray")
        self._workspace = workspace
        self.jobs = jobs
        self.seed = seed
        self.executor = executor
        self.ray_address = ray_address
        self.ray_data = ray_data
        self.console = console or Console(stderr=True)
        self.show_progress = self.console.is_terminal if progress is None else progress
        self._pool = ProcessPool(jobs, warn=self.console.print)
        # Connecting to Ray is deferred to the first task; importing it is not, so that a
        # missing Ray fails now, with a clear message, rather than mid-build.
        self._ray = RayRuntime(ray_address) if executor == "ray" else None
        self._lock: WorkspaceLock | None = None
        #: Work done, by kind, for reports and tests: ``decoded`` counts the images decoded by
        #: looks (:func:`curate.engine.facts.look`).
        self.counts: Counter[str] = Counter()
        #: Extractors whose facts a look computes too for any image it decodes anyway: set by
        #: a build from its later stages (:meth:`Stage.facts`) and exports.
        self.prefetch: list[Extractor] = []
        #: False while a stage runs dry: looks keep the facts they compute in memory only.
        self.persist_facts = True

    @property
    def workspace(self) -> Workspace:
        """The workspace the stages read and write (a context made without one has none)."""
        if self._workspace is None:
            raise CurateError("this command runs without a workspace")
        return self._workspace

    @property
    def in_process(self) -> bool:
        """Whether jobs given to :meth:`tasks` run in this process (every executor but Ray):
        then they may carry callbacks, such as a progress bar's, that cannot be pickled."""
        return self.executor != "ray"

    def progress(self, desc: str, total: int | None, **fields: Any) -> ProgressBar:
        """A progress bar on this context's console (drawn only when progress is shown); see
        :class:`curate.engine.progress.ProgressBar` for ``total`` and ``fields``."""
        return ProgressBar(self.console, desc, total, enabled=self.show_progress, **fields)

    def lock_workspace(self, command: str) -> None:
        """Take the workspace's writer lock and hold it until :meth:`close`, so that no other
        command writes the workspace in between (a second writer waits; see curate.core.lock).
        ``command`` is what the waiting writers are told is holding them up."""
        lock = self.workspace.lock(command, on_wait=lambda message: self.console.print(
            message, markup=False, highlight=False))
        lock.acquire()
        self._lock = lock

    def close(self, *, failed: bool = False) -> None:
        """Stop the workers, then (``failed``: the command raised) remove a workspace this
        command created and never saved into, then release the writer lock."""
        try:
            self._pool.shutdown()
            if self._ray is not None:
                self._ray.shutdown()
        finally:
            if failed and self._workspace is not None:
                self._workspace.discard_if_unused()
            # Last: the workers are gone, and everything the command wrote is in place.
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def env(self, stage: str, params: Any, roots: dict[str, str], *, seed: bool = False
            ) -> SampleEnv:
        return SampleEnv(stage=stage, params=params, roots=dict(roots),
                         store_root=str(self.workspace.store.root),
                         seed=self.seed if seed else None)

    def map(self, fn: Callable[[dict, SampleEnv], Update], rows: Sequence[dict],
            env: SampleEnv, desc: str, *, num_gpus: float = 0) -> list[Update]:
        """``[fn(row, env) for row in rows]`` on the executor, in order, with progress.

        ``num_gpus`` is what one task asks Ray for (a stage's :attr:`Stage.num_gpus`); the
        local and process executors ignore it.
        """
        rows = list(rows)
        if not rows:
            return []
        with self.progress(desc, len(rows)) as bar:
            def advance(done: int) -> None:
                bar.update(completed=done)

            if self._ray is not None:
                return self._ray.map(fn, rows, env, num_gpus, advance)
            # Forking costs more than it saves on a handful of rows.
            if self.executor == "local" or self.jobs == 1 or len(rows) < 2 * self.jobs:
                return map_inline(fn, rows, env, advance)
            return self._pool.map(fn, rows, env, advance)

    def tasks(self, fn: Callable[[Any], Any], jobs: Sequence[Any], *, num_gpus: float = 0,
              desc: str = "") -> Iterator[Any]:
        """``fn(job)`` for every job, yielded in order as they finish.

        For work that loads a model and runs it on a whole batch (SDAS sampling, a detector's
        training): one job is one unit of such work, and ``fn`` must be a module-level function
        of a picklable job. With Ray each job is a task asking for ``num_gpus`` GPUs, so jobs
        spread over a cluster's GPUs, at most two per GPU (or per CPU) in flight; a task whose
        worker dies is retried, an exception inside ``fn`` is raised here (never retried). The
        local and process executors run the jobs one after the other in this process: a GPU
        is not shared with forked workers, and the models use every core themselves.
        """
        jobs = list(jobs)
        if self._ray is None:
            for job in jobs:
                yield fn(job)
            return
        yield from self._ray.tasks(fn, jobs, num_gpus=num_gpus, desc=desc)

    def map_manifest(self, fn: Callable[[dict, SampleEnv], Update], manifest: Manifest,
                     env: SampleEnv, desc: str, *, num_gpus: float = 0
                     ) -> list[Update] | None:
        """``fn`` over the kept rows of a manifest saved in the workspace, streamed through
        Ray Data (:meth:`RayRuntime.map_parquet`), in the manifest's order. None when this does
        not apply (another executor, or a manifest not saved yet, ``ray_data`` off); the
        caller then uses :meth:`map`."""
        if self._ray is None or not self.ray_data or self._workspace is None:
            return None
        path = self._workspace.manifest_path(manifest.id)
        if not path.is_file():
            return None
        kept = manifest.header["counts"]["kept"]
        if kept == 0:
            return []
        with self.progress(desc, kept) as bar:
            updates = self._ray.map_parquet(fn, path, manifest.header["counts"]["samples"],
                                            env, num_gpus,
                                            lambda done: bar.update(completed=done))
        if len(updates) != kept:
            raise CurateError(f"stage {env.stage!r}: Ray Data returned {len(updates)} results "
                              f"for {kept} kept samples of {path}")
        return updates


# --------------------------------------------------------------------------- stages
#: A stage's parameters: a frozen dataclass, one per stage.
P = TypeVar("P", bound="DataclassInstance")


class Stage(abc.ABC, Generic[P]):
    """Base class of a stage. Subclasses set the class attributes and implement ``run``;
    ``class Dedup(Stage[DedupParams])`` names the type of its parameters once."""

    name: ClassVar[str]
    version: ClassVar[str]
    #: The parameters' class (a ClassVar cannot name a type variable, hence a plain annotation).
    Params: type[P]
    uses_seed: ClassVar[bool] = False
    #: GPUs one task of this stage asks Ray for (``--executor ray``); 0 for CPU-only stages.
    #: Stages whose device is a parameter override :meth:`gpus` instead.
    num_gpus: ClassVar[float] = 0

    def gpus(self, params: P) -> float:
        """GPUs one task of this stage asks Ray for, with these parameters."""
        return self.num_gpus

    @abc.abstractmethod
    def run(self, inputs: list[Manifest], params: P, ctx: Context) -> Manifest:
        """Compute the output manifest from ``inputs`` (the runner saves and caches it)."""

    def recorded_params(self, params: P) -> dict[str, Any]:
        """The parameters as the manifest header and the cache key record them. Stages whose
        parameters name files override this to record the files' content hashes instead
        (:func:`recorded_file`): the output depends on what a file says, not on where it
        lies."""
        return params_dict(params)

    def output(self, parent: Manifest, rows: list[dict[str, Any]], params: P,
               ctx: Context) -> Manifest:
        """The child of ``parent`` with ``rows``, stamped with this stage and its parameters."""
        return parent.derive(rows, stage=self.name, stage_version=self.version,
                             params=self.recorded_params(params),
                             seed=ctx.seed if self.uses_seed else None)

    def output_updates(self, parent: Manifest, updates: Iterable[tuple[int, Update]],
                       params: P, ctx: Context) -> Manifest:
        """The child of ``parent`` with ``updates`` (row index, update; applied in order)
        applied: what :meth:`output` gives for the updated rows, with only the columns the
        updates touch converted, validated and hashed (:meth:`Manifest.derive_columns`)."""
        return parent.derive_columns(column_updates(parent, updates, self.name),
                                     stage=self.name, stage_version=self.version,
                                     params=self.recorded_params(params),
                                     seed=ctx.seed if self.uses_seed else None)

    def facts(self, params: P) -> list[Extractor]:
        """The per-image facts this stage reads (:mod:`curate.engine.facts`): a build asks an
        earlier look to compute them from the same decode."""
        return []

    def cache_key(self, inputs: list[Manifest], params: P, ctx: Context) -> str | None:
        """Key of this stage's output in the cache; None means "always run"."""
        return content_hash({
            "inputs": [m.id for m in inputs],
            "stage": self.name,
            "version": self.version,
            "params": self.recorded_params(params),
            "seed": ctx.seed if self.uses_seed else None,
        })

    def roots(self, inputs: list[Manifest], params: P) -> dict[str, str]:
        """Source folders of the output: by default, those of the inputs."""
        merged: dict[str, str] = {}
        for m in inputs:
            merged.update(m.roots)
        return merged


def params_dict(params: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    return dict(params or {})


def recorded_file(path: str | os.PathLike) -> str:
    """How a parameter that names a file is recorded: ``sha256:<hex digest of its bytes>``.

    Weights and override files decide a stage's output by what they say, not where they lie,
    so the manifest id and the cache key must not depend on the path. The digest is kept per
    file version (path, inode, size, modification and change times) for the life of the
    process: official checkpoints are gigabytes, and the runner asks for the recorded
    parameters more than once per stage."""
    st = os.stat(path)
    digest = _file_digest(str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns,
                          st.st_ctime_ns)
    return f"sha256:{digest}"


@functools.cache
def _file_digest(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256_file(path)


def make_params(stage: type[Stage[P]] | Stage[P], values: dict[str, Any]) -> P:
    """Build ``stage.Params`` from a dict, with a clear error for unknown or bad fields."""
    known = {f.name for f in dataclasses.fields(stage.Params)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CurateError(f"stage {stage.name!r} has no parameter(s) {', '.join(unknown)}; "
                          f"its parameters are: {', '.join(sorted(known)) or 'none'}")
    try:
        return stage.Params(**values)
    except (TypeError, ValueError) as exc:
        raise CurateError(f"bad parameters for stage {stage.name!r}: {exc}") from exc


def map_kept(stage: Stage[Any], manifest: Manifest, params: Any, ctx: Context,
             fn: Callable[[dict, SampleEnv], Any], *, desc: str | None = None
             ) -> tuple[list[dict[str, Any]], list[int], list[Any]]:
    """``fn`` over the kept rows: (all rows, indices of the kept ones, their results).

    For stages that judge a sample against the others (a category's distribution, clusters of
    duplicates) after measuring each one; stages that only update samples use
    :func:`map_updates`. ``params`` is what ``fn`` gets as ``env.params``: the stage's
    parameters, or anything picklable built from them.
    """
    rows = manifest.row_list()
    kept_idx = [i for i, r in enumerate(rows) if r["status"] == KEPT]
    env = ctx.env(stage.name, params, manifest.roots, seed=stage.uses_seed)
    streamed = ctx.map_manifest(fn, manifest, env, desc or stage.name,
                                num_gpus=stage.gpus(params))
    if streamed is not None:
        return rows, kept_idx, streamed
    return rows, kept_idx, ctx.map(fn, [rows[i] for i in kept_idx], env, desc or stage.name,
                                   num_gpus=stage.gpus(params))


def kept_rows(manifest: Manifest, columns: Sequence[str]
              ) -> tuple[list[int], list[dict[str, Any]]]:
    """The kept rows of ``manifest`` with only ``columns`` (dicts), and their positions: for
    stages that decide over a few columns and facts (:mod:`curate.engine.facts`), which need
    not build whole rows."""
    status = manifest.column_values("status")
    positions = [i for i, s in enumerate(status) if s == KEPT]
    values = {name: manifest.column_values(name) for name in columns}
    return positions, [{name: values[name][i] for name in columns} for i in positions]


def map_updates(stage: Stage[Any], manifest: Manifest, params: Any, ctx: Context,
                fn: Callable[[dict, SampleEnv], Update], *, desc: str | None = None
                ) -> list[tuple[int, Update]]:
    """``fn``'s update of every kept row, as (row index, update) for
    :meth:`Stage.output_updates` (dropped rows pass through)."""
    _, kept_idx, updates = map_kept(stage, manifest, params, ctx, fn, desc=desc)
    return list(zip(kept_idx, updates, strict=True))


@dataclass
class StageResult:
    stage: str
    manifest: Manifest
    from_cache: bool
    elapsed_s: float
    dropped: dict[str, int] = field(default_factory=dict)  # by this stage, by reason code
    flagged: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        counts = self.manifest.header["counts"]
        params = self.manifest.header["stage"]["params"]
        return {
            "stage": self.stage,
            "source": params.get("source") if self.stage == "ingest" else None,
            "manifest": self.manifest.id,
            "from_cache": self.from_cache,
            "elapsed_s": round(self.elapsed_s, 3),
            "samples": counts["samples"],
            "kept": counts["kept"],
            "dropped": counts["dropped"],
            "dropped_here": self.dropped,
            "flagged_here": self.flagged,
        }


def run_stage(stage: Stage[P], inputs: list[Manifest], params: P, ctx: Context, *,
              save: bool = True) -> StageResult:
    """Run ``stage`` (or take its output from the cache), save the output, make it HEAD.

    With ``save=False`` (a dry run) the output is computed and returned, and nothing is written:
    no manifest, no cache entry, HEAD unchanged.
    """
    ws = ctx.workspace
    start = time.perf_counter()
    key = stage.cache_key(inputs, params, ctx)
    cached_id = ws.cache_lookup(key) if key else None
    if cached_id is not None:
        manifest = ws.load(cached_id)
        manifest.roots = stage.roots(inputs, params)
        from_cache = True
    else:
        ctx.persist_facts = save
        try:
            manifest = stage.run(inputs, params, ctx)
        finally:
            ctx.persist_facts = True
        from_cache = False
    elapsed = time.perf_counter() - start
    if save:
        ws.save(manifest, elapsed_s=elapsed, jobs=ctx.jobs, executor=ctx.executor,
                from_cache=from_cache, cache_key=None if from_cache else key)
    dropped, flagged = _notes_by(stage.name, manifest)
    _release_freed_memory()
    return StageResult(stage.name, manifest, from_cache, elapsed, dropped, flagged)


def _release_freed_memory() -> None:
    """Give the heap memory a stage freed back to the system (glibc keeps it otherwise, and a
    build's resident memory would grow with every stage by what the last one let go)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _notes_by(stage: str, manifest: Manifest) -> tuple[dict[str, int], dict[str, int]]:
    """Drop and flag codes this stage wrote, counted once per sample (read from the Arrow
    columns directly: no need to parse the JSON columns of every row)."""
    counts = []
    for column in ("reasons", "flags"):
        counter: Counter[str] = Counter()
        for notes in manifest.table.column(column).to_pylist():
            counter.update({n["code"] for n in notes if n["stage"] == stage})
        counts.append(dict(sorted(counter.items())))
    return counts[0], counts[1]


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
