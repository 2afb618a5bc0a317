"""The embedded default job: a small sample of every source layout (plus the real MTD when it
is there) -> ingest -> merge -> labels -> MVTec export -> verify.

It is what README command 1 runs on a fresh machine, and doubles as a smoke test of the whole
chain on every reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate import fixtures
from curate.export.mvtec import export_mvtec
from curate.runner import Context, StageResult, run_stage
from curate.stages.ingest import Ingest, IngestParams
from curate.stages.labels import Labels, LabelsParams
from curate.stages.merge import Merge, MergeParams
from curate.verify import verify


@dataclass
class DemoResult:
    stages: list[StageResult]
    export: dict[str, Any]
    problems: list[str]
    sources: dict[str, str] = field(default_factory=dict)


def run_demo(ctx: Context, out: Path, *, mtd: Path | None, seed: int = 0) -> DemoResult:
    """Generate the samples under ``out/sources``, build them, export to ``out/export``."""
    written = fixtures.write_all(out / "sources", seed=seed)
    sources = {kind: path for kind, path in written.items()}
    if mtd is not None:
        sources["mtd"] = mtd  # the real data replaces the generated MTD sample
    stages = [run_stage(Ingest(path), [], IngestParams(kind=kind), ctx)
              for kind, path in sorted(sources.items())]
    merged = run_stage(Merge(), [s.manifest for s in stages], MergeParams(), ctx)
    labelled = run_stage(Labels(), [merged.manifest], LabelsParams(), ctx)
    stages += [merged, labelled]
    report = export_mvtec(labelled.manifest, out / "export", ctx, overwrite=True)
    problems = verify(labelled.manifest, ctx)
    return DemoResult(stages, report, problems, {k: str(v) for k, v in sources.items()})
