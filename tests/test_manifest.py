"""Manifests: canonical ids, schema validation, integrity checks, diff, file round trip."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from curate.core.canonical import canonical_float, canonical_json
from curate.core.errors import ManifestError
from curate.core.manifest import HEADER_KEY, Manifest, diff, drop, new_row, sample_id_for


def rows(n=5):
    out = []
    for i in range(n):
        r = new_row(source="src", path=f"d/img{i}.png", category="Cat", label="good",
                    sha256=f"{i:064x}", format="png", width=8, height=6, channels=1)
        r["measures"] = {"labels.mask_fraction": 0.1 + 0.2 * i}
        out.append(r)
    return out


def build(rs, **kw):
    kw.setdefault("stage", "ingest")
    kw.setdefault("stage_version", "1")
    return Manifest.build(rs, **kw)


def test_id_ignores_row_order_and_roots():
    a = build(rows(), roots={"src": "/data/here"})
    b = build(list(reversed(rows())), roots={"src": "/elsewhere"})
    assert a.id == b.id
    assert [r["path"] for r in a.rows()] == sorted(r["path"] for r in rows())


def test_id_changes_with_content_params_and_parents():
    base = build(rows())
    changed = rows()
    changed[2]["label"] = "scratch"
    assert build(changed).id != base.id
    assert build(rows(), params={"x": 1}).id != base.id
    assert build(rows(), parents=["0" * 24]).id != base.id
    assert build(rows(), seed=1).id != base.id


def test_floats_are_canonical():
    assert canonical_float(0.1 + 0.2) == 0.3
    assert canonical_float(-0.0) == 0.0
    assert canonical_float(float("nan")) is None
    a, b = rows(), rows()
    a[0]["measures"]["labels.mask_fraction"] = 0.3
    b[0]["measures"]["labels.mask_fraction"] = 0.1 + 0.2  # differs in the last bit
    assert build(a).id == build(b).id
    assert canonical_json({"b": 1, "a": [1.0, (2, 3)]}) == '{"a":[1.0,[2,3]],"b":1}'


def test_write_read_round_trip_is_byte_identical(tmp_path):
    m = build(rows(), roots={"src": "/x"})
    m.write(tmp_path / "a.parquet")
    build(list(reversed(rows())), roots={"src": "/y"}).write(tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    back = Manifest.read(tmp_path / "a.parquet")
    assert back.id == m.id and back.header == m.header
    assert back.row_list() == m.row_list()
    assert back.check() == []


def test_hand_edited_rows_are_caught(tmp_path):
    m = build(rows())
    path = tmp_path / "m.parquet"
    m.write(path)
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[1] = "scratch"
    edited = table.set_column(table.schema.get_field_index("label"), "label",
                              [labels]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(edited, path)
    problems = Manifest.read(path).check()
    assert any("changed after it was written" in p for p in problems)
    assert any("counts do not match" in p for p in problems)  # kept_by_category moved


def test_hand_edited_header_is_caught(tmp_path):
    m = build(rows())
    path = tmp_path / "m.parquet"
    m.write(path)
    table = pq.read_table(path)
    header = json.loads(table.schema.metadata[HEADER_KEY])
    header["stage"]["params"] = {"threshold": 3}
    pq.write_table(table.replace_schema_metadata({HEADER_KEY: json.dumps(header)}), path)
    assert any("changed after it was written" in p for p in Manifest.read(path).check())


def test_not_a_manifest(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("hello")
    with pytest.raises(ManifestError, match="x.parquet"):
        Manifest.read(bad)


@pytest.mark.parametrize("field, value, words", [
    ("status", "lost", "status"),
    ("path", "../outside.png", "path"),
    ("path", "/etc/passwd", "path"),
    ("path", "a/./b.png", "path"),
    ("split", "val", "split"),
    ("sha256", "xyz", "sha256"),
])
def test_rows_are_validated_on_write(field, value, words):
    rs = rows(2)
    rs[0][field] = value
    with pytest.raises(ManifestError, match=words):
        build(rs)


def test_dropped_rows_need_a_reason_and_kept_rows_none():
    rs = rows(2)
    rs[0]["status"] = "dropped"
    with pytest.raises(ManifestError, match="reasons"):
        build(rs)
    rs = rows(2)
    drop(rs[0], "ingest", "unreadable_image", "d/img0.png: truncated")
    m = build(rs)
    assert m.header["counts"]["dropped"] == 1
    assert m.header["counts"]["reasons"] == {"unreadable_image": 1}


def test_duplicate_samples_are_refused():
    rs = rows(2)
    rs.append(dict(rs[0]))
    with pytest.raises(ManifestError, match="duplicate"):
        build(rs)


def test_sample_id_depends_on_source_and_path():
    assert sample_id_for("a", "x.png") != sample_id_for("b", "x.png")
    assert sample_id_for("a", "x.png") == sample_id_for("a", "x.png")


def test_diff_reports_field_changes():
    old = build(rows(3))
    rs = rows(3)
    drop(rs[0], "labels", "mask_size_mismatch", "mask is 3x3")
    rs[1]["artifacts"] = {"mask": "a" * 64 + ".png"}
    del rs[2]
    rs.append(new_row(source="src", path="d/new.png", category="Cat", label="good"))
    d = diff(old, build(rs, stage="labels", parents=[old.id]))
    assert [a["path"] for a in d["added"]] == ["d/new.png"]
    assert [r["path"] for r in d["removed"]] == ["d/img2.png"]
    changed = {c["path"]: c["changes"] for c in d["changed"]}
    assert set(changed) == {"d/img0.png", "d/img1.png"}
    assert changed["d/img0.png"]["status"] == {"old": "kept", "new": "dropped"}
    assert changed["d/img0.png"]["reasons"]["new"][0]["code"] == "mask_size_mismatch"
    assert set(changed["d/img1.png"]) == {"artifacts"}
