"""Mask files in every encoding a source may use, and broken ones (issue 16 items 6, 9, 11).

Built on real MTD masks: each encoding of the same defect must give the same binary mask, and
anything beyond a plain 8-bit grey mask is flagged ``unusual_mask``. A broken mask names the
MASK file and what was expected, and a gigantic one is refused before it is decoded.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import ingest, labels, mtd_images
from PIL import Image

from curate.imaging.io import MAX_PIXELS, binarize, decode
from curate.imaging.masks import AnnotationError, read_mask


def png(pixels: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    im = Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)
    if palette is not None:
        im.putpalette(palette)
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring width x height 8-bit grey pixels, with a few
    rows of data: a decompression bomb's shape, a few hundred bytes long."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(payload, zlib.crc32(kind))
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", ihdr),
                     chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 2)), chunk(b"IEND", b"")])


@pytest.fixture(scope="module")
def crack(mtd_root) -> tuple[Path, np.ndarray]:
    """A real MTD crack image whose mask has defect pixels, and that mask as booleans."""
    for jpg in mtd_images(mtd_root, "MT_Crack", 5):
        truth = decode(jpg.with_suffix(".png").read_bytes()) > 127
        if truth.any():
            return jpg, truth
    # The real MTD's crack masks mark their cracks: none with a defect pixel means the mask
    # reading broke, which must fail here, not skip.
    raise AssertionError("none of the first five real MTD crack masks has a defect pixel")


def encodings(m: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    """The same binary mask ``m`` as each encoding, with the words of the expected flag."""
    u8 = m.astype(np.uint8)
    zeros = np.zeros_like(u8)
    upper, lower = m.copy(), m.copy()
    rows = np.flatnonzero(m.any(axis=1))
    upper[rows[len(rows) // 2]:], lower[:rows[len(rows) // 2]] = False, False
    labelled = (upper * 2 + lower * 3).astype(np.uint8)  # label ids 2 and 3
    rgba_red = np.dstack([u8 * 255, zeros, zeros, u8 * 255])
    return {
        "8-bit 0/255": (png(u8 * 255), None),
        "8-bit 0/1": (png(u8), None),
        "16-bit 0/1": (cv2.imencode(".png", m.astype(np.uint16))[1].tobytes(), "16-bit mask"),
        "16-bit 0/65535": (cv2.imencode(".png", m.astype(np.uint16) * 65535)[1].tobytes(),
                           "16-bit mask"),
        "palette 0/1": (png(u8, "P", [0, 0, 0, 255, 0, 0]), "palette mask"),
        "palette with a dark defect colour": (png(u8, "P", [255, 255, 255, 1, 1, 1]),
                                              "palette mask"),
        "grey + alpha": (png(np.dstack([u8 * 255, np.full_like(u8, 255)]), "LA"), None),
        "RGB red": (png(np.dstack([u8 * 200, zeros, zeros])), "colour mask"),
        "RGBA red on transparent": (png(rgba_red, "RGBA"), "colour mask"),
        "RGBA mask in alpha only": (png(np.dstack([zeros, zeros, zeros, u8 * 255]), "RGBA"),
                                    "alpha channel read as the mask"),
        "label ids 2, 3": (png(labelled), "label values 2, 3"),
        "one level 38": (png(u8 * 38), "only non-zero value is 38"),
    }


def test_every_encoding_of_a_real_mask_reads_the_same(crack):
    _, truth = crack
    for name, (data, flag) in encodings(truth).items():
        read = read_mask(data, size=truth.shape)
        assert np.array_equal(read.mask, truth), name
        assert read.threshold == 0, name
        if flag is None:
            assert read.unusual == (), (name, read.unusual)
        else:
            assert any(flag in u for u in read.unusual), (name, read.unusual)


def test_anti_aliased_masks_keep_the_half_scale_cut(crack):
    jpg, _ = crack
    original = jpg.with_suffix(".png").read_bytes()
    values = decode(original)
    read = read_mask(original)
    assert read.threshold == 127 and np.array_equal(read.mask, values > 127)
    assert read.grey_pixels == np.count_nonzero((values > 0) & (values < 255)) > 0
    assert read.unusual == ()
    wide = cv2.imencode(".png", values.astype(np.uint16) * 257)[1].tobytes()
    assert np.array_equal(read_mask(wide).mask, read.mask)  # 16-bit: same cut, 8-bit scale
    assert binarize(values.astype(np.uint16) * 257, 99)[0].tolist() == (values > 99).tolist()


def test_an_explicit_alpha_background_is_not_read_as_defect():
    # Opaque black background, white defect: before, the alpha channel made every pixel defect.
    m = np.zeros((6, 8), bool)
    m[2:4, 3:6] = True
    rgba = np.dstack([m * 255] * 3 + [np.full(m.shape, 255)]).astype(np.uint8)
    assert np.array_equal(read_mask(png(rgba, "RGBA")).mask, m)


def copy_crack_tree(root: Path, jpg: Path, mask: bytes) -> tuple[Path, str]:
    folder = root / "MT_Crack" / "Imgs"
    folder.mkdir(parents=True)
    shutil.copy(jpg, folder)
    (folder / jpg.with_suffix(".png").name).write_bytes(mask)
    return root, f"MT_Crack/Imgs/{jpg.with_suffix('.png').name}"


def test_a_16_bit_0_1_mask_is_not_read_as_empty(ctx, crack, tmp_path):
    """The issue's case: a 16-bit {0, 1} mask was read as empty and its sample dropped as
    defect_without_mask."""
    jpg, truth = crack
    root, rel = copy_crack_tree(tmp_path / "mtd", jpg,
                                cv2.imencode(".png", truth.astype(np.uint16))[1].tobytes())
    (row,) = labels(ctx, ingest(ctx, "mtd", root)).rows()
    assert row["status"] == "kept", row["reasons"]
    assert np.array_equal(ctx.workspace.store.read_mask(row["artifacts"]["mask"]), truth)
    assert row["measures"]["labels.mask_fraction"] == pytest.approx(truth.mean())
    (flag,) = row["flags"]
    assert flag["code"] == "unusual_mask" and rel in flag["detail"]
    assert "16-bit" in flag["detail"]


def test_masks_that_decide_the_label_at_ingest_read_16_bit_too(ctx, crack, tmp_path):
    """KolektorSDD2 labels a sample by its mask at ingest: a 16-bit {0, 1} GT is a defect."""
    jpg, truth = crack
    image = cv2.imencode(".png", decode(jpg.read_bytes()))[1].tobytes()
    for split, stem, mask in (("train", "10000", truth), ("train", "10001", np.zeros_like(truth))):
        (tmp_path / "ksdd2" / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / "ksdd2" / split / f"{stem}.png").write_bytes(image)
        (tmp_path / "ksdd2" / split / f"{stem}_GT.png").write_bytes(
            cv2.imencode(".png", mask.astype(np.uint16))[1].tobytes())
    rows = {r["path"]: r for r in ingest(ctx, "kolektorsdd2", tmp_path / "ksdd2").rows()}
    assert rows["train/10000.png"]["label"] == "defect"
    assert rows["train/10001.png"]["label"] == "good"


@pytest.mark.parametrize("mask, code, words", [
    (lambda h, w: b"", "unreadable_mask", "is unreadable (empty file); expected a PNG, BMP, TIFF "
     "or JPEG mask of {w}x{h}"),
    (lambda h, w: png(np.zeros((h + 1, w * 2), np.uint8)), "mask_size_mismatch",
     "is {w2}x{h1}, expected {w}x{h} like its image"),
    (lambda h, w: png_header_only(100_000, 100_000), "unreadable_mask",
     "image too large: its header declares 10000000000 pixels, more than the 134217728"),
    (lambda h, w: b"GIF89a not really", "unreadable_mask", "is unreadable (not a readable image"),
])
def test_broken_masks_name_the_mask_file(ctx, crack, tmp_path, mask, code, words):
    jpg, truth = crack
    h, w = truth.shape
    root, rel = copy_crack_tree(tmp_path / "mtd", jpg, mask(h, w))
    (row,) = labels(ctx, ingest(ctx, "mtd", root)).rows()
    assert row["status"] == "dropped"
    (reason,) = row["reasons"]
    assert reason["code"] == code
    assert reason["detail"].startswith(f"mask {rel} ")
    assert words.format(h=h, w=w, h1=h + 1, w2=w * 2) in reason["detail"]
    assert "OpenCV" not in reason["detail"] and "Assertion" not in reason["detail"]


def test_a_gigantic_mask_is_refused_before_decoding():
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 1_000_000
    with pytest.raises(AnnotationError, match=f"more than the {MAX_PIXELS}") as info:
        read_mask(bomb)  # no size to compare: refused by the pixel limit alone
    assert info.value.code == "unreadable_mask"


def test_a_mask_deleted_since_ingest_drops_its_sample_naming_the_file(ctx, crack, tmp_path):
    jpg, _ = crack
    root, rel = copy_crack_tree(tmp_path / "mtd", jpg, jpg.with_suffix(".png").read_bytes())
    ingested = ingest(ctx, "mtd", root)
    (root / rel).unlink()
    (row,) = labels(ctx, ingested).rows()
    (reason,) = row["reasons"]
    assert reason["code"] == "missing_file" and rel.split("/")[-1] in reason["detail"]
