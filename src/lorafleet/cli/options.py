"""Options shared by several commands, each declared once here; `options_from`, which makes a
command's options from a config dataclass (each default read from its field, so it lives in one
place); and `with_options`, which adds a group of options to a command and hands the command
their values as one dict."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from lorafleet.adapters import parse_targets
from lorafleet.fed.config import AGGREGATIONS, FED_METHODS, FedConfig
from lorafleet.models.device import DEVICE_HELP, DeviceConfig

BASE_HELP = (
    "Base model: default, gemma-270m, qwen2.5-coder-0.5b, a tiny-* test model (tiny, "
    "tiny-qwen3, ...), a model directory, a .gguf file or a hub id."
)
BaseOpt = typer.Option(..., "--base", "-b", help=BASE_HELP)
BaseDefaultOpt = typer.Option("default", "--base", "-b", help=BASE_HELP)  # benchmarks, demo
AdapterOpt = typer.Option(None, "--adapter", "-a", help="A PEFT adapter directory to attach.")
ForceOpt = typer.Option(False, "--force", help="Load an adapter trained on another base anyway.")
HubAdaptersOpt = typer.Option(
    False,
    "--hub-adapters",
    help="The adapter may be a Hugging Face hub id org/name[@revision]: fetched once (config + "
    "safetensors only) into the hub cache; a local directory of that name wins.",
)
MaxRankOpt = typer.Option(256, "--max-rank", min=1, help="Refuse adapters above this rank.")
FedDirOpt = typer.Option(
    None, "--fed", help="A `lorafleet fed` run dir: base + its residual + its global adapter."
)
NO_CHAT_HELP = "Plain prompts, no chat template."
NoChatOpt = typer.Option(False, "--no-chat", help=NO_CHAT_HELP)
SeedOpt = typer.Option(0, "--seed")
MoleDirOpt = typer.Option(
    None, "--mole", help="A MoLE directory (`lorafleet mole train`): its experts + gates."
)
MaskOpt = typer.Option(
    [], "--mask", help="Drop this MoLE expert, renormalise the rest; repeatable."
)
PortOpt = typer.Option(8000, "--port", min=1, max=65535)
DtypeOpt = typer.Option(
    "float32", "--dtype", help="float32 | bfloat16: base weights, adapters and KV cache."
)


def option(name: str, annotation, default, *flags: str, **kw) -> inspect.Parameter:
    """One option of a shared group: the command parameter `name`, set by `flags`."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *flags, **kw),
    )


@dataclass(frozen=True)
class FieldOption:
    """How one field of a config dataclass is set on the command line: by the command
    parameter `name` through `flags`, typed `annotation` (None: the field's own type). Its
    default is `to_cli(the field's default)`; a value goes back to the field as
    `to_config(value)` (both the identity when None)."""

    field: str
    flags: tuple[str, ...]
    name: str
    annotation: Any = None
    to_cli: Callable[[Any], Any] | None = None
    to_config: Callable[[Any], Any] | None = None
    typer_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def from_field(
    field: str,
    *flags: str,
    name: str | None = None,
    annotation: Any = None,
    to_cli: Callable[[Any], Any] | None = None,
    to_config: Callable[[Any], Any] | None = None,
    **typer_kw: Any,
) -> FieldOption:
    """The option that sets config field `field`: `flags` (default `--field-name`), `typer_kw`
    for typer.Option (help, min, max); never a default, which is the field's."""
    flags = flags or ("--" + field.replace("_", "-"),)
    return FieldOption(field, flags, name or field, annotation, to_cli, to_config, typer_kw)


BaseField = from_field("base", "--base", "-b", help=BASE_HELP)  # a config's `base`


def field_default(config: type, field: str) -> Any:
    """The default of the dataclass `config`'s field `field` (`...` if it has none)."""
    found = {f.name: f for f in dataclasses.fields(config)}[field]
    if found.default is not dataclasses.MISSING:
        return found.default
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return ...


def cli_default(config: type, spec: FieldOption) -> Any:
    """The CLI's default of `spec`: its field's default in the CLI's form (`...`: required)."""
    default = field_default(config, spec.field)
    if default is ... or spec.to_cli is None:
        return default
    return spec.to_cli(default)


@dataclass(frozen=True)
class ConfigOptions:
    """The options of a command made from the config dataclass `config`, one per spec; a group
    for `with_options` (iterating gives the command parameters)."""

    config: type
    specs: tuple[FieldOption, ...]
    params: tuple[inspect.Parameter, ...]

    def __iter__(self) -> Iterator[inspect.Parameter]:
        return iter(self.params)

    def build(self, values: Mapping[str, Any], **more: Any):
        """`config` from this group's `values` {parameter name: value} (a field left out keeps
        its default) and `more`, fields the command sets itself (they win)."""
        fields = {
            spec.field: spec.to_config(values[spec.name]) if spec.to_config else values[spec.name]
            for spec in self.specs
            if spec.name in values
        }
        return self.config(**{**fields, **more})

    def without(self, *names: str) -> ConfigOptions:
        """The group less the options whose parameters are `names`."""
        return options_from(self.config, *(s for s in self.specs if s.name not in names))


def options_from(config: type, *specs: FieldOption | str) -> ConfigOptions:
    """The options that set fields of the dataclass `config`: a spec from `from_field`, or a
    field name for the plain `--field-name` option. Each default is read from the field."""
    specs = tuple(from_field(s) if isinstance(s, str) else s for s in specs)
    hints = typing.get_type_hints(config)
    unknown = [s.field for s in specs if s.field not in hints]
    if unknown:
        raise TypeError(f"{config.__name__} has no field {unknown[0]!r}")
    params = tuple(
        option(
            s.name,
            hints[s.field] if s.annotation is None else s.annotation,
            cli_default(config, s),
            *s.flags,
            **s.typer_kw,
        )
        for s in specs
    )
    return ConfigOptions(config, specs, params)


def no_chat_option(**typer_kw: Any) -> FieldOption:
    """`--no-chat`, which sets a config's `chat` field to its opposite."""
    return from_field(
        "chat",
        "--no-chat",
        name="no_chat",
        annotation=bool,
        to_cli=operator.not_,
        to_config=operator.not_,
        **typer_kw,
    )


def targets_option(help: str) -> FieldOption:
    """`--targets` as text (all-linear, or a comma list) for a config's `targets` list."""
    return from_field(
        "targets",
        annotation=str,
        to_cli=lambda targets: ",".join(targets) if targets else "all-linear",
        to_config=parse_targets,
        help=help,
    )


def repeated_option(field: str, flag: str, *flags: str, name: str, **typer_kw: Any) -> FieldOption:
    """A repeatable option (`flag` once per value) for a config's tuple-or-None field."""
    return from_field(
        field,
        flag,
        *flags,
        name=name,
        annotation=list[str],
        to_cli=lambda values: list(values or ()),
        to_config=lambda values: tuple(values) or None,
        **typer_kw,
    )


def with_options(**groups: tuple[inspect.Parameter, ...] | ConfigOptions) -> Callable:
    """Decorator: the command also takes every option of each group (listed in --help where
    the group's parameter stands), and receives each group's values as one dict, the argument
    named after the group (a ConfigOptions group's `build` turns it into the config).

        @with_options(run=FED_RUN)
        def simulate(run: dict, keep: bool = typer.Option(...)): cfg = FED_RUN.build(run)
    """

    def wrap(command: Callable) -> Callable:
        signature = inspect.signature(command)
        missing = sorted(set(groups) - set(signature.parameters))
        if missing:
            raise TypeError(f"{command.__name__} has no parameter {missing[0]!r} for its group")
        params: list[inspect.Parameter] = []
        for name, param in signature.parameters.items():
            if name in groups:
                params += list(groups[name])
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        shared = {p.name: p.annotation for group in groups.values() for p in group}

        @functools.wraps(command)
        def run(**values):
            for group_name, group in groups.items():
                values[group_name] = {p.name: values.pop(p.name) for p in group}
            return command(**values)

        run.__signature__ = inspect.Signature(params)
        hints = {k: v for k, v in command.__annotations__.items() if k not in groups}
        run.__annotations__ = {**hints, **shared}
        return run

    return wrap


# `--device` of the commands that load a model and keep it in no config of their own (eval,
# generate); serve's and train's is a field of EngineSettings / TrainConfig, same help.
DEVICE_OPTIONS = options_from(DeviceConfig, from_field("device", help=DEVICE_HELP))

# `lorafleet fed simulate | server | app`: what a federated run is (FedConfig's fields).
FED_RUN = options_from(
    FedConfig,
    BaseField,
    from_field(
        "data",
        "--data",
        "-d",
        help="A built-in task (sst2, ...) or a data file, split among clients.",
    ),
    from_field(
        "out",
        "--out",
        "-o",
        help="Run dir: global/adapter/, global/residual.safetensors, metrics.json, state/.",
    ),
    from_field("clients", "--clients", "-n", help="Number of clients (data partitions)."),
    from_field("rounds", "--rounds", "-R"),
    from_field("local_steps", "--local-steps", "-S", help="Optimizer steps per client and round."),
    from_field("aggregation", help=" | ".join(AGGREGATIONS)),
    from_field("split", help="iid | dirichlet:ALPHA (non-IID; small = skewed)."),
    from_field("split_by", help="Dirichlet over `label` or a data field."),
    from_field("val", help="Held-out data (default: a built-in task's validation)."),
    from_field("method", help=" | ".join(FED_METHODS)),
    from_field("rank", "--rank", "-r"),
    "alpha",
    targets_option("all-linear, or e.g. q_proj,v_proj"),
    "lr",
    "batch_size",
    "max_length",
    "seed",
    from_field("eval_limit", help="Validation rows scored each round."),
    from_field("train_limit", help="Use only the first N training rows."),
    from_field("min_clients", help="Aggregate a round only if at least this many clients replied."),
    from_field(
        "client_timeout", help="Seconds a client may take per round; later replies are skipped."
    ),
    from_field(
        "norm_bound", help="Drop a client whose update norm is over this x the others' median."
    ),
    no_chat_option(help=NO_CHAT_HELP),
    from_field("resume", help="Continue from the last saved round in --out."),
)

# `fed app` writes a Flower app's run config: the options above except these.
_NOT_IN_APP = (
    "val",
    "method",
    "max_length",
    "eval_limit",
    "train_limit",
    "client_timeout",
    "norm_bound",
    "no_chat",
    "resume",
)
FED_APP = FED_RUN.without(*_NOT_IN_APP)

# `lorafleet fed server | client`: how to reach the Flower SuperLink.
FLOWER_LINK = (
    option(
        "superlink",
        str,
        "127.0.0.1:8000",
        "--superlink",
        help="SuperLink address, host:port (Flower's default: 8000).",
    ),
    option("insecure", bool, False, "--insecure", help="No TLS (tests on one machine only)."),
    option(
        "root_certificates",
        Path | None,
        None,
        "--root-certificates",
        help="CA certificate (PEM) that signed the SuperLink's TLS cert.",
    ),
)


def fed_config(run: dict, **more) -> FedConfig:
    """The FedConfig of a FED_RUN / FED_APP option group's values (and `more` fields)."""
    return FED_RUN.build(run, **more)
