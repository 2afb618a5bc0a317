"""Hostile source trees for the invariant tests: a small valid dataset plus drawn mutations.

A tree is one of :data:`KINDS` (a reader kind, casting once per annotation format) written by
``curate.testing.fixtures`` at its smallest, then changed by a list of :class:`Mutation` drawn by
hypothesis: hostile names (spaces, unicode, leading dashes, backslashes, names that collide once
cleaned for export), the same stem with a second extension, broken images and masks (empty,
truncated, wrong format, 16-bit, RGBA, CMYK, palette, a header claiming 10^10 pixels), links
inside and outside the root, directory links and loops, broken links, FIFOs, unreadable files
(only where the tests do not run as root) and malformed annotation records of each format.

A mutation is a plain ``(op, slot, variant)`` triple: ``slot`` picks the good sample it works
on and ``variant`` the flavour, both modulo what exists, so hypothesis shrinks a failing tree
to the fewest, simplest mutations. :func:`build_tree` applies them and returns a :class:`Tree`
that also knows the folder *outside* the root that links point to, so a test can prove nothing
there was read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import cv2
import numpy as np
from hypothesis import strategies as st
from PIL import Image

from curate.imaging.io import encode_png
from curate.testing import fixtures

#: Tree kinds: reader kinds, with casting once per annotation format.
KINDS = ("kolektorsdd", "kolektorsdd2", "mtd", "severstal", "casting-voc", "casting-yolo",
         "casting-coco", "mvtec")

RUNS_AS_ROOT = os.geteuid() == 0
#: Prefix that runs a command without root's power over files (a new user namespace, where
#: root's capabilities do not cover them), so chmod 000 means unreadable; empty if not root.
UNPRIVILEGED = ["unshare", "--user"] if RUNS_AS_ROOT and shutil.which("unshare") else []


@dataclass(frozen=True)
class Layout:
    reader: str
    options: dict
    write: Callable[[Path, int], fixtures.Fixture]
    #: Files belonging to a sample image besides itself (mask, per-image annotation file).
    companions: Callable[[str], list[str]]
    #: Files shared by every sample (train.csv, annotations.json, data.yaml).
    shared: tuple[str, ...] = ()
    #: A directory path that the reader would read images from, for directory links.
    alias_dir: str | None = None


def _beside(suffix: str, ext: str) -> Callable[[str], list[str]]:
    return lambda image: [str(PurePosixPath(image).with_suffix("")) + suffix + ext]


def _mvtec_mask(image: str) -> list[str]:
    parts = image.split("/")
    if len(parts) != 4 or parts[1] != "test" or parts[2] == "good":
        return []
    return [f"{parts[0]}/ground_truth/{parts[2]}/{PurePosixPath(parts[3]).stem}_mask.png"]


def _mirror(image_dir: str, label_dir: str, ext: str) -> Callable[[str], list[str]]:
    def companions(image: str) -> list[str]:
        p = PurePosixPath(image)
        return [f"{label_dir}/{p.stem}{ext}"] if str(p.parent) == image_dir else []
    return companions


LAYOUTS: dict[str, Layout] = {
    "kolektorsdd": Layout(
        "kolektorsdd", {},
        lambda root, seed: fixtures.write_kolektorsdd(root, seed=seed, folders=1, parts=3),
        _beside("_label", ".bmp"), alias_dir="kos98"),
    "kolektorsdd2": Layout(
        "kolektorsdd2", {},
        lambda root, seed: fixtures.write_kolektorsdd2(root, seed=seed, train=2, test=2),
        _beside("_GT", ".png")),
    "mtd": Layout(
        "mtd", {}, lambda root, seed: fixtures.write_mtd(root, seed=seed, per_class=1),
        _beside("", ".png"), alias_dir="MT_Sneaky/Imgs"),
    "severstal": Layout(
        "severstal", {},
        lambda root, seed: fixtures.write_severstal(
            root, seed=seed, test=1, csv_layout="wide" if seed % 2 else "long"),
        lambda image: [], shared=("train.csv",)),
    "casting-voc": Layout(
        "casting", {"format": "voc"},
        lambda root, seed: fixtures.write_casting(root, seed=seed, format="voc"),
        _mirror("JPEGImages", "Annotations", ".xml"), alias_dir="JPEGImages/sub"),
    "casting-yolo": Layout(
        "casting", {"format": "yolo"},
        lambda root, seed: fixtures.write_casting(root, seed=seed, format="yolo"),
        _mirror("images/train", "labels/train", ".txt"), shared=("data.yaml",),
        alias_dir="images/train/sub"),
    "casting-coco": Layout(
        "casting", {"format": "coco"},
        lambda root, seed: fixtures.write_casting(root, seed=seed, format="coco"),
        lambda image: [], shared=("annotations.json",), alias_dir="images/sub"),
    "mvtec": Layout(
        "mvtec", {},
        lambda root, seed: fixtures.write_mvtec(root, seed=seed, train=1, test_good=1,
                                                per_defect=1),
        _mvtec_mask, alias_dir="bottle/test/sneaky"),
}


class Mutation(NamedTuple):
    op: str
    slot: int
    variant: int


@dataclass
class Tree:
    kind: str
    root: Path
    #: Folder outside the root that hostile links point into; nothing there may be read.
    outside: Path
    reader: str
    options: dict
    mutations: list[Mutation]
    #: What each mutation did (or why it was skipped), in order: the readable repro.
    log: list[str] = field(default_factory=list)
    fifos: list[Path] = field(default_factory=list)
    #: The sample whose files were copied outside the root (with unique image bytes).
    sentinel: str = ""

    def describe(self) -> str:
        return f"{self.kind} tree: " + "; ".join(self.log or ["no mutation"])


# ----------------------------------------------------------------------------- names and bytes
#: Stems a user's files really have, and worse: spaces, unicode (composed and not), leading
#: dashes (option-like), a backslash, a newline, names that clean to the same export name.
HOSTILE_STEMS = ("a b", "a_b", "défaut ü", "de\u0301faut u\u0308", "-rf", "--help", "日本 語",
                 " lead", "trail.", "a\\b", "new\nline", "a%20b", "x" * 120, "a;b|c", "'q\"")
SECOND_EXTS = (".png", ".JPG", ".bmp", ".jpeg", ".tif")
JUNK = ((".DS_Store", b"\x00\x00\x00\x01Bud1"), ("Thumbs.db", b"\xd0\xcf\x11\xe0"),
        ("._{stem}.jpg", b"\x00\x05\x16\x07AppleDouble"), ("notes.txt", b"hello\n"),
        ("{stem}.jpg.part", b"\xff\xd8\xff"), ("README", b""))


def _decoded(data: bytes) -> np.ndarray:
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # a header claiming more pixels than OpenCV accepts
        pixels = None
    if pixels is None:
        pixels = np.full((8, 8), 128, np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return pixels.astype(np.uint8)


def _grey(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else pixels[:, :, 0]


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return np.dstack([pixels] * 3) if pixels.ndim == 2 else pixels[:, :, :3]


def _pil_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def gigantic_png() -> bytes:
    """A well-formed PNG (every CRC right, IEND present) whose header claims 100000 x 100000
    pixels: a decompression bomb by its header alone."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _sixteen_bit(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", _grey(pixels).astype(np.uint16) * 257)
    assert ok
    return buf.tobytes()


def _other_format(data: bytes, pixels: np.ndarray) -> bytes:
    if data[:4] == b"\x89PNG":
        return _pil_bytes(Image.fromarray(_rgb(pixels)), "JPEG")
    return encode_png(pixels)


#: Name -> new bytes for an image or mask file, from its old bytes and decoded pixels.
CORRUPTIONS: dict[str, Callable[[bytes, np.ndarray], bytes]] = {
    "empty": lambda data, px: b"",
    "truncated": lambda data, px: data[: len(data) // 2],
    "text": lambda data, px: b"this is not an image\n",
    "other-format": _other_format,
    "16-bit": lambda data, px: _sixteen_bit(px),
    "rgba": lambda data, px: encode_png(np.dstack([_rgb(px), np.full(px.shape[:2], 200,
                                                                     np.uint8)])),
    "cmyk-jpeg": lambda data, px: _pil_bytes(Image.fromarray(_rgb(px)).convert("CMYK"), "JPEG"),
    "palette": lambda data, px: _pil_bytes(Image.fromarray(_rgb(px)).convert("P"), "PNG"),
    "one-pixel": lambda data, px: encode_png(np.zeros((1, 1), np.uint8)),
    "gigantic-header": lambda data, px: gigantic_png(),
    "float-tiff": lambda data, px: _pil_bytes(Image.fromarray(_grey(px).astype(np.float32)),
                                              "TIFF"),
}


# ----------------------------------------------------------------------------- annotations
def _severstal_lines(image_id: str) -> list[bytes]:
    return [f"{image_id},1".encode(), f"{image_id},7,1 5".encode(),
            f"{image_id},1,1 2 3".encode(), f"{image_id},1,{10 ** 12} 5".encode(),
            f"{image_id},1,-4 5".encode(), f"{image_id},1,abc def".encode(),
            b"../outside.jpg,1,1 1", b"/etc/passwd,1,1 1", f"{image_id},2,1 1".encode() * 1,
            b"\xff\xfe garbage", f'"{image_id},1,1 1'.encode(), f"{image_id},1,5 0".encode(),
            f"{image_id},1,1 {10 ** 20}".encode(), f"{image_id},2,30 4 1 2".encode(),
            f"{image_id}\x00,1,1 1".encode(), f"{image_id}_3,1 1".encode()]


def _voc_docs(stem: str, outside: Path) -> list[bytes]:
    box = "<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>"

    def doc(obj: str, size: str = "<size><width>192</width><height>144</height></size>",
            head: str = "", filename: str = f"{stem}.jpg") -> bytes:
        return (f"{head}<annotation><filename>{filename}</filename>{size}"
                f"<object>{obj}</object></annotation>").encode()
    return [b"<annotation><object>", b"",
            doc("<name>pit</name>" + box.format("a", "b", "c", "d")),
            doc("<name>pit</name>" + box.format(50, 50, 10, 10)),
            doc("<name>pit</name>" + box.format(1, 1, 100000, 100000)),
            doc("<name>pit</name>" + box.format("nan", 1, "inf", 5)),
            b"\xff\xfe\x00<", doc("<name>pit</name>"),
            doc("<name>pit</name>" + box.format(1, 1, 5, 5), filename="../../outside.jpg"),
            doc("<name></name>" + box.format(1, 1, 5, 5)),
            doc("<name>pit</name>" + box.format(1, 1, 5, 5),
                size="<size><width>10</width><height>10</height></size>"),
            doc("<name>&xxe;</name>" + box.format(1, 1, 5, 5),
                head=f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY xxe SYSTEM '
                     f'"file://{outside}/secret.txt">]>'),
            doc("<name>&a3;</name>" + box.format(1, 1, 5, 5),
                head='<!DOCTYPE annotation [<!ENTITY a0 "pit"><!ENTITY a1 "&a0;&a0;&a0;">'
                     '<!ENTITY a2 "&a1;&a1;&a1;"><!ENTITY a3 "&a2;&a2;&a2;">]>'),
            doc("<name>../../etc</name>" + box.format(1, 1, 5, 5)),
            doc("<name>pit</name>" + box.format("1e400", 1, 5, 5))]


YOLO_LINES = (b"0 0.5", b"a b c d e", b"0 nan 0.5 0.1 0.1", b"99 0.5 0.5 0.1 0.1",
              b"0 1.5 1.5 2 2", b"-1 0.5 0.5 0.1 0.1", b"0 0.1 0.1 0.2 0.2 0.3",
              b"\xff\xfe", b"0 0.5 0.5 0 0", b"0 1e309 0.5 0.1 0.1", b"1.5 0.5 0.5 0.1 0.1",
              b"0 0.5 0.5 0.1 0.1 extra")
YOLO_NAMES = (b"names: [\n", b"!!python/object/apply:os.system ['true']\n", b"names: 5\n",
              b"names: {0: pit, 1: [x]}\n", b"\xff\xfe")


def _coco_variants(doc: dict, outside: Path) -> list[Callable[[dict], object]]:
    first = doc["images"][0]

    def add_image(name: str) -> Callable[[dict], dict]:
        def edit(d: dict) -> dict:
            d["images"].append({"id": 999, "file_name": name, "width": 192, "height": 144})
            return d
        return edit

    def ann(**fields) -> Callable[[dict], dict]:
        def edit(d: dict) -> dict:
            d["annotations"].append({"id": 9999, "image_id": first["id"], "category_id": 1,
                                     "iscrowd": 0, "bbox": [1, 1, 5, 5], **fields})
            return d
        return edit

    def dup_id(d: dict) -> dict:
        d["images"][1]["id"] = d["images"][0]["id"]
        return d

    def wrong_size(d: dict) -> dict:
        d["images"][0].update(width=1, height=1)
        return d

    return [lambda d: "{", lambda d: [], add_image("../../outside/sentinel.jpg"),
            add_image(f"{outside}/sentinel.jpg"), ann(image_id=424242),
            ann(bbox=["a", 1, 2, 3]), ann(bbox=[10, 10, -5, -5]), ann(category_id=77),
            dup_id, ann(segmentation={"counts": "zz", "size": [1, 1]}),
            lambda d: b"\xff\xfe", lambda d: {"images": 5, "annotations": []}, wrong_size,
            ann(segmentation=[[1, 2]]), ann(bbox=[1e400, 1, 2, 3]),
            ann(bbox=[float("nan"), 1, 2, 3]), add_image(first["file_name"])]


# ----------------------------------------------------------------------------- the strategy
OPS = ("copy_as", "second_ext", "corrupt_image", "corrupt_mask", "annotation", "junk",
       "link_inside", "link_outside_image", "link_outside_mask", "dir_link", "link_loop",
       "broken_link", "fifo", "unreadable")

mutations = st.builds(Mutation, st.sampled_from(OPS), st.integers(0, 15), st.integers(0, 31))


def trees(kinds: tuple[str, ...] = KINDS, max_mutations: int = 4):
    """(kind, seed, mutations): what :func:`build_tree` needs; kept small so every example
    runs in a second or two."""
    return st.tuples(st.sampled_from(kinds), st.integers(0, 1),
                     st.lists(mutations, max_size=max_mutations))


def build_tree(spec: tuple[str, int, list[Mutation]], base: Path) -> Tree:
    """Write the tree ``spec`` under ``base/root`` (its sentinel folder is ``base/outside``)."""
    kind, seed, muts = spec
    layout = LAYOUTS[kind]
    root, outside = base / "root", base / "outside"
    fixture = layout.write(root, seed)
    tree = Tree(kind, root, outside, layout.reader, dict(layout.options), list(muts))
    _write_outside(tree, layout, fixture)
    samples = sorted(fixture.samples)
    for m in muts:
        target = samples[m.slot % len(samples)]
        tree.log.append(f"{m.op}: " + (_APPLY[m.op](tree, layout, target, m.variant)
                                       or "skipped (nothing to do)"))
    return tree


def _write_outside(tree: Tree, layout: Layout, fixture: fixtures.Fixture) -> None:
    """A sentinel sample outside the root (image, its companions, shared files), with bytes
    no file inside has, and a flat folder of the same to link whole directories to."""
    image = tree.sentinel = sorted(fixture.samples)[0]
    flat = tree.outside / "flat"
    flat.mkdir(parents=True)
    rng = np.random.default_rng(12345)
    for rel in [image, *layout.companions(image), *layout.shared]:
        src = tree.root / rel
        if not src.is_file():
            continue
        data = src.read_bytes()
        if rel == image:  # unique pixels: a copy of them inside the root can only be a leak
            pixels = _decoded(data)
            noisy = np.clip(pixels.astype(int) + rng.integers(-9, 9, pixels.shape), 0, 255)
            data = _other_format(b"", noisy.astype(np.uint8)) if rel.endswith(".png") else \
                _pil_bytes(Image.fromarray(_rgb(noisy.astype(np.uint8))), "JPEG")
        name = PurePosixPath(rel).name
        (tree.outside / name).write_bytes(data)
        (flat / name.replace(PurePosixPath(image).stem, "sentinel")).write_bytes(data)
    (tree.outside / "sentinel.jpg").write_bytes((tree.outside / PurePosixPath(image).name)
                                                .read_bytes())
    (tree.outside / "secret.txt").write_text("SECRET OUTSIDE THE ROOT\n")


def _new_path(rel: str, stem: str, ext: str | None = None) -> str:
    p = PurePosixPath(rel)
    return str(p.with_name(stem + (p.suffix if ext is None else ext)))


def _free(tree: Tree, *rels: str) -> bool:
    return not any(os.path.lexists(tree.root / r) for r in rels)


def _copy_as(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    stem = HOSTILE_STEMS[variant % len(HOSTILE_STEMS)]
    new = _new_path(target, stem)
    pairs = [(target, new)] + [(c, n) for c, n in zip(layout.companions(target),
                                                        layout.companions(new), strict=True)
                               if (tree.root / c).is_file()]
    if not _free(tree, *(n for _, n in pairs)):
        return None
    for old, n in pairs:
        (tree.root / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree.root / old, tree.root / n)
    return f"copied {target} (and its companions) as {new!r}"


def _second_ext(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    exts = [e for e in SECOND_EXTS if e.lower() != PurePosixPath(target).suffix.lower()]
    new = _new_path(target, PurePosixPath(target).stem, exts[variant % len(exts)])
    if not _free(tree, new) or new in layout.companions(target):
        return None
    shutil.copyfile(tree.root / target, tree.root / new)
    return f"copied {target} as {new!r} (same stem, second extension)"


def _corrupt(tree: Tree, rel: str, variant: int) -> str | None:
    path = tree.root / rel
    if not path.is_file() or path.is_symlink():
        return None
    name = sorted(CORRUPTIONS)[variant % len(CORRUPTIONS)]
    data = path.read_bytes()
    path.write_bytes(CORRUPTIONS[name](data, _decoded(data)))
    return f"{rel} made {name}"


def _corrupt_image(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    return _corrupt(tree, target, variant)


def _corrupt_mask(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    masks = [c for c in layout.companions(target) if c.endswith((".png", ".bmp"))]
    return _corrupt(tree, masks[0], variant) if masks else None


def _annotation(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    root, kind = tree.root, tree.kind
    if kind == "severstal":
        lines = _severstal_lines(PurePosixPath(target).name)
        line = lines[variant % len(lines)]
        with open(root / "train.csv", "ab") as fh:
            fh.write(line + b"\n")
        return f"train.csv: appended {line!r}"
    if kind == "casting-voc":
        docs = _voc_docs(PurePosixPath(target).stem, tree.outside)
        rel = layout.companions(target)[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(docs[variant % len(docs)])
        return f"{rel} replaced by {docs[variant % len(docs)][:120]!r}"
    if kind == "casting-yolo":
        if variant % 3 == 2:
            text = YOLO_NAMES[variant % len(YOLO_NAMES)]
            (root / "data.yaml").write_bytes(text)
            return f"data.yaml replaced by {text!r}"
        line = YOLO_LINES[variant % len(YOLO_LINES)]
        rel = layout.companions(target)[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "ab") as fh:
            fh.write(line + b"\n")
        return f"{rel}: appended {line!r}"
    if kind == "casting-coco":
        try:
            doc = json.loads((root / "annotations.json").read_text())
            doc["images"][1]
        except (ValueError, TypeError, KeyError, IndexError):
            return None  # an earlier mutation broke it already
        variants = _coco_variants(doc, tree.outside)
        new = variants[variant % len(variants)](doc)
        data = new if isinstance(new, bytes) else new.encode() if isinstance(new, str) else \
            json.dumps(new).encode()
        (root / "annotations.json").write_bytes(data)
        return f"annotations.json variant {variant % len(variants)}: {data[:60]!r}…"
    return _corrupt_mask(tree, layout, target, variant)


def _junk(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    name, data = JUNK[variant % len(JUNK)]
    rel = str(PurePosixPath(target).parent / name.format(stem=PurePosixPath(target).stem))
    if not _free(tree, rel):
        return None
    (tree.root / rel).write_bytes(data)
    return f"junk file {rel!r}"


def _symlink(tree: Tree, rel: str, to: str | Path) -> bool:
    if not _free(tree, rel):
        return False
    (tree.root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(to, tree.root / rel)
    return True


def _link_inside(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    stem = f"linked{variant % 4}"
    new = _new_path(target, stem)
    pairs = [(target, new)]
    if variant % 2:  # its companions linked too: a complete sample made of links
        pairs += list(zip(layout.companions(target), layout.companions(new), strict=True))
    done = [n for old, n in pairs
            if (tree.root / old).exists() and _symlink(tree, n, os.path.relpath(
                tree.root / old, (tree.root / n).parent))]
    return f"links inside the root {done} -> {target} and companions" if done else None


def _link_outside_image(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    new = _new_path(target, f"outside{variant % 4}")
    sentinel = tree.sentinel
    pairs = [(new, tree.outside / PurePosixPath(sentinel).name)]
    if variant % 2:
        pairs += [(n, tree.outside / PurePosixPath(c).name)
                  for c, n in zip(layout.companions(sentinel), layout.companions(new),
                                  strict=False)]
    done = [n for n, to in pairs if to.exists() and _symlink(tree, n, to)]
    return f"links to outside the root {done}" if done else None


def _link_outside_mask(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    """Replace a file the sample needs (its mask, or the shared annotation file) by a link to
    a copy outside the root."""
    needed = [c for c in layout.companions(target) if (tree.root / c).is_file()]
    needed += [s for s in layout.shared if (tree.root / s).is_file()]
    if not needed:
        return None
    rel = needed[variant % len(needed)]
    copy = tree.outside / "copies" / rel
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tree.root / rel, copy)
    os.symlink(copy, tree.root / rel)
    return f"{rel} replaced by a link to a copy outside the root"


def _dir_link(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    image_dir = str(PurePosixPath(target).parent)
    choice = variant % 5
    if choice == 0 and layout.alias_dir:  # a second name for a folder inside the root
        rel, to = layout.alias_dir, tree.root / image_dir
    elif choice == 1 and layout.alias_dir:  # a folder outside the root, named like the layout
        rel, to = layout.alias_dir, tree.outside / "flat"
    elif choice == 2:  # a cycle: the folder holds a link to its parent
        rel, to = f"{image_dir}/loop", ".."
    elif choice == 3:
        rel, to = f"{image_dir}/self", "self"
    else:
        rel, to = "outside_dir", tree.outside
    if not _symlink(tree, rel, to if isinstance(to, str) else
                    (os.path.relpath(to, (tree.root / rel).parent) if to.is_relative_to(
                        tree.root) else to)):
        return None
    return f"directory link {rel!r} -> {to}"


def _link_loop(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    a, b = _new_path(target, f"loop{variant % 3}a"), _new_path(target, f"loop{variant % 3}b")
    if not _free(tree, a, b):
        return None
    os.symlink(PurePosixPath(b).name, tree.root / a)
    os.symlink(PurePosixPath(a).name, tree.root / b)
    return f"link loop {a!r} <-> {b!r}"


def _broken_link(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    if variant % 2 and layout.companions(target) and \
            (tree.root / layout.companions(target)[0]).is_file():
        rel = layout.companions(target)[0]  # the sample's mask becomes a dangling link
        (tree.root / rel).unlink()
        os.symlink("does-not-exist.png", tree.root / rel)
        return f"{rel} replaced by a broken link"
    rel = _new_path(target, f"broken{variant % 3}")
    return f"broken link {rel!r}" if _symlink(tree, rel, "does-not-exist.jpg") else None


def _fifo(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    companions = layout.companions(target)
    if variant % 2 and companions and (tree.root / companions[0]).is_file():
        rel = companions[0]
        (tree.root / rel).unlink()
    else:
        rel = _new_path(target, f"fifo{variant % 3}")
        if not _free(tree, rel):
            return None
    os.mkfifo(tree.root / rel)
    tree.fifos.append(tree.root / rel)
    return f"FIFO {rel!r}"


def _unreadable(tree: Tree, layout: Layout, target: str, variant: int) -> str | None:
    # Root reads a chmod 000 file all the same: in-process runs as root then see a readable
    # file, and the build test runs its process under `unshare --user` (UNPRIVILEGED), where
    # the mode holds.
    rel = ([target, *layout.companions(target)] * 2)[variant % 2]
    if not (tree.root / rel).is_file():
        return None
    os.chmod(tree.root / rel, 0)
    return f"{rel} made unreadable (chmod 000)"


_APPLY = {"copy_as": _copy_as, "second_ext": _second_ext, "corrupt_image": _corrupt_image,
          "corrupt_mask": _corrupt_mask, "annotation": _annotation, "junk": _junk,
          "link_inside": _link_inside, "link_outside_image": _link_outside_image,
          "link_outside_mask": _link_outside_mask, "dir_link": _dir_link,
          "link_loop": _link_loop, "broken_link": _broken_link, "fifo": _fifo,
          "unreadable": _unreadable}
assert set(_APPLY) == set(OPS)
