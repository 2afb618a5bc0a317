"""dedup: exact and near duplicates, across every source of a manifest.

Decisions over per-image facts (:mod:`curate.engine.facts`): the look that decodes each image
once gives its perceptual hash (pHash by default; dHash or wHash selectable) — under flips or
all eight square symmetries with ``transforms`` —, its sharpness, an 8x8 thumbnail and the
digest of its pixels; facts already known (an earlier build over the same images) are not
computed again. ``decode="full"`` (default) hashes the full decode converted to grey as Pillow
converts it, so the hashes are imagehash's bit for bit; ``decode="reduced"`` lets libjpeg decode
JPEGs at 1/2 to 1/8 scale (keeping >= 32 px a side), a second, cheaper decode, at hashes a
median 2 bits from imagehash's on MTD (96% within 8), which cost under 1% recall on planted
duplicates. Then:

- **exact duplicates**: identical bytes (same sha256), or identical decoded pixels — compared
  (by pixel digest) only for pairs that could be: near duplicates of the same size whose 8x8
  thumbnails agree within 3 grey levels (another exposure of one object never does);
- **near duplicates**: hashes within ``radius`` bits, found by the exact sub-quadratic search
  of ``curate.imaging.hamming`` (for transforms: each image's turned hashes against the plain ones).

Duplicates are joined into clusters (connected components). By default only samples with the
same label can be duplicates of each other: in anomaly detection a small defect is exactly what
tells two otherwise identical images apart, so a defective image is never dropped in favour of
a good one. Identical images with different labels are kept and flagged
``duplicate_label_conflict`` for review instead.

Clusters are the connected components of the duplicate relation (``measures["dedup.cluster"]``
names each one, for review). Keep rule, within a cluster: the best sample is kept — largest
resolution (width x height), then sharpest (variance of the Laplacian relative to the image's
own variance, so a contrast-stretched copy does not count as sharper; ``dedup.sharpness``),
then first by (source, path) — and its *direct* duplicates are dropped, with reason
``exact_duplicate`` or ``near_duplicate`` naming the kept sample and the distance; then the best
sample left, and so on. So a sample is only ever dropped for one within ``radius`` of it:
chains (A near B near C, with A and C far apart) never drop C for A. This matters on textures,
where pHash neighbourhoods chain: at radius 10, one MTD component spans 295 images. (Note that
re-encoding a JPEG can *raise* measured sharpness, with new block artefacts, so the kept copy
of a re-encoded pair is not always the original; the rule is the documented one, not a guess
at provenance.)

With ``drop_near=False`` near duplicates are clustered and grouped but not dropped (only exact
duplicates are): for data whose near duplicates are wanted variation, such as MTD's series of
one tile under several exposures, which must only stay on one side of the split.

Groups: every sample also gets a ``group`` id, the connected component over a looser relation —
all near-duplicate edges up to ``group_radius`` whatever the labels, plus exact duplicates — so
that the split stage can keep the same object (another exposure of the same tile, say) on one
side of train/test. The group id is the sample id of the group's first member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.core.manifest import Manifest
from curate.core.measures import DEDUP_CLUSTER, DEDUP_HASH, DEDUP_SHARPNESS
from curate.engine.facts import LOOK_COLUMNS, Extractor, Look, PixelDigest, look
from curate.engine.runner import Context, Stage, kept_rows
from curate.imaging import phash
from curate.imaging.hamming import pairs_within, pairs_within_queries
from curate.imaging.io import BadImage, probe
from curate.imaging.stats import relative_sharpness, variance


@dataclass(frozen=True)
class DedupParams:
    method: str = field(default="phash", metadata={
        "choices": phash.METHODS, "help": "Perceptual hash."})
    radius: int = field(default=10, metadata={
        "min": 0, "max": 32,
        "help": "Largest Hamming distance (of 64 bits) between near duplicates."})
    transforms: str = field(default="none", metadata={
        "choices": phash.TRANSFORM_SETS,
        "help": "Also match flipped (flips) or flipped and rotated (dihedral) copies."})
    group_radius: int = field(default=12, metadata={
        "min": 0, "max": 32,
        "help": "Distance that puts images in one split group (when not given: at least "
                "--radius)."})
    #: Off: a small defect is exactly what tells two otherwise identical images apart (see
    #: the module doc).
    across_labels: bool = field(default=False, metadata={
        "help": "Let samples with different labels be duplicates of each other."})
    #: Off: for near duplicates that are wanted variation, e.g. MTD's exposure series, which
    #: are to stay together, not to go.
    drop_near: bool = field(default=True, metadata={
        "flag": "--keep-near",
        "help": "Only cluster and group near duplicates; drop exact duplicates alone."})
    decode: str = field(default="full", metadata={
        "choices": ("full", "reduced"),
        "help": "full: hash exactly what imagehash hashes; reduced: decode JPEGs at 1/2-1/8 "
                "scale (faster, hashes a few bits off imagehash's)."})

    def __post_init__(self):
        if self.method not in phash.METHODS:
            raise ValueError(f"method must be one of {', '.join(phash.METHODS)}")
        phash.transform_names(self.transforms)  # validates
        if not 0 <= self.radius <= 32:
            raise ValueError(f"radius must be in 0..32, got {self.radius}")
        if not self.radius <= self.group_radius <= 32:
            raise ValueError(f"group_radius must be in radius..32, got {self.group_radius}")
        if self.decode not in ("full", "reduced"):
            raise ValueError(f"decode must be 'full' or 'reduced', got {self.decode!r}")


#: decode="reduced": OpenCV's JPEG decoder can scale by 1/2, 1/4 or 1/8 while decoding (DCT
#: scaling), much cheaper than decoding every pixel; a hash needs only a 32x32 thumbnail.
_REDUCED = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
            4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
#: The reduced image keeps at least this many pixels on its shorter side: the 32x32 pHash
#: thumbnail is then made by shrinking, never by enlarging.
MIN_REDUCED_SIDE = 32


def reduction(width: int, height: int) -> int:
    """The largest decode scale-down (1, 2, 4, 8) keeping the shorter side >= 32 px."""
    factor = 1
    while factor < 8 and min(width, height) // (factor * 2) >= MIN_REDUCED_SIDE:
        factor *= 2
    return factor


def reduced_grey(data: bytes, width: int, height: int) -> np.ndarray:
    """OpenCV's JPEG decode at 1/2-1/8 scale (``decode="reduced"``), grey."""
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduction(width, height)])
    if grey is None:
        raise BadImage("OpenCV could not decode the image")
    return grey


def grey_for_hashing(row: dict[str, Any], data: bytes, mode: str) -> np.ndarray:
    """The grey image the hashes are taken from: the full decode converted as Pillow converts
    (exactly what imagehash hashes), or OpenCV's reduced JPEG decode."""
    if mode == "full":
        return Look(data, row, None).grey  # type: ignore[arg-type]  # no store needed
    return reduced_grey(data, row["width"], row["height"])


@dataclass(frozen=True)
class HashFacts(Extractor):
    """Hashes under every transform, sharpness and an 8x8 thumbnail of one image."""

    name = "dedup.hashes"
    version = "1"
    fields = (("hashes", pa.list_(pa.uint64())), ("sharpness", pa.float64()),
              ("thumb", pa.binary(64)))
    method: str = "phash"
    transforms: str = "none"
    decode: str = "full"

    def compute(self, look: Look) -> dict[str, Any]:
        if self.decode == "full":
            grey = look.grey
            sharp = look.sharpness / (variance(grey) + 1.0)  # relative_sharpness, shared
        else:
            look.count_decode()
            info = probe(look.data)
            grey = reduced_grey(look.data, info.width, info.height)
            sharp = relative_sharpness(grey)
        image = Image.fromarray(grey)
        thumb = phash.thumbnail(image)
        return {
            "hashes": phash.hashes(image, self.method, self.transforms, thumb=thumb),
            "sharpness": sharp,
            # 8x8 block means of the thumbnail: pixel-identical images have (near) identical
            # ones, so this picks the few pairs whose full pixels are worth comparing.
            "thumb": thumb.reshape(8, 4, 8, 4).mean(axis=(1, 3)).round().astype(np.uint8)
            .tobytes(),
        }


@dataclass
class Edges:
    """Undirected near-duplicate edges between samples (indices into the hashed samples)."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray  # smallest Hamming distance over the transforms


def near_edges(hashes: np.ndarray, radius: int) -> Edges:
    """Near-duplicate edges among rows of ``hashes`` (n x transforms, identity first)."""
    n, n_t = hashes.shape
    if n_t == 1:
        a, b, d = pairs_within(hashes[:, 0], radius)
    else:
        q, j, d = pairs_within_queries(hashes.reshape(-1), hashes[:, 0], radius)
        i = q // n_t
        keep = i != j
        i, j, d = i[keep], j[keep], d[keep]
        a, b = np.minimum(i, j), np.maximum(i, j)
        # Several transforms (and both directions) can link one pair: keep the closest.
        order = np.lexsort((d, b, a))
        a, b, d = a[order], b[order], d[order]
        first = np.ones(a.size, bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        a, b, d = a[first], b[first], d[first]
    return Edges(a, b, d)


def exact_edges(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining samples with equal keys (a star from each key's first sample)."""
    first: dict[str, int] = {}
    a, b = [], []
    for i, key in enumerate(keys):
        if key in first:
            a.append(first[key])
            b.append(i)
        else:
            first[key] = i
    return np.array(a, np.int64), np.array(b, np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes."""
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


#: The row columns dedup decides by.
COLUMNS = (*LOOK_COLUMNS, "width", "height", "channels", "label")


class Dedup(Stage[DedupParams]):
    name = "dedup"
    version = "1"
    Params = DedupParams

    def facts(self, params: DedupParams) -> list[Extractor]:
        hashing = HashFacts(params.method, params.transforms, params.decode)
        # With a full decode the pixel digest costs little more: take it for every image.
        return [hashing, PixelDigest()] if params.decode == "full" else [hashing]

    def run(self, inputs: list[Manifest], params: DedupParams, ctx: Context) -> Manifest:
        (manifest,) = inputs
        positions, rows = kept_rows(manifest, COLUMNS)
        hashing, *_ = wanted = self.facts(params)
        looked = look(ctx, self.name, rows, manifest.roots, wanted, desc="dedup: hashing")
        # Undecodable images are dropped with the reason the runner gave.
        changes: list[tuple[int, dict[str, Any]]] = [
            (positions[k], update) for k, update in sorted(looked.failed.items())]
        members = [k for k in range(len(rows)) if k not in looked.failed]
        shas = [rows[k]["sha256"] for k in members]
        facts = looked[hashing].take(shas)
        n_t = len(phash.transform_names(params.transforms))
        hashes = facts.column("hashes").combine_chunks().flatten().to_numpy(
            zero_copy_only=False).astype(np.uint64).reshape(len(members), n_t)
        sharp = facts.column("sharpness").to_numpy(zero_copy_only=False)
        thumbs = np.frombuffer(b"".join(facts.column("thumb").to_pylist()),
                               np.uint8).reshape(len(members), 8, 8)
        near = near_edges(hashes, params.group_radius)
        # Exact duplicates: identical bytes from the manifest; identical pixels, but only for
        # pairs that could be (see pixel_candidates), from the pixel digests.
        candidates = pixel_candidates(rows, members, thumbs, near)
        pixels: dict[int, str] = {}
        if candidates:
            digest = PixelDigest()
            seen = look(ctx, self.name, [rows[members[k]] for k in candidates], manifest.roots,
                        [digest], desc="dedup: pixel identity")
            pixels = {k: seen[digest].record(rows[members[k]]["sha256"])["digest"]
                      for j, k in enumerate(candidates) if j not in seen.failed}
        updates = resolve(rows, members, sharp, hashes, near, pixels, params)
        changes += [(positions[k], update) for k, update in updates.items()]
        return self.output_updates(manifest, changes, params, ctx)


def pixel_candidates(rows, members, thumbs: np.ndarray, near: Edges, max_distance: int = 4,
                     max_difference: int = 3) -> list[int]:
    """Samples that may have a pixel-identical twin of other bytes: in a pair at most
    ``max_distance`` bits apart, of the same size and channels, whose 8x8 thumbnails differ by
    at most ``max_difference`` grey levels anywhere (other exposures of one object differ by
    far more). Identical bytes need no check."""
    chosen: set[int] = set()
    close = near.distance <= max_distance
    for a, b in zip(near.a[close].tolist(), near.b[close].tolist(), strict=True):
        ra, rb = rows[members[a]], rows[members[b]]
        if ra["sha256"] == rb["sha256"]:
            continue
        if (ra["width"], ra["height"], ra["channels"]) != (rb["width"], rb["height"],
                                                             rb["channels"]):
            continue
        diff = np.abs(thumbs[a].astype(np.int16) - thumbs[b].astype(np.int16))
        if int(diff.max()) <= max_difference:
            chosen.update((a, b))
    return sorted(chosen)


def resolve(rows: list[dict[str, Any]], members: list[int], sharpness: np.ndarray,
            hashes: np.ndarray, near: Edges, pixels: dict[int, str], params: DedupParams
            ) -> dict[int, dict[str, Any]]:
    """Row index -> update (hash, sharpness, group, and drops or flags) for hashed samples
    (``members``: the rows that were hashed; ``sharpness`` and ``hashes`` are theirs).

    ``pixels``: full-pixel digests of the candidates for pixel identity (sample -> digest).
    """
    n = len(members)
    names = phash.transform_names(params.transforms)
    updates: dict[int, dict[str, Any]] = {
        i: {"measures": {DEDUP_HASH: phash.to_hex(int(hashes[k, 0])),
                         DEDUP_SHARPNESS: float(sharpness[k])}}
        for k, i in enumerate(members)}
    if n == 0:
        return updates
    # Exact duplicates: identical bytes, or identical pixels among the checked candidates.
    ba, bb = exact_edges([rows[i]["sha256"] for i in members])
    checked = sorted(pixels)
    pa_, pb_ = exact_edges([pixels[k] for k in checked])
    ea = np.concatenate([ba, np.array(checked, np.int64)[pa_]]).astype(np.int64)
    eb = np.concatenate([bb, np.array(checked, np.int64)[pb_]]).astype(np.int64)
    exact_of = components(n, ea, eb)
    labels = np.array([rows[i]["label"] or "" for i in members], dtype=object)

    # Groups: everything linked at group_radius or exactly, whatever the labels.
    group_of = components(n, np.concatenate([near.a, ea]), np.concatenate([near.b, eb]))
    # Duplicates proper: within radius (or exact), and of one label unless told otherwise.
    close = near.distance <= params.radius
    da, db = np.concatenate([near.a[close], ea]), np.concatenate([near.b[close], eb])
    same = params.across_labels | (labels[da] == labels[db])
    cluster_of = components(n, da[same], db[same])

    order_key = [(rows[i]["source"], rows[i]["path"]) for i in members]
    group_ids = {comp: rows[members[first]]["sample_id"]
                 for comp, first in _first_members(group_of, order_key).items()}
    for k, comp in enumerate(group_of.tolist()):
        updates[members[k]]["group"] = group_ids[comp]

    # Within a cluster, keep the best sample and drop its *direct* duplicates, then repeat with
    # the best sample left: chaining alone (A near B near C) never drops C in favour of A.
    neighbours = _adjacency(n, da[same], db[same])
    # Exact duplicates tie on sharpness (a PNG twin of a JPEG decodes by another path and can
    # measure a hair differently): path order decides between them.
    sharp: dict[int, float] = {}
    for k, comp in enumerate(exact_of.tolist()):
        sharp[comp] = max(sharp.get(comp, 0.0), float(sharpness[k]))
    for cluster in _clusters(cluster_of):
        cluster_id = rows[members[min(cluster, key=lambda k: order_key[k])]]["sample_id"]
        ranked = sorted(cluster, key=lambda k: (
            -(rows[members[k]]["width"] or 0) * (rows[members[k]]["height"] or 0),
            -sharp[int(exact_of[k])], order_key[k]))
        settled: set[int] = set()
        for keeper in ranked:
            updates[members[keeper]]["measures"][DEDUP_CLUSTER] = cluster_id
            if keeper in settled:
                continue
            settled.add(keeper)
            for k in neighbours[keeper]:
                if k not in settled and (params.drop_near or exact_of[k] == exact_of[keeper]):
                    settled.add(k)
                    updates[members[k]]["drop"] = [_duplicate_reason(
                        rows, members, exact_of, hashes, names, k, keeper, params)]

    # Identical images that carry different labels: a labelling problem for a person to see.
    for a, b in zip(ea.tolist(), eb.tolist(), strict=True):
        if labels[a] != labels[b]:
            for x, y in ((a, b), (b, a)):
                other = rows[members[y]]
                flag = ("duplicate_label_conflict",
                        f"identical to {other['source']}:{other['path']} (sample "
                        f"{other['sample_id']}), which is labelled {other['label']!r}, not "
                        f"{rows[members[x]]['label']!r}")
                updates[members[x]].setdefault("flags", []).append(flag)
    return updates


def cluster_summary(manifest: Manifest) -> dict[str, int]:
    """How many duplicate clusters and multi-sample groups a dedup output has, and how big."""
    clusters: dict[str, int] = {}
    groups: dict[str, int] = {}
    for row in manifest.rows():
        if DEDUP_CLUSTER in row["measures"]:
            clusters[row["measures"][DEDUP_CLUSTER]] = \
                clusters.get(row["measures"][DEDUP_CLUSTER], 0) + 1
        if row["group"] is not None:
            groups[row["group"]] = groups.get(row["group"], 0) + 1
    multi = [n for n in groups.values() if n > 1]
    return {"clusters": len(clusters), "largest_cluster": max(clusters.values(), default=0),
            "groups": len(multi), "largest_group": max(multi, default=0)}


def _first_members(component_of: np.ndarray, order_key: list) -> dict[int, int]:
    """Component -> its first member by (source, path)."""
    first: dict[int, int] = {}
    for k, comp in enumerate(component_of.tolist()):
        if comp not in first or order_key[k] < order_key[first[comp]]:
            first[comp] = k
    return first


def _adjacency(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        neighbours[x].append(y)
        neighbours[y].append(x)
    return neighbours


def _clusters(component_of: np.ndarray) -> list[list[int]]:
    by_comp: dict[int, list[int]] = {}
    for k, comp in enumerate(component_of.tolist()):
        by_comp.setdefault(comp, []).append(k)
    return [c for c in by_comp.values() if len(c) > 1]


def _duplicate_reason(rows, members, exact_of, hashes, names, k, keeper,
                      params: DedupParams) -> tuple[str, str]:
    kept_row, row = rows[members[keeper]], rows[members[k]]
    kept = f"{kept_row['source']}:{kept_row['path']} (sample {kept_row['sample_id']})"
    if row["sha256"] == kept_row["sha256"]:
        return "exact_duplicate", f"identical bytes to {kept}, which is kept"
    if exact_of[k] == exact_of[keeper]:
        return "exact_duplicate", f"identical decoded pixels to {kept}, which is kept"
    # The closest reading of the pair: either one turned, against the other plain.
    dist = np.minimum(np.bitwise_count(hashes[k] ^ hashes[keeper, 0]),
                      np.bitwise_count(hashes[keeper] ^ hashes[k, 0]))
    t = int(np.argmin(dist))
    how = f" under {names[t]}" if t else ""
    return "near_duplicate", (f"near duplicate of {kept}, which is kept: {params.method} "
                              f"distance {int(dist[t])}{how}")
