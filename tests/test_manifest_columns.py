"""Column-wise manifests: ids hashed column by column, and deriving a version from changed
columns alone. The promise: ``derive_columns`` makes exactly the manifest ``derive`` makes from
rows with the same values (same id, header and table), and an id depends on values only."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.core.canonical import canonical_json, dumps_canonical
from curate.core.columns import column_digest
from curate.core.errors import ManifestError
from curate.core.manifest import COLUMNS, FORMAT_1, ID_LENGTH, Manifest, drop, new_row

LABELS = ("good", "crack", "blowhole")


def make_rows(n: int, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        label = LABELS[(i + seed) % 3]
        r = new_row(source="mtd" if i % 2 else "ksdd", path=f"d{i % 3}/img{i:04d}.jpg",
                    category="Cat" if i % 4 else "Other", label=label, sha256=f"{i:064x}",
                    format="jpeg", width=64 + i, height=48, channels=3,
                    defect_classes=[] if label == "good" else [label],
                    measures={"quality.sharpness": i * 0.25, "quality.clipped": None})
        if i % 7 == 3:
            drop(r, "dedup", "duplicate", f"same as {i - 1}")
        out.append(r)
    return out


def build(rows: list[dict]) -> Manifest:
    return Manifest.build(rows, stage="ingest", stage_version="1", )


# What a stage may change without touching identity, and how to draw a valid new value.
CHANGES = {
    "split": st.sampled_from(["train", "test", None]),
    "group": st.one_of(st.none(), st.text("abc", min_size=1, max_size=3)),
    "label": st.one_of(st.none(), st.sampled_from(LABELS)),
    "width": st.one_of(st.none(), st.integers(1, 2 ** 31 - 1)),
    "defect_classes": st.lists(st.sampled_from(LABELS), unique=True, max_size=3),
    "measures": st.dictionaries(st.sampled_from(["split.x", "quality.sharpness", "labels.area"]),
                                st.one_of(st.none(), st.floats(-1e6, 1e6), st.integers(-9, 9),
                                          st.booleans(), st.text(max_size=4))),
    "artifacts": st.dictionaries(st.sampled_from(["mask", "foreground"]),
                                 st.integers(0, 99).map(lambda k: f"{k:064x}.png")),
    "flags": st.lists(st.builds(lambda c, d: {"stage": "quality", "code": c, "detail": d},
                                st.sampled_from(["blurred", "dark"]), st.text(max_size=5)),
                      max_size=2),
}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 25))
def test_derive_columns_makes_what_derive_makes_from_rows(data, n):
    parent = build(make_rows(n))
    names = data.draw(st.sets(st.sampled_from(sorted(CHANGES)), min_size=1, max_size=4))
    rows = parent.row_list()
    columns = {name: [data.draw(CHANGES[name]) for _ in rows] for name in sorted(names)}
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    by_rows = parent.derive(rows, stage="s", stage_version="1", params={"k": 1})
    by_columns = parent.derive_columns(columns, stage="s", stage_version="1", params={"k": 1})
    assert by_columns.id == by_rows.id
    assert by_columns.header == by_rows.header
    assert by_columns.table.equals(by_rows.table)
    assert by_columns.check() == []


def test_status_and_reasons_change_together_and_counts_follow():
    parent = build(make_rows(12))
    rows = parent.row_list()
    for row in rows[:4]:
        if row["status"] == "kept":
            drop(row, "quality", "blurred", "z -4")
    status = [r["status"] for r in rows]
    reasons = [r["reasons"] for r in rows]
    by_rows = parent.derive(rows, stage="quality", stage_version="1")
    by_columns = parent.derive_columns({"status": status, "reasons": reasons},
                                       stage="quality", stage_version="1")
    assert by_columns.id == by_rows.id and by_columns.header["counts"] == by_rows.header["counts"]
    assert by_columns.header["counts"]["reasons"]["blurred"] > 0
    with pytest.raises(ManifestError, match="dropped sample needs reasons"):
        parent.derive_columns({"status": ["dropped"] * len(rows)}, stage="q", stage_version="1")


def test_a_derived_manifest_rehashes_only_what_changed(monkeypatch):
    parent = build(make_rows(10))
    parent.column_digests()
    hashed = []
    import curate.core.manifest as manifest_module

    def counting(column):
        hashed.append(column)
        return column_digest(column)

    monkeypatch.setattr(manifest_module, "column_digest", counting)
    parent.derive_columns({"split": ["test"] * 10}, stage="split", stage_version="1")
    assert len(hashed) == 1


def test_bad_columns_are_refused_naming_the_column():
    parent = build(make_rows(6))
    for columns, message in [
        ({"path": ["x.jpg"] * 6}, "cannot change path"),
        ({"colour": ["red"] * 6}, "unknown manifest columns"),
        ({"split": ["test"] * 5}, "5 values for 6 rows"),
        ({"split": ["validation"] * 6}, "column split fails"),
        ({"width": pa.array(["1"] * 6)}, "column width is int32"),
        ({"measures": pa.array(["{}"] * 6)}, "takes Python values"),
        ({"measures": [{"Not A Name": 1}] * 6}, "column measures fails"),
    ]:
        with pytest.raises(ManifestError, match=message):
            parent.derive_columns(columns, stage="s", stage_version="1")


def test_a_digest_depends_on_values_not_layout():
    values = ["ab", None, "c", "", "défaut"]
    whole = pa.array(values)
    assert column_digest(whole) == column_digest(pa.chunked_array([whole[:2], whole[2:]]))
    assert column_digest(pa.array(["x", *values])[1:]) == column_digest(whole)
    for other in (["a", "b", "c", "", "défaut"][:5], ["ab", "", "c", "", "défaut"],
                  ["abc", None, "", "", "défaut"]):
        assert column_digest(pa.array(other)) != column_digest(whole), other
    lists = pa.array([["a"], [], None], type=pa.list_(pa.string()))
    assert column_digest(lists) != column_digest(pa.array([[], ["a"], None],
                                                          type=pa.list_(pa.string())))
    assert column_digest(pa.array([1, None], pa.int32())) != \
        column_digest(pa.array([1, 0], pa.int32()))


def test_an_edit_after_hashing_is_caught_by_check():
    m = build(make_rows(8))
    m.column_digests()  # kept in memory; check must not trust them
    m.table = m.table.set_column(list(COLUMNS).index("label"), "label",
                                 pa.array(["scratch"] * 8))
    assert any("changed after it was written" in p for p in m.check())


def test_a_format_1_manifest_is_still_read_and_checked(tmp_path):
    """Manifests written before ids were hashed by column keep their row-wise id."""
    m = build(make_rows(5))
    header = dict(m.header, format=FORMAT_1)
    h = hashlib.sha256()
    h.update(canonical_json({k: v for k, v in header.items()
                             if k not in ("id", "counts")}).encode())
    for row in m.table.to_pylist():
        h.update(b"\n" + dumps_canonical([row[c] for c in COLUMNS]).encode())
    header["id"] = h.hexdigest()[:ID_LENGTH]
    old = Manifest(header=header, table=m.table, roots={})
    old.write(tmp_path / "old.parquet")
    back = Manifest.read(tmp_path / "old.parquet")
    assert back.check() == [] and back.recompute_id() == header["id"]
    child = back.derive_columns({"split": ["test"] * 5}, stage="split", stage_version="1")
    assert child.header["format"] == "curate-manifest/2" and child.header["parents"] == [back.id]
    assert child.check() == []
