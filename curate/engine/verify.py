"""Verify a manifest against itself, the artifact store and the original files on disk.

- the manifest: schema, canonical order, counts, and that its content still hashes to its id
  (a manifest edited by hand fails here);
- the store: every artifact a row names exists and its content matches its key;
- the originals (optional, reads every file): every image and mask file still exists and has
  the sha256 recorded at ingest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.core.files import sha256_file
from curate.core.manifest import Manifest
from curate.engine.runner import Context, SampleEnv


@dataclass(frozen=True)
class VerifyParams:
    originals: bool = True


def verify_sample(row: dict[str, Any], env: SampleEnv) -> dict[str, Any]:
    problems = []
    for name, key in sorted(row["artifacts"].items()):
        problem = env.store.check(key)
        if problem:
            problems.append(f"{row['path']}: artifact {name}: {problem}")
    if env.params.originals:
        expected = [(row["path"], row["sha256"])]
        if "mask" in row["annotation"]:
            expected.append((row["annotation"]["mask"], row["annotation"].get("mask_sha256")))
        for rel, digest in expected:
            path = env.source_path(row, rel)
            if not path.is_file():
                problems.append(f"{path}: original file is missing")
            elif digest is not None and sha256_file(path) != digest:
                problems.append(f"{path}: original file changed since ingest (sha256 differs)")
    return {"problems": problems}


def verify(manifest: Manifest, ctx: Context, *, originals: bool = True) -> list[str]:
    """Every problem found, as sentences naming the file; empty when all is sound."""
    problems = list(manifest.check())
    env = ctx.env("verify", VerifyParams(originals=originals), manifest.roots)
    for result in ctx.map(verify_sample, list(manifest.rows()), env, "verify"):
        problems.extend(result.get("problems", []))
        problems.extend(detail for _, detail in result.get("drop", []))
    return problems
