"""Review sessions on any manifest version (issue 16 item 7, issue 17 items 3 and 5).

`curate review push` straight after `curate ingest` (as the README shows) or after `labels`
must work: fields no stage has produced yet are absent, saved views that need them are not
made; a push that fails leaves no half-made dataset; `review pull` reads it back, also when a
sample's tags read back as None; a reviewer's keep cannot bring back a defective image without
a usable mask.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import ingest, labels, mtd_subset
from test_review import fo  # noqa: F401 - the module's FiftyOne on its own database

from curate.app.cli import cli
from curate.core.errors import CurateError
from curate.engine.runner import Context
from curate.engine.workspace import Workspace
from curate.stages.review import reviewer_tags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory, mtd_root, fo):  # noqa: F811
    """A workspace with ingest and labels manifests of 6 real MTD images."""
    root = mtd_subset(mtd_root, tmp_path_factory.mktemp("mtd") / "mtd",
                      {"MT_Free": 3, "MT_Crack": 3})
    ws = Workspace.open(tmp_path_factory.mktemp("ws") / "ws")
    with Context(ws, jobs=1, progress=False) as ctx:
        ingested = ingest(ctx, "mtd", root)
        labelled = labels(ctx, ingested)
    return ws, ingested, labelled


def invoke(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.mark.parametrize("stage", ["ingest", "labels"])
def test_push_and_pull_right_after_ingest_or_labels(chain, fo, stage):  # noqa: F811
    ws, ingested, labelled = chain
    m = ingested if stage == "ingest" else labelled
    name = f"early-{stage}"
    out = invoke("review", "push", m.id, "--name", name, "-w", ws.root, "--json")
    assert json.loads(out.stdout)["dataset"] == name  # nothing but JSON on stdout
    ds = fo.load_dataset(name)
    assert len(ds) == len(m) and ds.info["curate_manifest"] == m.id
    assert not ds.has_saved_view("dedup-clusters")  # no dedup ran: nothing to group
    masks = ds.count("ground_truth") if ds.has_sample_field("ground_truth") else 0
    assert masks == (3 if stage == "labels" else 0)
    crack = ds.match(fo.ViewField("label") == "Crack").first()
    crack.tags = crack.tags + ["drop"]
    crack.save()
    out = invoke("review", "pull", name, "-w", ws.root, "--json")
    (summary,) = json.loads(out.stdout)
    pulled = ws.load(summary["manifest"])
    assert pulled.header["parents"] == [m.id]
    assert summary["dropped_here"] == {"reviewer_drop": 1}


def test_a_failed_push_leaves_no_half_made_dataset(chain, fo, monkeypatch):  # noqa: F811
    from curate.export import fiftyone as fiftyone_export

    ws, _, labelled = chain

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(fiftyone_export, "_save_views", broken)
    with pytest.raises(RuntimeError, match="went away"):
        fiftyone_export.push(ws, labelled, "half-made")
    assert not fo.dataset_exists("half-made")
    monkeypatch.undo()
    assert fiftyone_export.push(ws, labelled, "half-made").added == len(labelled)


def test_a_failed_push_to_an_existing_dataset_keeps_it(chain, fo, monkeypatch):  # noqa: F811
    from curate.export import fiftyone as fiftyone_export

    ws, ingested, _ = chain
    fiftyone_export.push(ws, ingested, "kept-on-failure")
    monkeypatch.setattr(fiftyone_export, "_save_views", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fiftyone_export.push(ws, ingested, "kept-on-failure")
    assert len(fo.load_dataset("kept-on-failure")) == len(ingested)  # the reviewers' work stays


def test_tags_read_back_as_none_are_no_tags(chain, fo):  # noqa: F811
    assert reviewer_tags(None) == []
    ws, ingested, _ = chain
    from curate.export.fiftyone import push
    from curate.stages.review import pull

    push(ws, ingested, "none-tags")
    ds = fo.load_dataset("none-tags")
    ds.set_values("tags", [None] * len(ds))  # as a database edited by hand reads back
    with Context(ws, progress=False) as ctx:
        result = pull(ctx, "none-tags")
    assert result.manifest.header["parents"] == [ingested.id]
    assert result.manifest.row_list() == ingested.row_list()


def test_pushing_another_manifest_under_a_taken_name_is_still_refused(chain, fo):  # noqa: F811
    from curate.export.fiftyone import push

    ws, ingested, labelled = chain
    push(ws, ingested, "taken")
    with pytest.raises(CurateError, match="already holds manifest"):
        push(ws, labelled, "taken")
    assert fo.dataset_exists("taken")  # a refused push deletes nothing it did not make


def test_an_empty_dataset_a_killed_push_left_is_taken_over(chain, fo):  # noqa: F811
    from curate.export.fiftyone import push

    ws, ingested, _ = chain
    fo.Dataset("killed-early", persistent=True)  # created, then the push was killed
    assert push(ws, ingested, "killed-early").added == len(ingested)
    assert fo.load_dataset("killed-early").info["curate_manifest"] == ingested.id


@pytest.fixture(scope="module")
def empty_mask(tmp_path_factory, mtd_root, fo):  # noqa: F811
    """A labels + label_filter manifest of one real MT_Uneven image whose mask is empty
    (dropped as defect_without_mask) and one Crack image with its mask."""
    from helpers import mtd_images

    from curate.engine.runner import run_stage
    from curate.stages.label_filter import LabelFilter, LabelFilterParams

    empty = mtd_root / "MT_Uneven" / "Imgs" / "exp3_num_45042.jpg"
    if not empty.is_file():
        pytest.skip(f"{empty} is not in this copy of MTD")
    root = tmp_path_factory.mktemp("empty-mask") / "mtd"
    for jpg in (empty, *mtd_images(mtd_root, "MT_Crack", 1)):
        target = root / jpg.parent.parent.name / "Imgs"
        target.mkdir(parents=True, exist_ok=True)
        for original in (jpg, jpg.with_suffix(".png")):
            (target / original.name).write_bytes(original.read_bytes())
    ws = Workspace.open(tmp_path_factory.mktemp("ws") / "ws")
    with Context(ws, jobs=1, progress=False) as ctx:
        m = labels(ctx, ingest(ctx, "mtd", root))
        m = run_stage(LabelFilter(), [m], LabelFilterParams(), ctx).manifest
    (row,) = [r for r in m.rows() if r["path"].startswith("MT_Uneven/")]
    assert [r["code"] for r in row["reasons"]] == ["defect_without_mask"]
    return ws, m


def test_keeping_a_defect_without_a_usable_mask_is_refused(empty_mask, fo):  # noqa: F811
    """Issue 17 item 3: a keep would put an anomaly with an all-zero mask into the export."""
    ws, m = empty_mask
    invoke("review", "push", m.id, "--name", "empty-mask", "-w", ws.root)
    ds = fo.load_dataset("empty-mask")
    uneven = ds.match(fo.ViewField("label") == "Uneven").first()
    uneven.tags = uneven.tags + ["keep"]
    uneven.save()
    before = len(ws.list())
    out = invoke("review", "pull", "empty-mask", "-w", ws.root, code=1).output
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out
    assert "keeps 1 defective sample(s) without a usable mask" in out
    assert "MT_Uneven/Imgs/exp3_num_45042.jpg (labelled 'Uneven', an empty mask)" in out
    assert "relabel:good" in out
    assert len(ws.list()) == before  # refused: no manifest written
    uneven.tags = uneven.tags + ["relabel:good"]  # the reviewer says: not a defect after all
    uneven.save()
    (summary,) = json.loads(invoke("review", "pull", "empty-mask", "-w", ws.root,
                                   "--json").stdout)
    kept = {r["path"]: r for r in ws.load(summary["manifest"]).rows()}[uneven.path]
    assert (kept["status"], kept["label"], kept["defect_classes"]) == ("kept", "good", [])
    assert {f["code"] for f in kept["flags"]} >= {"overruled", "relabelled"}


def test_push_logs_nothing(chain, fo, caplog):  # noqa: F811
    """`review push --json` prints JSON only: FiftyOne logs "Computing metadata..." with a
    handler on stdout."""
    import logging

    from curate.export.fiftyone import push

    ws, _, labelled = chain
    caplog.set_level(logging.INFO, logger="fiftyone")
    push(ws, labelled, "quiet-push")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("fiftyone")] == []
    assert fo.load_dataset("quiet-push").count("metadata") == len(labelled)
