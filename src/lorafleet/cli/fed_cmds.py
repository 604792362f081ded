"""`lorafleet fed simulate | server | client | app`: federated fine-tuning (FedEx-LoRA, FedAvg,
FFA-LoRA), in one process or on Flower."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lorafleet.cli import BaseOpt, app

fed_app = typer.Typer(
    help="Federated fine-tuning: FedEx-LoRA (exact), FedAvg and FFA-LoRA; simulated or on Flower.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(fed_app, name="fed")

DataOpt = typer.Option(
    ..., "--data", "-d", help="A built-in task (sst2, ...) or a data file, split among clients."
)
OutOpt = typer.Option(
    ..., "--out", "-o",
    help="Run dir: global/adapter/, global/residual.safetensors, metrics.json, state/.",
)  # fmt: skip
ClientsOpt = typer.Option(4, "--clients", "-n", help="Number of clients (data partitions).")
RoundsOpt = typer.Option(3, "--rounds", "-R")
LocalStepsOpt = typer.Option(
    10, "--local-steps", "-S", help="Optimizer steps per client and round."
)
AggregationOpt = typer.Option("fedex", "--aggregation", help="fedex | fedavg | ffa")
SplitOpt = typer.Option("iid", "--split", help="iid | dirichlet:ALPHA (non-IID; small = skewed).")
SplitByOpt = typer.Option("label", "--split-by", help="Dirichlet over `label` or a data field.")
ValOpt = typer.Option(None, "--val", help="Held-out data (default: a built-in task's validation).")
MethodOpt = typer.Option("lora", "--method", help="lora | rslora")
RankOpt = typer.Option(8, "--rank", "-r")
AlphaOpt = typer.Option(16.0, "--alpha")
TargetsOpt = typer.Option("all-linear", "--targets", help="all-linear, or e.g. q_proj,v_proj")
LrOpt = typer.Option(1e-3, "--lr")
BatchOpt = typer.Option(8, "--batch-size")
MaxLenOpt = typer.Option(512, "--max-length")
SeedOpt = typer.Option(0, "--seed")
EvalLimitOpt = typer.Option(200, "--eval-limit", help="Validation rows scored each round.")
TrainLimitOpt = typer.Option(None, "--train-limit", help="Use only the first N training rows.")
MinClientsOpt = typer.Option(
    1, "--min-clients", help="Aggregate a round only if at least this many clients replied."
)
TimeoutOpt = typer.Option(
    None, "--client-timeout", help="Seconds a client may take per round; later replies are skipped."
)
NormBoundOpt = typer.Option(
    10.0, "--norm-bound", help="Drop a client whose update norm is over this x the others' median."
)
NoChatOpt = typer.Option(False, "--no-chat", help="Plain prompts, no chat template.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the last saved round in --out.")
SuperlinkOpt = typer.Option(
    "127.0.0.1:8000", "--superlink", help="SuperLink address, host:port (Flower's default: 8000)."
)
InsecureOpt = typer.Option(False, "--insecure", help="No TLS (tests on one machine only).")
RootCertOpt = typer.Option(
    None, "--root-certificates", help="CA certificate (PEM) that signed the SuperLink's TLS cert."
)


def _config(**kw):
    from lorafleet.adapters import parse_targets
    from lorafleet.fed import FedConfig

    kw["targets"] = parse_targets(kw["targets"])
    return FedConfig(**kw)


@fed_app.command()
def simulate(
    base: str = BaseOpt, data: str = DataOpt, out: Path = OutOpt, clients: int = ClientsOpt,
    rounds: int = RoundsOpt, local_steps: int = LocalStepsOpt, aggregation: str = AggregationOpt,
    split: str = SplitOpt, split_by: str = SplitByOpt, val: str | None = ValOpt,
    method: str = MethodOpt, rank: int = RankOpt, alpha: float = AlphaOpt,
    targets: str = TargetsOpt, lr: float = LrOpt, batch_size: int = BatchOpt,
    max_length: int = MaxLenOpt, seed: int = SeedOpt, eval_limit: int = EvalLimitOpt,
    train_limit: int | None = TrainLimitOpt, min_clients: int = MinClientsOpt,
    client_timeout: float | None = TimeoutOpt, norm_bound: float = NormBoundOpt,
    save_clients: bool = typer.Option(
        False, "--save-clients", help="Also keep DIR/round-R/client-K/ and clients.json."
    ),
    no_chat: bool = NoChatOpt, resume: bool = ResumeOpt,
):  # fmt: skip
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

    cfg = _config(
        base=base, data=data, out=out, clients=clients, rounds=rounds, local_steps=local_steps,
        aggregation=aggregation, split=split, split_by=split_by, val=val, method=method,
        rank=rank, alpha=alpha, targets=targets, lr=lr, batch_size=batch_size,
        max_length=max_length, seed=seed, eval_limit=eval_limit, train_limit=train_limit,
        min_clients=min_clients, client_timeout=client_timeout, norm_bound=norm_bound,
        save_clients=save_clients, chat=not no_chat, resume=resume,
    )  # fmt: skip
    run_simulation(cfg)
    typer.echo(f"global model written to {out}/global (metrics: {out}/metrics.json)")


@fed_app.command()
def server(
    base: str = BaseOpt, data: str = DataOpt, out: Path = OutOpt, clients: int = ClientsOpt,
    rounds: int = RoundsOpt, local_steps: int = LocalStepsOpt, aggregation: str = AggregationOpt,
    split: str = SplitOpt, split_by: str = SplitByOpt, val: str | None = ValOpt,
    method: str = MethodOpt, rank: int = RankOpt, alpha: float = AlphaOpt,
    targets: str = TargetsOpt, lr: float = LrOpt, batch_size: int = BatchOpt,
    max_length: int = MaxLenOpt, seed: int = SeedOpt, eval_limit: int = EvalLimitOpt,
    train_limit: int | None = TrainLimitOpt, min_clients: int = MinClientsOpt,
    client_timeout: float | None = TimeoutOpt, norm_bound: float = NormBoundOpt,
    no_chat: bool = NoChatOpt, resume: bool = ResumeOpt, superlink: str = SuperlinkOpt,
    insecure: bool = InsecureOpt, root_certificates: Path | None = RootCertOpt,
):  # fmt: skip
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

    cfg = _config(
        base=base, data=data, out=out, clients=clients, rounds=rounds, local_steps=local_steps,
        aggregation=aggregation, split=split, split_by=split_by, val=val, method=method,
        rank=rank, alpha=alpha, targets=targets, lr=lr, batch_size=batch_size,
        max_length=max_length, seed=seed, eval_limit=eval_limit, train_limit=train_limit,
        min_clients=min_clients, client_timeout=client_timeout, norm_bound=norm_bound,
        chat=not no_chat, resume=resume,
    )  # fmt: skip
    code = run_server(cfg, superlink, insecure=insecure, root_certificates=root_certificates)
    if code != 0:
        typer.echo(f"lorafleet: error: flwr run exited with status {code}", err=True)
        return 1
    typer.echo(f"run submitted and finished; the ServerApp wrote {cfg.out} on the SuperLink host")
    return 0


@fed_app.command()
def client(
    partition: int = typer.Option(..., "--partition", "-k", help="This client's id, 0..N-1."),
    partitions: int = typer.Option(..., "--partitions", "-n", help="N, the run's --clients."),
    superlink: str = SuperlinkOpt,
    insecure: bool = InsecureOpt,
    root_certificates: Path | None = RootCertOpt,
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
        superlink, partition, partitions, insecure=insecure, root_certificates=root_certificates,
        port=port, data=data, base=base, auth_private_key=auth_private_key,
    )  # fmt: skip
    os.execve(cmd[0], cmd, flower_env())


@fed_app.command("app")
def app_cmd(
    base: str = BaseOpt, data: str = DataOpt, out: Path = OutOpt,
    app_dir: Path = typer.Option(..., "--app-dir", help="Where to write the Flower app."),
    clients: int = ClientsOpt, rounds: int = RoundsOpt, local_steps: int = LocalStepsOpt,
    aggregation: str = AggregationOpt, split: str = SplitOpt, split_by: str = SplitByOpt,
    rank: int = RankOpt, alpha: float = AlphaOpt, targets: str = TargetsOpt, lr: float = LrOpt,
    batch_size: int = BatchOpt, seed: int = SeedOpt, min_clients: int = MinClientsOpt,
):  # fmt: skip
    """Write lorafleet's Flower app (a pyproject.toml) to run with plain `flwr run`.

    Examples:

        lorafleet fed app -b default -d sst2 -o /srv/fed/run1 --app-dir fedapp

        flwr run fedapp my-superlink --stream
    """
    from lorafleet.fed.launch import write_app

    cfg = _config(
        base=base, data=data, out=out.resolve(), clients=clients, rounds=rounds,
        local_steps=local_steps, aggregation=aggregation, split=split, split_by=split_by,
        rank=rank, alpha=alpha, targets=targets, lr=lr, batch_size=batch_size, seed=seed,
        min_clients=min_clients,
    )  # fmt: skip
    typer.echo(f"wrote {write_app(app_dir, cfg) / 'pyproject.toml'}")
