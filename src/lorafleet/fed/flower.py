"""The Flower apps (Message API): a ServerApp whose strategy aggregates with lorafleet's pure
functions, and a ClientApp that trains locally with lorafleet's training step.

What travels: server -> client, the global adapter tensors, the accumulated FedEx residual (so
a client that missed rounds or restarted rebuilds W0 + residual exactly) and the run's
settings; client -> server, only its adapter tensors and a few numbers. The base model and the
data never leave their machines. Needs `pip install 'lorafleet[fed]'`.
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from lorafleet.errors import LorafleetError
from lorafleet.fed.aggregate import ClientUpdate, Dropped
from lorafleet.fed.config import FedConfig
from lorafleet.fed.data import make_partition, validation_set
from lorafleet.fed.local import initial_adapter, load_global, local_train, trainable_model
from lorafleet.fed.residual import apply_residual
from lorafleet.fed.server import FedServer
from lorafleet.fed.simulate import round_summary

log = logging.getLogger("lorafleet.fed")

ADAPTER_KEY, RESIDUAL_KEY, CONFIG_KEY, METRICS_KEY = "adapter", "residual", "config", "metrics"
WAIT_FOR_NODES_S = 600  # how long round 1 waits for all --clients SuperNodes to connect
DEFAULT_ROUND_TIMEOUT_S = 3600.0


def _arrays(tensors: dict) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _tensors(record: ArrayRecord | None) -> dict:
    return dict(record.to_torch_state_dict()) if record is not None and len(record) else {}


class LoraStrategy(FedAvg):
    """FedAvg's node sampling and messaging; `aggregate_train` hands the replies to the same
    validation and aggregation (fedex | fedavg | ffa) as the in-process simulation."""

    def __init__(self, server: FedServer):
        cfg = server.cfg
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            arrayrecord_key=ADAPTER_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.server = server
        self.sent: list[int] = []
        self.round_start = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.round_start = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        residual = _arrays(self.server.residual)
        for msg in messages:
            msg.content[RESIDUAL_KEY] = residual
        self.sent = [msg.metadata.dst_node_id for msg in messages]
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord, MetricRecord]:
        updates: list[ClientUpdate] = []
        failed: list[Dropped] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                failed.append(Dropped(-1, f"node {node}: {msg.error.reason}"))
                continue
            try:
                metrics = msg.content[METRICS_KEY]
                client = int(metrics["partition-id"])
                tensors = _tensors(msg.content[ADAPTER_KEY])
                weight = float(metrics["num-examples"])
            except (KeyError, TypeError, ValueError) as exc:
                failed.append(Dropped(-1, f"node {node}: malformed reply ({exc})"))
                continue
            if any(u.client == client for u in updates):
                failed.append(Dropped(client, f"node {node}: duplicate partition id {client}"))
                continue
            extra = {"last_loss": float(metrics.get("last-loss", float("nan")))}
            updates.append(ClientUpdate(client, tensors, weight, extra))
        for node in self.sent:
            if node not in answered:
                failed.append(Dropped(-1, f"node {node}: no reply within the round's timeout"))
        seconds = time.perf_counter() - self.round_start
        record = self.server.finish_round(server_round, updates, failed, seconds)
        log.warning(round_summary(record))
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        return _arrays(self.server.tensors), MetricRecord(numbers)


def _wait_for_nodes(grid: Grid, cfg: FedConfig) -> None:
    deadline = time.monotonic() + WAIT_FOR_NODES_S
    while len(list(grid.get_node_ids())) < cfg.clients and time.monotonic() < deadline:
        time.sleep(1.0)
    connected = len(list(grid.get_node_ids()))
    if connected < cfg.min_clients:
        raise LorafleetError(
            f"only {connected} SuperNodes connected; --min-clients is {cfg.min_clients}"
        )


def serve(grid: Grid, cfg: FedConfig) -> FedServer:
    """The ServerApp's loop: configure -> send and receive -> aggregate, saving every round."""
    from lorafleet.models import load_base

    base = load_base(cfg.base)
    model, adapter_config, tensors = initial_adapter(base.model, cfg)
    val = validation_set(cfg, base.tokenizer)
    server = FedServer(cfg, model, base.tokenizer, val, adapter_config, tensors, base.fingerprint)
    first = server.start()
    strategy = LoraStrategy(server)
    _wait_for_nodes(grid, cfg)
    settings = {**cfg.to_flower(), "adapter-config": json.dumps(adapter_config)}
    timeout = cfg.client_timeout or DEFAULT_ROUND_TIMEOUT_S
    for server_round in range(first, cfg.rounds + 1):
        messages = strategy.configure_train(
            server_round, _arrays(server.tensors), ConfigRecord(dict(settings)), grid
        )
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        strategy.aggregate_train(server_round, replies)
    return server


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    serve(grid, FedConfig.from_flower(dict(context.run_config)))


def client_round(content: RecordDict, node_config: dict) -> RecordDict:
    """One client's round from a server message: rebuild the global model (base + residual +
    adapter), train on this node's data, reply with the adapter tensors."""
    from lorafleet.models import load_base

    settings = dict(content[CONFIG_KEY])
    server_round = int(settings["server-round"])
    cfg = FedConfig.from_flower(settings)
    client = int(node_config.get("partition-id", 0))
    if "data" in node_config:  # this node's own data file: all of it is this client's
        cfg.data, cfg.clients, cfg.split, cfg.train_limit = str(node_config["data"]), 1, "iid", None
        part_id = 0
    else:
        num = int(node_config.get("num-partitions", cfg.clients))
        if num != cfg.clients:
            raise LorafleetError(
                f"node has num-partitions={num}, the run has {cfg.clients} clients"
            )
        part_id = client
    if "base" in node_config:
        cfg.base = str(node_config["base"])
    base = load_base(cfg.base)
    apply_residual(base.model, _tensors(content.get(RESIDUAL_KEY)))
    model = trainable_model(base.model, json.loads(settings["adapter-config"]))
    load_global(model, _tensors(content[ADAPTER_KEY]), freeze_a=cfg.aggregation == "ffa")
    data = make_partition(cfg, base.tokenizer).encoded(part_id, base.tokenizer, cfg.max_length)
    update = local_train(
        model,
        data,
        cfg,
        round_=server_round,
        client=client,
        pad_token_id=base.tokenizer.pad_token_id,
    )
    metrics = MetricRecord(
        {
            "num-examples": int(update.weight),
            "partition-id": client,
            "first-loss": float(update.metrics["first_loss"]),
            "last-loss": float(update.metrics["last_loss"]),
        }
    )
    return RecordDict({ADAPTER_KEY: _arrays(update.tensors), METRICS_KEY: metrics})


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    return Message(content=client_round(msg.content, dict(context.node_config)), reply_to=msg)
