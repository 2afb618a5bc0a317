"""Masks looked at once: facts about a stored mask, kept by its store key.

A mask in the store is named by a hash of its pixels (:meth:`curate.engine.store.Store.put_mask`),
so its key is a content key, as an image's sha256 is: facts about it — its defect pixels, its
size, its regions, what is left of it at a detector's resolution — are pure functions of the
key and are kept in the workspace's fact store (:class:`curate.engine.facts.FactStore`) beside
the image facts, under ``mask.*`` extractor names. The stage that makes a mask holds its array
and records the facts right there (``labels``: :class:`MaskStats` always, plus the mask
extractors of ``ctx.prefetch``); a later reader asks :func:`look_masks`, which decodes from the
store only the masks whose facts are missing, once each, and adds
``ctx.counts["decoded_masks"]``. So ``label_filter`` and the export decide over facts and a
stored mask is decoded at most once, whatever reads it after.

Mask extractors are :class:`~curate.engine.facts.Extractor` s with ``kind = "mask"``: a build
may list them in ``ctx.prefetch`` beside image extractors (a stage's ``facts(params)``), and
each look computes only its own kind.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from curate.core.errors import CurateError
from curate.engine.facts import Extractor, FactStore, FactTable, Look
from curate.engine.store import Store
from curate.imaging.masks import count_components, pixels_at_train_size, region_aspect_ratios

if TYPE_CHECKING:
    from curate.engine.runner import Context, SampleEnv


class MaskLook:
    """One stored mask (bool H x W): given by a caller that holds it, else decoded from the
    store on first use, at most once (``decodes`` counts it)."""

    def __init__(self, key: str, store: Store, mask: np.ndarray | None = None):
        self.key = key
        self.store = store
        self.decodes = 0
        if mask is not None:
            self.__dict__["mask"] = mask  # what the cached property would hold

    @cached_property
    def mask(self) -> np.ndarray:
        self.decodes += 1
        mask = self.store.read_mask(self.key)
        if mask.ndim != 2:
            raise CurateError(f"artifact {self.key} is not a mask (shape {mask.shape})")
        return mask


@dataclass(frozen=True)
class MaskExtractor(Extractor):
    """A fact about one stored mask (see :class:`~curate.engine.facts.Extractor`: name,
    version, fields; the dataclass fields are the parameters)."""

    kind: ClassVar[str] = "mask"

    def compute(self, look: Look | MaskLook) -> dict[str, Any]:
        # An image look never computes a mask fact (it skips kind "mask"): if one is asked
        # to, say so rather than fail somewhere inside the extractor.
        if not isinstance(look, MaskLook):
            raise TypeError(f"{self.name} is a fact about a stored mask, not about an image")
        return self.measure(look)

    @abc.abstractmethod
    def measure(self, look: MaskLook) -> dict[str, Any]:
        """The fact's values for the mask in ``look`` (raise to fail its samples)."""


@dataclass(frozen=True)
class MaskStats(MaskExtractor):
    """Defect pixels, height and width, and 8-connected defect regions."""

    name = "mask.stats"
    version = "1"
    fields = (("pixels", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
              ("components", pa.int64()))

    def measure(self, look: MaskLook) -> dict[str, Any]:
        mask = look.mask
        return {"pixels": int(np.count_nonzero(mask)), "height": int(mask.shape[0]),
                "width": int(mask.shape[1]), "components": count_components(mask)}


@dataclass(frozen=True)
class MaskRegions(MaskExtractor):
    """Long side / short side of the minimum-area rectangle around each 8-connected region
    (:func:`curate.imaging.masks.region_aspect_ratios`): what the dataset card plots."""

    name = "mask.regions"
    version = "1"
    fields = (("aspect_ratios", pa.list_(pa.float64())),)

    def measure(self, look: MaskLook) -> dict[str, Any]:
        return {"aspect_ratios": region_aspect_ratios(look.mask)}


@dataclass(frozen=True)
class MaskAtSize(MaskExtractor):
    """Defect pixels left at a detector's training resolution ``size`` x ``size``
    (:func:`curate.imaging.masks.pixels_at_train_size`)."""

    size: int
    name = "mask.at_size"
    version = "1"
    fields = (("pixels", pa.int64()),)

    def measure(self, look: MaskLook) -> dict[str, Any]:
        return {"pixels": pixels_at_train_size(look.mask, self.size)}


def mask_facts(extractors: Iterable[Extractor]) -> list[MaskExtractor]:
    """The mask extractors among ``extractors`` (``ctx.prefetch`` mixes both kinds), once each,
    in order."""
    return [ex for ex in dict.fromkeys(extractors) if isinstance(ex, MaskExtractor)]


def compute_mask_facts(key: str, mask: np.ndarray, store: Store,
                       extractors: Iterable[MaskExtractor]) -> dict[str, dict[str, Any]]:
    """The facts (extractor key -> values) of a mask its maker holds: no decode."""
    look = MaskLook(key, store, mask)
    return {ex.key: ex.compute(look) for ex in extractors}


def add_mask_facts(ctx: Context, extractors: Iterable[MaskExtractor],
                   facts: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Keep facts computed elsewhere (mask key -> extractor key -> values) in the workspace,
    or in memory only for a dry run; masks that already have them are left alone."""
    store: FactStore = ctx.workspace.facts
    for ex in extractors:
        known = store.read(ex)
        new = {key: values[ex.key] for key, values in facts.items()
               if ex.key in values and key not in known}
        store.add(ex, new, persist=ctx.persist_facts)


# --------------------------------------------------------------------------- looking
@dataclass(frozen=True)
class MaskJob:
    extractors: tuple[MaskExtractor, ...]


def look_mask(job: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    """Decode one stored mask (``job["key"]``) and run the extractors on it."""
    look = MaskLook(job["key"], env.store)
    params: MaskJob = env.params
    return {"facts": {ex.key: ex.compute(look) for ex in params.extractors},
            "decoded": look.decodes}


@dataclass
class MaskLooked:
    """What :func:`look_masks` found: each extractor's facts (by mask key) and, for the masks
    that could not be looked at, the drop reasons as ``(code, why)`` (``why`` without a
    path: :meth:`drop` puts the sample's in front, as the runner does)."""

    facts: dict[str, FactTable]
    failed: dict[str, list[tuple[str, str]]]

    def __getitem__(self, extractor: MaskExtractor) -> FactTable:
        return self.facts[extractor.key]

    def drop(self, key: str, path: str) -> list[tuple[str, str]]:
        """The drop reasons of a sample at ``path`` whose mask ``key`` failed."""
        return [(code, f"{path}: {why}") for code, why in self.failed[key]]


def look_masks(ctx: Context, stage: str, keys: Iterable[str],
               extractors: Iterable[MaskExtractor], *, desc: str | None = None) -> MaskLooked:
    """The facts of ``extractors`` for the stored masks ``keys``: read from the fact store,
    and for masks lacking any, computed from one decode each on the executor (with the mask
    extractors of ``ctx.prefetch`` they lack too). Decodes are added to
    ``ctx.counts["decoded_masks"]``; a dry run (``ctx.persist_facts`` false) writes none."""
    store: FactStore = ctx.workspace.facts
    wanted = list(dict.fromkeys(extractors))
    extra = [ex for ex in mask_facts(ctx.prefetch) if ex not in wanted]
    known = {ex.key: store.read(ex) for ex in [*wanted, *extra]}
    todo = [key for key in dict.fromkeys(keys)
            if any(key not in known[ex.key] for ex in wanted)]
    failed: dict[str, list[tuple[str, str]]] = {}
    if todo:
        missing = [ex for ex in [*wanted, *extra]
                   if any(key not in known[ex.key] for key in todo)]
        # "path" is what the runner names in the reason of a mask that fails: its key.
        jobs = [{"key": key, "path": key} for key in todo]
        env = ctx.env(stage, MaskJob(tuple(missing)), {})
        results = ctx.map(look_mask, jobs, env, desc or f"{stage}: masks")
        new: dict[str, dict[str, dict[str, Any]]] = {ex.key: {} for ex in missing}
        for key, res in zip(todo, results, strict=True):
            if "facts" not in res:
                failed[key] = [(code, detail.removeprefix(f"{key}: "))
                               for code, detail in res["drop"]]
                continue
            ctx.counts["decoded_masks"] += res["decoded"]
            for ex_key, values in res["facts"].items():
                if key not in known[ex_key]:
                    new[ex_key][key] = values
        for ex in missing:
            store.add(ex, new[ex.key], persist=ctx.persist_facts)
            known[ex.key] = store.read(ex)
    if ctx.persist_facts:
        for ex in wanted:  # facts an earlier dry run found, kept now
            store.flush(ex)
    return MaskLooked({ex.key: known[ex.key] for ex in wanted}, failed)
