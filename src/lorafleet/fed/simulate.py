"""In-process federated simulation: N clients train on partitions of one data set, in turn, on
one copy of the base model; the server aggregates after every round."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lorafleet.fed import local
from lorafleet.fed.aggregate import Dropped
from lorafleet.fed.config import FedConfig
from lorafleet.fed.data import make_partition, validation_set
from lorafleet.fed.server import FedServer

log = logging.getLogger("lorafleet.fed")

# Called as hook(round, client) before a client trains: fault injection for tests and demos.
ClientHook = Callable[[int, int], None]


def round_summary(record: dict) -> str:
    """One line per round for the terminal."""
    parts = [f"round {record['round']}"]
    if "clients" in record:
        parts.append(f"clients {record['clients']}")
    for key in ("accuracy", "exact_match", "loss"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    if "aggregation_error" in record:
        parts.append(f"aggregation error {record['aggregation_error']:.2e}")
    for key in ("dropped", "failed"):
        for entry in record.get(key) or []:
            parts.append(f"{key} client {entry['client']} ({entry['reason']})")
    if record.get("skipped"):
        parts.append(f"SKIPPED: {record['skipped']}")
    return "; ".join(parts)


def run_simulation(
    cfg: FedConfig,
    *,
    before_client: ClientHook | None = None,
    show_progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) a simulated federated fine-tuning; writes the documented `cfg.out`
    layout and returns {"out", "rounds": per-round records}."""
    from tqdm.auto import tqdm

    from lorafleet.models import load_base

    base = load_base(cfg.base)
    tok = base.tokenizer
    part = make_partition(cfg, tok)
    val = validation_set(cfg, tok)
    model, adapter_config, tensors = local.initial_adapter(base.model, cfg)
    extra = {"partition": {"sizes": [len(p) for p in part.parts], "labels": part.histogram}}
    server = FedServer(cfg, model, tok, val, adapter_config, tensors, base.fingerprint, extra)
    first = server.start()
    data = [part.encoded(k, tok, cfg.max_length) for k in range(cfg.clients)]
    remaining = max(0, cfg.rounds - first + 1)
    bar = tqdm(
        total=remaining * cfg.clients, desc="federated", unit="client", disable=not show_progress
    )
    say = echo or bar.write
    if first > 1:
        say(f"resuming after round {first - 1}")
    try:
        for round_ in range(first, cfg.rounds + 1):
            start = time.perf_counter()
            updates, failed = [], []
            for client in range(cfg.clients):
                bar.set_postfix(round=round_, client=client)
                # Every client starts from the global model: W0 + residual is already in the
                # base weights (the server put it there); the adapter is reset here.
                local.load_global(model, server.tensors, freeze_a=cfg.aggregation == "ffa")
                deadline = local.clock() + cfg.client_timeout if cfg.client_timeout else None
                try:
                    if before_client is not None:
                        before_client(round_, client)
                    updates.append(
                        local.local_train(
                            model,
                            data[client],
                            cfg,
                            round_=round_,
                            client=client,
                            pad_token_id=tok.pad_token_id,
                            deadline=deadline,
                        )
                    )
                except Exception as exc:  # a crashed client is skipped, not fatal
                    reason = f"{type(exc).__name__}: {exc}"
                    failed.append(Dropped(client, reason))
                    log.warning("client %s failed in round %s: %s", client, round_, reason)
                bar.update(1)
            record = server.finish_round(round_, updates, failed, time.perf_counter() - start)
            say(round_summary(record))
    finally:
        bar.close()
    return {"out": str(cfg.out), "rounds": server.history}
