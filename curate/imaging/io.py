"""Reading and writing images: header probes, decoding, and a fast PNG writer.

Ingest never decodes full pixels: it probes the header (format, size, channels) with Pillow
and checks that the file is complete, which is all a manifest needs. For a PNG or BMP that
takes no decoding at all; a JPEG is also decoded at 1/8 scale (DC coefficients only, about
0.3 ms for an MTD tile, still cheaper than a full decode), the only way to see a scan that
stops short. Pixels are decoded once, by the stage that needs them.

PNG writing dominates an MVTec export (every source image is re-encoded as PNG). zlib's deflate
is the slow part: on MTD, OpenCV's PNG writer takes about 6x as long as decoding the JPEGs.
:func:`encode_png` writes the same standard PNG with the "up" filter and ISA-L's deflate
(level 1), which is about 4x faster than OpenCV here at a similar size. Any PNG reader decodes
the result; tests check that it round-trips exactly through OpenCV and Pillow.

Hostile files are refused with :class:`BadImage` before they cost anything: an empty file, a
header declaring more than :data:`MAX_PIXELS` pixels (a few kilobytes of PNG can declare
100000 x 100000: a "decompression bomb"), and a JPEG whose scan stops short even when an
end-of-image marker was appended to it (see :func:`jpeg_cut_short`).
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
from isal import isal_zlib
from PIL import Image, UnidentifiedImageError

from curate.core.errors import stable_text

# Decoding happens in worker processes, each handling one image at a time.
cv2.setNumThreads(1)

_FORMATS = {"JPEG": "jpeg", "PNG": "png", "BMP": "bmp", "TIFF": "tiff"}
_CHANNELS = {"1": 1, "L": 1, "P": 3, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1,
             "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


#: The most pixels (width x height) curate decodes: 2^27, e.g. 11585 x 11585 (about 400 MB as
#: 8-bit RGB, far beyond any inspection camera's frame). A header declaring more is refused
#: before decoding. Pillow refuses on its own only above 2 x ``Image.MAX_IMAGE_PIXELS``
#: (about 1.8e8) and merely warns below that; OpenCV's limit is 2^30.
MAX_PIXELS = 2 ** 27


class BadImage(ValueError):
    """The bytes are not a complete image in a format curate reads."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    channels: int


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _too_large(pixels: int, size: str = "") -> BadImage:
    return BadImage(f"image too large: its header declares {size}{pixels} pixels, more than "
                    f"the {MAX_PIXELS} curate decodes (refused before decoding)")


def _header(data: bytes) -> tuple[Image.Image, str]:
    """Pillow's image of ``data`` with only its header read, and curate's name of its format.

    Raises :class:`BadImage` for an empty file, a format curate does not read, and a header
    declaring more than :data:`MAX_PIXELS` pixels; nothing is decoded.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd but readable headers
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        # Pillow raises this only while its limit is set: MAX_IMAGE_PIXELS is an int here.
        limit = 2 * cast(int, Image.MAX_IMAGE_PIXELS)
        raise _too_large(int(declared.group(1)) if declared else limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise BadImage(f"not a readable image ({stable_text(exc)})") from exc
    fmt = _FORMATS.get(im.format or "")
    if fmt is None:
        raise BadImage(f"unsupported image format {im.format!r}")
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise _too_large(width * height, f"{width}x{height} = ")
    return im, fmt


def probe(data: bytes) -> ImageInfo:
    """Format, size and channel count of an encoded image, without decoding its pixels.

    Raises :class:`BadImage` for a file that is not a JPEG/PNG/BMP/TIFF image, that declares
    more than :data:`MAX_PIXELS` pixels, or that is truncated (a JPEG without its end-of-image
    marker or whose scan stops short, a PNG whose chunks fail their CRC or lack IEND, a BMP
    shorter than its header says).
    """
    im, fmt = _header(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = im.size
            channels = _CHANNELS.get(im.mode)
            if channels is None:
                raise BadImage(f"unsupported pixel mode {im.mode!r}")
            if im.mode == "P" and "transparency" in im.info:
                channels = 4
            if fmt == "png":
                # verify() walks every chunk and checks its CRC, without inflating the data.
                Image.open(io.BytesIO(data)).verify()
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise BadImage(f"not a readable image ({stable_text(exc)})") from exc
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if fmt == "jpeg" and not _jpeg_complete(data):
        raise BadImage("truncated JPEG: no end-of-image marker")
    if fmt == "jpeg" and jpeg_cut_short(data):
        raise BadImage(JPEG_CUT_SHORT)
    if fmt == "bmp" and len(data) < _bmp_declared_size(data):
        raise BadImage(f"truncated BMP: {len(data)} bytes, header declares "
                       f"{_bmp_declared_size(data)}")
    return ImageInfo(fmt, int(width), int(height), channels)


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded JPEG data never contains FF D9 (0xFF is always stuffed), so the marker near
    # the end means the scan was complete. Some writers pad after it, hence a window, not a suffix.
    return _jpeg_end(data) >= 0


def _jpeg_end(data: bytes) -> int:
    """Offset of the end-of-image marker near the end of ``data``, or -1."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 1024))


JPEG_CUT_SHORT = ("truncated JPEG: its data ends before the last rows (an end-of-image marker "
                  "follows a cut scan)")
#: Entropy-coded filler for :func:`jpeg_cut_short`: every byte but 0xFF (which would start a
#: marker), so that it decodes as a varied run of Huffman codes.
_FILLER = bytes(range(255)) * 4
#: What libjpeg decodes where the data ran out: all-zero coefficients, i.e. mid-grey.
_MID_GREY = 128


def _dc_image(data: bytes) -> np.ndarray | None:
    """The JPEG at 1/8 scale, grey: one pixel per 8 x 8 block, from its DC coefficient alone
    (libjpeg skips the inverse DCT, so this costs mostly the Huffman decoding)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)


def jpeg_cut_short(data: bytes) -> bool:
    """Whether a JPEG's entropy-coded scan stops before its last blocks.

    A copy cut short and closed with an end-of-image marker (``FF D9``) passes the marker
    check, and libjpeg decodes it with a mere warning, filling the missing blocks with zero
    coefficients: flat mid-grey (128) down to the bottom-right block. So: if the last block is
    exactly 128, decode again with filler bytes inserted before the marker. A complete scan
    ends before the filler (libjpeg skips it as junk before the marker) and the pixels do not
    change; a cut one reads the filler as more blocks and the pixels do. A progressive JPEG
    cut between two scans is a complete, coarser image and is not detected.
    """
    end = _jpeg_end(data)
    if end < 0:
        return False
    blocks = _dc_image(data)
    if blocks is None or int(blocks[-1, -1]) != _MID_GREY:
        return False
    # The rare second look goes through Pillow's libjpeg, which keeps its warnings to itself:
    # OpenCV's prints "Corrupt JPEG data: N extraneous bytes" on the user's terminal for every
    # complete image given the filler. Both decodings by one library, so they compare exactly.
    try:
        return not np.array_equal(_pillow_dc_image(data),
                                  _pillow_dc_image(data[:end] + _FILLER + data[end:]))
    except (OSError, SyntaxError, ValueError, struct.error):
        return True


def _pillow_dc_image(data: bytes) -> np.ndarray:
    """:func:`_dc_image` by Pillow (``draft`` asks libjpeg for the 1/8 scale)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(io.BytesIO(data))
        im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
        return np.asarray(im.convert("L"))


def _bmp_declared_size(data: bytes) -> int:
    if len(data) < 6:
        return 6
    return struct.unpack("<I", data[2:6])[0]


def _imdecode(data: bytes, flag: int) -> np.ndarray:
    """OpenCV's decoding, after the header checks of :func:`_header`, with every failure as
    :class:`BadImage` (OpenCV raises its assertion text for empty or oversized data)."""
    _, fmt = _header(data)
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise BadImage(f"OpenCV could not decode the image ({str(exc).strip()})") from None
    if arr is None:
        raise BadImage("OpenCV could not decode the image")
    # Mid-grey in the last pixel is the sign of a cut scan (see jpeg_cut_short): only then is
    # the JPEG decoded again to tell.
    if fmt == "jpeg" and (arr[-1, -1] == _MID_GREY).all() and jpeg_cut_short(data):
        raise BadImage(JPEG_CUT_SHORT)
    return arr


def decode(data: bytes, *, grayscale: bool = False) -> np.ndarray:
    """Decode to uint8 pixels: H x W (grey) or H x W x 3/4 in RGB(A) order.

    OpenCV decodes (fastest here); its BGR order is turned into RGB so arrays match what
    Pillow, torchvision and every PNG file mean by the channels. Raises :class:`BadImage` for
    what :func:`_header` refuses and for data OpenCV cannot decode.
    """
    arr = _imdecode(data, cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_UNCHANGED)
    if arr.dtype != np.uint8:
        # 16-bit inputs: keep the 8 most significant bits, like most viewers show them.
        arr = (arr >> 8).astype(np.uint8) if arr.dtype == np.uint16 else arr.astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        elif arr.shape[2] == 4:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


def mask_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a mask file from its header, without decoding (:class:`BadImage` as
    :func:`_header`)."""
    im, _ = _header(data)
    return im.size[1], im.size[0]


def decode_mask_values(data: bytes) -> tuple[np.ndarray, str]:
    """A mask file's stored values, unconverted, and its kind: ``"palette"`` (H x W palette
    indices), else OpenCV's reading at full depth: H x W, or H x W x 3 / 4 in BGR(A) order
    (grey + alpha arrives as BGRA), uint8 or uint16 (kind ``"16-bit"``), kind ``""``.

    :func:`decode` keeps only the top 8 bits of 16-bit data and expands palettes to colours,
    which turns a 16-bit {0, 1} mask or a palette of label indices into something else;
    masks keep their values (see ``curate.imaging.masks.read_mask`` for how they are read).
    """
    im, _ = _header(data)
    if im.mode in ("P", "PA"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                indices = np.asarray(im.getchannel(0) if im.mode == "PA" else im)
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise BadImage(f"not a readable image ({stable_text(exc)})") from exc
        return np.ascontiguousarray(indices, np.uint8), "palette"
    arr = _imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr.dtype not in (np.uint8, np.uint16):
        raise BadImage(f"{arr.dtype} samples; expected 8- or 16-bit integer values")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return arr, "16-bit" if arr.dtype == np.uint16 else ""


def decode_file(path) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode(fh.read())


_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = isal_zlib.crc32(payload, isal_zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """Encode uint8 pixels (H x W, or H x W x C with C in 1..4, RGB order) as a PNG file.

    8-bit, non-interlaced, every row with the "up" filter (a good, vectorisable default for
    photographs and masks alike); ``level`` is ISA-L's deflate level (0-3).
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (2, 3, 4)):
        raise ValueError(f"encode_png takes H x W or H x W x C pixels, got {pixels.shape}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "up": each byte minus the byte above (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], dtype=np.uint8, casting="unsafe")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", ihdr),
        _chunk(b"IDAT", isal_zlib.compress(filtered.tobytes(), level)),
        _chunk(b"IEND", b""),
    ])


def count_between(values: np.ndarray, low: int, high: int) -> int:
    """How many pixels of a 2-d uint8 or uint16 mask hold a value in ``low..high``."""
    if low > high:
        return 0
    # OpenCV's two passes: several times faster than a histogram or numpy's comparisons.
    return cv2.countNonZero(cv2.inRange(np.ascontiguousarray(values), low, high))


def mask_levels(values: np.ndarray) -> np.ndarray:
    """The distinct non-zero values of a 2-d uint8 or uint16 mask, ascending."""
    top = int(values.max())
    if top == 0 or count_between(values, 1, top - 1) == 0:  # empty or binary: no histogram
        return np.array([top] if top else [], dtype=np.int64)
    counts = np.bincount(values.ravel(), minlength=2)
    return np.flatnonzero(counts[1:]) + 1


def auto_threshold(values: np.ndarray) -> int:
    """The ``"auto"`` threshold of :func:`binarize` for a 2-d uint8 or uint16 mask."""
    top = int(values.max())
    if top <= 127 * (257 if values.dtype == np.uint16 else 1):
        return 0  # binary {0, 1}, label ids, or empty
    return 0 if count_between(values, 1, top - 1) == 0 else 127


def binarize(mask: np.ndarray, threshold: int | str = "auto") -> tuple[np.ndarray, int]:
    """Binary mask (bool, H x W) from an 8- or 16-bit mask, and the threshold used.

    A pixel is foreground when its value is greater than the threshold, given on the 8-bit
    scale: a 16-bit value v counts as level v / 257. ``"auto"`` takes

    - 0 (every non-zero value is foreground) when the mask holds a single non-zero value
      ({0, 1}, {0, 255}, {0, 65535}: binary masks however stored) or none above half its full
      scale (label ids 1, 2, 3 ...: half-scale would leave nothing);
    - 127 otherwise: an anti-aliased mask, cut at half its full scale.

    Colour masks are reduced to their maximum over channels.
    """
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"masks are 8- or 16-bit integers, got {mask.dtype}")
    scale = 257 if mask.dtype == np.uint16 else 1
    if threshold == "auto":
        threshold = auto_threshold(mask)
    if not isinstance(threshold, int) or not 0 <= threshold < 255:
        raise ValueError(f"mask threshold must be 'auto' or an integer in 0..254, got {threshold!r}")
    return mask > threshold * scale, threshold
