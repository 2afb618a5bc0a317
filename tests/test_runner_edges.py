"""The runner and the workspace at their edges (issue 16 items 9 and 10): pool workers die
with their command, a full disk changes nothing, a damaged manifest is named, not a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ingest, mtd_subset, truncate

from curate.app.cli import cli
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.stages.quality import Quality, QualityParams

CURATE = [sys.executable, "-m", "curate.app.cli"]
#: Bound against hanging forever on a loaded machine, not a measurement.
PATIENCE_S = 120


def _wait_until(condition, what: str, patience: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + patience
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.02)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def workspace_with_head(tmp_path, mtd_root) -> Workspace:
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 6, "MT_Blowhole": 3,
                                                      "MT_Crack": 3})
    ws = Workspace.open(tmp_path / "ws")
    with Context(ws, progress=False) as ctx:
        ingest(ctx, "mtd", source)
    return ws


def _state(ws: Workspace) -> dict[str, str]:
    """Every file of the workspace (but the lock and the facts) with its bytes' hash. Facts
    (curate.engine.facts) are kept by content, as pure functions of an image's bytes: those a
    failed stage computed change no manifest, HEAD or cache entry, and spare its rerun the
    decoding."""
    import hashlib

    return {str(p.relative_to(ws.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.root.rglob("*")) if p.is_file() and p.name != "lock"
            and p.relative_to(ws.root).parts[0] != "facts"}


# ----------------------------------------------------------------------------- item 10
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_pool_workers_die_when_their_command_is_killed(tmp_path, mtd_root):
    """kill -9 of a command leaves no worker behind (they used to wait forever, parent 1)."""
    proc = subprocess.Popen([*CURATE, "ingest", "mtd", str(mtd_root), "-w",
                             str(tmp_path / "ws"), "-j", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        workers: set[int] = set()

        def two_workers() -> bool:
            assert proc.poll() is None, "the command finished before its workers were seen"
            workers.update(_children(proc.pid))
            return len(workers) >= 2

        _wait_until(two_workers, "the command has two pool workers")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait_until(lambda: not any(_alive(w) for w in workers), "the workers are gone", 10)
    finally:
        proc.kill()
        proc.wait()


def test_watchdog_ends_a_worker_whose_parent_died():
    """The fallback where PR_SET_PDEATHSIG does not exist: a thread that watches the parent."""
    script = """
import os, time
from curate.engine.executors import exit_when_orphaned
pid = os.fork()
if pid == 0:
    os.close(1); os.close(2)  # (the test reads both to their end)
    exit_when_orphaned(os.getppid(), poll_s=0.02)
    time.sleep(600)  # reached only if the watchdog returned instead of exiting
print(pid, flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    child = int(out)
    try:
        _wait_until(lambda: not _alive(child), "the orphaned child exits", 10)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- item 9: disk full
def test_a_failed_save_leaves_the_workspace_as_it_was(workspace_with_head, monkeypatch):
    ws = workspace_with_head
    before = _state(ws)

    def full(self, manifest_id):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / "HEAD"))

    # HEAD is written last: the manifest, its run record and its cache entry are already on
    # disk when the disk fills up, and must go again.
    monkeypatch.setattr(Workspace, "set_head", full)
    with Context(ws, progress=False) as ctx, pytest.raises(OSError) as caught:
        run_stage(Quality(), [ws.load()], QualityParams(), ctx)
    assert caught.value.errno == errno.ENOSPC
    assert _state(ws) == before


def _limit_file_size(limit: int):
    def preexec() -> None:
        # Writes past the limit fail with EFBIG, as on a full disk (instead of SIGXFSZ).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("stage, limit", [
    ("quality", 2048),  # measures only: the manifest is the first thing too big to write
    ("labels", 64),     # writes masks to the store: the first mask is too big
])
def test_a_stage_that_cannot_write_fails_in_one_sentence_and_changes_nothing(
        workspace_with_head, stage, limit):
    ws = workspace_with_head
    before = _state(ws)
    result = subprocess.run([*CURATE, stage, "-w", str(ws.root), "-j", "1"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size(limit))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(ws.root) in lines[0]  # names the file it could not write
    if stage == "labels":  # the store write stopped the stage: no sample was dropped for it
        assert str(ws.store.root) in lines[0]
    after = _state(ws)
    # Nothing changed but what a rerun reuses: store artifacts are complete,
    # content-addressed files. No temporary file, manifest, record, cache entry or new HEAD.
    assert {k: v for k, v in after.items() if not k.startswith("store/")} == before
    assert not [k for k in after if k.endswith(".tmp")]


# ----------------------------------------------------------------------------- item 9: damage
def test_manifest_list_names_a_truncated_manifest_and_lists_the_others(workspace_with_head):
    ws = workspace_with_head
    good = ws.head()
    with Context(ws, progress=False) as ctx:
        bad = run_stage(Quality(), [ws.load()], QualityParams(), ctx).manifest.id
    truncate(ws.manifest_path(bad))

    result = CliRunner().invoke(cli, ["manifest", "list", "-w", str(ws.root)])
    assert result.exit_code == 1
    assert good in result.stdout and bad in result.stdout
    assert "unreadable" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {ws.manifest_path(bad)}: not a readable Parquet manifest")

    listed = CliRunner().invoke(cli, ["manifest", "list", "--json", "-w", str(ws.root)])
    assert listed.exit_code == 1
    by_id = {m["id"]: m for m in json.loads(listed.stdout)}
    assert by_id[good]["problem"] is None and by_id[good]["stage"] == "ingest"
    assert "not a readable Parquet manifest" in by_id[bad]["problem"]
    assert by_id[bad]["latest"] is True

    for args in (["manifest", "show", bad], ["manifest", "diff", good, bad]):
        shown = CliRunner().invoke(cli, [*args, "-w", str(ws.root)])
        assert shown.exit_code == 1, args
        assert shown.exception is None or isinstance(shown.exception, SystemExit)
        assert str(ws.manifest_path(bad)) in shown.stderr


def test_a_damaged_run_record_or_header_is_named(workspace_with_head):
    ws = workspace_with_head
    head = ws.head()
    ws.record_path(head).write_text("{not json")
    (info,) = ws.list()
    assert info.problem.startswith(f"{ws.record_path(head)}: unreadable run record")
    result = CliRunner().invoke(cli, ["manifest", "show", "-w", str(ws.root)])
    assert result.exit_code == 1
    assert str(ws.record_path(head)) in result.stderr


def test_a_failed_first_command_leaves_no_workspace_behind(tmp_path):
    """Found by tests/test_invariants.py: an ingest that failed (a Severstal folder whose
    train.csv links outside it) still left a new, empty workspace skeleton behind."""
    not_a_source = tmp_path / "garbage"
    not_a_source.mkdir()
    (not_a_source / "notes.txt").write_text("no images here")
    runner = CliRunner()
    new = tmp_path / "new-ws"
    result = runner.invoke(cli, ["ingest", "mtd", str(not_a_source), "-w", str(new)])
    assert result.exit_code == 1, result.output
    assert not new.exists()
    empty = tmp_path / "empty-ws"
    empty.mkdir()
    result = runner.invoke(cli, ["ingest", "mtd", str(not_a_source), "-w", str(empty)])
    assert result.exit_code == 1, result.output
    assert empty.is_dir() and not any(empty.iterdir())


def test_a_failed_command_keeps_a_workspace_that_holds_manifests(tmp_path, mtd_root):
    tiles = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 2})
    ws = tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", "mtd", str(tiles), "-w", str(ws)]).exit_code == 0
    before = sorted(p.relative_to(ws) for p in ws.rglob("*") if p.name != "lock")
    result = runner.invoke(cli, ["ingest", "mtd", str(tmp_path / "missing"), "-w", str(ws)])
    assert result.exit_code == 1
    assert sorted(p.relative_to(ws) for p in ws.rglob("*") if p.name != "lock") == before
