"""Runner, workspace and store: caching, executors, per-sample randomness, errors."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from curate.core.errors import CurateError, UnsafePathError
from curate.core.files import check_relative, safe_join
from curate.core.manifest import Manifest, new_row
from curate.engine.executors import chunk_size, chunks
from curate.engine.progress import ProgressBar
from curate.engine.runner import (
    Context,
    Stage,
    apply_update,
    make_params,
    map_updates,
    recorded_file,
    run_stage,
)
from curate.engine.workspace import Workspace


def seed_manifest(n=12) -> Manifest:
    rows = [new_row(source="s", path=f"img{i:02d}.png", category="C", label="good",
                    width=4, height=4) for i in range(n)]
    return Manifest.build(rows, stage="ingest", stage_version="1", roots={"s": "/nowhere"})


@dataclass(frozen=True)
class NoiseParams:
    scale: float = 1.0
    fail_on: str = ""


def noisy(row, env):
    """Uses the per-sample generator; raises for one chosen sample."""
    if row["path"] == env.params.fail_on:
        raise RuntimeError("boom")
    value = float(env.rng(row).normal() * env.params.scale)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = value > 0
    return {"measures": {"noise.value": value}, "artifacts": {"m": env.store.put_mask(mask)}}


class Noise(Stage[NoiseParams]):
    name = "noise"
    version = "1"
    Params = NoiseParams
    uses_seed = True
    calls = 0

    def run(self, inputs, params, ctx):
        Noise.calls += 1
        (m,) = inputs
        return self.output_updates(m, map_updates(self, m, params, ctx, noisy), params, ctx)


def run(ws, jobs, seed=0, **params):
    with Context(ws, jobs=jobs, seed=seed, progress=False) as ctx:
        return run_stage(Noise(), [seed_manifest()], NoiseParams(**params), ctx)


def test_results_do_not_depend_on_jobs(tmp_path):
    one = run(Workspace.open(tmp_path / "a"), jobs=1)
    two = run(Workspace.open(tmp_path / "b"), jobs=2)
    assert one.manifest.id == two.manifest.id
    assert (tmp_path / "a/manifests" / f"{one.manifest.id}.parquet").read_bytes() == \
        (tmp_path / "b/manifests" / f"{two.manifest.id}.parquet").read_bytes()


def test_seed_changes_random_results(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    a = run(ws, jobs=1, seed=0).manifest
    b = run(ws, jobs=1, seed=1).manifest
    assert a.id != b.id
    va = [r["measures"]["noise.value"] for r in a.rows()]
    assert len(set(va)) == len(va)  # each sample its own stream


def test_cache_hits_and_misses(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    Noise.calls = 0
    first = run(ws, jobs=1)
    again = run(ws, jobs=1)
    assert (first.from_cache, again.from_cache) == (False, True)
    assert again.manifest.id == first.manifest.id and Noise.calls == 1
    other = run(ws, jobs=1, scale=2.0)
    assert not other.from_cache and Noise.calls == 2
    assert ws.head() == other.manifest.id


def test_a_failing_sample_is_dropped_not_fatal(tmp_path):
    result = run(Workspace.open(tmp_path / "ws"), jobs=2, fail_on="img03.png")
    rows = {r["path"]: r for r in result.manifest.rows()}
    assert rows["img03.png"]["status"] == "dropped"
    reason = rows["img03.png"]["reasons"][0]
    assert (reason["stage"], reason["code"]) == ("noise", "error")
    assert "RuntimeError: boom" in reason["detail"] and "img03.png" in reason["detail"]
    assert sum(r["status"] == "kept" for r in rows.values()) == 11
    assert result.dropped == {"error": 1}


def test_updates_cannot_touch_identity_or_status():
    row = seed_manifest(1).row_list()[0]
    for key in ("status", "sample_id", "path", "reasons", "nonsense"):
        with pytest.raises(ValueError, match=key):
            apply_update(row, {key: "x"}, "s")
    out = apply_update(row, {"drop": [("bad", "why")], "flags": [("look", "here")]}, "s")
    assert out["status"] == "dropped" and out["flags"][0]["code"] == "look"
    assert row["status"] == "kept"  # the input row is not modified


def test_make_params_names_unknown_fields():
    with pytest.raises(CurateError, match="no parameter.*bogus.*scale"):
        make_params(Noise, {"bogus": 1})


def test_workspace_refuses_foreign_folder_and_resolves_prefixes(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("x")
    with pytest.raises(CurateError, match="not empty"):
        Workspace.open(tmp_path / "full")
    with pytest.raises(CurateError, match="not a curate workspace"):
        Workspace.open(tmp_path / "missing", create=False)
    ws = Workspace.open(tmp_path / "ws")
    with pytest.raises(CurateError, match="no manifests yet"):
        ws.load()
    m = run(ws, jobs=1).manifest
    assert ws.load(m.id[:6]).id == m.id
    assert ws.load("latest").id == m.id
    with pytest.raises(CurateError, match="no manifest"):
        ws.load("ffffffffff")
    record = ws.record_path(m.id).read_text()
    assert "created_at" in record and "/nowhere" in record
    # Nothing volatile in the manifest file itself.
    assert b"created_at" not in ws.manifest_path(m.id).read_bytes()


def test_store_is_content_addressed_and_checked(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    mask = np.eye(5, dtype=bool)
    key = ws.store.put_mask(mask)
    assert key == ws.store.put_mask(mask.astype(np.uint8) * 255)  # same pixels, same key
    assert np.array_equal(ws.store.read_mask(key), mask)
    assert ws.store.check(key) is None
    path = ws.store.path(key)
    os.chmod(path, 0o644)
    from curate.imaging.io import encode_png

    path.write_bytes(encode_png(np.zeros((5, 5), np.uint8)))
    assert "changed on disk" in ws.store.check(key)
    path.unlink()
    assert "missing" in ws.store.check(key)
    with pytest.raises(CurateError, match="not a store key"):
        ws.store.path("../../etc/passwd")


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs", "C:/x", "a\\b", "./a", ""])
def test_paths_escaping_their_root_are_rejected(rel, tmp_path):
    with pytest.raises(UnsafePathError):
        check_relative(rel)
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, rel)


def test_safe_relative_paths_pass(tmp_path):
    assert safe_join(tmp_path, "a/b..c/d.png") == tmp_path / "a/b..c/d.png"


# ----------------------------------------------------------------------------- engine parts
@pytest.mark.parametrize("rows, workers, size", [
    (1, 4, 1), (10, 1, 2), (1000, 2, 63), (10**6, 2, 256), (0, 3, 1), (5, 0, 1)])
def test_one_chunking_rule_for_every_executor(rows, workers, size):
    """About eight chunks per worker, never more than 256 rows (what a dead worker loses),
    never empty; the chunks cover the rows once, in order."""
    assert chunk_size(rows, workers) == size
    items = [{"i": i} for i in range(rows)]
    parts = chunks(items, workers)
    assert [r for part in parts for r in part] == items
    assert all(0 < len(part) <= size for part in parts)


def test_a_file_parameter_is_recorded_by_its_content(tmp_path):
    """Same bytes anywhere: same record; new bytes at the same path: a new record, even
    though the digest of the old version is kept for the process."""
    first, second = tmp_path / "a.bin", tmp_path / "elsewhere" / "b.bin"
    second.parent.mkdir()
    first.write_bytes(b"weights v1")
    second.write_bytes(b"weights v1")
    expected = "sha256:" + hashlib.sha256(b"weights v1").hexdigest()
    assert recorded_file(first) == recorded_file(str(second)) == expected
    first.write_bytes(b"weights v2, longer")
    assert recorded_file(first) == "sha256:" + hashlib.sha256(b"weights v2, longer").hexdigest()
    with pytest.raises(FileNotFoundError):
        recorded_file(tmp_path / "missing.bin")


def test_sample_env_and_workspace_resolve_source_files_alike(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"x")
    ws = Workspace.open(tmp_path / "ws")
    manifest = Manifest.build([new_row(source="s", path="a.png", category="C", label="good")],
                              stage="ingest", stage_version="1", roots={"s": str(tmp_path / "src")})
    with Context(ws, progress=False) as ctx:
        env = ctx.env("t", None, manifest.roots)
    row = manifest.row_list()[0]
    assert env.source_path(row) == ws.source_file(manifest, "s", "a.png") == \
        (tmp_path / "src" / "a.png").absolute()
    with pytest.raises(CurateError, match="no folder is known for source 'other'"):
        env.source_path({**row, "source": "other"})
    with pytest.raises(CurateError, match="no folder is known for source 'other'"):
        ws.source_file(manifest, "other", "a.png")
    with pytest.raises(UnsafePathError):
        env.source_path(row, "../outside.png")


def test_one_progress_bar_shows_counts_and_named_fields():
    """The bar every loop uses: done of total, and extra fields after the time (sdas train's
    loss); disabled, it draws nothing."""
    shown = io.StringIO()
    with ProgressBar(Console(file=shown, force_terminal=True, width=120), "work", 3,
                     loss=float("nan")) as bar:
        bar.update(advance=2)
        bar.update(completed=3, loss=0.5)
    assert "3/3" in shown.getvalue() and "loss 0.5000" in shown.getvalue()
    hidden = io.StringIO()
    with Context(None, progress=False, console=Console(file=hidden, force_terminal=True)) as ctx:
        with ctx.progress("work", 3) as bar:
            bar.update(completed=3)
    assert hidden.getvalue() == ""


def test_context_executor_kind_and_missing_workspace():
    with Context(None, progress=False) as ctx:
        assert ctx.executor == "local" and ctx.in_process
        with pytest.raises(CurateError, match="without a workspace"):
            ctx.workspace  # noqa: B018 - the property is what is tested
    with Context(None, jobs=2, progress=False) as ctx:
        assert ctx.executor == "process" and ctx.in_process


# What a per-sample function may return, drawn: the merge keys and plain columns together.
_UPDATES = st.fixed_dictionaries({}, optional={
    "measures": st.dictionaries(st.sampled_from(["noise.a", "noise.b"]),
                                st.one_of(st.none(), st.floats(-9, 9), st.integers(-3, 3))),
    "artifacts": st.dictionaries(st.sampled_from(["m", "f"]),
                                 st.integers(0, 9).map(lambda k: f"{k:064x}.png")),
    "flags": st.lists(st.tuples(st.sampled_from(["odd", "dim"]), st.text(max_size=3)),
                      max_size=2),
    "drop": st.lists(st.tuples(st.sampled_from(["blurry", "small"]), st.text(max_size=3)),
                     min_size=1, max_size=2),
    "split": st.sampled_from(["train", "test", None]),
    "label": st.sampled_from(["good", "crack"]),
})


@settings(max_examples=40, deadline=None)
@given(changes=st.lists(st.tuples(st.integers(0, 11), _UPDATES), max_size=20))
def test_output_updates_is_output_of_the_updated_rows(changes):
    """Deriving from (row, update) pairs by column gives what applying them to rows gives,
    repeated rows and every merge key included."""
    parent = seed_manifest()
    rows = parent.row_list()
    for index, update in changes:
        rows[index] = apply_update(rows[index], update, "noise")
    with Context(None, progress=False) as ctx:
        by_rows = Noise().output(parent, rows, NoiseParams(), ctx)
        by_columns = Noise().output_updates(parent, changes, NoiseParams(), ctx)
    assert by_columns.id == by_rows.id and by_columns.header == by_rows.header
    assert by_columns.table.equals(by_rows.table)


def test_output_updates_refuses_what_a_stage_may_not_set():
    with Context(None, progress=False) as ctx, pytest.raises(ValueError, match="may not set"):
        Noise().output_updates(seed_manifest(), [(0, {"path": "x.png"})], NoiseParams(), ctx)
