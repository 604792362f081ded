"""The CLI's shared pieces: option groups (`with_options`, `options_from` a config dataclass),
fed_config, write_json, and the rule that command modules use only public names of each other
and of the library."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorafleet.cli.common import write_json
from lorafleet.cli.options import (
    FED_APP,
    FED_RUN,
    fed_config,
    from_field,
    no_chat_option,
    option,
    options_from,
    with_options,
)
from lorafleet.errors import LorafleetError

CLI_DIR = Path(__file__).parents[1] / "src" / "lorafleet" / "cli"


def _tiny_app():
    app = typer.Typer()
    group = (
        option("size", int, 3, "--size", "-s", help="A size."),
        option("name", str, "x", "--name"),
    )

    @app.command()
    @with_options(shape=group)
    def show(shape: dict, loud: bool = typer.Option(False, "--loud")):
        """Echo the group's values."""
        typer.echo(json.dumps({"shape": shape, "loud": loud}))

    @app.command()
    def other():
        """A second command, so `show` keeps its name."""

    return app


def test_with_options_hands_the_group_over_as_one_dict():
    result = CliRunner().invoke(_tiny_app(), ["show", "-s", "7", "--loud"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"shape": {"size": 7, "name": "x"}, "loud": True}


def test_with_options_lists_group_options_then_own_in_help():
    result = CliRunner().invoke(_tiny_app(), ["show", "--help"])
    assert result.exit_code == 0
    out = result.output
    assert out.index("--size") < out.index("--name") < out.index("--loud")
    assert "A size." in out and "Echo the group's values." in out


def test_fed_groups_match_fed_config_fields():
    cfg = fed_config(
        {p.name: p.default.default for p in FED_RUN if p.default.default is not ...}
        | {"base": "b", "data": "d", "out": Path("o"), "targets": "q_proj,v_proj"}
    )
    assert cfg.chat is True and cfg.targets == ["q_proj", "v_proj"] and cfg.rank == 8
    assert {p.name for p in FED_APP} < {p.name for p in FED_RUN}
    with pytest.raises(LorafleetError):
        fed_config(
            {
                "base": "b",
                "data": "d",
                "out": Path("o"),
                "targets": "all-linear",
                "aggregation": "median",
            }
        )


@dataclasses.dataclass
class _Shape:
    name: str
    size: int = 3
    tags: tuple[str, ...] = ("a",)
    chat: bool = True


def _shape_app(group):
    app = typer.Typer()

    @app.command()
    @with_options(shape=group)
    def show(*, first: int = typer.Option(0, "--first"), shape: dict, last: bool = False):
        """Echo the config the group builds."""
        typer.echo(json.dumps(dataclasses.asdict(group.build(shape))))

    @app.command()
    def other():
        """A second command, so `show` keeps its name."""

    return app


def test_options_from_reads_each_default_from_the_field():
    group = options_from(
        _Shape,
        from_field("name", "--name", "-n", help="The name."),
        from_field("size", min=1),
        no_chat_option(),
    )
    defaults = {p.name: p.default.default for p in group}
    assert defaults == {"name": ..., "size": 3, "no_chat": False}
    runner = CliRunner()
    result = runner.invoke(_shape_app(group), ["show", "-n", "x", "--no-chat"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"name": "x", "size": 3, "tags": ["a"], "chat": False}
    result = runner.invoke(_shape_app(group), ["show", "-n", "x", "--size", "0"])
    assert result.exit_code == 2  # typer's bound, from the spec
    help_text = runner.invoke(_shape_app(group), ["show", "--help"]).output
    assert help_text.index("--first") < help_text.index("--name") < help_text.index("--last")
    assert "The name." in help_text


def test_a_changed_field_default_changes_the_option():
    @dataclasses.dataclass
    class Bigger(_Shape):
        size: int = 7

    assert [p.default.default for p in options_from(Bigger, "size")] == [7]


def test_options_from_refuses_an_unknown_field():
    with pytest.raises(TypeError, match="no field 'colour'"):
        options_from(_Shape, "colour")


def test_build_keeps_defaults_of_fields_left_out_and_lets_more_win():
    group = options_from(_Shape, "name", "size")
    assert group.build({"name": "x"}) == _Shape("x")
    assert group.build({"name": "x", "size": 5}, size=9, chat=False) == _Shape("x", 9, chat=False)
    assert [p.name for p in group.without("size")] == ["name"]


def test_write_json_is_atomic_and_makes_parents(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]


@pytest.mark.parametrize("module", sorted(p.name for p in CLI_DIR.glob("*.py")))
def test_no_command_module_imports_private_names(module):
    tree = ast.parse((CLI_DIR / module).read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafleet")
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__future__"
    ]
    assert not private, f"{module} imports private names: {private}"
