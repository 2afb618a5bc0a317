"""Where per-sample work runs: inline, on a pool of forked processes, or as Ray tasks.

:class:`curate.engine.runner.Context` chooses the executor; this module does the running. Rows
travel in chunks (:func:`chunk_size`, the one rule for every executor) through
:func:`run_chunk`, which turns a sample's exception into a drop, so a chunk never fails
because one sample did. Every executor returns the updates in input order.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.core.errors import CurateError, UnsafePathError, stable_text
from curate.core.manifest import KEPT, manifest_row
from curate.core.optional import require
from curate.imaging.io import BadImage

if TYPE_CHECKING:  # the runner imports this module; these names are for annotations only
    from curate.engine.runner import SampleEnv, Update

    SampleFn = Callable[[dict, SampleEnv], Update]

#: How many times the process executor replaces a pool whose worker died, per map.
POOL_RETRIES = 3
#: Upper bound of a chunk: a chunk is the unit that a dead worker loses and reruns.
MAX_CHUNK = 256
#: Chunks per worker: enough that a slow chunk does not leave the other workers idle at the end.
CHUNKS_PER_WORKER = 8


def chunk_size(rows: int, workers: int) -> int:
    """Rows per chunk when ``rows`` rows are shared by ``workers`` workers (processes, or the
    CPUs of a Ray cluster): about ``CHUNKS_PER_WORKER`` chunks each, at most ``MAX_CHUNK``
    rows, at least one."""
    return max(1, min(MAX_CHUNK, math.ceil(rows / (max(1, workers) * CHUNKS_PER_WORKER))))


def chunks(rows: list[dict], workers: int) -> list[list[dict]]:
    size = chunk_size(len(rows), workers)
    return [rows[start:start + size] for start in range(0, len(rows), size)]


# --------------------------------------------------------------------------- one chunk
#: A write the disk refused (full, over quota, over the file-size limit) is no fault of the
#: sample being processed: it stops the stage instead of dropping every sample after it.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def run_chunk(fn: SampleFn, rows: list[dict], env: SampleEnv) -> list[Update]:
    """``fn`` over ``rows``; a sample that raises gets a drop update instead."""
    out = []
    for row in rows:
        try:
            out.append(fn(row, env) or {})
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the stage
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                raise
            out.append(_error_update(exc, row.get("path", "?")))
    return out


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


def map_inline(fn: SampleFn, rows: list[dict], env: SampleEnv,
               advance: Callable[[int], None]) -> list[Update]:
    """The chunks one after the other in this process (``advance``: results so far)."""
    results: list[Update] = []
    for chunk in chunks(rows, 1):
        results.extend(run_chunk(fn, chunk, env))
        advance(len(results))
    return results


# --------------------------------------------------------------------------- process pool
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
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
    threading.Thread(target=exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="curate-parent-watchdog").start()


def exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


class ProcessPool:
    """``jobs`` forked worker processes, started on first use and shared by every stage of one
    command; a pool broken by a dead worker is replaced (:meth:`map`)."""

    def __init__(self, jobs: int, warn: Callable[[str], None]):
        self.jobs = jobs
        self._warn = warn
        self._pool: ProcessPoolExecutor | None = None

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(self.jobs,
                                             mp_context=multiprocessing.get_context(method),
                                             initializer=die_with_parent,
                                             initargs=(os.getpid(),))
        return self._pool

    def map(self, fn: SampleFn, rows: list[dict], env: SampleEnv,
            advance: Callable[[int], None]) -> list[Update]:
        """Chunks of rows on the pool. A worker that dies (killed, out of memory) breaks the
        whole pool: a new pool then reruns every chunk not yet collected, up to
        ``POOL_RETRIES`` times. Chunks are pure functions of their rows, and the store's
        writes are atomic and content-addressed, so a rerun chunk gives the same results."""
        todo = chunks(rows, self.jobs)
        results: list[Update] = []
        collected = retries = 0  # chunks whose results are in `results`
        while collected < len(todo):
            pool = self._started()
            futures: list[Future] = [pool.submit(run_chunk, fn, chunk, env)
                                     for chunk in todo[collected:]]
            try:
                for fut in futures:
                    results.extend(fut.result())
                    collected += 1
                    advance(len(results))
            except BrokenProcessPool as exc:
                for fut in futures:
                    fut.cancel()
                self.shutdown()
                retries += 1
                if retries > POOL_RETRIES:
                    raise CurateError(f"stage {env.stage!r}: worker processes died "
                                      f"{retries} times; giving up ({stable_text(exc)})") from exc
                self._warn(f"[yellow]stage {env.stage}: a worker process died; rerunning the "
                           f"unfinished chunks (retry {retries} of {POOL_RETRIES})[/]")
        return results

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------- Ray
def import_ray() -> ModuleType:
    return require("ray", "--executor ray")


_RAY_REMOTES: dict[Callable, Any] = {}


def _ray_remote(ray: ModuleType, fn: Callable) -> Any:
    """``fn`` as a Ray remote function (made once per function, when Ray is first used).

    max_retries: a task whose worker process died runs again (the store's writes are atomic
    and content-addressed, so a half-done task leaves nothing wrong behind); an exception
    raised by ``fn`` is not retried."""
    if fn not in _RAY_REMOTES:
        _RAY_REMOTES[fn] = ray.remote(max_retries=3, retry_exceptions=False)(fn)
    return _RAY_REMOTES[fn]


def _call(fn: Callable[[Any], Any], job: Any) -> Any:
    return fn(job)


def _parquet_batch(table: Any, fn: SampleFn, env: SampleEnv) -> dict[str, np.ndarray]:
    """A Ray Data batch of a manifest's Parquet table -> the updates of its kept rows, in order
    (dropped rows are skipped), as one output row.

    Rows are decoded exactly as :meth:`Manifest.rows` decodes them, so ``fn`` sees the same
    dicts as with the other executors."""
    rows = [row for row in map(manifest_row, table.to_pylist()) if row["status"] == KEPT]
    # One opaque value per batch: Ray Data would turn a column of dicts into an Arrow struct,
    # unifying their keys (an empty dict comes back None, absent keys as None). Pickle is what
    # Ray itself uses between its workers; these bytes never leave the cluster's object store.
    return {"updates": np.array([pickle.dumps(run_chunk(fn, rows, env))], dtype=object)}


class RayRuntime:
    """The Ray runtime of one command: joined or started on first use, shut down by
    :meth:`shutdown` if this command started it."""

    def __init__(self, address: str | None):
        self.address = address
        self._started = False
        import_ray()  # fail now, with a clear message, rather than mid-build

    def connect(self) -> ModuleType:
        """The ray module, connected: joins the runtime already started in this process, else
        the cluster at ``address``, else starts a local one."""
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True,
                     include_dashboard=False, log_to_driver=False)
            self._started = True
        return ray

    def shutdown(self) -> None:
        if self._started:
            import_ray().shutdown()
            self._started = False

    def _cpus(self, ray: ModuleType) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: SampleFn, rows: list[dict], env: SampleEnv, num_gpus: float,
            advance: Callable[[int], None]) -> list[Update]:
        """Chunks of rows as Ray tasks, at most two per CPU of the cluster in flight, so the
        object store holds a bounded slice of the dataset, never all of it. A task whose worker
        dies is retried (``max_retries``); a sample that raises is already a drop inside
        :func:`run_chunk`, so exceptions are never retried."""
        ray = self.connect()
        cpus = self._cpus(ray)
        remote = _ray_remote(ray, run_chunk)
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

        for chunk in chunks(rows, cpus):
            if len(pending) >= 2 * cpus:
                collect_oldest()
            pending.append(remote.remote(fn, chunk, env_ref))
        while pending:
            collect_oldest()
        return results

    def map_parquet(self, fn: SampleFn, path: Path, samples: int, env: SampleEnv,
                    num_gpus: float, advance: Callable[[int], None]) -> list[Update]:
        """``fn`` over the kept rows of the manifest file ``path`` (``samples`` rows in all),
        through Ray Data: ``read_parquet`` → ``map_batches`` (bounded batches, streamed, in
        order) → the updates, in the manifest's order. The driver never ships the rows:
        workers read them from the shared workspace."""
        ray = self.connect()
        from ray.data import DataContext

        size = chunk_size(samples, self._cpus(ray))
        data_context = DataContext.get_current()
        data_context.execution_options.preserve_order = True
        data_context.enable_progress_bars = False  # curate shows its own bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # One manifest file reads as one block, and map_batches runs one task per block:
        # split it so that the batches spread over the cluster.
        blocks = max(1, math.ceil(samples / size))
        dataset = ray.data.read_parquet(str(path.absolute())).repartition(blocks)
        remote_args = {"num_gpus": num_gpus} if num_gpus else {}
        dataset = dataset.map_batches(_parquet_batch, batch_size=size, batch_format="pyarrow",
                                      fn_args=(fn, env), **remote_args)
        updates: list[Update] = []
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for blob in batch["updates"]:
                    updates.extend(pickle.loads(blob))
                advance(len(updates))
        except ray.exceptions.RayError as exc:
            raise CurateError(f"stage {env.stage!r}: Ray Data failed even after "
                              f"retries: {exc}") from exc
        return updates

    def tasks(self, fn: Callable[[Any], Any], jobs: Sequence[Any], *, num_gpus: float,
              desc: str) -> Iterator[Any]:
        """``fn(job)`` for every job as a Ray task asking for ``num_gpus`` GPUs, yielded in
        order; at most two per GPU (or per CPU) in flight. A task whose worker dies is
        retried; an exception inside ``fn`` is raised here (never retried)."""
        ray = self.connect()
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
                yield self._get(ray, pending.popleft(), desc)
            pending.append(remote.remote(fn_ref, job))
        while pending:
            yield self._get(ray, pending.popleft(), desc)

    @staticmethod
    def _get(ray: ModuleType, ref: Any, desc: str) -> Any:
        try:
            return ray.get(ref)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise CurateError(f"{desc or 'a Ray task'}: failed even after retries: "
                              f"{exc}") from exc
