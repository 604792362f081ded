"""One default per option: every option of `train`, `eval`, `calibrate`, `serve` and `fed` that
sets a config field shows that field's default (in the CLI's form: --no-chat for `chat`,
all-linear for `targets=None`), a command left at its defaults builds the library's default
config, and no command declares a field's option by hand beside its generated group."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from lorafleet.bayes import CalibrateConfig, LaplaceConfig
from lorafleet.cli import app
from lorafleet.cli.bayes_cmds import FIT_OPTIONS, TUNING_OPTIONS
from lorafleet.cli.bench_cmds import SOAK_OPTIONS
from lorafleet.cli.fed_cmds import KEEP_CLIENTS
from lorafleet.cli.options import FED_APP, FED_RUN, field_default
from lorafleet.cli.serve_cmds import ENGINE_OPTIONS, SERVER_OPTIONS
from lorafleet.cli.train_cmds import EVAL_OPTIONS, TRAIN_OPTIONS
from lorafleet.cli.transfer_cmds import PREPARE_OPTIONS, RUN_OPTIONS
from lorafleet.eval import EvalConfig
from lorafleet.fed import FedConfig
from lorafleet.serve.api import ServerConfig
from lorafleet.serve.api.server import EngineSettings
from lorafleet.train import TrainConfig

RUN = {"base": "b", "data": "d", "out": Path("o")}
# (command, its option group, the config's required fields)
GROUPS = [
    ("train", TRAIN_OPTIONS, RUN),
    ("eval", EVAL_OPTIONS, {}),
    ("calibrate", FIT_OPTIONS, {}),
    ("calibrate", TUNING_OPTIONS, {}),
    ("serve", ENGINE_OPTIONS, {}),
    ("serve", SERVER_OPTIONS, {"model_name": "m"}),
    ("fed simulate", FED_RUN, RUN),
    ("fed simulate", KEEP_CLIENTS, RUN),
    ("fed server", FED_RUN, RUN),
    ("fed app", FED_APP, RUN),
    ("bench soak", SOAK_OPTIONS, {}),
    ("transfer prepare", PREPARE_OPTIONS, {**RUN, "adapter": Path("a")}),
    (
        "transfer run",
        RUN_OPTIONS,
        {"kit": Path("k"), "target_base": "t", "synthetic": 4, "out": Path("o")},
    ),
]
IDS = [f"{path}:{group.config.__name__}:{group.specs[0].name}" for path, group, _ in GROUPS]
# Options that set a config field but whose CLI default is the command's own policy.
CLI_POLICY = {("serve", "model_name")}  # --model-name: default --base


def _command(path: str):
    command = typer.main.get_command(app)
    for name in path.split():
        command = command.commands[name]
    return command


def _defaults(path: str) -> dict:
    """{parameter: default} of the command as the user meets it (lists for repeatables)."""
    return {
        p.name: list(p.default or ()) if p.multiple else p.default for p in _command(path).params
    }


@pytest.mark.parametrize(("path", "group", "required"), GROUPS, ids=IDS)
def test_each_option_shows_its_fields_default(path, group, required):
    defaults = _defaults(path)
    for spec in group.specs:
        if spec.field in required:
            assert _command_param(path, spec.name).required, (path, spec.name)
            continue
        expected = field_default(group.config, spec.field)
        if spec.to_cli is not None:
            expected = spec.to_cli(expected)
        assert defaults[spec.name] == expected, (path, spec.name)


@pytest.mark.parametrize(("path", "group", "required"), GROUPS, ids=IDS)
def test_a_command_at_its_defaults_builds_the_default_config(path, group, required):
    defaults = _defaults(path)
    values = {s.name: defaults[s.name] for s in group.specs if s.field not in required}
    assert group.build(values, **required) == group.config(**required)


@pytest.mark.parametrize(("path", "group", "required"), GROUPS, ids=IDS)
def test_no_field_option_is_declared_by_hand(path, group, required):
    generated = {s.name for s in group.specs}
    fields = {f.name for f in dataclasses.fields(group.config)}
    by_hand = {
        p.name
        for p in _command(path).params
        if p.name in fields and p.name not in generated and (path, p.name) not in CLI_POLICY
    }
    # Another group of the same command may own the field (serve: max_rank is the engine's).
    owned_elsewhere = {
        s.name for other_path, other, _ in GROUPS if other_path == path for s in other.specs
    }
    assert not by_hand - owned_elsewhere, (path, by_hand)


def test_the_figures_users_see_are_the_configs():
    """The concrete defaults the issue named: rank 16 everywhere in `train`, and a few more."""
    from lorafleet.adapters import MethodConfig

    train, serve = _defaults("train"), _defaults("serve")
    assert train["rank"] == TrainConfig.rank == MethodConfig.rank
    assert train["alpha"] == TrainConfig.alpha == MethodConfig.alpha
    assert train["no_chat"] is (not TrainConfig.chat) and train["targets"] == "all-linear"
    assert _defaults("eval")["max_length"] == EvalConfig.max_length
    calibrate = _defaults("calibrate")
    assert calibrate["n_kfac"] == LaplaceConfig.n_kfac
    assert calibrate["prior"] == CalibrateConfig.prior
    assert serve["max_queue"] == ServerConfig.max_waiting
    assert serve["max_adapters"] == EngineSettings.max_adapters
    assert _defaults("fed simulate")["rank"] == FedConfig.rank


def _command_param(path: str, name: str):
    return next(p for p in _command(path).params if p.name == name)
