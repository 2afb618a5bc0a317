"""foreground and reclassify decide over per-image facts (curate.engine.facts): an image is
decoded once whichever stage looks first, texture images are never decoded for a mask, and a
stage run again with other decision parameters decodes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import by_path, ingest
from hypothesis import given
from hypothesis import strategies as st

from curate.app.demo import run_demo
from curate.core.manifest import Manifest
from curate.engine.runner import Context, run_stage
from curate.engine.workspace import Workspace
from curate.stages.foreground.stage import (
    HSS_IAD_POLICY,
    OBJECT,
    TEXTURE,
    Foreground,
    ForegroundParams,
    OtsuFacts,
    otsu_facts,
)
from curate.stages.merge import Merge, MergeParams
from curate.stages.quality import Quality, QualityParams
from curate.stages.reclassify import CastingFacts, Reclassify, ReclassifyParams, casting_facts
from curate.testing import fixtures

FOREGROUND = ForegroundParams()
RECLASSIFY = ReclassifyParams()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Castings (objects) and KolektorSDD (a texture), generated once for the module."""
    root = tmp_path_factory.mktemp("sources")
    return {"casting": fixtures.write_casting(root / "casting", seed=7).root,
            "kolektorsdd": fixtures.write_kolektorsdd(root / "ksdd", seed=7).root}


def merged(ctx: Context, sources: dict[str, Path]) -> Manifest:
    parts = [ingest(ctx, kind, root) for kind, root in sources.items()]
    return run_stage(Merge(), parts, MergeParams(), ctx).manifest


def decoded_by(ctx: Context, stage, manifest: Manifest, params) -> tuple[Manifest, int]:
    """The stage's output and the decodes it made."""
    before = ctx.counts["decoded"]
    out = run_stage(stage, [manifest], params, ctx).manifest
    return out, ctx.counts["decoded"] - before


def test_same_manifests_whether_the_facts_were_prefetched_or_not(ctx, sources, tmp_path):
    # As a build does: quality's look computes foreground's and reclassify's facts too.
    ctx.prefetch = [*Foreground().facts(FOREGROUND), *Reclassify().facts(RECLASSIFY)]
    m = run_stage(Quality(), [merged(ctx, sources)], QualityParams(), ctx).manifest
    castings = sum(r["category"] == "Casting" for r in m.rows())
    assert ctx.counts["decoded"] == m.header["counts"]["kept"]  # each image once, castings too
    fg, fg_decodes = decoded_by(ctx, Foreground(), m, FOREGROUND)
    rc, rc_decodes = decoded_by(ctx, Reclassify(), fg, RECLASSIFY)
    assert (fg_decodes, rc_decodes) == (0, 0)

    # Another workspace, nothing prefetched: each stage looks for itself.
    with Context(Workspace.open(tmp_path / "alone"), progress=False) as alone:
        m2 = run_stage(Quality(), [merged(alone, sources)], QualityParams(), alone).manifest
        fg2, fg2_decodes = decoded_by(alone, Foreground(), m2, FOREGROUND)
        rc2, rc2_decodes = decoded_by(alone, Reclassify(), fg2, RECLASSIFY)
    assert (fg2_decodes, rc2_decodes) == (castings, castings)
    assert m2.id == m.id and fg2.id == fg.id and rc2.id == rc.id
    assert {r["category"] for r in rc.rows()} >= {"Casting_C1", "Casting_C2", "Casting_C3"}


@pytest.fixture
def own_sources(tmp_path) -> dict[str, Path]:
    """Sources a test may spoil (the module's are shared)."""
    return {"casting": fixtures.write_casting(tmp_path / "casting", seed=7).root,
            "kolektorsdd": fixtures.write_kolektorsdd(tmp_path / "ksdd", seed=7).root}


def test_texture_images_are_never_decoded_by_foreground(ctx, own_sources):
    m = merged(ctx, own_sources)
    rows = by_path(m)
    textures = [r for r in rows.values() if r["category"] == "KolektorSDD"]
    casting = next(r for r in rows.values() if r["category"] == "Casting")
    # Unreadable now: a texture's mask does not need its bytes; a casting's does.
    for row in [*textures, casting]:
        Path(m.roots[row["source"]], row["path"]).write_bytes(b"not an image")
    out, decodes = decoded_by(ctx, Foreground(), m, FOREGROUND)
    castings = sum(r["category"] == "Casting" for r in rows.values())
    assert decodes == castings - 1
    result = by_path(out)
    for row in textures:
        kept = result[row["path"]]
        assert kept["status"] == "kept" and kept["measures"]["foreground.fraction"] == 1.0
        assert ctx.workspace.store.read_mask(kept["artifacts"]["foreground"]).shape == \
            (row["height"], row["width"])
    failed = result[casting["path"]]
    assert failed["status"] == "dropped"
    assert all(reason["detail"].startswith(casting["path"]) for reason in failed["reasons"])


def test_a_second_run_with_other_decisions_decodes_nothing(workspace, sources, tmp_path):
    with Context(workspace, progress=False) as first:
        m = merged(first, sources)
        run_stage(Reclassify(), [run_stage(Foreground(), [m], FOREGROUND, first).manifest],
                  RECLASSIFY, first)
        assert first.counts["decoded"] > 0
    sample = next(r for r in m.rows() if r["category"] == "Casting")
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(f"{sample['sample_id']}: {{class: C2, note: seen by eye}}\n")
    # A fresh context on the same workspace: the facts come from disk, not from memory.
    with Context(Workspace.open(workspace.root), progress=False) as second:
        fg = run_stage(Foreground(), [m], ForegroundParams(min_confidence=0.99), second)
        rc = run_stage(Reclassify(), [fg.manifest],
                       ReclassifyParams(clutter_c3=0.5, overrides=str(overrides)), second)
        assert second.counts["decoded"] == 0
    assert not fg.from_cache and not rc.from_cache  # both decided again
    assert fg.flagged  # the stricter confidence flags some masks, from the stored facts
    assert by_path(rc.manifest)[sample["path"]]["category"] == "Casting_C2"


def test_a_build_decodes_each_image_once(ctx, tmp_path):
    # The demo's recipe: dedup looks first and computes foreground's and reclassify's facts
    # (and the export's PNGs) from the same decode.
    result = run_demo(ctx, tmp_path / "demo", mtd=None)
    assert result.problems == []
    assert ctx.counts["decoded"] == result.build.manifest.header["counts"]["kept"]
    stages = [r.stage for r in result.build.stages]
    assert stages.index("dedup") < stages.index("foreground") < stages.index("reclassify")


@given(policy=st.dictionaries(st.sampled_from(sorted(HSS_IAD_POLICY) + ["Other"]),
                              st.sampled_from([TEXTURE, OBJECT])),
       default=st.sampled_from([TEXTURE, OBJECT]),
       category=st.sampled_from(sorted(HSS_IAD_POLICY) + ["Other", "Unlisted"]))
def test_the_policy_says_which_images_want_a_mask_not_how_it_is_made(policy, default, category):
    facts = otsu_facts(ForegroundParams(policy=policy, default_policy=default))
    assert facts.wants({"category": category}) == (policy.get(category, default) == OBJECT)
    assert facts.key == OtsuFacts().key  # masks found under one policy serve any other


@given(category=st.text(min_size=1, max_size=12), contrast=st.floats(1, 100))
def test_casting_facts_are_keyed_by_their_parameters_only(category, contrast):
    facts = casting_facts(ReclassifyParams(category=category, hole_contrast=contrast))
    assert facts.wants({"category": category}) and not facts.wants({"category": category + "_"})
    assert facts.key == casting_facts(ReclassifyParams(hole_contrast=contrast)).key
    assert (facts.key == casting_facts(RECLASSIFY).key) == (contrast == RECLASSIFY.hole_contrast)


def test_casting_facts_are_keyed_by_value_not_by_type():
    facts = casting_facts(ReclassifyParams(hole_contrast=40, machined_std=6))
    assert facts.key == casting_facts(RECLASSIFY).key == CastingFacts(40.0, 150.0, 6.0).key
