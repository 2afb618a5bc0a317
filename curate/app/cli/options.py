"""Options the commands share, the Context a command runs in, and stage options made from Params.

Shared options, each applied only where the command uses it: :func:`workspace_option`,
:func:`seed_option`, :func:`parallel_options` (--jobs, --executor, --ray-address, --ray-data),
:func:`run_options` (the seed and the parallel options: every command that runs a stage) and
:data:`json_option`.

A stage's parameters are stated once, in its ``Params`` dataclass; :class:`StageCommand` makes
one option per field (:func:`params_options`), by these rules:

- name: the field's, dashed (``group_radius`` -> ``--group-radius``); ``metadata["short"]`` adds
  a short name (``-n``);
- default: the field's; a field without a default is a required option;
- help: ``metadata["help"]``;
- type: the field's. ``int`` / ``float`` take a range from ``metadata`` ``min`` / ``max`` (and
  ``min_open`` / ``max_open``); ``str`` takes ``metadata["choices"]`` when it has them;
  ``X | None`` is an option of type X whose default is None; ``str | int`` (labels'
  ``threshold``: 'auto' or a number) takes one of its ``choices`` or an integer;
- ``bool``: one flag that sets the field to the opposite of its default. It is named after the
  field when the default is False (``--across-labels``), ``--no-<field>`` when it is True
  (``--no-drop``), unless ``metadata["flag"]`` names it (dedup's ``drop_near`` is
  ``--keep-near``: "no drop near" would say the same less clearly).

A field the command line does not offer (a tuning knob), or one the command fills itself (a
path checked to exist, a pair of bounds given as one option, a default that depends on the
machine), is listed in the command's ``by_hand`` with the reason beside it.

Stage modules import heavy libraries (numba, torch), so the options are made when the command
is parsed or its help shown, not when the command line is imported: ``curate --help`` stays
fast, and a stage whose extra is missing says so in one sentence.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import types
import typing
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource

from curate.core.optional import require
from curate.engine.runner import EXECUTORS, Context, default_jobs
from curate.engine.workspace import Workspace

from .output import stderr

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


# ------------------------------------------------------------------------------ shared options
workspace_option: Decorator = click.option(
    "--workspace", "-w", type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("CURATE_WORKSPACE", "curate-workspace"),
    show_default="$CURATE_WORKSPACE or ./curate-workspace",
    help="Folder holding manifests, artifact store and cache.")

json_option: Decorator = click.option("--json", "as_json", is_flag=True,
                                      help="Print machine-readable JSON.")


def seed_option(help: str = "Seed for every random choice (same seed, same manifests).",
                ) -> Decorator:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


jobs_option: Decorator = click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=default_jobs,
    show_default="number of CPUs, at most 8", help="Worker processes.")


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep an executor option on the click context, where :func:`open_context` reads it (the
    commands themselves never look at it)."""
    ctx.meta[f"curate.{param.name}"] = value
    return value


def parallel_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--jobs and where per-sample work runs: --executor, --ray-address, --ray-data."""
    for option in reversed([
        jobs_option,
        click.option("--executor", type=click.Choice(EXECUTORS), default=None,
                     show_default="process with --jobs > 1, else local", expose_value=False,
                     callback=_remember,
                     help="Where per-sample work runs: inline, a process pool, or Ray tasks."),
        click.option("--ray-address", default=None, metavar="ADDRESS", expose_value=False,
                     callback=_remember,
                     help="Ray cluster to join with --executor ray (e.g. 'auto' or "
                          "'ray://head:10001'); default: a local Ray runtime."),
        click.option("--ray-data", is_flag=True, expose_value=False, callback=_remember,
                     help="With --executor ray: workers read each saved input manifest "
                          "through Ray Data (read_parquet -> map_batches) instead of "
                          "receiving its rows as tasks."),
    ]):
        fn = option(fn)
    return fn


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--seed and the parallel options: what every command that runs a stage takes."""
    return seed_option()(parallel_options(fn))


dry_run_option: Decorator = click.option(
    "--dry-run", is_flag=True, help="Report what would be dropped; write nothing.")


# ------------------------------------------------------------------------------ values
def given(option: str) -> bool:
    """Whether the user gave ``option`` (on the command line or in its environment variable)
    rather than leaving it at its default."""
    source = click.get_current_context().get_parameter_source(option)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def parse_key_values(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict, each value read as YAML (``-o release=boxes``)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        values[key] = yaml.safe_load(value) if value else ""
    return values


# ------------------------------------------------------------------------------ context
def open_context(workspace: Path, *, seed: int = 0, jobs: int = 1, create: bool = True,
                 write: bool = True) -> Context:
    """The Context a command runs in. A command that writes the workspace holds its lock
    until the context closes: from before it reads HEAD until after it moved it, so that a
    second writer waits instead of losing a result (see curate.core.lock). Readers
    (``write=False``) never take it nor wait for it."""
    click_ctx = click.get_current_context(silent=True)
    meta = click_ctx.meta if click_ctx is not None else {}
    ctx = Context(Workspace.open(workspace, create=create), jobs=jobs, seed=seed,
                  console=stderr, executor=meta.get("curate.executor"),
                  ray_address=meta.get("curate.ray_address"),
                  ray_data=meta.get("curate.ray_data", False))
    if write:
        try:
            ctx.lock_workspace(shlex.join(["curate", *sys.argv[1:]]))
        except BaseException:
            ctx.close()
            raise
    return ctx


def workspace_of(ctx: Context) -> Workspace:
    """The workspace of a context :func:`open_context` made (a Context may have none)."""
    if ctx.workspace is None:
        raise TypeError("a context without a workspace")
    return ctx.workspace


# ------------------------------------------------------------------------------ Params -> options
class WordOrInt(click.ParamType):
    """An integer, or one of a few words (labels' --threshold: 'auto' or a grey level)."""

    def __init__(self, words: Collection[str]):
        self.words = tuple(words)
        self.name = "|".join([*self.words, "integer"])

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value in self.words:
            return value
        try:
            return int(value)
        except ValueError:
            words = " or ".join(repr(w) for w in self.words)
            self.fail(f"expected {words} or an integer, got {value!r}", param, ctx)


def _click_type(name: str, hint: Any, meta: typing.Mapping[str, Any]) -> click.ParamType:
    """The click type of a field typed ``hint`` (``X | None`` already unwrapped)."""
    bounds = {k: meta[k] for k in ("min", "max", "min_open", "max_open") if k in meta}
    if hint is int:
        return click.IntRange(**bounds) if bounds else click.INT
    if hint is float:
        return click.FloatRange(**bounds) if bounds else click.FLOAT
    if hint is str:
        return click.Choice(meta["choices"]) if "choices" in meta else click.STRING
    if set(typing.get_args(hint)) == {str, int} and "choices" in meta:
        return WordOrInt(meta["choices"])
    raise TypeError(f"Params field {name!r} of type {hint} has no command-line form: give it "
                    "one in curate.app.cli.options or list it in the command's by_hand")


def field_option(field: dataclasses.Field, hint: Any) -> click.Option:
    """The option for one Params field (the rules are in the module's docstring)."""
    meta = field.metadata
    if field.default is not dataclasses.MISSING:
        default_or_required: dict[str, Any] = {"default": field.default}
    elif field.default_factory is not dataclasses.MISSING:
        default_or_required = {"default": field.default_factory()}
    else:  # (no default at all, not even None: click would count None as given)
        default_or_required = {"required": True}
    dashed = field.name.replace("_", "-")
    help_ = meta.get("help")
    if hint is bool:
        on = bool(default_or_required.get("default"))
        flag = meta.get("flag", f"--no-{dashed}" if on else f"--{dashed}")
        return click.Option([flag, field.name], is_flag=True, flag_value=not on, default=on,
                            help=help_)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    decls = [f"--{dashed}", *([meta["short"]] if "short" in meta else []), field.name]
    return click.Option(decls, type=_click_type(field.name, hint, meta), **default_or_required,
                        show_default=default_or_required.get("default") is not None, help=help_)


def params_options(params_class: type, by_hand: Collection[str] = ()) -> list[click.Option]:
    """One option per field of ``params_class``, in field order, but those in ``by_hand``."""
    hints = typing.get_type_hints(params_class)
    unknown = set(by_hand) - {f.name for f in dataclasses.fields(params_class)}
    if unknown:
        raise TypeError(f"{params_class.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return [field_option(f, hints[f.name]) for f in dataclasses.fields(params_class)
            if f.name not in by_hand]


class StageCommand(click.Command):
    """A command running a stage, whose options for the stage's parameters are made from its
    Params dataclass (``stage_params="module:Class"``), read only when the command is parsed or its
    help shown. The callback receives them as one dict, ``values`` (field name -> value),
    beside its own hand-written arguments and options."""

    def __init__(self, *args: Any, stage_params: str, by_hand: Collection[str] = (),
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage_params = stage_params
        self.by_hand = tuple(by_hand)
        self._stage_options: list[click.Option] | None = None

    def params_class(self, ctx: click.Context) -> type:
        module, name = self.stage_params.split(":")
        # A stage needing an extra (PyTorch) says so, naming the command, not the module.
        return getattr(require(module, _command_line(ctx)), name)

    def stage_options(self, ctx: click.Context) -> list[click.Option]:
        if self._stage_options is None:
            options = params_options(self.params_class(ctx), self.by_hand)
            clash = {o.name for o in options} & {p.name for p in self.params}
            if clash:
                raise TypeError(f"{self.name}: Params field(s) {', '.join(sorted(clash))} "
                                "clash with the command's own parameters")
            self._stage_options = options
        return self._stage_options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [*self.stage_options(ctx), *super().get_params(ctx)]

    def invoke(self, ctx: click.Context) -> Any:
        ctx.params["values"] = {o.name: ctx.params.pop(o.name)
                                for o in self.stage_options(ctx) if o.name is not None}
        return super().invoke(ctx)


def _command_line(ctx: click.Context) -> str:
    """``curate`` and the command's names (``curate sdas sample``), whatever the program's name."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["curate", *reversed(names)])



def copy_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How an export places files of the workspace's store (images a build stored as PNG,
    masks, foregrounds): hard links by default (see curate.export.mvtec)."""
    return click.option("--copy", is_flag=True,
                        help="Write independent copies of the workspace's stored files instead "
                             "of hard links to them (links take no space; the store's files "
                             "are read-only).")(fn)
