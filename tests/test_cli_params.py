"""A stage's parameters are stated once, in its Params dataclass: the command line's options for
them are made from its fields (issue 18), and the lists of names it offers are the registries'."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from curate.app.cli import cli
from curate.app.cli.options import StageCommand, params_options
from curate.engine.runner import EXECUTORS
from curate.sources import READERS
from detectors import DETECTORS

#: Every command that runs a stage with a Params dataclass.
STAGE_COMMANDS = [("ingest",), ("labels",), ("dedup",), ("quality",), ("sdas", "sample"),
                  ("sdas", "blend"), ("filter-noise",)]


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _stage_command(path: tuple[str, ...]) -> tuple[StageCommand, click.Context, type]:
    command = _command(path)
    assert isinstance(command, StageCommand)
    ctx = click.Context(command, info_name=path[-1])
    return command, ctx, command.params_class(ctx)


def test_every_command_running_a_stage_makes_its_options_from_params():
    def walk(group: click.Group, path: tuple[str, ...]):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, (*path, name))
            elif isinstance(command, StageCommand):
                yield (*path, name)

    assert sorted(walk(cli, ())) == sorted(STAGE_COMMANDS)


@pytest.mark.parametrize("path", STAGE_COMMANDS, ids=" ".join)
def test_generated_options_are_the_params_fields(path, tmp_path):
    command, ctx, params_class = _stage_command(path)
    fields = [f for f in dataclasses.fields(params_class) if f.name not in command.by_hand]
    options = command.stage_options(ctx)
    assert [o.name for o in options] == [f.name for f in fields]
    hints = typing.get_type_hints(params_class)
    for option, f in zip(options, fields, strict=True):
        meta = f.metadata
        assert option.help == meta.get("help"), f.name
        if f.default is dataclasses.MISSING:
            assert option.required, f.name
            continue
        assert option.default == f.default, f.name
        if hints[f.name] is bool:  # one flag, turning the default over
            assert option.is_flag and option.flag_value is (not f.default), f.name
            continue
        if "choices" in meta and hints[f.name] is str:
            assert isinstance(option.type, click.Choice), f.name
            assert tuple(option.type.choices) == tuple(meta["choices"]), f.name
        if "min" in meta or "max" in meta:
            assert isinstance(option.type, click.IntRange | click.FloatRange), f.name
            assert (option.type.min, option.type.max) == (meta.get("min"), meta.get("max"))
    # The options parse to the Params' own defaults (required ones given).
    # (an existing folder serves every required option: a category name, --checkpoint)
    required = [a for o in command.get_params(ctx) if isinstance(o, click.Option) and o.required
                for a in (o.opts[0], str(tmp_path))]
    arguments = ["mtd", "folder"] if path == ("ingest",) else []  # KIND PATH
    parsed = command.make_context(path[-1], [*arguments, *required])
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert parsed.params[f.name] == f.default, f.name


@pytest.mark.parametrize("path", STAGE_COMMANDS, ids=" ".join)
def test_help_shows_the_params_defaults(path):
    command, ctx, params_class = _stage_command(path)
    text = " ".join(command.get_help(ctx).split())
    for f in dataclasses.fields(params_class):
        if f.name in command.by_hand or f.default in (dataclasses.MISSING, None, False, True):
            continue
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f"[default: {f.default}" in text, f.name


@dataclass(frozen=True)
class ToyParams:
    """A Params dataclass as a stage would write one."""
    name: str = field(metadata={"help": "Required: no default."})
    size: int = field(default=8, metadata={"min": 1, "max": 64, "help": "A size."})
    kind: str = field(default="a", metadata={"choices": ("a", "b")})
    ratio: float | None = None
    threshold: str | int = field(default="auto", metadata={"choices": ("auto",)})
    verbose: bool = False
    keep: bool = True
    fuzz: bool = field(default=True, metadata={"flag": "--exact"})
    count: int = field(default=1, metadata={"short": "-c"})


def test_a_field_added_to_params_becomes_an_option():
    options = {o.name: o for o in params_options(ToyParams)}
    assert list(options) == [f.name for f in dataclasses.fields(ToyParams)]
    assert options["name"].opts == ["--name"] and options["name"].required
    assert isinstance(options["size"].type, click.IntRange)
    assert options["size"].type.max == 64
    assert list(options["kind"].type.choices) == ["a", "b"]
    assert options["ratio"].type is click.FLOAT and options["ratio"].default is None
    assert options["verbose"].opts == ["--verbose"]
    assert options["keep"].opts == ["--no-keep"]
    assert options["fuzz"].opts == ["--exact"]
    assert options["count"].opts == ["--count", "-c"]

    seen = []
    command = StageCommand("toy", stage_params=f"{__name__}:ToyParams",
                           callback=lambda values: seen.append(values))
    result = CliRunner().invoke(command, ["--name", "n", "--size", "9", "--kind", "b",
                                          "--threshold", "7", "--verbose", "--no-keep",
                                          "--exact", "-c", "3"])
    assert result.exit_code == 0, result.output
    assert ToyParams(**seen[0]) == ToyParams(name="n", size=9, kind="b", threshold=7,
                                             verbose=True, keep=False, fuzz=False, count=3)
    assert CliRunner().invoke(command, ["--name", "n"]).exit_code == 0
    assert ToyParams(**seen[1]) == ToyParams(name="n")
    for bad in (["--size", "65"], ["--kind", "c"], ["--threshold", "high"], []):
        assert CliRunner().invoke(command, [*(["--name", "n"] if bad else []), *bad]
                                  ).exit_code == 2, bad


def test_a_field_the_command_line_cannot_express_must_be_left_to_the_command():
    @dataclass
    class Mapping:
        options: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match="'options'.*by_hand"):
        params_options(Mapping)
    assert params_options(Mapping, by_hand=("options",)) == []
    with pytest.raises(TypeError, match="no field"):
        params_options(Mapping, by_hand=("nosuch",))


@pytest.mark.parametrize("args", [
    ["manifest", "list"], ["manifest", "show"], ["manifest", "diff", "x"],
    ["manifest", "verify"], ["card", "--export", "x"], ["review", "push"],
    ["review", "open", "x"], ["export", "mvtec", "--out", "x"], ["sdas", "export", "--bank",
                                                                 "x", "--out", "x"],
], ids=" ".join)
def test_a_command_running_no_stage_refuses_a_seed(args, tmp_path):
    result = CliRunner().invoke(cli, [*args, "--seed", "1"])
    assert result.exit_code == 2, result.output
    assert "No such option '--seed'" in result.output


def test_name_lists_are_the_registries():
    assert list(_command(("ingest",)).params[0].type.choices) == list(READERS)
    bench = {p.name: p for p in _command(("bench",)).params}
    assert list(bench["detector"].type.choices) == list(DETECTORS)
    executor = {p.name: p for p in _command(("dedup",)).params}["executor"]
    assert tuple(executor.type.choices) == EXECUTORS


def test_sdas_sample_choices_are_the_samplers():
    sampler = pytest.importorskip("curate.stages.sdas.sampler")
    from curate.stages.sdas.stage import SdasSampleParams

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(SdasSampleParams)}
    assert choices["spacing"] == sampler.SPACINGS
    assert choices["sampler"] == sampler.METHODS
