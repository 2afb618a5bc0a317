"""The review commands: push a manifest to FiftyOne, open the App, pull the decisions back."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from curate.engine.workspace import Workspace

from .options import json_option, open_context, run_options, workspace_option
from .output import emit_json, show_results, stdout


@click.group("review")
def review_group() -> None:
    """Review a manifest in the FiftyOne App and pull the decisions back.

    \b
    Tags reviewers use: drop, keep, mask-bad, relabel:<label>, move:train,
    move:test, category:<name>.
    """


@review_group.command("push")
@click.argument("manifest", required=False)
@click.option("--name", default=None, help="Dataset name  [default: curate-<ws>-<manifest>]")
@workspace_option
@json_option
def review_push(manifest: str | None, name: str | None, workspace: Path, as_json: bool) -> None:
    """Push a manifest (default: the latest) to a persistent FiftyOne dataset.

    Images stay where they are; masks and foregrounds come from the store. Pushing again adds
    only what is missing and keeps the reviewers' tags.

    \b
    Example:
      curate review push -w ws
    """
    from curate.export.fiftyone import push

    ws = Workspace.open(workspace, create=False)
    result = push(ws, ws.load(manifest), name)
    if as_json:
        emit_json(vars(result))
        return
    stdout.print(f"dataset {result.dataset}: manifest {result.manifest[:12]}, {result.added} "
                 f"samples added, {result.already_there} already there; saved views: "
                 f"{', '.join(result.views) or 'none'}")
    stdout.print(f"next: curate review open {result.dataset} -w {workspace}")


@review_group.command("open")
@click.argument("name")
@click.option("--port", type=click.IntRange(1, 65535), default=5151, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to serve on (loopback: only this machine can connect).")
@json_option
def review_open(name: str, port: int, address: str, as_json: bool) -> None:
    """Serve the FiftyOne App for a pushed dataset and print its URL (Ctrl-C to stop).

    \b
    Example:
      curate review open curate-3f2a9c01-81be07d2c4aa --port 5151
    """
    from curate.export.fiftyone import launch

    session = launch(name, port=port, address=address)
    url = f"http://{address}:{port}/datasets/{name}"
    if as_json:
        emit_json({"url": url, "dataset": name})
    else:
        stdout.print(f"FiftyOne App for {name}: {url}  (Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass


@review_group.command("pull")
@click.argument("name")
@workspace_option
@run_options
@json_option
def review_pull(name: str, workspace: Path, seed: int, jobs: int, as_json: bool) -> None:
    """Turn the reviewers' tags of a dataset into a new manifest (stage review).

    Unknown or contradictory tags stop the pull, naming them and the samples.

    \b
    Example:
      curate review pull curate-3f2a9c01-81be07d2c4aa -w ws
    """
    from curate.stages.review import pull

    with open_context(workspace, seed=seed, jobs=jobs, create=False) as ctx:
        result = pull(ctx, name)
    show_results([result], as_json)
