"""Hostile sample images (issue 16 items 9, 11): decompression bombs, empty files, JPEGs cut
short and closed with an end-of-image marker, images deleted since ingest.

Each is refused with a reason that names the file, never with OpenCV's assertion text or a
traceback; every real MTD JPEG still passes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import ingest, mtd_images
from test_mask_edges import png_header_only

from curate.engine.runner import run_stage
from curate.imaging.io import MAX_PIXELS, BadImage, decode, jpeg_cut_short, probe
from curate.stages.quality import Quality, QualityParams


def cut_and_closed(data: bytes, fraction: float) -> bytes:
    """The first ``fraction`` of a JPEG with an end-of-image marker appended: a copy that
    stopped early, 'repaired' so that the marker check passes."""
    return data[:int(len(data) * fraction)] + b"\xff\xd9"


def test_every_real_mtd_jpeg_passes(mtd_root):
    """Including the two whose last 8x8 block is exactly mid-grey, the cut-scan sign: the
    second decode must clear them."""
    jpegs = sorted(mtd_root.glob("MT_*/Imgs/*.jpg"))
    assert len(jpegs) > 1000
    for jpg in jpegs:
        assert not jpeg_cut_short(jpg.read_bytes()), jpg
    for name in ("MT_Free/Imgs/exp5_num_116324.jpg", "MT_Free/Imgs/exp6_num_292199.jpg"):
        if (mtd_root / name).is_file():
            probe((mtd_root / name).read_bytes())
            decode((mtd_root / name).read_bytes())


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_real_jpegs_cut_and_closed_are_refused(mtd_root, fraction):
    for jpg in mtd_images(mtd_root, "MT_Blowhole", 3) + mtd_images(mtd_root, "MT_Free", 3):
        cut = cut_and_closed(jpg.read_bytes(), fraction)
        assert cut.endswith(b"\xff\xd9")
        with pytest.raises(BadImage, match="truncated JPEG"):
            probe(cut)
        with pytest.raises(BadImage, match="truncated JPEG"):
            decode(cut)
        with pytest.raises(BadImage, match="truncated JPEG"):
            decode(cut, grayscale=True)


def test_ingest_drops_a_cut_jpeg_with_its_name(ctx, mtd_root, tmp_path):
    first, second = mtd_images(mtd_root, "MT_Blowhole", 2)
    folder = tmp_path / "mtd" / "MT_Blowhole" / "Imgs"
    folder.mkdir(parents=True)
    for jpg in (first, second):
        shutil.copy(jpg.with_suffix(".png"), folder)
    shutil.copy(first, folder)
    (folder / second.name).write_bytes(cut_and_closed(second.read_bytes(), 0.5))
    rows = {r["path"]: r for r in ingest(ctx, "mtd", tmp_path / "mtd").rows()}
    assert rows[f"MT_Blowhole/Imgs/{first.name}"]["status"] == "kept"
    cut = rows[f"MT_Blowhole/Imgs/{second.name}"]
    assert cut["status"] == "dropped"
    (reason,) = cut["reasons"]
    assert reason["code"] == "unreadable_image"
    assert reason["detail"].startswith(f"MT_Blowhole/Imgs/{second.name}: truncated JPEG")


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (12_000, 12_000)])
def test_decompression_bombs_are_refused_before_decoding(width, height):
    bomb = png_header_only(width, height)
    assert width * height > MAX_PIXELS and len(bomb) < 100_000
    for read in (probe, decode):
        with pytest.raises(BadImage, match=f"image too large: .*{width * height} pixels, more "
                                           f"than the {MAX_PIXELS}"):
            read(bomb)


def test_an_image_at_the_limit_is_not_refused_for_its_size():
    side = int(MAX_PIXELS ** 0.5)
    assert probe(png_header_only(side, side)).width == side  # header only: nothing decoded


def test_empty_and_garbage_files_are_bad_images_not_opencv_errors():
    for data, words in ((b"", "empty file"), (b"\x89PNG\r\n\x1a\n", "not a readable image"),
                        (b"\xff\xd8\xff", "not a readable image")):
        with pytest.raises(BadImage, match=words):
            decode(data)


def test_ingest_drops_a_bomb_image_with_its_name(ctx, mtd_root, tmp_path):
    (jpg,) = mtd_images(mtd_root, "MT_Free", 1)
    folder = tmp_path / "mtd" / "MT_Free" / "Imgs"
    folder.mkdir(parents=True)
    (folder / "huge.jpg").write_bytes(png_header_only(100_000, 100_000))
    shutil.copy(jpg.with_suffix(".png"), folder / "huge.png")
    rows = {r["path"]: r for r in ingest(ctx, "mtd", tmp_path / "mtd").rows()}
    huge = rows["MT_Free/Imgs/huge.jpg"]
    assert huge["status"] == "dropped"
    (reason,) = huge["reasons"]
    assert reason["code"] == "unreadable_image"
    assert reason["detail"].startswith("MT_Free/Imgs/huge.jpg: image too large")


def test_an_image_deleted_since_ingest_is_dropped_naming_it(ctx, mtd_root, tmp_path):
    folder = tmp_path / "mtd" / "MT_Free" / "Imgs"
    folder.mkdir(parents=True)
    for jpg in mtd_images(mtd_root, "MT_Free", 3):
        shutil.copy(jpg, folder)
        shutil.copy(jpg.with_suffix(".png"), folder)
    ingested = ingest(ctx, "mtd", tmp_path / "mtd")
    gone = sorted(folder.glob("*.jpg"))[1]
    gone.unlink()
    quality = run_stage(Quality(), [ingested], QualityParams(), ctx).manifest
    rows = {r["path"]: r for r in quality.rows()}
    dropped = rows[f"MT_Free/Imgs/{gone.name}"]
    (reason,) = dropped["reasons"]
    assert reason["code"] == "missing_file" and gone.name in reason["detail"]
    assert sum(r["status"] == "kept" for r in rows.values()) == 2
    assert np.isfinite(next(r for r in rows.values() if r["status"] == "kept")["measures"]
                       ["quality.sharpness"])


def test_an_unreadable_image_is_described_the_same_in_every_process(tmp_path, ctx):
    """Pillow's text for a file it cannot identify names a memory address
    ('<_io.BytesIO object at 0x7f49...>'); in a drop reason that made the manifest id differ
    between runs and between --jobs (found by tests/test_invariants.py)."""
    with pytest.raises(BadImage) as caught:
        probe(b"not an image at all")
    assert "0x" not in str(caught.value)
    root = tmp_path / "src" / "MT_Free" / "Imgs"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"made text")
    (root / "a.png").write_bytes(b"made text")
    manifest = ingest(ctx, "mtd", tmp_path / "src")
    [row] = manifest.rows()
    assert row["status"] == "dropped"
    assert "0x" not in row["reasons"][0]["detail"], row["reasons"]


def test_checking_a_complete_jpeg_prints_nothing(mtd_root, capfd):
    """The second look at a tile whose last block is mid-grey decoded it with filler bytes
    through OpenCV, whose libjpeg printed 'Corrupt JPEG data: 1015 extraneous bytes before
    marker 0xd9' on the terminal during every ingest of MTD."""
    for name in ("MT_Free/Imgs/exp5_num_116324.jpg", "MT_Free/Imgs/exp6_num_292199.jpg"):
        probe((mtd_root / name).read_bytes())
    assert "JPEG" not in capfd.readouterr().err
