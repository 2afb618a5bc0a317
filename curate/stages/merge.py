"""merge: several manifests (typically one ingest per source) -> one manifest.

Rows are taken as they are; the sources, inventories and source folders of the inputs are
combined. Two inputs that use the same source name for different data cannot be merged (their
sample ids would collide): ingest one of them under another ``--name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.core.errors import CurateError
from curate.core.manifest import Manifest
from curate.engine.runner import Context, Stage


@dataclass(frozen=True)
class MergeParams:
    pass


class Merge(Stage[MergeParams]):
    name = "merge"
    version = "1"
    Params = MergeParams

    def run(self, inputs: list[Manifest], params: MergeParams, ctx: Context) -> Manifest:
        if len(inputs) < 2:
            raise CurateError("merge needs at least two manifests")
        if len({m.id for m in inputs}) != len(inputs):
            raise CurateError("merge was given the same manifest twice")
        sources: dict[str, Any] = {}
        inventory: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for m in inputs:
            for name, spec in m.header["sources"].items():
                if name in sources and (sources[name] != spec or
                                        inventory.get(name) != m.header["inventory"].get(name)):
                    raise CurateError(
                        f"manifests {inputs[0].id} and {m.id} both hold a source named {name!r} "
                        "with different content: ingest one of them under another --name")
                sources[name] = spec
                if name in m.header["inventory"]:
                    inventory[name] = m.header["inventory"][name]
            rows.extend(m.rows())
        ids = [r["sample_id"] for r in rows]
        if len(set(ids)) != len(ids):
            # The same sample reached through two inputs (e.g. two stages of one chain).
            raise CurateError("the manifests to merge share samples: merge manifests of "
                              "different sources, not two versions of one")
        return Manifest.build(
            rows, stage=self.name, stage_version=self.version, params={},
            # Sorted: the merged manifest does not depend on the order the inputs were named in.
            parents=sorted(m.id for m in inputs), sources=sources, inventory=inventory,
            roots=self.roots(inputs, params),
        )

    def cache_key(self, inputs: list[Manifest], params: MergeParams, ctx: Context
                  ) -> str | None:
        return super().cache_key(sorted(inputs, key=lambda m: m.id), params, ctx)
