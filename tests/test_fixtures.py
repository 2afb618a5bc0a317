"""The fixture generators: deterministic, faithful to each source's facts, readable by curate."""

from __future__ import annotations

import pytest
from helpers import (
    assert_every_file_accounted_for,
    assert_masks_match,
    ingest,
    kept_counts,
    labels,
    tree_digest,
)

from curate.imaging.io import decode_file, probe
from curate.sources import CATALOG
from curate.testing.fixtures import (
    write_all,
    write_casting,
    write_kolektorsdd,
    write_kolektorsdd2,
    write_mtd,
    write_mvtec,
    write_severstal,
)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for write in (write_kolektorsdd, write_kolektorsdd2, write_mtd, write_severstal,
                  write_casting, write_mvtec):
        a = tree_digest(write(tmp_path / write.__name__ / "a", seed=7).root)
        b = tree_digest(write(tmp_path / write.__name__ / "b", seed=7).root)
        c = tree_digest(write(tmp_path / write.__name__ / "c", seed=8).root)
        assert a == b and a != c, write.__name__


def test_write_all_writes_one_readable_source_per_kind(ctx, tmp_path):
    roots = write_all(tmp_path, seed=0)
    assert {kind: root.name for kind, root in roots.items()} == {
        kind: CATALOG[kind].folder_names[0] for kind in roots}
    for kind, root in roots.items():
        m = ingest(ctx, kind, root)
        assert_every_file_accounted_for(m, root)
        dropped = m.header["counts"]["reasons"]
        assert dropped == ({"no_labels": 2} if kind == "severstal" else {}), kind
        assert m.header["counts"]["kept"] > 0


def test_mtd_masks_are_anti_aliased_and_binarise_to_what_was_drawn(ctx, workspace, tmp_path):
    mtd = write_mtd(tmp_path / "mtd", seed=3)
    m = ingest(ctx, "mtd", mtd.root)
    assert kept_counts(m) == mtd.counts() == {(None, "Blowhole"): 3, (None, "Crack"): 3,
                                              (None, "good"): 3}
    labelled = labels(ctx, m)
    assert_masks_match(workspace, labelled, mtd)
    grey = [r["measures"]["labels.grey_pixels"] for r in labelled.rows() if r["label"] != "good"]
    assert all(g > 0 for g in grey)


@pytest.mark.parametrize(("write", "image", "facts"), [
    (write_kolektorsdd, "kos01/Part0.jpg", ("jpeg", 1)),
    (write_kolektorsdd2, "train/10000.png", ("png", 3)),
    (write_mtd, "MT_Free/Imgs/exp0_num_17.jpg", ("jpeg", 1)),
    (write_casting, "JPEGImages/cast_0000.jpg", ("jpeg", 3)),
    (write_mvtec, "grid/train/good/000.png", ("png", 1)),
])
def test_images_keep_the_format_and_channels_of_the_source(tmp_path, write, image, facts):
    info = probe((write(tmp_path, seed=0).root / image).read_bytes())
    assert (info.format, info.channels) == facts


def test_kolektor_images_keep_their_tall_aspect(tmp_path):
    for write, image in ((write_kolektorsdd, "kos02/Part3.jpg"),
                         (write_kolektorsdd2, "test/10004.png")):
        info = probe((write(tmp_path / image, seed=0).root / image).read_bytes())
        assert info.height > 2 * info.width


def test_severstal_images_are_steel_shaped_three_channel_jpegs(tmp_path):
    steel = write_severstal(tmp_path, seed=0)
    info = probe((steel.root / next(iter(steel.samples))).read_bytes())
    assert (info.format, info.channels, info.width / info.height) == ("jpeg", 3, 6.25)


def test_defects_are_visible_where_the_annotation_says(tmp_path):
    casting = write_casting(tmp_path, seed=0, format="coco")
    for path, drawn in casting.samples.items():
        if drawn.mask is None:
            continue
        pixels = decode_file(casting.root / path).astype(float).mean(axis=2)
        assert pixels[drawn.mask].mean() < pixels[~drawn.mask].mean() - 30, path


def test_unknown_generator_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="csv_layout"):
        write_severstal(tmp_path, csv_layout="tall")
    with pytest.raises(ValueError, match="format"):
        write_casting(tmp_path, format="labelme")
