"""The writer lock of a workspace: one command at a time may change it.

Two commands writing one workspace at once would both read the same HEAD and both make their
own output HEAD, so one result would silently fall out of the chain. A writer therefore holds
this lock from before it reads HEAD until after it wrote its last manifest; a second writer
waits for it (saying once whom it waits for), up to ``CURATE_LOCK_TIMEOUT`` seconds. Readers
(``curate manifest list/show/diff/verify``) never take it: manifests are immutable and HEAD
is replaced atomically, so they always see a consistent workspace.

The lock is ``flock`` on an open file: the kernel releases it when the holder exits, however
it exits (``kill -9`` included), so a lock is never stale and needs no cleaning up. The file
also holds the holder's pid and command line, only for the waiting message.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from curate.core.errors import CurateError, UsageError

TIMEOUT_ENV = "CURATE_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
#: How often a waiting writer tries again.
POLL_S = 0.1


def lock_timeout() -> float:
    """Seconds a writer waits for the lock: ``$CURATE_LOCK_TIMEOUT``, else the default."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds (0 or more)")
    return value


class WorkspaceLock:
    """Exclusive, process-wide right to write the workspace whose lock file is ``path``.

    ``command`` describes this process to the writers that wait for it; ``on_wait`` is called
    once with "waiting for <pid> (<command>) to finish with workspace <folder>" when the lock
    is taken (default: print it on stderr).
    """

    #: Lock files this process holds: taking one twice would wait for itself.
    _held: set[Path] = set()

    def __init__(self, path: Path, command: str, *, timeout: float | None = None,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path).absolute()
        self.command = command
        self.timeout = lock_timeout() if timeout is None else timeout
        self.on_wait = on_wait or (lambda message: print(message, file=sys.stderr, flush=True))
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self.path in WorkspaceLock._held:
            raise RuntimeError(f"this process already holds the lock {self.path}")
        # O_CLOEXEC: programs this process starts (a database, a browser) do not inherit it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._wait_for(fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            # Who holds it, for the message of the next writer (the lock itself is the flock).
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{self.command}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, the next writer waits for
            # "another process"; the command itself will say what failed
        self._fd = fd
        WorkspaceLock._held.add(self.path)

    def _wait_for(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            holder = self.holder()
            if time.monotonic() >= deadline:
                raise CurateError(
                    f"workspace {self.path.parent} is still in use by {holder} after "
                    f"{self.timeout:g} s of waiting: let it finish, or set {TIMEOUT_ENV} to "
                    "wait longer")
            if not announced:
                self.on_wait(f"waiting for {holder} to finish with workspace "
                             f"{self.path.parent}")
                announced = True
            time.sleep(POLL_S)

    def holder(self) -> str:
        """'<pid> (<command>)' of the process holding the lock, as it wrote them."""
        try:
            pid, _, command = self.path.read_text("utf-8", "replace").partition("\n")
        except OSError:
            pid = command = ""
        pid, command = pid.strip(), command.strip()
        if not pid.isdigit():  # taken an instant ago, not written yet
            return "another process"
        return f"{pid} ({command or 'unknown command'})"

    def release(self) -> None:
        if self._fd is None:
            return
        # The pid and command stay in the file: the next holder overwrites them, and an
        # unlocked file means nothing whatever it says.
        os.close(self._fd)
        self._fd = None
        WorkspaceLock._held.discard(self.path)

    def __enter__(self) -> WorkspaceLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
