"""Start the Flower side: write the Flower app directory, submit a run to a SuperLink with
`flwr run`, or start a SuperNode with `flower-supernode` (the commands Flower documents)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafleet import __version__
from lorafleet.errors import LorafleetError
from lorafleet.fed.config import FedConfig

CONNECTION = "lorafleet"


def _toml(data: dict) -> str:
    try:
        import tomli_w
    except ImportError as exc:  # comes with flwr
        raise LorafleetError("Flower is not installed: pip install 'lorafleet[fed]'") from exc
    return tomli_w.dumps(data)


def flower_tool(name: str) -> str:
    """Path of a Flower console script (next to this Python first, then on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise LorafleetError(f"{name} not found: pip install 'lorafleet[fed]'")
    return found


def flower_env(env: dict | None = None) -> dict:
    """The environment with Flower's scripts on PATH: a SuperLink / SuperNode starts its
    helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    env = dict(os.environ if env is None else env)
    folder = str(Path(flower_tool("flwr")).parent)
    env["PATH"] = os.pathsep.join([folder, env.get("PATH", "")])
    return env


def write_app(app_dir: Path, cfg: FedConfig) -> Path:
    """A Flower app directory whose components are lorafleet's ServerApp and ClientApp and
    whose run config holds `cfg` (the FAB carries only this pyproject.toml: the code is the
    installed lorafleet package on every machine)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "lorafleet-fed",
            "version": __version__,
            "license": "Apache-2.0",
            "description": "lorafleet federated LoRA fine-tuning (FedEx-LoRA, FedAvg, FFA-LoRA)",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "lorafleet",
                    "components": {
                        "serverapp": "lorafleet.fed.flower:server_app",
                        "clientapp": "lorafleet.fed.flower:client_app",
                    },
                    "config": cfg.to_flower(),
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(_toml(project))
    return app_dir


def connection_home(
    home: Path, superlink: str, *, insecure: bool, root_certificates: Path | None
) -> Path:
    """A Flower home (FLWR_HOME) whose config.toml names the SuperLink connection."""
    if not insecure and root_certificates is None:
        raise LorafleetError("give --root-certificates CA.pem for TLS, or --insecure for a test")
    conn: dict = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    (home / "config.toml").write_text(_toml(config))
    return home


def run_server(
    cfg: FedConfig, superlink: str, *, insecure: bool, root_certificates: Path | None
) -> int:
    """Submit the run to the SuperLink (`flwr run ... --stream`) and follow its log. The
    ServerApp runs beside the SuperLink and writes `cfg.out` there."""
    cfg.out = cfg.out.resolve()
    app = write_app(cfg.out / "flower-app", cfg)
    with tempfile.TemporaryDirectory(prefix="lorafleet-flwr-") as tmp:
        home = connection_home(
            Path(tmp), superlink, insecure=insecure, root_certificates=root_certificates
        )
        env = {**flower_env(), "FLWR_HOME": str(home)}
        cmd = [flower_tool("flwr"), "run", str(app), CONNECTION, "--stream"]
        return subprocess.call(cmd, env=env)


def supernode_command(
    superlink: str,
    partition: int,
    partitions: int,
    *,
    insecure: bool,
    root_certificates: Path | None,
    port: int,
    data: str | None = None,
    base: str | None = None,
    auth_private_key: Path | None = None,
) -> list[str]:
    """The `flower-supernode` command line for client `partition` of `partitions`."""
    if not 0 <= partition < partitions:
        raise LorafleetError(f"--partition must be in 0..{partitions - 1}, got {partition}")
    if not insecure and root_certificates is None:
        raise LorafleetError("give --root-certificates CA.pem for TLS, or --insecure for a test")
    node = f"partition-id={partition} num-partitions={partitions}"
    if data:
        node += f' data="{data}"'
    if base:
        node += f' base="{base}"'
    cmd = [
        flower_tool("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        node,
    ]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:  # registered on the SuperLink with `flwr supernode register`
        cmd += ["--auth-supernode-private-key", str(auth_private_key)]
    return cmd
