"""Writers of one workspace exclude each other (issue 16 item 4); readers never wait.

The lock is held by real processes here: a helper process that takes it and sleeps (killed
with SIGKILL to show that a dead holder's lock is taken over), and the CLI itself.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ingest, mtd_subset

from curate.core.errors import CurateError, UsageError
from curate.core.lock import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, lock_timeout
from curate.engine.runner import Context
from curate.engine.workspace import Workspace

CURATE = [sys.executable, "-m", "curate.app.cli"]
HOLDER_COMMAND = "curate holder-for-test"
HOLDER = f"""
import sys, time
from curate.engine.workspace import Workspace
Workspace.open(sys.argv[1], create=False).lock({HOLDER_COMMAND!r}).acquire()
print("locked", flush=True)
time.sleep(600)
"""
#: Generous bound on how long a subprocess may take to get somewhere on a loaded machine
#: (a bound against hanging forever, not a measurement).
PATIENCE_S = 120


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(TIMEOUT_ENV, None)
    env.update(extra)
    return env


@pytest.fixture
def held(tmp_path):
    """Start a process holding the lock of ``tmp_path / 'ws'``; yields (workspace, process)."""
    procs = []

    def hold(ws: Workspace) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws.root)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], PATIENCE_S)
        assert ready and proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def _ingested(tmp_path: Path, mtd_root: Path, per_class: dict[str, int]) -> Workspace:
    source = mtd_subset(mtd_root, tmp_path / "mtd", per_class)
    ws = Workspace.open(tmp_path / "ws")
    with Context(ws, progress=False) as ctx:
        ingest(ctx, "mtd", source)
    return ws


@pytest.fixture
def ingested(tmp_path, mtd_root) -> Workspace:
    """A workspace whose HEAD is an ingest of a few real MTD images."""
    return _ingested(tmp_path, mtd_root, {"MT_Free": 6, "MT_Blowhole": 2, "MT_Crack": 2})


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.05)


def _waiting_line(holder: subprocess.Popen, ws: Workspace) -> str:
    return f"waiting for {holder.pid} ({HOLDER_COMMAND}) to finish with workspace {ws.root}"


# ----------------------------------------------------------------------------- the lock itself
def test_lock_names_its_holder_times_out_and_is_taken_over_when_the_holder_dies(
        tmp_path, held, monkeypatch):
    ws = Workspace.open(tmp_path / "ws")
    holder = held(ws)
    monkeypatch.setenv(TIMEOUT_ENV, "0.3")
    said: list[str] = []
    lock = ws.lock("curate second", on_wait=said.append)
    with pytest.raises(CurateError, match=rf"still in use by {holder.pid} "
                                          rf"\({HOLDER_COMMAND}\) after 0.3 s"):
        lock.acquire()
    assert said == [_waiting_line(holder, ws)]  # said once, not once per try
    assert not lock.held

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock.acquire()  # the kernel dropped the dead holder's lock: no stale lock to clean up
    assert lock.held
    assert (ws.root / "lock").read_text() == f"{os.getpid()}\ncurate second\n"
    with pytest.raises(RuntimeError, match="already holds"):
        ws.lock("curate third").acquire()  # would wait for itself
    lock.release()
    with ws.lock("curate third") as again:
        assert again.held


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_lock_timeout_is_bad_usage(monkeypatch, value):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(UsageError, match=TIMEOUT_ENV):
        lock_timeout()


def test_lock_timeout_defaults_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert lock_timeout() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert lock_timeout() == 2.5


# ----------------------------------------------------------------------------- through the CLI
def test_a_writer_waits_for_the_holder_then_builds_on_what_it_left(ingested, held, tmp_path):
    ws = ingested
    before = ws.head()
    holder = held(ws)
    err = tmp_path / "quality.err"
    with open(err, "w") as fh:
        proc = subprocess.Popen([*CURATE, "quality", "-w", str(ws.root), "-j", "1"],
                                stdout=subprocess.DEVNULL, stderr=fh,
                                env=_env(**{TIMEOUT_ENV: str(PATIENCE_S)}))
    try:
        _wait_until(lambda: "waiting for" in err.read_text(), "quality says it waits")
        assert proc.poll() is None
        assert ws.head() == before and ws.ids() == [before]  # nothing written while waiting

        holder.send_signal(signal.SIGKILL)  # a holder killed with -9 leaves no stale lock
        holder.wait()
        assert proc.wait(timeout=PATIENCE_S) == 0, err.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert err.read_text().count("waiting for") == 1
    assert _waiting_line(holder, ws) in err.read_text()
    after = ws.load()
    assert after.stage == "quality" and after.header["parents"] == [before]


def test_a_writer_that_waits_too_long_fails_in_one_sentence_and_readers_never_wait(
        ingested, held):
    ws = ingested
    before = ws.head()
    holder = held(ws)
    result = subprocess.run([*CURATE, "dedup", "-w", str(ws.root), "-j", "1"],
                            capture_output=True, text=True, env=_env(**{TIMEOUT_ENV: "0.2"}))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == _waiting_line(holder, ws)
    assert len(lines) == 2 and lines[1].startswith(f"error: workspace {ws.root} is still in "
                                                   f"use by {holder.pid} ({HOLDER_COMMAND})")
    assert ws.head() == before and ws.ids() == [before]

    # With a zero timeout, any command that took the lock would fail at once.
    for reader in (["manifest", "list"], ["manifest", "show", "latest"],
                   ["manifest", "diff", before, "latest"],
                   ["manifest", "verify", "--no-originals"]):
        result = subprocess.run([*CURATE, *reader, "-w", str(ws.root)], capture_output=True,
                                text=True, env=_env(**{TIMEOUT_ENV: "0"}))
        assert result.returncode == 0, (reader, result.stderr)
        assert "waiting for" not in result.stderr


def test_two_writers_at_once_both_end_up_in_the_chain(tmp_path, mtd_root):
    # Enough images that each stage runs for a while after reading HEAD: without the lock,
    # both would read the same HEAD and one result would fall out of the chain.
    ws = _ingested(tmp_path, mtd_root, {"MT_Free": 60, "MT_Blowhole": 20, "MT_Crack": 20})
    start = ws.head()
    procs = [subprocess.Popen([*CURATE, stage, "-w", str(ws.root), "-j", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=_env(**{TIMEOUT_ENV: str(PATIENCE_S)}))
             for stage in ("dedup", "quality")]
    for proc in procs:
        _, err = proc.communicate(timeout=PATIENCE_S)
        assert proc.returncode == 0, err
    last = ws.load()
    (middle_id,) = last.header["parents"]
    middle = ws.load(middle_id)
    assert {last.stage, middle.stage} == {"dedup", "quality"}
    assert middle.header["parents"] == [start]
    assert len(ws.ids()) == 3  # nothing computed from a stale HEAD


def test_creating_a_workspace_leaves_a_lock_file_alone(tmp_path):
    """A second command may create the lock file of a workspace that is being created: that
    folder is not "some other non-empty folder"."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "lock").write_text("")
    ws = Workspace.open(root)
    assert (ws.root / "workspace.json").is_file() and ws.manifests_dir.is_dir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match="not empty"):
        Workspace.open(other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_the_first_marker_stands_when_two_commands_create_one_workspace(tmp_path):
    root = tmp_path / "ws"
    first = Workspace.open(root)
    marker = (root / "workspace.json").read_text()
    from curate.engine.workspace import _create_marker

    _create_marker(root / "workspace.json")  # the slower of two creators
    assert (root / "workspace.json").read_text() == marker
    assert Workspace.open(root).id == first.id
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []
    assert Path(root / "workspace.json").stat().st_nlink == 1
