"""RealNet and Real-IAD sample lists, written from an MVTec export's report.

Each list is read back the way its loader reads it (RealNet: JSON Lines joined to
``image_dir``; Real-IAD: ``meta.prefix`` joined before each path, good when ``mask_path`` is
null or ``anomaly_class`` is ``meta.normal_class``) and compared with the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ingest, labels

from curate.core.errors import CurateError
from curate.export.mvtec import MARKER, export_mvtec
from curate.export.realiad import export_realiad
from curate.export.realnet import export_realnet
from curate.testing.fixtures import write_mvtec

EXPORTERS = {"realnet": export_realnet, "realiad": export_realiad}


def _entry(file: str, mask: str | None) -> dict:
    return {"file": file, "mask": mask, "foreground": None, "sample_id": file,
            "source": "hand", "path": file, "sha256": "0" * 64}


def _hand_export(root: Path) -> Path:
    """A small export with train images, which the pipeline cannot make yet (no split stage)."""
    files = [_entry(f"{cat}/train/good/{n}.png", None) for cat in ("cap", "nut") for n in "ab"]
    files += [_entry("cap/test/good/c.png", None),
              _entry("cap/test/crack/d.png", "cap/ground_truth/crack/d_mask.png"),
              _entry("nut/test/dent/e.png", "nut/ground_truth/dent/e_mask.png")]
    for entry in files:
        for rel in (entry["file"], entry["mask"]):
            if rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"png")
    (root / MARKER).write_text(json.dumps({"format": "mvtec", "files": files[::-1]}))
    return root


@pytest.fixture(params=["pipeline", "hand"])
def export(request, tmp_path) -> Path:
    if request.param == "hand":
        return _hand_export(tmp_path / "hand")
    ctx = request.getfixturevalue("ctx")
    manifest = labels(ctx, ingest(ctx, "mvtec", write_mvtec(tmp_path / "src", seed=1).root))
    export_mvtec(manifest, tmp_path / "out", ctx)
    return tmp_path / "out"


def _report(export: Path) -> dict[str, dict]:
    return {e["file"]: e for e in json.loads((export / MARKER).read_text())["files"]}


def _good(file: str) -> bool:
    return file.split("/")[2] == "good"


# ----------------------------------------------------------------------------------- RealNet
def _realnet_reads(meta_file: Path, image_dir: Path) -> list[dict]:
    """Each line of ``meta_file`` as RealNet's dataset parses it, paths checked on disk."""
    metas = [json.loads(line) for line in meta_file.read_text().splitlines()]
    for meta in metas:
        for key in ("filename", "maskname"):
            if key in meta:
                assert (image_dir / meta[key]).is_file(), meta[key]
    return metas


def test_realnet_lists_every_image_once_with_its_label_and_mask(export):
    report = _report(export)
    written = export_realnet(export)
    categories = {f.split("/")[0] for f in report}
    assert written == sorted(export / "realnet" / f"{split}_{c}.json"
                             for split in ("train", "test") for c in [*categories, "uni"])
    per_category, uni = [], []
    for path in written:
        split, category = path.stem.split("_", 1)
        for meta in _realnet_reads(path, export):
            assert meta["filename"].split("/")[1] == split
            (uni if category == "uni" else per_category).append(meta["filename"])
            assert category in ("uni", meta["clsname"])
            entry, good = report[meta["filename"]], _good(meta["filename"])
            assert meta["clsname"] == meta["filename"].split("/")[0]
            assert (meta["label"], meta["label_name"]) == ((0, "good") if good else (1, "defective"))
            assert meta.get("maskname") == entry["mask"]
            assert set(meta) == {"clsname", "filename", "label", "label_name"} | (
                set() if good else {"maskname"})
    assert sorted(per_category) == sorted(uni) == sorted(report)


# ----------------------------------------------------------------------------------- Real-IAD
def _realiad_reads(meta_file: Path, image_dir: Path) -> list[tuple[str, dict]]:
    """(split, sample) as Real-IAD's ExplicitDataset reads ``meta_file``: prefixed paths
    relative to ``image_dir``, ``label`` 0 or 1; asserts the keys that loader asserts."""
    info = json.loads(meta_file.read_text())
    assert set(info) == {"meta", "train", "test"}
    prefix, normal = info["meta"]["prefix"], info["meta"]["normal_class"]
    read = []
    for split in ("train", "test"):
        for sample in info[split]:
            assert set(sample) == {"category", "anomaly_class", "image_path", "mask_path"}
            good = sample["mask_path"] is None or sample["anomaly_class"] == normal
            meta = {"filename": f"{prefix}/{sample['image_path']}", "label": 0 if good else 1,
                    "maskname": None if good else f"{prefix}/{sample['mask_path']}",
                    "category": sample["category"], "anomaly_class": sample["anomaly_class"]}
            for key in ("filename", "maskname"):
                if meta[key]:
                    assert (image_dir / meta[key]).is_file(), meta[key]
            read.append((split, meta))
    return read


def test_realiad_lists_every_image_once_with_its_label_and_mask(export):
    report = _report(export)
    written = export_realiad(export)
    categories = {f.split("/")[0] for f in report}
    assert written == sorted(export / "realiad" / f"{c}.json" for c in categories)
    seen = []
    for path in written:
        info = json.loads(path.read_text())
        assert info["meta"] == {"prefix": path.stem, "normal_class": "OK"}
        for split, meta in _realiad_reads(path, export):
            file = meta["filename"]
            seen.append(file)
            assert file.split("/")[:2] == [path.stem, split] and meta["category"] == path.stem
            good = _good(file)
            assert meta["label"] == (0 if good else 1)
            assert meta["anomaly_class"] == ("OK" if good else file.split("/")[2])
            assert meta["maskname"] == report[file]["mask"]
    assert sorted(seen) == sorted(report)


def test_realiad_refuses_a_defect_its_loader_would_count_good(tmp_path):
    export = _hand_export(tmp_path / "hand")
    report = json.loads((export / MARKER).read_text())
    for entry in report["files"]:
        if entry["file"] == "cap/test/crack/d.png":
            entry["mask"] = None
    (export / MARKER).write_text(json.dumps(report))
    with pytest.raises(CurateError, match="cap/test/crack/d.png is defective but has no mask"):
        export_realiad(export)
    assert len(export_realnet(export)) == 6  # RealNet reads it as a whole-image defect


def test_realnet_refuses_a_category_named_like_its_all_category_lists(tmp_path):
    root = tmp_path / "x"
    root.mkdir()
    (root / MARKER).write_text(json.dumps(
        {"format": "mvtec", "files": [_entry("uni/test/good/a.png", None)]}))
    with pytest.raises(CurateError, match="category named 'uni'"):
        export_realnet(root)


# ----------------------------------------------------------------------------------- both
@pytest.mark.parametrize("fmt", EXPORTERS)
def test_lists_from_a_report_in_hand_match_those_read_from_disk(fmt, tmp_path):
    """A build hands the exporter the report it has just written: the same lists, and the
    file on disk is not read (here it is gone)."""
    export = _hand_export(tmp_path / "hand")
    from_disk = {p: p.read_bytes() for p in EXPORTERS[fmt](export)}
    report = json.loads((export / MARKER).read_text())
    (export / MARKER).unlink()
    assert {p: p.read_bytes() for p in EXPORTERS[fmt](export, report)} == from_disk
    with pytest.raises(CurateError, match="not found"):
        EXPORTERS[fmt](export)


@pytest.mark.parametrize("fmt", EXPORTERS)
def test_lists_are_byte_for_byte_the_same_on_a_second_run(fmt, tmp_path):
    export = _hand_export(tmp_path / "hand")
    first = {p: p.read_bytes() for p in EXPORTERS[fmt](export)}
    second = {p: p.read_bytes() for p in EXPORTERS[fmt](export)}
    assert first == second
    assert sorted((export / fmt).iterdir()) == sorted(first)  # no temporary files left


@pytest.mark.parametrize("fmt", EXPORTERS)
@pytest.mark.parametrize("report, expected", [
    (None, "not found"),
    ("{not json", "cannot be read as JSON"),
    ('{"format": "mvtec"}', "a \"files\" list"),
    ('{"format": "yolo", "files": []}', "\"format\": \"mvtec\""),
    ('{"format": "mvtec", "files": [{"file": "a/test/good/x.png"}]}', "\"mask\" string or null"),
    ('{"format": "mvtec", "files": [{"file": "../a/test/good/x.png", "mask": null}]}', "escapes"),
    ('{"format": "mvtec", "files": [{"file": "a/good/x.png", "mask": null}]}', "is not <Category>"),
    ('{"format": "mvtec", "files": [{"file": "a/val/good/x.png", "mask": null}]}', "is not <Cat"),
    ('{"format": "mvtec", "files": [{"file": "a/test/bad/x.png", "mask": "b/ground_truth/x.png"}]}',
     "outside its category folder"),
    ('{"format": "mvtec", "files": [{"file": "a/test/good/x.png", "mask": null},'
     ' {"file": "a/test/good/x.png", "mask": null}]}', "listed twice"),
])
def test_a_missing_or_broken_report_names_the_file(fmt, report, expected, tmp_path):
    if report is not None:
        (tmp_path / MARKER).write_text(report)
    with pytest.raises(CurateError, match=expected) as err:
        EXPORTERS[fmt](tmp_path)
    assert str(tmp_path / MARKER) in str(err.value)
    assert not (tmp_path / fmt).exists()
