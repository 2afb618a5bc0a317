"""FiftyOne review sessions: push, tag, pull — with a real MongoDB and a real browser."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ingest, labels

from curate.app.cli import cli
from curate.core.errors import CurateError
from curate.core.manifest import diff
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.stages.dedup import Dedup, DedupParams
from curate.stages.foreground.stage import Foreground, ForegroundParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fo(tmp_path_factory):
    """FiftyOne on a database of its own, in a temporary folder (real mongod)."""
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fiftyone-db"))
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    fiftyone = pytest.importorskip("fiftyone", reason="review tests need FiftyOne "
                                                      "(pip install 'curate[review]')")
    yield fiftyone
    for name in fiftyone.list_datasets():
        fiftyone.delete_dataset(name)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, mtd_root, fo):
    """A workspace with a manifest of 24 real MTD images (with a planted exact duplicate)."""
    root = tmp_path_factory.mktemp("mtd") / "mtd"
    for cls, n in (("Free", 12), ("Crack", 6), ("Uneven", 6)):
        src, dst = mtd_root / f"MT_{cls}" / "Imgs", root / f"MT_{cls}" / "Imgs"
        dst.mkdir(parents=True)
        for jpg in sorted(src.glob("*.jpg"))[:n]:
            shutil.copy(jpg, dst)
            shutil.copy(jpg.with_suffix(".png"), dst)
    twin = root / "MT_Free" / "Imgs" / "twin.jpg"
    shutil.copy(sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))[0], twin)
    shutil.copy(sorted((root / "MT_Free" / "Imgs").glob("*.png"))[0], twin.with_suffix(".png"))
    ws = Workspace.open(tmp_path_factory.mktemp("ws") / "ws")
    with Context(ws, jobs=1, progress=False) as ctx:
        m = labels(ctx, ingest(ctx, "mtd", root))
        m = run_stage(Dedup(), [m], DedupParams(radius=0, group_radius=0), ctx).manifest
        m = run_stage(Foreground(), [m], ForegroundParams(), ctx).manifest
    return ws, m


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def rows_by_path(m):
    return {r["path"]: r for r in m.rows()}


def test_push_is_complete_and_idempotent(reviewed, fo):
    from curate.export.fiftyone import push

    ws, m = reviewed
    first = push(ws, m, "mtd-push")
    assert (first.added, first.already_there) == (len(m), 0)
    again = push(ws, m, "mtd-push")
    assert (again.added, again.already_there) == (0, len(m))
    ds = fo.load_dataset("mtd-push")
    assert len(ds) == len(m) and ds.persistent
    assert ds.info["curate_manifest"] == m.id and ds.info["curate_workspace"] == ws.id
    sample = ds.match(fo.ViewField("label") == "Crack").first()
    assert Path(sample.ground_truth.mask_path).is_file()
    assert sample.filepath.endswith(".jpg") and Path(sample.filepath).is_file()
    twin = ds.match(fo.ViewField("path") == "MT_Free/Imgs/twin.jpg").first()
    assert {"dropped", "reason:exact_duplicate"} <= set(twin.tags)
    assert twin.dedup_cluster is not None and isinstance(twin.dedup_sharpness, float)
    assert "dropped-exact_duplicate" in first.views and "dedup-clusters" in first.views
    clusters = ds.load_saved_view("dedup-clusters")  # one dynamic group: the twin pair
    assert len(clusters) == 1 and ds.count("dedup_cluster") == 2
    assert ds.mask_targets["ground_truth"] == {255: "defect"}
    # What the App shows without a click (issue 17 item 4): masks overlaid, label and tags on
    # the tiles, width and height in the modal.
    config = ds.app_config
    assert set(config.active_fields.paths) == {"ground_truth", "foreground", "label",
                                               "curate_tags"}
    assert not config.active_fields.exclude
    masks = {f["path"]: f["maskTargetsColors"] for f in config.color_scheme.fields
             if "maskTargetsColors" in f}
    assert set(masks) == {"ground_truth", "foreground"}
    assert all(colours[0]["intTarget"] == 255 for colours in masks.values())
    assert [c.label for c in twin.curate_tags.classifications] == twin.tags
    assert sample.curate_tags is None  # a kept Crack image with no finding: nothing to show
    assert Path(sample.foreground.mask_path).is_file()
    assert ds.count("metadata") == len(ds)
    import cv2

    height, width = cv2.imread(sample.filepath).shape[:2]
    assert (sample.metadata.width, sample.metadata.height) == (width, height)


def test_round_trip_on_real_mtd(reviewed, fo):
    from curate.export.fiftyone import push

    ws, m = reviewed
    push(ws, m, "mtd-round-trip")
    ds = fo.load_dataset("mtd-round-trip")
    rows = rows_by_path(m)
    crack, free, uneven = (sorted(p for p in rows if p.startswith(f"MT_{c}/"))
                           for c in ("Crack", "Free", "Uneven"))
    tags = {crack[0]: ["drop"], crack[1]: ["mask-bad"], free[1]: ["relabel:Crack", "move:test"],
            uneven[0]: ["category:Tiles"], free[2]: ["move:train"],
            "MT_Free/Imgs/twin.jpg": ["keep"], free[3]: ["keep"]}
    for path, new in tags.items():
        sample = ds.match(fo.ViewField("path") == path).first()
        sample.tags = sample.tags + new  # curate's own tags stay; pull ignores them
        sample.save()
    out = invoke("review", "pull", "mtd-round-trip", "-w", ws.root, "--json")
    import json

    (summary,) = json.loads(out.stdout)
    new = ws.load(summary["manifest"])
    assert new.header["parents"] == [m.id] and new.stage == "review"
    d = diff(m, new)
    changed = {c["path"]: c["changes"] for c in d["changed"]}
    assert set(changed) == {crack[0], crack[1], free[1], uneven[0], free[2],
                            "MT_Free/Imgs/twin.jpg"}  # keep on a kept sample: no change
    assert changed[crack[0]]["reasons"]["new"][-1]["code"] == "reviewer_drop"
    assert changed[crack[1]]["reasons"]["new"][-1]["code"] == "mask_bad"
    assert changed[free[1]]["label"] == {"old": "good", "new": "Crack"}
    assert changed[free[1]]["split"]["new"] == "test"
    assert changed[uneven[0]]["category"]["new"] == "Tiles"
    assert changed[free[2]]["split"] == {"old": None, "new": "train"}
    twin = changed["MT_Free/Imgs/twin.jpg"]
    assert twin["status"] == {"old": "dropped", "new": "kept"}
    assert twin["flags"]["new"][-1]["code"] == "overruled"
    assert "exact_duplicate" in twin["flags"]["new"][-1]["detail"]
    shown = invoke("manifest", "diff", m.id, new.id, "-w", ws.root).stdout
    assert "6 changed" in shown and "reviewer_drop" in shown and "Tiles" in shown
    assert summary["dropped_here"] == {"mask_bad": 1, "reviewer_drop": 1}


def test_unknown_and_contradictory_tags_and_foreign_datasets(reviewed, fo, tmp_path):
    from curate.export.fiftyone import push
    from curate.stages.review import pull

    ws, m = reviewed
    push(ws, m, "mtd-bad-tags")
    ds = fo.load_dataset("mtd-bad-tags")
    first, second = ds.head(2)
    first.tags = first.tags + ["approved", "move:sideways"]
    first.save()
    with Context(ws, progress=False) as ctx, pytest.raises(
            CurateError, match=r"outside the review vocabulary: 'approved' \(1\), "
                               r"'move:sideways' \(1\)"):
        pull(ctx, "mtd-bad-tags")
    first.tags = [t for t in first.tags if t not in ("approved", "move:sideways")] + \
        ["drop", "keep"]
    first.save()
    second.tags = second.tags + ["move:train", "move:test"]
    second.save()
    with Context(ws, progress=False) as ctx, pytest.raises(CurateError) as info:
        pull(ctx, "mtd-bad-tags")
    message = str(info.value)
    assert "2 sample(s)" in message and first.path in message and second.path in message
    assert "drop and keep" in message
    other = Workspace.open(tmp_path / "other")
    with Context(other, progress=False) as ctx, pytest.raises(
            CurateError, match="pushed from another workspace"):
        pull(ctx, "mtd-bad-tags")
    with Context(ws, progress=False) as ctx, pytest.raises(CurateError, match="no FiftyOne"):
        pull(ctx, "never-pushed")


def test_a_dataset_name_holding_another_manifest_is_refused(reviewed, fo):
    from curate.export.fiftyone import push

    ws, m = reviewed
    push(ws, m, "mtd-taken")
    parent = ws.load(m.header["parents"][0])
    with pytest.raises(CurateError, match="already holds manifest"):
        push(ws, parent, "mtd-taken")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_shows_the_dataset_in_a_real_browser(reviewed, fo, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    ws, m = reviewed
    invoke("review", "push", m.id, "--name", "mtd-browser", "-w", ws.root)
    port = _free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "curate.app.cli", "review", "open", "mtd-browser", "--port",
         str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ)
    url = f"http://127.0.0.1:{port}/datasets/mtd-browser"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert app.poll() is None, app.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        flags = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--virtual-time-budget=20000",
                 f"--user-data-dir={tmp_path / 'chromium'}"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True,
                             text=True, timeout=120).stdout
        count = re.search(r'data-cy="entry-counts".*?entry-count-part[^>]*>([\d,]+)<', dom)
        assert "mtd-browser" in dom
        assert count and int(count.group(1).replace(",", "")) == len(m)
        # The label and curate's tags are drawn on the tiles (issue 17 item 4).
        assert 'title="label: Crack"' in dom and 'title="label: good"' in dom
        assert 'title="curate_tags: reason:exact_duplicate"' in dom
        shot = tmp_path / "app.png"
        subprocess.run([chromium, *flags, "--window-size=1400,900", f"--screenshot={shot}",
                        url], capture_output=True, timeout=120)
        import cv2
        import numpy as np

        pixels = cv2.imread(str(shot))
        assert pixels is not None and pixels.shape == (900, 1400, 3)
        assert pixels.std() > 10  # not a blank page
        # MTD images are grey (R = G = B), and so is the App's background: any colour in the
        # grid, right of the sidebar and below the toolbar, is drawn over the images.
        plain = [cv2.imread(str(ws.source_file(m, r["source"], r["path"])))
                 for r in m.row_list()[:4]]
        assert all(np.ptp(image.astype(int), axis=2).max() == 0 for image in plain)
        grid = pixels[150:, 310:].astype(int)
        grid[:340 - 150, 940 - 310:] = 0  # where the App's one-time "Enterprise" popover lies
        b, g, r = (grid[..., i] for i in range(3))
        defect = (r - np.maximum(g, b) > 60) & (abs(g - b) < 40)  # red, not orange
        veil = (b - r > 12) & (b - r < 60)  # the slate foreground overlay (label boxes: > 100)
        assert defect.sum() > 500, f"no defect mask overlaid: {defect.sum()} red pixels"
        assert veil.mean() > 0.1, f"no foreground overlaid: {veil.mean():.3f} of the grid"
        # The sample modal shows the image's width and height (it showed None).
        crack = fo.load_dataset("mtd-browser").match(fo.ViewField("label") == "Crack").first()
        height, width = cv2.imread(crack.filepath).shape[:2]
        modal = subprocess.run([chromium, *flags, "--dump-dom", f"{url}?id={crack.id}"],
                               capture_output=True, text=True, timeout=120).stdout
        for value, name in ((width, "width"), (height, "height")):
            assert re.search(rf'title="{value}">{value}<.{{0,300}}?metadata\.{name}', modal,
                             re.S), f"the modal does not show {name} {value}"
        if os.environ.get("CURATE_KEEP_SCREENSHOT"):
            shutil.copy(shot, os.environ["CURATE_KEEP_SCREENSHOT"])
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
