"""Look once (curate.engine.facts): one decode per image, facts kept by content and reused.

The invariants: a look returns, for every row, exactly what the extractors compute from that
image's bytes, whether the facts were found or computed; it decodes each image (each distinct
sha256) at most once, and only those whose facts are missing; a manifest is the same whether a
stage computed its facts or found them (another build, a prefetch); a build over a superset of
images decodes only the new ones.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from helpers import ingest, mtd_subset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.app.build import build
from curate.app.cli import cli
from curate.app.recipe import load_recipe
from curate.core.files import sha256_bytes
from curate.engine import facts as facts_mod
from curate.engine.facts import (
    MAX_SEGMENTS,
    Extractor,
    FactStore,
    Look,
    PixelDigest,
    StoredPng,
    look,
)
from curate.engine.runner import Context, run_stage
from curate.engine.store import pixel_digest
from curate.engine.workspace import Workspace
from curate.imaging.io import decode_file
from curate.stages import stage_class
from curate.stages.dedup import Dedup, DedupParams, HashFacts
from curate.stages.quality import Quality, QualityFacts, QualityParams
from curate.testing import fixtures

EXTRACTORS = [QualityFacts(), HashFacts("phash", "flips", "full"), PixelDigest()]


def _image(seed: int, channels: int) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
    pixels = rng.integers(0, 256, shape + ((channels,) if channels > 1 else ()), np.uint8)
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def _rows(folder: Path, images: list[bytes], names: list[int]) -> list[dict]:
    """One row per name; several names may show the same image (the same bytes twice)."""
    rows = []
    for n, which in enumerate(names):
        rel = f"img{n:03d}.png"
        (folder / rel).write_bytes(images[which])
        rows.append({"sample_id": f"s{n}", "source": "src", "path": rel, "category": "c",
                     "sha256": sha256_bytes(images[which])})
    return rows


# ----------------------------------------------------------------------------- the invariant
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from([1, 3])),
                       min_size=1, max_size=6),
       picks=st.lists(st.integers(0, 5), min_size=1, max_size=10),
       known=st.sets(st.integers(0, 5)), jobs=st.sampled_from([1, 2]))
def test_a_look_gives_what_the_extractors_compute_and_decodes_only_what_is_missing(
        tmp_path_factory, images, picks, known, jobs):
    tmp = tmp_path_factory.mktemp("look")
    data = [_image(seed, ch) for seed, ch in images]
    names = [p % len(data) for p in picks]
    (tmp / "src").mkdir()
    rows = _rows(tmp / "src", data, names)
    roots = {"src": str(tmp / "src")}
    ws = Workspace.open(tmp / "ws")
    with Context(ws, jobs=jobs, progress=False) as ctx:
        # Some images' facts exist already (an earlier look over some of them).
        first = [r for r in rows if names[int(r["sample_id"][1:])] in known]
        look(ctx, "t", first, roots, EXTRACTORS)
        ctx.counts.clear()
        looked = look(ctx, "t", rows, roots, EXTRACTORS)
        missing = {r["sha256"] for r in rows} - {r["sha256"] for r in first}
        assert ctx.counts["decoded"] == len(missing)
    assert not looked.failed
    for row in rows:
        image = Look(data[names[int(row["sample_id"][1:])]], row, ws.store)
        for ex in EXTRACTORS:
            assert looked[ex].record(row["sha256"]) == {"key": row["sha256"],
                                                        **ex.compute(image)}


def test_facts_are_kept_by_content_in_few_segments(tmp_path):
    store = FactStore(tmp_path / "facts")
    ex = PixelDigest()
    added = {}
    for batch in range(MAX_SEGMENTS + 5):
        records = {f"{batch:02d}{k}": {"digest": f"d{batch}.{k}"} for k in range(3)}
        store.add(ex, records)
        added.update(records)
        assert len(list(store.folder(ex).glob("*.parquet"))) <= MAX_SEGMENTS
    fresh = FactStore(tmp_path / "facts")  # another process reads the same
    table = fresh.read(ex)
    assert len(table) == len(added)
    assert {k: table.record(k)["digest"] for k in added} == {k: v["digest"]
                                                             for k, v in added.items()}


def test_a_damaged_segment_is_ignored_and_its_facts_computed_again(tmp_path, mtd_root):
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 4})
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        manifest = ingest(ctx, "mtd", source)
        first = run_stage(Quality(), [manifest], QualityParams(min_category=3), ctx).manifest
        (segment,) = ctx.workspace.facts.folder(QualityFacts()).glob("*.parquet")
        segment.write_bytes(b"not parquet")
        ctx.counts.clear()
        again = Quality().run([manifest], QualityParams(min_category=3), ctx)
        assert ctx.counts["decoded"] == 4
    assert again.id == first.id


def test_a_changed_original_is_dropped_and_no_fact_is_kept_for_it(tmp_path, mtd_root):
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3})
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        manifest = ingest(ctx, "mtd", source)
        victim = sorted((source / "MT_Free" / "Imgs").glob("*.jpg"))[0]
        other = sorted((source / "MT_Free" / "Imgs").glob("*.jpg"))[1]
        victim.unlink()  # (a hard link to the real data: replace it, never write through it)
        victim.write_bytes(other.read_bytes())
        out = run_stage(Quality(), [manifest], QualityParams(), ctx).manifest
        ingested = {r["path"]: r["sha256"] for r in manifest.rows()}
        facts = ctx.workspace.facts.read(QualityFacts())
    row = next(r for r in out.rows() if r["path"].endswith(victim.name))
    assert row["status"] == "dropped"
    assert "changed since ingest" in row["reasons"][0]["detail"]
    assert row["reasons"][0]["detail"].startswith(row["path"])
    assert ingested[row["path"]] not in facts


def test_a_dry_run_keeps_no_facts(tmp_path, mtd_root):
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 3})
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        manifest = ingest(ctx, "mtd", source)
        run_stage(Dedup(), [manifest], DedupParams(), ctx, save=False)
        assert not list((ctx.workspace.root / "facts").rglob("*.parquet"))
        ctx.counts.clear()
        run_stage(Dedup(), [manifest], DedupParams(), ctx)  # found in memory, kept now
        assert ctx.counts["decoded"] == 0
    segments = list((tmp_path / "ws" / "facts").rglob("*.parquet"))
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        Dedup().run([manifest], DedupParams(), ctx)
        assert ctx.counts["decoded"] == 0 and len(segments) == 2


# ----------------------------------------------------------------------------- builds
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """The folder of downloads: every source of the recipe, generated."""
    found = fixtures.write_all(tmp_path_factory.mktemp("downloads") / "sources", seed=0)
    return found["mtd"].parent


def _stage_by_stage(ws: Workspace, sources: Path, jobs: int) -> str:
    """The recipe's stages run one by one, no build: each stage looks for its own facts."""
    recipe = load_recipe("hss-iad")
    with Context(ws, jobs=jobs, progress=False) as ctx:
        manifest = build(dataclasses.replace(recipe, stages=[], exports=[]), ctx,
                         sources).manifest
        for step in recipe.stages:
            manifest = run_stage(stage_class(step.stage)(), [manifest], step.params,
                                 ctx).manifest
    return manifest.id


@pytest.mark.slow
def test_the_final_manifest_does_not_depend_on_jobs_executor_or_where_facts_came_from(
        tmp_path, sources):
    recipe = load_recipe("hss-iad")
    ids = {}
    for name, kwargs in {"local": {"jobs": 1}, "process-2": {"jobs": 2},
                         "local-2": {"jobs": 2, "executor": "local"}}.items():
        with Context(Workspace.open(tmp_path / name), progress=False, **kwargs) as ctx:
            ids[name] = build(recipe, ctx, sources).manifest.id
            if name == "local":
                # Every image decoded once, by the first stage's look, for the whole recipe.
                decoded = ctx.counts["decoded"]
    ids["stage by stage"] = _stage_by_stage(Workspace.open(tmp_path / "alone"), sources, 2)
    assert len(set(ids.values())) == 1, ids
    ws = Workspace.open(tmp_path / "local", create=False)
    deduped = next(m for m in (ws.load(i) for i in ws.ids())
                   if m.header["stage"]["name"] == "dedup")
    # Every image that reached dedup and could be decoded: once, whatever stage needed it.
    looked_at = {r["sha256"] for r in deduped.rows()
                 if not any(n["stage"] == "dedup" and n["code"] != "exact_duplicate"
                            for n in r["reasons"])
                 and not (r["status"] == "dropped" and r["reasons"][-1]["stage"] != "dedup")}
    assert decoded == len(looked_at)


def _build(sources: Path, ws: Path, out: Path, jobs: int = 1) -> dict:
    result = CliRunner().invoke(cli, ["build", "hss-iad", "--source", f"mtd={sources}", "-w",
                                      str(ws), "--out", str(out), "--no-card", "-j", str(jobs),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_build_over_a_superset_decodes_only_the_new_images(tmp_path, mtd_root):
    small = mtd_subset(mtd_root, tmp_path / "small", {"MT_Free": 12, "MT_Blowhole": 4})
    large = mtd_subset(mtd_root, tmp_path / "large",
                       {"MT_Free": 20, "MT_Blowhole": 6, "MT_Crack": 5})
    first = _build(small, tmp_path / "ws", tmp_path / "out1")
    assert first["decoded"] == 16
    second = _build(large, tmp_path / "ws", tmp_path / "out2")
    assert second["decoded"] == 31 - 16
    # The same final manifest as a build that computed every fact itself.
    fresh = _build(large, tmp_path / "fresh", tmp_path / "out3", jobs=2)
    assert fresh["decoded"] == 31 and fresh["manifest"] == second["manifest"]
    # And the same export, pixel for pixel, whether its PNGs were stored by this build's look
    # or an earlier one's. (Pixels, not bytes: ISA-L's deflate has been seen, once in a few
    # thousand images, to give other valid bytes for the same pixels in another process.)
    def tree(out: Path) -> dict[Path, str]:
        return {p.relative_to(out): pixel_digest(decode_file(p)) for p in out.rglob("*.png")}

    assert tree(tmp_path / "out2") == tree(tmp_path / "out3")


@pytest.mark.slow
def test_an_export_copies_the_png_its_build_stored(tmp_path, mtd_root, monkeypatch):
    """The build's look stores each image's PNG once; the export decodes no image again."""
    small = mtd_subset(mtd_root, tmp_path / "small", {"MT_Free": 6, "MT_Crack": 3})
    # A decode in the export would show here: the export's own fallback decodes through
    # curate.export.mvtec.decode.
    import curate.export.mvtec as mvtec

    def no_decode(*args, **kwargs):
        raise AssertionError("the export decoded an image")

    monkeypatch.setattr(mvtec, "decode", no_decode)
    report = _build(small, tmp_path / "ws", tmp_path / "out")
    assert report["exports"]["mvtec"]["written"] > 0
    ws = Workspace.open(tmp_path / "ws", create=False)
    pngs = ws.facts.read(StoredPng())
    assert len(pngs) == 9
    key = pngs.table.column("png")[0].as_py()
    assert ws.store.check(key) is None


def test_prefetch_rides_along_only_where_an_image_is_decoded(tmp_path, mtd_root):
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 4})
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        manifest = ingest(ctx, "mtd", source)
        ctx.prefetch = [QualityFacts(), StoredPng()]
        run_stage(Dedup(), [manifest], DedupParams(), ctx)
        assert len(ctx.workspace.facts.read(StoredPng())) == 4
        ctx.prefetch = []
        ctx.counts.clear()
        run_stage(Quality(), [manifest], QualityParams(min_category=3), ctx)
        assert ctx.counts["decoded"] == 0


def test_facts_module_documents_its_layout():
    # The layout the docstring promises is what FactStore writes.
    assert "W/facts/<name>-<version>-<params digest>/" in facts_mod.__doc__
    assert PixelDigest().key.startswith("image.pixels-1-")


@pytest.mark.slow
def test_killed_while_looking_then_rerun_gives_the_same_manifest(tmp_path, mtd_root):
    """kill -9 during the first look (facts not yet written): the rerun computes them and
    ends on the uninterrupted build's manifest."""
    source = mtd_subset(mtd_root, tmp_path / "mtd", {"MT_Free": 60, "MT_Crack": 20})
    clean = _build(source, tmp_path / "clean", tmp_path / "o1")
    ws = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "curate.app.cli", "build", "hss-iad",
                             "--source", f"mtd={source}", "-w", str(ws), "--out",
                             str(tmp_path / "o2"), "--no-card", "-j", "2", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while (proc.poll() is None and time.monotonic() < deadline
           and not list((ws / "manifests").glob("*.parquet"))):
        time.sleep(0.01)
    time.sleep(0.3)  # into the look
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    resumed = _build(source, ws, tmp_path / "o2")
    assert resumed["manifest"] == clean["manifest"]


@pytest.mark.slow
def test_an_export_links_store_files_and_copies_them_when_asked_or_it_must(
        tmp_path, mtd_root, monkeypatch):
    small = mtd_subset(mtd_root, tmp_path / "small", {"MT_Free": 5, "MT_Crack": 3})
    _build(small, tmp_path / "ws", tmp_path / "linked")
    ws = Workspace.open(tmp_path / "ws", create=False)
    report = json.loads((tmp_path / "linked" / "curate-export.json").read_text())
    for entry in report["files"]:
        for kind in ("file", "mask", "foreground"):
            if entry[kind] is None:
                continue
            exported = (tmp_path / "linked" / entry[kind]).stat()
            assert exported.st_nlink >= 2  # the store's file, not a copy of it
            assert not exported.st_mode & 0o222  # read-only, as the store keeps it
    # --copy: the same bytes, files of their own.
    result = CliRunner().invoke(cli, ["export", "mvtec", "-w", str(ws.root), "--out",
                                      str(tmp_path / "copied"), "--copy"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    linked = {p.relative_to(tmp_path / "linked"): p for p in (tmp_path / "linked").rglob("*.png")}
    copied = {p.relative_to(tmp_path / "copied"): p for p in (tmp_path / "copied").rglob("*.png")}
    assert linked.keys() == copied.keys()
    for rel, path in copied.items():
        assert path.stat().st_nlink == 1 and path.read_bytes() == linked[rel].read_bytes()
    # Another file system (no link possible): copies, silently.
    import curate.export.mvtec as mvtec

    def no_link(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(mvtec.os, "link", no_link)
    result = CliRunner().invoke(cli, ["export", "mvtec", "-w", str(ws.root), "--out",
                                      str(tmp_path / "elsewhere")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(p.stat().st_nlink == 1 for p in (tmp_path / "elsewhere").rglob("*.png"))


CALLS: Counter[str] = Counter()


@dataclasses.dataclass(frozen=True)
class Counting(Extractor):
    """Counts its computations (inline executor: in this process)."""

    name = "test.counting"
    version = "1"
    fields = (("pixels", pa.int64()),)
    tag: str = ""

    def compute(self, look: Look) -> dict:
        CALLS[self.tag] += 1
        return {"pixels": int(look.grey.size)}


def test_an_image_gets_only_the_extractors_it_lacks(tmp_path):
    (tmp_path / "src").mkdir()
    rows = _rows(tmp_path / "src", [_image(k, 1) for k in range(3)], [0, 1, 2])
    roots = {"src": str(tmp_path / "src")}
    CALLS.clear()
    with Context(Workspace.open(tmp_path / "ws"), progress=False) as ctx:
        look(ctx, "t", rows[:2], roots, [Counting("a")])
        assert CALLS == {"a": 2} and ctx.counts["decoded"] == 2
        ctx.prefetch = [Counting("a"), Counting("c")]
        looked = look(ctx, "t", rows, roots, [Counting("b")])
        # b for all three; a only for the image that lacked it; c rides along on all three.
        assert CALLS == {"a": 3, "b": 3, "c": 3} and ctx.counts["decoded"] == 5
        sizes = [cv2.imread(str(tmp_path / "src" / r["path"]), cv2.IMREAD_UNCHANGED).size
                 for r in rows]
        assert looked[Counting("b")].column([r["sha256"] for r in rows], "pixels") == sizes
        ctx.prefetch = []
        look(ctx, "t", rows, roots, [Counting("a"), Counting("b"), Counting("c")])
        assert CALLS == {"a": 3, "b": 3, "c": 3} and ctx.counts["decoded"] == 5
