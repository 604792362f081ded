"""`lorafleet fed simulate | server | client | app`: federated fine-tuning (FedEx-LoRA, FedAvg,
FFA-LoRA), in one process or on Flower."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.options import (
    FED_APP,
    FED_RUN,
    FLOWER_LINK,
    fed_config,
    from_field,
    options_from,
    with_options,
)
from lorafleet.fed.config import FedConfig

fed_app = typer.Typer(
    help="Federated fine-tuning: FedEx-LoRA (exact), FedAvg and FFA-LoRA; simulated or on Flower.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(fed_app, name="fed")

# `fed simulate` alone can keep what every client trained.
KEEP_CLIENTS = options_from(
    FedConfig,
    from_field("save_clients", help="Also keep DIR/round-R/client-K/ and clients.json."),
)


@fed_app.command()
@with_options(run=FED_RUN, keep=KEEP_CLIENTS)
def simulate(run: dict, keep: dict):
    """Simulate N clients in this process: each round every client trains on its partition,
    then the server aggregates and scores the global model on held-out data.

    Writes DIR/global/adapter/ (PEFT), DIR/global/residual.safetensors (FedEx's delta to the
    base weights, keyed by their names; empty for fedavg/ffa), DIR/metrics.json and
    DIR/metrics.png; use the result with `lorafleet eval --base B --fed DIR`.

    Examples:

        lorafleet fed simulate -b default -d sst2 -n 4 -R 3 -S 15 --split dirichlet:0.5 -o runs/fed

        lorafleet fed simulate -b default -d my.jsonl --split dirichlet:0.3 --split-by topic -o x

        lorafleet fed simulate -b default -d sst2 --aggregation fedavg --save-clients -o runs/avg

        lorafleet fed simulate -b default -d sst2 --rounds 6 --out runs/fed --resume
    """
    from lorafleet.fed.simulate import run_simulation

    cfg = fed_config(run, **keep)
    run_simulation(cfg)
    out = run["out"]
    typer.echo(f"global model written to {out}/global (metrics: {out}/metrics.json)")


@fed_app.command()
@with_options(run=FED_RUN, link=FLOWER_LINK)
def server(run: dict, link: dict):
    """Run the federated training on Flower: submit lorafleet's Flower app to a running
    SuperLink (`flwr run ... --stream`) and follow the log until the last round.

    The ServerApp runs beside the SuperLink and writes --out there (same layout as
    `fed simulate`); clients are SuperNodes started with `lorafleet fed client`. If the server
    stops, start it again with --resume: it continues after the last saved round.

    Examples:

        lorafleet fed server --superlink link.example.org:8000 --root-certificates ca.pem \
            --base default --data sst2 --clients 4 --out /srv/fed/run1

        lorafleet fed server --superlink 127.0.0.1:8000 --insecure -b default -d sst2 -n 2 \
            -o /tmp/fed --resume

    The SuperLink itself (TLS; see docs/federated.md for SuperNode authentication):

        flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem \
            --ssl-keyfile server.key --disable-runtime-dependency-installation
    """
    from lorafleet.fed.launch import run_server

    cfg = fed_config(run)
    code = run_server(cfg, **link)
    if code != 0:
        typer.echo(f"lorafleet: error: flwr run exited with status {code}", err=True)
        return 1
    typer.echo(f"run submitted and finished; the ServerApp wrote {cfg.out} on the SuperLink host")
    return 0


@fed_app.command()
@with_options(link=FLOWER_LINK)
def client(
    link: dict,
    partition: int = typer.Option(..., "--partition", "-k", help="This client's id, 0..N-1."),
    partitions: int = typer.Option(..., "--partitions", "-n", help="N, the run's --clients."),
    port: int = typer.Option(9094, "--port", help="Local port of the SuperNode's ClientApp API."),
    data: str | None = typer.Option(
        None, "--data", help="This client's own data file (default: its partition of the run's)."
    ),
    base: str | None = typer.Option(None, "--base", help="Where this machine has the base."),
    auth_private_key: Path | None = typer.Option(
        None, "--auth-private-key", help="SuperNode key (EC, PEM) registered on the SuperLink."
    ),
):
    """Start a Flower SuperNode that trains as client K (runs `flower-supernode`; Ctrl-C stops).

    Examples:

        lorafleet fed client --superlink link.example.org:8000 --root-certificates ca.pem \
            --partition 0 --partitions 4 --auth-private-key node0.key

        lorafleet fed client --superlink 127.0.0.1:8000 --insecure -k 1 -n 2 --port 9095
    """
    from lorafleet.fed.launch import flower_env, supernode_command

    cmd = supernode_command(
        partition=partition,
        partitions=partitions,
        port=port,
        data=data,
        base=base,
        auth_private_key=auth_private_key,
        **link,
    )
    os.execve(cmd[0], cmd, flower_env())


@fed_app.command("app")
@with_options(run=FED_APP)
def app_cmd(
    run: dict,
    app_dir: Path = typer.Option(..., "--app-dir", help="Where to write the Flower app."),
):
    """Write lorafleet's Flower app (a pyproject.toml) to run with plain `flwr run`.

    Examples:

        lorafleet fed app -b default -d sst2 -o /srv/fed/run1 --app-dir fedapp

        flwr run fedapp my-superlink --stream
    """
    from lorafleet.fed.launch import write_app

    cfg = fed_config({**run, "out": run["out"].resolve()})
    typer.echo(f"wrote {write_app(app_dir, cfg) / 'pyproject.toml'}")
