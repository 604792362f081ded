"""`lorafleet fed simulate` end to end on the tiny model: the documented --out layout, the
exactness of the written global model, and `eval` / `generate --fed`."""

from __future__ import annotations

import json

import pytest
from fed_helpers import fed_options
from safetensors.torch import load_file

from lorafleet.adapters import read_adapter
from lorafleet.fed.aggregate import lora_modules, lora_scale
from lorafleet.fed.residual import read_residual
from lorafleet.models.tiny import tiny_llama

EXACT_RTOL = 1e-6


@pytest.fixture(scope="module")
def fedex_run(tmp_path_factory, tiny_base_dir, reviews):
    """One simulated FedEx round with 3 non-IID clients, client adapters kept."""
    from lorafleet.cli import main

    out = tmp_path_factory.mktemp("fedex") / "run"
    args = fed_options(tiny_base_dir, *reviews, out, clients=3, rounds=1, split="dirichlet:1.0")
    assert main(["fed", "simulate", *args, "--save-clients"]) == 0
    return out


def test_simulate_writes_the_documented_layout(fedex_run, tiny_base_dir):
    out = fedex_run
    adapter = read_adapter(out / "global" / "adapter")  # PEFT format
    assert adapter.method == "lora" and adapter.rank == 4
    residual, meta = read_residual(out / "global" / "residual.safetensors")
    base_names = set(tiny_llama(0, vocab_size=8).state_dict())  # the base's own weight names
    assert residual and set(residual) <= base_names
    assert "model.layers.0.self_attn.q_proj.weight" in residual
    assert meta["base_fingerprint"] == adapter.meta["base_fingerprint"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert sum(metrics["partition"]["sizes"]) == 24
    last = metrics["rounds"][-1]
    assert last["clients"] == [0, 1, 2] and 0 <= last["accuracy"] <= 1
    assert last["aggregation_error"] < EXACT_RTOL
    assert (out / "metrics.png").stat().st_size > 1000
    clients = json.loads((out / "round-1" / "clients.json").read_text())
    assert [c["client"] for c in clients] == [0, 1, 2]
    assert sum(c["weight"] for c in clients) == pytest.approx(1.0)
    for c in clients:
        assert read_adapter(c["dir"]).rank == 4


def test_written_global_model_is_the_exact_average_of_the_clients(fedex_run):
    # Round 1 starts from W0, so residual + s B'A' must equal sum_k w_k s B_k A_k, per module,
    # using only the files in the run directory.
    out = fedex_run
    glob = read_adapter(out / "global" / "adapter")
    scale = lora_scale(glob.config)
    residual, _ = read_residual(out / "global" / "residual.safetensors")
    clients = json.loads((out / "round-1" / "clients.json").read_text())
    tensors = [load_file(f"{c['dir']}/adapter_model.safetensors") for c in clients]
    for prefix, (a, b) in lora_modules(glob.tensors).items():
        name = prefix.removeprefix("base_model.model.") + ".weight"
        ideal = sum(
            c["weight"] * scale * (t[b].double() @ t[a].double())
            for c, t in zip(clients, tensors, strict=True)
        )
        got = residual[name].double() + scale * glob.tensors[b].double() @ glob.tensors[a].double()
        assert float((got - ideal).norm() / ideal.norm()) < EXACT_RTOL


def test_eval_and_generate_use_the_global_model(fedex_run, tiny_base_dir, reviews, run_cli):
    out = fedex_run
    _, val = reviews
    args = [
        "--base",
        tiny_base_dir,
        "--data",
        val,
        "--no-chat",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--limit",
        "8",
    ]
    code, _, err = run_cli("eval", *args, "--fed", out, "--json", out / "eval-fed.json")
    assert code == 0, err
    code, _, err = run_cli("eval", *args, "--json", out / "eval-base.json")
    assert code == 0, err
    fed = json.loads((out / "eval-fed.json").read_text())
    plain = json.loads((out / "eval-base.json").read_text())
    recorded = json.loads((out / "metrics.json").read_text())["rounds"][-1]
    # Same global model as the server scored after the round; not the bare base.
    assert fed["loss"] == pytest.approx(recorded["loss"], rel=1e-4)
    assert abs(fed["loss"] - plain["loss"]) > 1e-3
    # Leaving out the residual changes the model: the residual is part of the global model.
    code, _, err = run_cli(
        "eval",
        *args,
        "--adapter",
        out / "global" / "adapter",
        "--json",
        out / "eval-adapter-only.json",
    )
    assert code == 0, err
    adapter_only = json.loads((out / "eval-adapter-only.json").read_text())
    assert abs(adapter_only["loss"] - fed["loss"]) > 1e-6
    code, text, err = run_cli(
        "generate",
        "--base",
        tiny_base_dir,
        "--fed",
        out,
        "--prompt",
        "a great film",
        "--max-tokens",
        "4",
        "--no-chat",
    )
    assert code == 0 and text.strip(), err
    code, _, err = run_cli(
        "generate",
        "--base",
        tiny_base_dir,
        "--fed",
        out,
        "--adapter",
        out / "global" / "adapter",
        "--prompt",
        "x",
    )
    assert code == 2 and "not both" in err


def test_fedavg_split_by_a_field_has_no_residual_and_reports_its_error(
    tiny_base_dir, reviews, tmp_path
):
    from lorafleet.cli import main

    out = tmp_path / "avg"
    args = fed_options(
        tiny_base_dir,
        *reviews,
        out,
        rounds=1,
        clients=3,
        aggregation="fedavg",
        split="dirichlet:0.2",
        split_by="genre",
    )
    assert main(["fed", "simulate", *args]) == 0
    residual, _ = read_residual(out / "global" / "residual.safetensors")
    assert residual == {}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][-1]["aggregation_error"] > 1e-4  # FedAvg's inexactness, per round
    sizes = metrics["partition"]["sizes"]
    assert sum(sizes) == 24 and min(sizes) >= 1
    # The histogram is over the genre field: 3 genres among 3 clients.
    genres = {g for client in metrics["partition"]["labels"] for g in client}
    assert genres == {"drama", "comedy", "horror"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--aggregation", "median"], "unknown --aggregation"),
        (["--split", "dirichlet:x"], "ALPHA must be a number"),
        (["--method", "dora"], "cannot be federated"),
        (["--min-clients", "5"], "more than --clients"),
        (["--split", "dirichlet:1", "--split-by", "colour"], 'no field "colour"'),
        (["--resume"], "no saved round"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_base_dir, reviews, tmp_path, run_cli, extra, message):
    args = fed_options(tiny_base_dir, *reviews, tmp_path / "bad")
    code, _, err = run_cli("fed", "simulate", *args, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_existing_run_needs_resume(fedex_run, tiny_base_dir, reviews, run_cli):
    args = fed_options(tiny_base_dir, *reviews, fedex_run, clients=3, split="dirichlet:1.0")
    code, _, err = run_cli("fed", "simulate", *args)
    assert code == 2 and "--resume" in err
    code, _, err = run_cli("fed", "simulate", *args, "--resume", "--rank", "8")
    assert code == 2 and "--rank differs" in err


def test_flower_commands_check_input_and_write_the_app(tiny_base_dir, reviews, tmp_path, run_cli):
    for command in ("simulate", "server", "client", "app"):
        code, text, _ = run_cli("fed", command, "--help")
        assert code == 0 and "Examples" in text
    code, _, err = run_cli("fed", "client", "--partition", "2", "--partitions", "2", "--insecure")
    assert code == 2 and "--partition must be in 0..1" in err
    code, _, err = run_cli("fed", "client", "--partition", "0", "--partitions", "2")
    assert code == 2 and "--insecure" in err
    args = fed_options(tiny_base_dir, *reviews, tmp_path / "srv")
    code, _, err = run_cli("fed", "server", *args)
    assert code == 2 and "--root-certificates" in err
    app_dir = tmp_path / "app"
    code, _, err = run_cli(
        "fed",
        "app",
        "-b",
        tiny_base_dir,
        "-d",
        reviews[0],
        "-o",
        tmp_path / "o",
        "--app-dir",
        app_dir,
        "--rounds",
        "5",
    )
    assert code == 0, err
    text = (app_dir / "pyproject.toml").read_text()  # TOML, read as text (py3.10 has no tomllib)
    assert 'clientapp = "lorafleet.fed.flower:client_app"' in text
    assert 'serverapp = "lorafleet.fed.flower:server_app"' in text
    assert "rounds = 5\n" in text and 'aggregation = "fedex"' in text
