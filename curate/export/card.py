"""The dataset card: a Markdown summary with plots, written beside an MVTec-layout export.

    <out>/card.md              provenance, counts, defect statistics, curation, sources
    <out>/card/counts.png      normal / anomalous images per category and split (HSS-IAD Fig. 4a)
    <out>/card/defect_area.png share of the image covered by each defect mask (Fig. 4b)
    <out>/card/aspect_ratio.png long / short side of each defect region's minimum-area
                               rectangle (Fig. 4c)

Everything is computed from the manifest (kept samples only, as exported) and the masks in the
artifact store; the export's ``curate-export.json`` only says which manifest the files came
from. The title names the dataset by its sources (and the recipe, when a build wrote the card);
the sources a recipe did not find are listed on top, since every figure then covers less than
the recipe's dataset. The same manifest gives the same bytes: no timestamps, fixed sizes, sorted categories,
matplotlib's default style whatever the user's ``matplotlibrc`` says.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.style
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from curate import __version__
from curate.core.canonical import canonical_json
from curate.core.files import atomic_write_bytes, atomic_write_text
from curate.core.manifest import GOOD, KEPT, Manifest
from curate.core.measures import LABELS_MASK_FRACTION
from curate.engine.store import Store
from curate.export.index import read_report
from curate.export.mvtec import split_and_label
from curate.imaging.masks import region_aspect_ratios
from curate.sources import CATALOG

CARD_NAME = "card.md"
FIGURES_DIR = "card"
COUNTS_FIGURE = "counts.png"
AREA_FIGURE = "defect_area.png"
ASPECT_FIGURE = "aspect_ratio.png"
SPLITS = ("train", "test")
NORMAL, ANOMALOUS = "normal", "anomalous"
#: Table I of the HSS-IAD paper ("Proportion", abnormal pixels): one figure for its whole
#: dataset, all seven categories built from these five sources. The paper has no per-category
#: figure (Fig. 4b only plots the areas), so the card compares the whole-dataset ratio with it,
#: and only for a dataset built from the same sources.
PAPER_ANOMALOUS_PIXEL_RATIO = 0.030
PAPER_SOURCES = frozenset({"kolektorsdd", "kolektorsdd2", "mtd", "severstal", "casting"})

# --------------------------------------------------------------------------- statistics
@dataclass
class CategoryStats:
    """What the card says about one category (kept samples only)."""

    #: (split, NORMAL or ANOMALOUS) -> images.
    images: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Defect label -> images.
    defect_labels: Counter[str] = field(default_factory=Counter)
    #: Share of the image covered by the mask, one per defective sample that has the measure.
    area_fractions: list[float] = field(default_factory=list)
    #: Defective samples without a mask measure (the labels stage has not seen them).
    unmeasured: int = 0
    #: Defective samples without a mask in the store (nothing to take regions from).
    maskless: int = 0
    aspect_ratios: list[float] = field(default_factory=list)
    #: Defect pixels and all pixels of the anomalous test images that have the measure.
    test_defect_pixels: float = 0.0
    test_pixels: int = 0

    @property
    def defective(self) -> int:
        return sum(n for (_, kind), n in self.images.items() if kind == ANOMALOUS)


@dataclass
class DatasetStats:
    categories: dict[str, CategoryStats]
    #: (outcome "dropped"/"flagged", stage, code) -> samples, and one detail as an example.
    curation: Counter[tuple[str, str, str]]
    curation_examples: dict[tuple[str, str, str], str]


def dataset_stats(manifest: Manifest, store: Store,
                  ratios: Mapping[str, list[float]] | None = None) -> DatasetStats:
    """Counts, defect areas and region aspect ratios per category, and curation notes.

    ``ratios``: each mask's region aspect ratios by store key, where known (the facts a
    build's ``labels`` recorded, :class:`curate.engine.mask_facts.MaskRegions`); a mask not in
    it is read from ``store``. Categories whose samples were all dropped are listed too (with
    zero counts).
    """
    categories: dict[str, CategoryStats] = {}
    curation: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], str] = {}
    for row in manifest.rows():
        stats = categories.setdefault(row["category"], CategoryStats())
        for outcome, notes in (("dropped", row["reasons"]), ("flagged", row["flags"])):
            for key in {(outcome, n["stage"], n["code"]) for n in notes}:
                curation[key] += 1
            for n in notes:
                examples.setdefault((outcome, n["stage"], n["code"]), n["detail"])
        if row["status"] == KEPT:
            _add_kept_sample(stats, row, store, ratios or {})
    return DatasetStats(dict(sorted(categories.items())), curation, examples)


def _add_kept_sample(stats: CategoryStats, row: dict[str, Any], store: Store,
                     ratios: Mapping[str, list[float]]) -> None:
    split, label = split_and_label(row)
    if label == GOOD:
        stats.images[(split, NORMAL)] += 1
        return
    stats.images[(split, ANOMALOUS)] += 1
    stats.defect_labels[label] += 1
    fraction = row["measures"].get(LABELS_MASK_FRACTION)
    if fraction is None:
        stats.unmeasured += 1
    else:
        stats.area_fractions.append(fraction)
        if split == "test":
            pixels = row["width"] * row["height"]
            stats.test_defect_pixels += fraction * pixels
            stats.test_pixels += pixels
    if "mask" in row["artifacts"]:
        key = row["artifacts"]["mask"]
        known = ratios.get(key)
        stats.aspect_ratios.extend(known if known is not None else
                                   region_aspect_ratios(store.read_mask(key)))
    else:
        stats.maskless += 1


def anomalous_pixel_ratio(categories: Iterable[CategoryStats]) -> float | None:
    """Defect pixels / all pixels of the anomalous test images (None without any)."""
    categories = list(categories)
    pixels = sum(c.test_pixels for c in categories)
    return sum(c.test_defect_pixels for c in categories) / pixels if pixels else None


# --------------------------------------------------------------------------- export report
# --------------------------------------------------------------------------- plots
def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" entry: the bytes would otherwise change with the matplotlib version.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _width(n_categories: int) -> float:
    return max(6.4, 1.0 * n_categories + 2.0)


def _counts_figure(categories: dict[str, CategoryStats]) -> Figure:
    names = list(categories)
    bars = [("train", NORMAL, "#2b5d8a"), ("train", ANOMALOUS, "#b5402a"),
            ("test", NORMAL, "#8fb8de"), ("test", ANOMALOUS, "#f0a58f")]
    figure = Figure(figsize=(_width(len(names)), 4.8))
    ax = figure.subplots()
    x = np.arange(len(names))
    width = 0.8 / len(bars)
    for i, (split, kind, colour) in enumerate(bars):
        values = [categories[c].images[(split, kind)] for c in names]
        drawn = ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, color=colour,
                       label=f"{split} {kind}")
        ax.bar_label(drawn, labels=[str(v) if v else "" for v in values], fontsize=7,
                     padding=1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Normal and anomalous images per category")
    ax.legend(fontsize=8)
    ax.margins(y=0.1)
    figure.tight_layout()
    return figure


def _plain_log_scale(ax: Axes) -> None:
    """A log y axis labelled 0.5, 2, 10 rather than 5x10^-1, 2x10^0, 10^1."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    # Within two decades the powers of ten alone are too few ticks to read values off.
    if high / low < 100:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _box_figure(values: Mapping[str, Sequence[float]], *, title: str, ylabel: str) -> Figure:
    """One box per category (all points beyond the whiskers drawn), log-scaled y axis."""
    names = list(values)
    figure = Figure(figsize=(_width(len(names)), 4.8))
    ax = figure.subplots()
    ax.boxplot([values[c] for c in names], flierprops={"markersize": 3})
    ax.set_xticks(range(1, len(names) + 1),
                  [f"{c}\n(n={len(values[c])})" for c in names], rotation=30, ha="right")
    _plain_log_scale(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    return figure


def _figures(stats: DatasetStats) -> dict[str, Figure]:
    """File name -> figure, for the plots that have something to show."""
    figures = {}
    if stats.categories:
        figures[COUNTS_FIGURE] = _counts_figure(stats.categories)
    # Zero-area masks cannot sit on a log axis; the card counts them in its table.
    areas = {c: [100 * f for f in s.area_fractions if f > 0]
             for c, s in stats.categories.items()}
    areas = {c: v for c, v in areas.items() if v}
    if areas:
        figures[AREA_FIGURE] = _box_figure(
            areas, title="Share of the image covered by the defect mask",
            ylabel="defect area (% of image, log scale)")
    ratios = {c: s.aspect_ratios for c, s in stats.categories.items() if s.aspect_ratios}
    if ratios:
        figures[ASPECT_FIGURE] = _box_figure(
            ratios, title="Aspect ratio of each defect region's minimum-area rectangle",
            ylabel="long side / short side (log scale)")
    return figures


# --------------------------------------------------------------------------- Markdown
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.3g}%"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _provenance(manifest: Manifest, report: dict[str, Any], export_link: str,
                recipe: str | None) -> list[str]:
    header = manifest.header
    stage = header["stage"]
    export_where = "this folder" if export_link == "." else f"`{export_link}`"
    lines = ["## Provenance", ""]
    lines += _table(["", ""], [
        ["recipe", f"`{recipe}`" if recipe else "not known to this card"],
        ["manifest", f"`{manifest.id}`"],
        ["stage", f"{stage['name']} v{stage['version']}, parameters "
                  f"`{canonical_json(stage['params'])}`"],
        ["parents", ", ".join(f"`{p}`" for p in header["parents"]) or "none"],
        ["seed", "none" if header["seed"] is None else header["seed"]],
        ["curate", f"{__version__} (card), {report.get('curate_version', '?')} (export)"],
        ["export", f"{export_where}: manifest `{report['manifest']}`, "
                   f"{report.get('written', '?')} images written, "
                   f"{len(report.get('skipped', []))} skipped"],
    ])
    if report.get("manifest") != manifest.id:
        lines += [f"> **Warning:** the export was written from manifest `{report['manifest']}`, "
                  f"not from `{manifest.id}`, which this card describes: its files need not "
                  "match these numbers.", ""]
    return lines


def _counts_section(stats: DatasetStats, figures: Collection[str]) -> list[str]:
    lines = ["## Images per category", "",
             "Kept samples, filed as in the export (a sample without a split, and every "
             "anomalous sample, is a test sample).",
             ""]
    if not stats.categories:
        return lines + ["none", ""]
    columns = [(split, kind) for split in SPLITS for kind in (NORMAL, ANOMALOUS)]
    rows = []
    for name, c in stats.categories.items():
        labels = ", ".join(f"{label} {n}" for label, n in sorted(c.defect_labels.items()))
        rows.append([name, *(c.images[col] for col in columns), c.images.total(),
                     labels or "none"])
    totals = [sum(c.images[col] for c in stats.categories.values()) for col in columns]
    rows.append(["**all**", *totals, sum(totals), ""])
    lines += _table(["category", *(f"{s} {k}" for s, k in columns), "total", "defect labels"],
                    rows)
    if COUNTS_FIGURE in figures:
        lines += [f"![Images per category]({FIGURES_DIR}/{COUNTS_FIGURE})", ""]
    return lines


def _source_kinds(manifest: Manifest) -> set[str]:
    return {spec["kind"] for spec in manifest.header["sources"].values()}


def _titles(kinds: Iterable[str]) -> str:
    return ", ".join(CATALOG[k].title if k in CATALOG else k for k in sorted(kinds))


def missing_sources(wanted: Iterable[str], manifest: Manifest) -> dict[str, str]:
    """The source kinds of ``wanted`` (a recipe's) that ``manifest`` was not built from
    (kind -> why), for a card written after the build (the build itself knows why each was
    missing)."""
    kinds = _source_kinds(manifest)
    return {kind: f"not among the sources of manifest {manifest.id}"
            for kind in wanted if kind not in kinds}


def _paper_comparison(manifest: Manifest) -> str:
    """What the paper's anomalous-pixel ratio is, and whether this dataset's compares with it."""
    paper = (f"The HSS-IAD paper reports {100 * PAPER_ANOMALOUS_PIXEL_RATIO:.1f}% for its whole "
             f"dataset (Table I, all seven categories, from {_titles(PAPER_SOURCES)})")
    kinds = _source_kinds(manifest)
    if kinds == PAPER_SOURCES:
        return (f"{paper}: the same sources as this dataset, whose figure over all its "
                "categories is the one to compare. The paper gives no per-category figure "
                "(Fig. 4b only plots the areas).")
    return (f"{paper}. This dataset is built from {_titles(kinds) or 'no source'} only, so "
            "its figure is not comparable with the paper's, and the paper gives no per-category "
            "figure to compare with instead (Fig. 4b only plots the areas).")


def _area_section(stats: DatasetStats, figures: Collection[str],
                  manifest: Manifest) -> list[str]:
    lines = ["## Defect area", "",
             f"Share of the image covered by each kept defective sample's mask "
             f"(`{LABELS_MASK_FRACTION}`).", ""]
    rows = []
    for name, c in stats.categories.items():
        if not c.defective:
            continue
        f = c.area_fractions
        rows.append([name, c.defective, c.unmeasured, sum(1 for v in f if v == 0),
                     _percent(float(np.median(f))) if f else "-",
                     _percent(min(f)) if f else "-", _percent(max(f)) if f else "-",
                     _percent(anomalous_pixel_ratio([c]))])
    if not rows:
        return lines + ["none: no kept defective samples.", ""]
    lines += _table(["category", "defective", "unmeasured", "empty mask", "median", "min",
                     "max", "anomalous-pixel ratio (test)"], rows)
    ratio = anomalous_pixel_ratio(stats.categories.values())
    shown = "none (no measured anomalous test images)" if ratio is None else _percent(ratio)
    lines += [f"Anomalous-pixel ratio over all categories (defect pixels / all pixels of the "
              f"anomalous test images, from this manifest's masks): **{shown}**.", "",
              _paper_comparison(manifest), ""]
    if AREA_FIGURE in figures:
        lines += ["Empty masks are left off the plot's log scale.", "",
                  f"![Defect area per category]({FIGURES_DIR}/{AREA_FIGURE})", ""]
    else:
        lines += ["No plot: none of these samples has a non-empty mask.", ""]
    return lines


def _aspect_section(stats: DatasetStats, figures: Collection[str]) -> list[str]:
    lines = ["## Defect aspect ratios", "",
             "Long side / short side of the minimum-area rectangle around each connected "
             "(8-neighbour) defect region of each kept defective sample's mask.", ""]
    rows = []
    for name, c in stats.categories.items():
        if not c.defective:
            continue
        r = c.aspect_ratios
        rows.append([name, c.defective - c.maskless, c.maskless, len(r),
                     _number(float(np.median(r))) if r else "-",
                     _number(float(np.percentile(r, 90))) if r else "-",
                     _number(max(r)) if r else "-"])
    if not rows:
        return lines + ["none: no kept defective samples.", ""]
    lines += _table(["category", "masks", "without mask", "regions", "median", "90th percentile",
                     "max"], rows)
    if ASPECT_FIGURE in figures:
        lines += [f"![Defect aspect ratio per category]({FIGURES_DIR}/{ASPECT_FIGURE})", ""]
    else:
        lines += ["none: no defect regions in the masks.", ""]
    return lines


def _curation_section(stats: DatasetStats) -> list[str]:
    lines = ["## Curation", "",
             "Samples dropped or flagged, by the stage that did it and its reason code "
             "(a sample can carry several).", ""]
    if not stats.curation:
        return lines + ["none", ""]
    rows = [[outcome, stage, f"`{code}`", n, stats.curation_examples[(outcome, stage, code)]]
            for (outcome, stage, code), n in sorted(stats.curation.items())]
    return lines + _table(["outcome", "stage", "code", "samples", "example"], rows)


def _sources_section(manifest: Manifest) -> list[str]:
    lines = ["## Sources", ""]
    sources = manifest.header["sources"]
    if not sources:
        return lines + ["none", ""]
    rows = []
    for name, spec in sorted(sources.items()):
        info = CATALOG.get(spec["kind"])
        described = ([info.title, info.url, info.licence, info.citation] if info
                     else ["unknown kind"] + ["-"] * 3)
        rows.append([name, spec["kind"], *described])
    return lines + _table(["source", "kind", "title", "url", "licence", "citation"], rows)


def _heading(manifest: Manifest, recipe: str | None, missing: dict[str, str]) -> list[str]:
    """The title (the recipe and the sources the dataset is built from) and, on top, the
    sources the recipe wanted and did not get."""
    built_from = _titles(_source_kinds(manifest)) or "no source"
    title = (f"# Dataset card: {recipe}, built from {built_from}" if recipe
             else f"# Dataset card: {built_from}")
    lines = [title, ""]
    if missing:
        lines += [f"> **Incomplete:** {len(missing)} of the sources of recipe "
                  f"`{recipe or '?'}` were missing from this build, and every figure below "
                  "covers only what was found:", ">"]
        lines += [f"> - {_cell(_titles([kind]))} (`{kind}`): {_cell(why)}"
                  for kind, why in sorted(missing.items())]
        lines += [""]
    return lines


def card_markdown(manifest: Manifest, report: dict[str, Any], stats: DatasetStats,
                  figures: Collection[str], export_link: str, *, recipe: str | None = None,
                  missing: dict[str, str] | None = None) -> str:
    """The card's text; ``figures`` names the plots written beside it, ``recipe`` the recipe
    that built the manifest and ``missing`` its sources that were not found (kind -> why)."""
    lines = _heading(manifest, recipe, missing or {})
    lines += _provenance(manifest, report, export_link, recipe)
    lines += _counts_section(stats, figures)
    lines += _area_section(stats, figures, manifest)
    lines += _aspect_section(stats, figures)
    lines += _curation_section(stats)
    lines += _sources_section(manifest)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- writing
def write_card(manifest: Manifest, export_dir: str | os.PathLike, store: Store,
               out_dir: str | os.PathLike | None = None, *,
               report: dict[str, Any] | None = None, recipe: str | None = None,
               missing: dict[str, str] | None = None,
               ratios: Mapping[str, list[float]] | None = None) -> Path:
    """Write ``card.md`` and its plots under ``card/`` into ``out_dir`` (default: the export).
    ``report`` is the export's report where the caller holds it (the build that has just
    written it; otherwise it is read from ``export_dir``), ``recipe`` names the recipe that
    built ``manifest``, ``missing`` its sources that were not found (kind -> why; a build's
    ``BuildResult.missing``), ``ratios`` the masks' region aspect ratios where known (see
    :func:`dataset_stats`).

    Returns the path of ``card.md``. Raises CurateError if ``report`` is not given and
    ``export_dir`` holds no export report, or if a mask is missing from ``store``.
    """
    export_dir = Path(export_dir)
    if report is None:
        report = read_report(export_dir)
    out_dir = Path(out_dir) if out_dir is not None else export_dir
    stats = dataset_stats(manifest, store, ratios)
    # The default style: a user's matplotlibrc must not change the card's bytes.
    with matplotlib.style.context("default"):
        figures = _figures(stats)
        images = {name: _png(figure) for name, figure in figures.items()}
    figures_dir = out_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    for name in (COUNTS_FIGURE, AREA_FIGURE, ASPECT_FIGURE):
        if name in images:
            atomic_write_bytes(figures_dir / name, images[name])
        else:
            # A plot from an earlier card of other data must not survive beside this one.
            (figures_dir / name).unlink(missing_ok=True)
    export_link = Path(os.path.relpath(export_dir.absolute(), out_dir.absolute())).as_posix()
    card = out_dir / CARD_NAME
    atomic_write_text(card, card_markdown(manifest, report, stats, images, export_link,
                                          recipe=recipe, missing=missing))
    return card
