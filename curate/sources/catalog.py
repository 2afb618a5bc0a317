"""What is known about a public source: where it is distributed, its licence, how to cite it,
and the folder names it unpacks to (which `curate build` uses to find it). Each reader declares
its own (``Reader.info``); ``curate.sources.CATALOG`` collects them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceInfo:
    kind: str
    title: str
    url: str
    licence: str
    citation: str
    #: Folder names as distributed, and common aliases (compared case-insensitively).
    folder_names: tuple[str, ...]
