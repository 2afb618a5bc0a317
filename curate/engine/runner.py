"""Stages and the runner that executes them: caching, executors, per-sample randomness.

A stage is a small object with a ``name``, a ``version``, a ``Params`` dataclass and
``run(inputs, params, ctx) -> Manifest``. Work on single samples is a pure module-level function
``fn(row, env) -> update`` that :meth:`Context.map` runs inline, on a process pool or as Ray
tasks (the ``executor``: local, process, ray; with Ray and ``ray_data``, a saved input manifest
is streamed to the workers through Ray Data instead, :meth:`Context.map_manifest`); results
come back in input order and all
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
import collections
import dataclasses
import errno
import hashlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from curate.core.canonical import content_hash
from curate.core.errors import CurateError, UnsafePathError, stable_text
from curate.core.files import source_file_path
from curate.core.lock import WorkspaceLock
from curate.core.manifest import COLUMNS, KEPT, Manifest, drop, manifest_row, note
from curate.core.optional import require
from curate.engine.store import Store
from curate.engine.workspace import Workspace
from curate.imaging.io import BadImage

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
        still inside the source folder (see ``curate.core.files.source_file_path``)."""
        root = self.roots.get(row["source"])
        if root is None:
            raise CurateError(f"no folder is known for source {row['source']!r}")
        return source_file_path(root, rel if rel is not None else row["path"],
                                what=f"path in source {row['source']!r}")

    def read_source(self, row: dict[str, Any], rel: str | None = None) -> bytes:
        with open(self.source_path(row, rel), "rb") as fh:
            return fh.read()

    def rng(self, row: dict[str, Any]) -> np.random.Generator:
        """The sample's own random generator: depends only on (seed, stage, sample id)."""
        digest = hashlib.sha256(f"{self.seed}\x00{self.stage}\x00{row['sample_id']}".encode())
        return np.random.default_rng(int.from_bytes(digest.digest()[:16], "little"))


def _error_update(exc: BaseException, path: str) -> Update:
    if isinstance(exc, BadImage):
        code = "unreadable_image"
    elif isinstance(exc, UnsafePathError):
        code = "unsafe_path"
    elif isinstance(exc, FileNotFoundError):
        code = "missing_file"
    else:
        code = "error"
    detail = stable_text(exc) if isinstance(exc, (CurateError, BadImage, OSError)) else \
        f"{type(exc).__name__}: {stable_text(exc)}"
    return {"drop": [(code, f"{path}: {detail}")]}


#: A write the disk refused (full, over quota, over the file-size limit) is no fault of the
#: sample being processed: it stops the stage instead of dropping every sample after it.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _run_chunk(fn: Callable[[dict, SampleEnv], Update], rows: list[dict],
               env: SampleEnv) -> list[Update]:
    out = []
    for row in rows:
        try:
            out.append(fn(row, env) or {})
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the stage
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise
            out.append(_error_update(exc, row.get("path", "?")))
    return out


def _import_ray():
    return require("ray", "--executor ray")


_RAY_REMOTES: dict[Callable, Any] = {}


def _ray_remote(ray, fn: Callable):
    """``fn`` as a Ray remote function (made once per function, when Ray is first used).

    max_retries: a task whose worker process died runs again (the store's writes are atomic
    and content-addressed, so a half-done task leaves nothing wrong behind); an exception
    raised by ``fn`` is not retried."""
    if fn not in _RAY_REMOTES:
        _RAY_REMOTES[fn] = ray.remote(max_retries=3, retry_exceptions=False)(fn)
    return _RAY_REMOTES[fn]


def _call(fn: Callable[[Any], Any], job: Any) -> Any:
    return fn(job)


def _parquet_batch(table, fn: Callable[[dict, SampleEnv], Update], env: SampleEnv
                   ) -> dict[str, np.ndarray]:
    """A Ray Data batch of a manifest's Parquet table -> the updates of its kept rows, in order
    (dropped rows are skipped), as one output row.

    Rows are decoded exactly as :meth:`Manifest.rows` decodes them, so ``fn`` sees the same
    dicts as with the other executors."""
    rows = [row for row in map(manifest_row, table.to_pylist()) if row["status"] == KEPT]
    # One opaque value per batch: Ray Data would turn a column of dicts into an Arrow struct,
    # unifying their keys (an empty dict comes back None, absent keys as None). Pickle is what
    # Ray itself uses between its workers; these bytes never leave the cluster's object store.
    return {"updates": np.array([pickle.dumps(_run_chunk(fn, rows, env))], dtype=object)}


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


# --------------------------------------------------------------------------- pool workers
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Initializer of every pool worker: the worker dies with the command that started it.

    Workers wait on a pipe that their siblings keep open, so after a ``kill -9`` of the
    command they would wait forever, holding memory (and the workspace lock's open file).
    On Linux the kernel sends them SIGKILL when their parent dies (PR_SET_PDEATHSIG; the pool
    forks them from the thread that submits work, which lives as long as the command);
    elsewhere a watchdog thread exits when the parent changes.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="curate-parent-watchdog").start()


def _exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


# --------------------------------------------------------------------------- context
EXECUTORS = ("local", "process", "ray")
#: How many times the process executor replaces a pool whose worker died, per map.
POOL_RETRIES = 3


class Context:
    """How stages run: workspace, seed, executor and its workers, progress display.

    ``executor`` is ``local`` (inline), ``process`` (a pool of ``jobs`` forked processes) or
    ``ray`` (Ray tasks on the cluster at ``ray_address``, or on a local Ray runtime when None).
    With ``ray_data``, a stage whose input manifest is saved streams it to the workers through
    Ray Data instead of sending rows as tasks (:meth:`map_manifest`).
    None means ``ray`` when a ``ray_address`` is given, else ``process`` when ``jobs`` > 1, else
    ``local``. Every executor gives the same results in the same order, so the manifests do not
    depend on it.
    """

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
        self.workspace = workspace
        self.jobs = jobs
        self.seed = seed
        self.executor = executor
        self.ray_address = ray_address
        self.ray_data = ray_data
        self.console = console or Console(stderr=True)
        self.progress = self.console.is_terminal if progress is None else progress
        self._pool: Executor | None = None
        self._ray_started = False
        self._lock: WorkspaceLock | None = None
        if executor == "ray":
            _import_ray()  # fail now, with a clear message, rather than mid-build

    # The pool is created on first use and shared by every stage of one command.
    def _executor(self) -> Executor:
        if self._pool is None:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(self.jobs,
                                             mp_context=multiprocessing.get_context(method),
                                             initializer=_die_with_parent,
                                             initargs=(os.getpid(),))
        return self._pool

    def lock_workspace(self, command: str) -> None:
        """Take the workspace's writer lock and hold it until :meth:`close`, so that no other
        command writes the workspace in between (a second writer waits; see curate.core.lock).
        ``command`` is what the waiting writers are told is holding them up."""
        lock = self.workspace.lock(command, on_wait=lambda message: self.console.print(
            message, markup=False, highlight=False))
        lock.acquire()
        self._lock = lock

    def _ray(self):
        """The ray module, connected: joins the runtime already started in this process, else
        the cluster at ``ray_address``, else starts a local one (shut down by :meth:`close`)."""
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.ray_address, ignore_reinit_error=True,
                     include_dashboard=False, log_to_driver=False)
            self._ray_started = True
        return ray

    def close(self, *, failed: bool = False) -> None:
        """Stop the workers, then (``failed``: the command raised) remove a workspace this
        command created and never saved into, then release the writer lock."""
        try:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
            if self._ray_started:
                import ray

                ray.shutdown()
                self._ray_started = False
        finally:
            if failed and self.workspace is not None:
                self.workspace.discard_if_unused()
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
        with self._progress_bar() as bar:
            task = bar.add_task(desc, total=len(rows))
            if self.executor == "ray":
                return self._map_ray(fn, rows, env, num_gpus,
                                     lambda done: bar.update(task, completed=done))
            if self.executor == "local" or self.jobs == 1 or len(rows) < 2 * self.jobs:
                results = []
                for start in range(0, len(rows), 64):
                    results.extend(_run_chunk(fn, rows[start:start + 64], env))
                    bar.update(task, completed=len(results))
                return results
            return self._map_pool(fn, rows, env,
                                  lambda done: bar.update(task, completed=done))

    def _map_pool(self, fn, rows: list[dict], env: SampleEnv,
                  advance: Callable[[int], None]) -> list[Update]:
        """Chunks of rows on the process pool. A worker that dies (killed, out of memory)
        breaks the whole pool: a new pool then reruns every chunk not yet collected, up to
        ``POOL_RETRIES`` times. Chunks are pure functions of their rows, and the store's
        writes are atomic and content-addressed, so a rerun chunk gives the same results."""
        size = max(1, min(256, math.ceil(len(rows) / (self.jobs * 8))))
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        results: list[Update] = []
        collected = retries = 0  # chunks whose results are in `results`
        while collected < len(chunks):
            pool = self._executor()
            futures = [pool.submit(_run_chunk, fn, chunk, env) for chunk in chunks[collected:]]
            try:
                for fut in futures:
                    results.extend(fut.result())
                    collected += 1
                    advance(len(results))
            except BrokenProcessPool as exc:
                for fut in futures:
                    fut.cancel()
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
                retries += 1
                if retries > POOL_RETRIES:
                    raise CurateError(f"stage {env.stage!r}: worker processes died "
                                      f"{retries} times; giving up ({stable_text(exc)})") from exc
                self.console.print(f"[yellow]stage {env.stage}: a worker process died; "
                                   f"rerunning the unfinished chunks (retry {retries} of "
                                   f"{POOL_RETRIES})[/]")
        return results

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
        if self.executor != "ray":
            for job in jobs:
                yield fn(job)
            return
        ray = self._ray()
        resources = ray.cluster_resources()
        slots = (int(resources.get("GPU", 0) / num_gpus) if num_gpus
                 else int(resources.get("CPU", 1)))
        if slots < 1:
            raise CurateError(f"{desc or 'this stage'} asks Ray for {num_gpus} GPU(s) per "
                              f"task and the cluster has {resources.get('GPU', 0)}: start "
                              "workers with GPUs, or run on the CPU (--device cpu)")
        remote = _ray_remote(ray, _call)
        remote = remote.options(num_gpus=num_gpus) if num_gpus else remote
        fn_ref = ray.put(fn)
        pending: collections.deque = collections.deque()
        for job in jobs:
            if len(pending) >= 2 * slots:
                yield self._ray_get(ray, pending.popleft(), desc)
            pending.append(remote.remote(fn_ref, job))
        while pending:
            yield self._ray_get(ray, pending.popleft(), desc)

    @staticmethod
    def _ray_get(ray, ref, desc: str) -> Any:
        try:
            return ray.get(ref)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise CurateError(f"{desc or 'a Ray task'}: failed even after retries: "
                              f"{exc}") from exc

    def map_manifest(self, fn: Callable[[dict, SampleEnv], Update], manifest: Manifest,
                     env: SampleEnv, desc: str, *, num_gpus: float = 0
                     ) -> list[Update] | None:
        """``fn`` over the kept rows of a manifest saved in the workspace, through Ray Data:
        ``read_parquet`` of its file → ``map_batches`` (bounded batches, streamed, in order)
        → the updates, in the manifest's order. The driver never ships the rows: workers read
        them from the shared workspace. None when this does not apply (another executor, or a
        manifest not saved yet, ``ray_data`` off); the caller then uses :meth:`map`."""
        if self.executor != "ray" or not self.ray_data or self.workspace is None:
            return None
        path = self.workspace.manifest_path(manifest.id)
        if not path.is_file():
            return None
        kept = manifest.header["counts"]["kept"]
        if kept == 0:
            return []
        ray = self._ray()
        from ray.data import DataContext

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = max(1, min(256, math.ceil(manifest.header["counts"]["samples"] / (cpus * 8))))
        data_context = DataContext.get_current()
        data_context.execution_options.preserve_order = True
        data_context.enable_progress_bars = False  # curate shows its own bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # One manifest file reads as one block, and map_batches runs one task per block:
        # split it so that the batches spread over the cluster.
        blocks = max(1, math.ceil(len(manifest) / size))
        dataset = ray.data.read_parquet(str(path.absolute())).repartition(blocks)
        remote_args = {"num_gpus": num_gpus} if num_gpus else {}
        dataset = dataset.map_batches(_parquet_batch, batch_size=size, batch_format="pyarrow",
                                      fn_args=(fn, env), **remote_args)
        updates: list[Update] = []
        with self._progress_bar() as bar:
            task = bar.add_task(desc, total=kept)
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for blob in batch["updates"]:
                        updates.extend(pickle.loads(blob))
                    bar.update(task, completed=len(updates))
            except ray.exceptions.RayError as exc:
                raise CurateError(f"stage {env.stage!r}: Ray Data failed even after "
                                  f"retries: {exc}") from exc
        if len(updates) != kept:
            raise CurateError(f"stage {env.stage!r}: Ray Data returned {len(updates)} results "
                              f"for {kept} kept samples of {path}")
        return updates

    def _map_ray(self, fn, rows: list[dict], env: SampleEnv, num_gpus: float,
                 advance: Callable[[int], None]) -> list[Update]:
        """Chunks of rows as Ray tasks, at most two per CPU of the cluster in flight, so the
        object store holds a bounded slice of the dataset, never all of it. A task whose worker
        dies is retried (``max_retries``); a sample that raises is already a drop inside
        :func:`_run_chunk`, so exceptions are never retried."""
        ray = self._ray()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = max(1, min(256, math.ceil(len(rows) / (cpus * 8))))
        remote = _ray_remote(ray, _run_chunk)
        remote = remote.options(num_gpus=num_gpus) if num_gpus else remote
        env_ref = ray.put(env)
        pending: collections.deque = collections.deque()
        results: list[Update] = []

        def collect_oldest() -> None:
            try:
                results.extend(ray.get(pending.popleft()))
            except ray.exceptions.RayError as exc:
                raise CurateError(f"stage {env.stage!r}: a Ray task failed even after "
                                  f"retries: {exc}") from exc
            advance(len(results))

        for start in range(0, len(rows), size):
            if len(pending) >= 2 * cpus:
                collect_oldest()
            pending.append(remote.remote(fn, rows[start:start + size], env_ref))
        while pending:
            collect_oldest()
        return results

    def _progress_bar(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console, transient=True,
                        disable=not self.progress)


# --------------------------------------------------------------------------- stages
class Stage(abc.ABC):
    """Base class of a stage. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type]
    uses_seed: ClassVar[bool] = False
    #: GPUs one task of this stage asks Ray for (``--executor ray``); 0 for CPU-only stages.
    #: Stages whose device is a parameter override :meth:`gpus` instead.
    num_gpus: ClassVar[float] = 0

    def gpus(self, params: Any) -> float:
        """GPUs one task of this stage asks Ray for, with these parameters."""
        return self.num_gpus

    @abc.abstractmethod
    def run(self, inputs: list[Manifest], params: Any, ctx: Context) -> Manifest:
        """Compute the output manifest from ``inputs`` (the runner saves and caches it)."""

    def recorded_params(self, params: Any) -> dict[str, Any]:
        """The parameters as the manifest header and the cache key record them. Stages whose
        parameters name files override this to record the files' content hashes instead: the
        output depends on what a file says, not on where it lies."""
        return params_dict(params)

    def output(self, parent: Manifest, rows: list[dict[str, Any]], params: Any,
               ctx: Context) -> Manifest:
        """The child of ``parent`` with ``rows``, stamped with this stage and its parameters."""
        return parent.derive(rows, stage=self.name, stage_version=self.version,
                             params=self.recorded_params(params),
                             seed=ctx.seed if self.uses_seed else None)

    def cache_key(self, inputs: list[Manifest], params: Any, ctx: Context) -> str | None:
        """Key of this stage's output in the cache; None means "always run"."""
        return content_hash({
            "inputs": [m.id for m in inputs],
            "stage": self.name,
            "version": self.version,
            "params": self.recorded_params(params),
            "seed": ctx.seed if self.uses_seed else None,
        })

    def roots(self, inputs: list[Manifest], params: Any) -> dict[str, str]:
        """Source folders of the output: by default, those of the inputs."""
        merged: dict[str, str] = {}
        for m in inputs:
            merged.update(m.roots)
        return merged


def params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})


def make_params(stage: type[Stage] | Stage, values: dict[str, Any]) -> Any:
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


def map_kept(stage: Stage, manifest: Manifest, params: Any, ctx: Context,
             fn: Callable[[dict, SampleEnv], Any], *, desc: str | None = None
             ) -> tuple[list[dict[str, Any]], list[int], list[Any]]:
    """``fn`` over the kept rows: (all rows, indices of the kept ones, their results).

    For stages that judge a sample against the others (a category's distribution, clusters of
    duplicates) after measuring each one; stages that only update samples use
    :func:`map_samples`.
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


def map_samples(stage: Stage, manifest: Manifest, params: Any, ctx: Context,
                fn: Callable[[dict, SampleEnv], Update], *, desc: str | None = None
                ) -> list[dict[str, Any]]:
    """Rows of ``manifest`` with ``fn`` applied to every kept row (dropped rows pass through)."""
    rows, kept_idx, updates = map_kept(stage, manifest, params, ctx, fn, desc=desc)
    for i, update in zip(kept_idx, updates, strict=True):
        rows[i] = apply_update(rows[i], update, stage.name)
    return rows


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


def run_stage(stage: Stage, inputs: list[Manifest], params: Any, ctx: Context, *,
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
        manifest = stage.run(inputs, params, ctx)
        from_cache = False
    elapsed = time.perf_counter() - start
    if save:
        ws.save(manifest, elapsed_s=elapsed, jobs=ctx.jobs, executor=ctx.executor,
                from_cache=from_cache, cache_key=None if from_cache else key)
    dropped, flagged = _notes_by(stage.name, manifest)
    return StageResult(stage.name, manifest, from_cache, elapsed, dropped, flagged)


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
