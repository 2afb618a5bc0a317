"""The promise of issue 16 as properties: whatever the source tree, nothing is lost, nothing
outside the root is read, the export holds what it says, failures are one line and change
nothing, and the same tree gives the same manifest.

Trees come from ``tests/treegen.py``: a small valid dataset of each reader kind plus hostile
mutations drawn by hypothesis (names, broken images and masks, links in and out of the root,
loops, FIFOs, malformed annotations). A failing example is printed as the tree's mutation log,
the readable recipe to rebuild it. Unreadable files (chmod 000) are made in every tree; root
reads them all the same in-process, so the whole-build test runs its process under
``unshare --user`` when the tests run as root, where the mode holds.

Examples are few and small (each tree has a handful of images) so the file runs in seconds to
minutes on two busy cores; CI loads the derandomized ``ci`` profile from ``conftest.py`` so
it always draws the same examples; ``CURATE_HYPOTHESIS_SCALE=K`` draws K times as many.

Counterexamples hypothesis found while these tests were written (each fixed, each with its
own regression test besides):
- on the code before issue 16: a directory link to itself crashed ingest (ELOOP traceback); a
  directory link ``kos98 -> kos01`` appeared nowhere; a file link out of the root was read and
  ingested; ``export --out <file>/sub`` ended in a FileExistsError traceback;
- an image Pillow cannot identify was dropped with Pillow's text, which names a memory address
  (``<_io.BytesIO object at 0x7f...>``): the manifest id differed between runs and ``--jobs``
  (tests/test_image_edges.py);
- a failed first ``ingest`` (a Severstal folder whose train.csv links outside it) left an
  empty new workspace behind (tests/test_runner_edges.py);
- a broken YOLO ``data.yaml`` failed with YAML's multi-line error, caret drawing included
  (tests/test_reader_edges.py); bad usage printed click's three-line usage block
  (tests/test_cli_edges.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ingest, labels
from hypothesis import HealthCheck, given, note, settings
from treegen import LAYOUTS, UNPRIVILEGED, Tree, build_tree, trees

from curate.app.cli import cli
from curate.core.errors import CurateError
from curate.engine.runner import Context
from curate.engine.workspace import Workspace
from curate.export.mvtec import MARKER, export_mvtec


def examples(n: int) -> settings:
    """At most ``n`` examples, each as slow as it needs (temporary trees, subprocesses).
    ``CURATE_HYPOTHESIS_SCALE=K`` multiplies ``n`` for a longer hunt than CI affords."""
    n *= int(os.environ.get("CURATE_HYPOTHESIS_SCALE", "1"))
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck),
                    print_blob=True)


# ----------------------------------------------------------------------------- observing
def entries(root: Path) -> dict[str, str]:
    """Every entry under ``root`` that is not a directory (files, links of any kind, FIFOs),
    found without following any link: relative path -> what it is."""
    found: dict[str, str] = {}
    stack = [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(root / prefix) as it:
            for entry in it:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel + "/")
                elif entry.is_symlink():
                    found[rel] = "dir-link" if os.path.isdir(entry.path) else "link"
                else:
                    found[rel] = "file" if entry.is_file() else "special"
    return found


def assert_every_entry_accounted_once(manifest, tree: Tree) -> None:
    """Invariant 1: each entry is exactly once a row, a mask or annotation file of rows, or an
    inventory entry; a directory link may instead be accounted for by what is under it."""
    (inventory,) = manifest.header["inventory"].values()
    rows = manifest.row_list()
    annotation_files = set(inventory["annotation_files"])
    annotation_files |= {r["annotation"]["file"] for r in rows if "file" in r["annotation"]}
    claims = Counter(r["path"] for r in rows)
    claims.update(r["annotation"]["mask"] for r in rows if "mask" in r["annotation"])
    claims.update(e["path"] for e in inventory["unpaired"] + inventory["ignored"])
    claims.update(annotation_files)
    on_disk = entries(tree.root)
    twice = {p: n for p, n in claims.items() if n > 1}
    assert not twice, f"accounted for more than once: {twice}"
    dir_links = [p for p, what in on_disk.items() if what == "dir-link"]

    def under_dir_link(path: str) -> bool:
        return any(path.startswith(d + "/") for d in dir_links)

    missing = {p: what for p, what in on_disk.items() if p not in claims
               and not (what == "dir-link" and any(c.startswith(p + "/") for c in claims))}
    assert not missing, f"entries under the root nowhere in the manifest: {missing}"
    invented = sorted(p for p in claims if p not in on_disk and not under_dir_link(p))
    assert not invented, f"the manifest accounts for paths that are not entries: {invented}"
    assert inventory["files"] == len(claims), \
        f"inventory says {inventory['files']} files, {len(claims)} are accounted for"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_outside_read(manifest, tree: Tree, opened: set[str]) -> None:
    """No file outside the root was opened, and no row holds the hash of one (bytes that only
    exist outside the root can only come from following a link out of it)."""
    assert not opened, f"read outside the root: {sorted(opened)}"
    inside = {sha256(tree.root / p) for p, what in entries(tree.root).items()
              if what == "file" and os.access(tree.root / p, os.R_OK)}
    outside = {sha256(p) for p in tree.outside.rglob("*") if p.is_file()} - inside
    rows = manifest.row_list()
    leaked = [r["path"] for r in rows
              if r.get("sha256") in outside or r["annotation"].get("mask_sha256") in outside]
    assert not leaked, f"rows made from files outside the root: {leaked}"


class OutsideReads:
    """Records every file or folder opened (in this process) that lies outside the root once
    links are resolved. An audit hook cannot be removed, so one is installed for the session
    and switched on around the pipeline only."""

    _active: OutsideReads | None = None
    _installed = False

    def __init__(self, tree: Tree):
        self.outside = os.path.realpath(tree.outside)
        self.opened: set[str] = set()

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        self = cls._active
        if self is None or event not in ("open", "os.scandir", "os.listdir"):
            return
        path = args[0] if args else None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return
        cls._active = None  # realpath itself must not recurse into the hook
        try:
            real = os.path.realpath(path)
            if real == self.outside or real.startswith(self.outside + os.sep):
                self.opened.add(path)
        finally:
            cls._active = self

    @contextmanager
    def watching(self):
        if not OutsideReads._installed:
            sys.addaudithook(OutsideReads._hook)
            OutsideReads._installed = True
        OutsideReads._active = self
        try:
            yield self
        finally:
            OutsideReads._active = None


@contextmanager
def fifo_watch(tree: Tree):
    """A writer waits on each FIFO of the tree: if curate opens one for reading the writer
    gets through (and closes at once, so curate reads an empty file instead of hanging the
    suite). Yields the list of FIFOs that were opened; curate must open none."""
    opened: list[str] = []
    releasing = threading.Event()

    def writer(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY)  # blocks until someone opens it for reading
        if not releasing.is_set():
            opened.append(str(path.relative_to(tree.root)))
        os.close(fd)

    threads = [threading.Thread(target=writer, args=(f,), daemon=True) for f in tree.fifos]
    for t in threads:
        t.start()
    try:
        yield opened
    finally:
        releasing.set()
        for fifo, thread in zip(tree.fifos, threads, strict=True):
            if thread.is_alive():
                try:
                    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
                    thread.join(5)
                    os.close(fd)
                except OSError:
                    pass
            thread.join(5)


def snapshot(ws_root: Path) -> dict[str, str]:
    """Every file of a workspace (HEAD, manifests, run records, store, cache) with its hash;
    {} when the folder does not exist."""
    if not ws_root.exists():
        return {}
    return {str(p.relative_to(ws_root)): sha256(p) if p.is_file() else "dir"
            for p in sorted(ws_root.rglob("*"))}


def assert_export_holds_what_it_reports(out: Path, manifest, report: dict,
                                        beside: tuple[str, ...] = ()) -> None:
    """Invariant 2: the files on disk are exactly those reported, one per sample, masks
    beside their images, and written + skipped is every kept row. ``beside``: top-level
    entries other exports of a build add (sample lists, dataset card)."""
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*")
               if not p.is_dir() and p.relative_to(out).parts[0] not in beside}
    assert json.loads((out / MARKER).read_text()) == report
    files = report["files"]
    listed = {f["file"] for f in files} | {f[k] for f in files for k in ("mask", "foreground")
                                           if f.get(k)}
    assert on_disk - {MARKER} == listed, f"on disk but not reported: {on_disk - listed - {MARKER}}"
    ids = Counter(f["sample_id"] for f in files)
    assert all(n == 1 for n in ids.values()), f"a sample exported twice: {ids.most_common(2)}"
    assert len(files) == report["written"]
    kept = [r for r in manifest.rows() if r["status"] == "kept"]
    assert report["written"] + len(report["skipped"]) == len(kept)
    assert {f["sample_id"] for f in files} | {s["sample_id"] for s in report["skipped"]} == \
        {r["sample_id"] for r in kept}
    counted = Counter(tuple(f["file"].split("/")[:3]) for f in files)
    assert {k: n for k, n in counted.items()} == {
        (c, s, lbl): n for c, splits in report["counts"].items()
        for s, lbls in splits.items() for lbl, n in lbls.items()}
    for f in files:
        category, split, label, name = f["file"].split("/")
        assert len(f["file"].split("/")) == 4
        if label == "good":
            assert not f.get("mask"), f
        else:
            stem = name.rsplit(".", 1)[0]
            assert f["mask"] == f"{category}/ground_truth/{label}/{stem}_mask.png", f
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, f"temporary folders left beside the export: {leftovers}"


def one_line(message: str) -> None:
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- the pipeline
def run_pipeline(tree: Tree, base: Path) -> None:
    """ingest -> labels -> export mvtec in-process, checking invariants 1-3 on the way."""
    ws = Workspace.open(base / "ws")
    out = base / "export"
    with Context(ws, jobs=1, progress=False) as ctx:
        for step in ("ingest", "labels", "export"):
            before = snapshot(ws.root)
            watch = OutsideReads(tree)
            with watch.watching(), fifo_watch(tree) as fifos_opened:
                try:
                    if step == "ingest":
                        manifest = ingest(ctx, tree.reader, tree.root, **tree.options)
                    elif step == "labels":
                        manifest = labels(ctx, manifest)
                    else:
                        report = export_mvtec(manifest, out, ctx)
                except CurateError as exc:
                    note(f"{step} stopped: {exc}")
                    one_line(str(exc))
                    assert snapshot(ws.root) == before, f"a failed {step} changed the workspace"
                    assert not out.exists()
                    assert not fifos_opened, f"{step} opened FIFOs {fifos_opened}"
                    assert not watch.opened, f"{step} read outside the root: {watch.opened}"
                    return
            assert not fifos_opened, f"{step} opened FIFOs {fifos_opened}"
            if step == "ingest":
                assert_every_entry_accounted_once(manifest, tree)
            if step != "export":
                assert_nothing_outside_read(manifest, tree, watch.opened)
            else:
                assert not watch.opened, f"export read outside the root: {watch.opened}"
                assert_export_holds_what_it_reports(out, manifest, report)


@examples(40)
@given(spec=trees())
def test_any_tree_is_accounted_for_exported_whole_and_read_only_inside(spec):
    with tempfile.TemporaryDirectory() as tmp:
        tree = build_tree(spec, Path(tmp))
        note(tree.describe())
        run_pipeline(tree, Path(tmp))


def _ids(tree: Tree, ws_root: Path, jobs: int) -> tuple[str, ...]:
    with Context(Workspace.open(ws_root), jobs=jobs, progress=False) as ctx:
        try:
            first = ingest(ctx, tree.reader, tree.root, **tree.options)
        except CurateError as exc:
            return ("error", str(exc).replace(str(tree.root), "ROOT"))
        return first.id, labels(ctx, first).id


@examples(8)
@given(spec=trees())
def test_the_same_tree_gives_the_same_manifest_ids_whatever_the_jobs(spec):
    with tempfile.TemporaryDirectory() as tmp:
        tree = build_tree(spec, Path(tmp))
        note(tree.describe())
        with fifo_watch(tree):
            one = _ids(tree, Path(tmp) / "ws1", jobs=1)
            two = _ids(tree, Path(tmp) / "ws2", jobs=2)
        assert one == two


# ----------------------------------------------------------------------------- the CLI
def invoke(*args) -> tuple[int, str, str, BaseException | None]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr, result.exception


def assert_clean_failure(code: int, stderr: str, exc: BaseException | None, what: str) -> None:
    """Invariant 3, the visible part: exit 1 or 2, one line on stderr, no traceback (bad
    usage too: no multi-line usage reminder)."""
    assert exc is None or isinstance(exc, SystemExit), \
        f"{what} raised {type(exc).__name__}: {exc}"
    assert code in (1, 2), f"{what} exited {code}: {stderr}"
    one_line(stderr)


@pytest.fixture(scope="module")
def good_workspace(tmp_path_factory):
    """A workspace holding an ingested and labelled MTD-shaped tree, and that tree."""
    base = tmp_path_factory.mktemp("good")
    LAYOUTS["mtd"].write(base / "mtd", 0)
    ws = base / "ws"
    for args in (("ingest", "mtd", base / "mtd"), ("labels",)):
        code, _, stderr, exc = invoke(*args, "-w", ws, "-j", "1")
        assert code == 0, (stderr, exc)
    return ws, base


FAILING = {
    "ingest of an empty folder": lambda b, ws: ("ingest", "mtd", b / "empty"),
    "ingest of a file": lambda b, ws: ("ingest", "mtd", b / "a-file"),
    "ingest of a missing folder": lambda b, ws: ("ingest", "mtd", b / "nowhere"),
    "ingest of a FIFO": lambda b, ws: ("ingest", "mtd", b / "fifo"),
    "ingest of a link loop": lambda b, ws: ("ingest", "mtd", b / "loop"),
    "ingest of another layout": lambda b, ws: ("ingest", "kolektorsdd", b / "mtd"),
    "ingest of garbage": lambda b, ws: ("ingest", "severstal", b / "garbage"),
    "an unknown reader option": lambda b, ws: ("ingest", "mtd", b / "mtd", "-o", "nosuch=1"),
    "a bad reader option value": lambda b, ws: ("ingest", "casting", b / "mtd", "-o",
                                                "format=gif"),
    "an option without =": lambda b, ws: ("ingest", "mtd", b / "mtd", "-o", "format"),
    "zero jobs": lambda b, ws: ("ingest", "mtd", b / "mtd", "-j", "0"),
    "labels of an unknown manifest": lambda b, ws: ("labels", "0000beef"),
    "export over a folder that is not an export": lambda b, ws: (
        "export", "mvtec", "--out", b / "occupied"),
    "export onto a file": lambda b, ws: ("export", "mvtec", "--out", b / "a-file"),
    "export under a file": lambda b, ws: ("export", "mvtec", "--out", b / "a-file" / "sub"),
    "export into the workspace": lambda b, ws: ("export", "mvtec", "--out", ws),
    "export into the source": lambda b, ws: ("export", "mvtec", "--out", b / "mtd"),
    "export of an unlabelled manifest": lambda b, ws: (
        "export", "mvtec", *[i.id for i in Workspace.open(ws).list() if i.stage == "ingest"],
        "--out", b / "new-export"),
    "export with a bad image mode": lambda b, ws: ("export", "mvtec", "--out", b / "x",
                                                   "--images", "gif"),
    "a workspace that is a file": lambda b, ws: ("ingest", "mtd", b / "mtd", "-w",
                                                 b / "a-file"),
    "a build of nothing": lambda b, ws: ("build", "hss-iad", "--sources", b / "empty",
                                         "--out", b / "built"),
    "a build of an unknown recipe": lambda b, ws: ("build", "no-such-recipe", "--out",
                                                   b / "built"),
    "a build from a source of the wrong kind": lambda b, ws: (
        "build", "hss-iad", "--source", f"kolektorsdd={b / 'mtd'}", "--out", b / "built"),
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_a_failing_command_says_one_line_and_changes_nothing(case, good_workspace):
    ws, base = good_workspace
    for name in ("empty", "occupied"):
        (base / name).mkdir(exist_ok=True)
    (base / "occupied" / "keep.txt").write_text("mine\n")
    (base / "a-file").write_text("a file\n")
    (base / "garbage").mkdir(exist_ok=True)
    (base / "garbage" / "train.csv").write_bytes(b"\xff\xfe\x00garbage")
    if not os.path.lexists(base / "fifo"):
        os.mkfifo(base / "fifo")
        os.symlink("loop", base / "loop")
    args = FAILING[case](base, ws)
    if "-w" not in args:
        args = (*args, "-w", ws)
    before, source_before = snapshot(ws), snapshot(base / "mtd")
    outside_before = sorted(p.name for p in base.iterdir())
    code, _, stderr, exc = invoke(*args, "-j", "1") if "-j" not in args else invoke(*args)
    assert_clean_failure(code, stderr, exc, case)
    assert snapshot(ws) == before, f"{case} changed the workspace"
    assert snapshot(base / "mtd") == source_before, f"{case} changed the source"
    assert sorted(p.name for p in base.iterdir()) == outside_before, \
        f"{case} left files beside the workspace"
    assert (base / "occupied" / "keep.txt").read_text() == "mine\n"


@examples(6)
@given(spec=trees())
def test_the_cli_on_any_tree_succeeds_or_fails_in_one_line(spec):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tree = build_tree(spec, base)
        note(tree.describe())
        ws, out = base / "ws", base / "export"
        options = [a for k, v in tree.options.items() for a in ("-o", f"{k}={v}")]
        with fifo_watch(tree) as fifos_opened:
            for args in (("ingest", tree.reader, tree.root, *options), ("labels",),
                         ("export", "mvtec", "--out", out)):
                before = snapshot(ws)
                code, _, stderr, exc = invoke(*args, "-w", ws, "-j", "1")
                if code != 0:
                    assert_clean_failure(code, stderr, exc, args[0])
                    assert snapshot(ws) == before, f"a failed {args[0]} changed the workspace"
                    break
        assert not fifos_opened


@examples(3)
@given(spec=trees(kinds=("kolektorsdd", "mtd", "mvtec", "casting-voc"), max_mutations=3))
def test_a_whole_build_on_any_tree_succeeds_or_fails_in_one_line(spec):
    """`curate build` as a user runs it, in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tree = build_tree(spec, base)
        note(tree.describe())
        ws, out = base / "ws", base / "built"
        curate = shutil.which("curate", path=str(Path(sys.executable).parent))
        with fifo_watch(tree) as fifos_opened:
            proc = subprocess.run(
                [*UNPRIVILEGED, curate, "build", "hss-iad", "--source", f"{tree.reader}={tree.root}", "-w",
                 ws, "--out", out, "--no-card", "-j", "1"],
                capture_output=True, text=True, timeout=600)
        assert not fifos_opened
        if proc.returncode != 0:
            assert proc.returncode in (1, 2), proc.stderr[-2000:]
            one_line(proc.stderr)
            assert not out.exists()
            return
        report = json.loads((out / MARKER).read_text())
        final = Workspace.open(ws).load(report["manifest"])
        assert_export_holds_what_it_reports(out, final, report,
                                            beside=("realnet", "realiad", "card", "card.md"))
