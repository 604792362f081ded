"""The llama.cpp peers built by `make bench-peers`: where they are, their commands, LoRA to GGUF."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters.lora_keys import (
    LoraKeyError,
    lora_pairs,
    module_alpha,
    module_rank,
    uniform_scale,
)
from lorafleet.adapters.methods import find_method
from lorafleet.errors import LorafleetError

DEFAULT_DIR = Path("build/peers")
VERSION = "0.3.36"  # llama-cpp-python, the PyPI source package that vendors llama.cpp
NOT_INSTALLED = "the llama.cpp peers are not installed ({missing}): run `make bench-peers` first"


@dataclass(frozen=True)
class Peers:
    """Paths of one `make bench-peers` build (see bench/peers_build.sh)."""

    root: Path
    python: Path  # the venv holding the llama-cpp-python binding
    server: Path  # llama-server
    lib_dir: Path  # libllama.so and libggml*.so, loaded by the binding (LLAMA_CPP_LIB_PATH)
    convert: Path  # convert_lora_to_gguf.py from the same llama.cpp sources

    def binding_env(self) -> dict[str, str]:
        return {**os.environ, "LLAMA_CPP_LIB_PATH": str(self.lib_dir)}


def locate(root: str | Path | None = None) -> Peers:
    """The peers under `root` (default build/peers, or $LORAFLEET_PEERS_DIR)."""
    root = Path(root or os.environ.get("LORAFLEET_PEERS_DIR") or DEFAULT_DIR)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    bin_dir = root / "llama.cpp" / "bin"
    peers = Peers(
        root=root,
        python=root / "venv" / "bin" / "python",
        server=bin_dir / "llama-server",
        lib_dir=bin_dir,
        convert=src / "convert_lora_to_gguf.py",
    )
    return peers


def require(root: str | Path | None = None) -> Peers:
    """`locate`, or one line saying what is missing and to run `make bench-peers`."""
    peers = locate(root)
    checks = [
        (peers.python, "the binding's venv"),
        (peers.server, "llama-server"),
        (peers.lib_dir / "libllama.so", "libllama.so"),
        (peers.convert, "convert_lora_to_gguf.py"),
    ]
    missing = [f"{what} at {path}" for path, what in checks if not path.exists()]
    if missing:
        raise LorafleetError(NOT_INSTALLED.format(missing="; ".join(missing)))
    return peers


# -- LoRA adapters to GGUF -----------------------------------------------------------------------


def check_convertible(config: dict, tensors: dict) -> float:
    """llama.cpp's GGUF LoRA holds one alpha (scale alpha / r) and plain A/B pairs: refuse
    adapters it cannot carry. Returns the adapter's scale."""
    method = find_method(config)
    if method is None or not method.factored:
        what = method.title if method else f"peft_type {config.get('peft_type')}"
        raise LorafleetError(f"llama.cpp converts plain LoRA only: {what} won't convert")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LorafleetError("llama.cpp needs one LoRA scale: per-module rank/alpha won't convert")
    try:
        lora_pairs(tensors)
    except LoraKeyError as exc:
        raise LorafleetError(f"llama.cpp converts plain LoRA A/B pairs only: {exc}") from None
    scale = uniform_scale(config)
    if not math.isclose(scale, module_alpha(config, "") / module_rank(config, "")):
        raise LorafleetError(
            f"llama.cpp scales plain LoRA by alpha / r: {method.title} (scale {scale:g}) won't "
            "convert"
        )
    return scale


def convert_command(peers: Peers, base_config_dir: Path, jobs: list[tuple[Path, Path]]) -> list:
    """One process running convert_lora_to_gguf.py once per (PEFT dir, out .gguf) pair, against
    the base's HF config dir, to f32 (imports paid once: ~25 s each on a loaded 2-core box)."""
    runs = [
        [
            "--base",
            str(base_config_dir),
            "--outfile",
            str(out),
            "--outtype",
            "f32",
            str(adapter_dir),
        ]
        for adapter_dir, out in jobs
    ]
    driver = (
        "import json, os, runpy, sys\n"
        "script, runs = sys.argv[1], json.loads(sys.argv[2])\n"
        "sys.path.insert(0, os.path.dirname(script))  # its `conversion` package\n"
        "for args in runs:\n"
        "    sys.argv = [script, *args]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    return [sys.executable, "-c", driver, str(peers.convert), json.dumps(runs)]


def convert(peers: Peers, base_config_dir: Path, jobs: list[tuple[Path, Path]]) -> list[Path]:
    """Convert each (PEFT dir, out) pair; each out appears only once complete (temp + rename)."""
    tmp_jobs = [(src, out.with_name(out.name + ".tmp")) for src, out in jobs]
    proc = subprocess.run(
        convert_command(peers, base_config_dir, tmp_jobs), capture_output=True, text=True
    )
    if proc.returncode != 0 or not all(tmp.is_file() for _, tmp in tmp_jobs):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LorafleetError(f"convert_lora_to_gguf.py failed: {tail[0][:300]}")
    for (_, tmp), (_, out) in zip(tmp_jobs, jobs, strict=True):
        os.replace(tmp, out)
    return [out for _, out in jobs]


# -- llama-server ----------------------------------------------------------------------------------


def server_command(
    peers: Peers, gguf: Path, loras: list[Path], slots: int, slot_ctx: int, threads: int, port: int
) -> list[str]:
    """llama-server with `slots` parallel slots of `slot_ctx` tokens each, every LoRA loaded at
    scale 0 (each request picks its own through the `lora` field), no prompt cache reuse."""
    args = [
        str(peers.server),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(slots * slot_ctx),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--cache-ram",
        "0",
        "--no-webui",
    ]
    for lora in loras:
        args += ["--lora", str(lora)]
    if loras:
        args.append("--lora-init-without-apply")
    return args


def completion_body(prompt: list[int], new_tokens: int, lora_id: int | None) -> dict:
    """One llama-server /completion request: greedy, EOS ignored, streamed token by token, no
    prompt cache, LoRA `lora_id` at scale 1 (None: the base, every LoRA at scale 0)."""
    return {
        "prompt": prompt,
        "n_predict": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "cache_prompt": False,
        "return_tokens": True,
        "lora": [] if lora_id is None else [{"id": lora_id, "scale": 1.0}],
    }


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak RSS (VmHWM) in MiB; None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
