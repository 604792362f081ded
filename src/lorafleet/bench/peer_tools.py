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
    server: Path  # llama-server
    lib_dir: Path  # where the binaries and libllama.so / libggml*.so are
    convert: Path  # convert_lora_to_gguf.py from the same llama.cpp sources
    batched_bench: Path | None = None  # llama-batched-bench (in-process batched decoding)
    perplexity: Path | None = None  # llama-perplexity (KL divergence against a base run)
    quantize: Path | None = None  # llama-quantize


# What `require` can be asked for: Peers field -> how the one-line error names it.
TOOLS = {
    "server": "llama-server",
    "batched_bench": "llama-batched-bench",
    "perplexity": "llama-perplexity",
    "quantize": "llama-quantize",
    "convert": "convert_lora_to_gguf.py",
}


def locate(root: str | Path | None = None) -> Peers:
    """The peers under `root` (default build/peers, or $LORAFLEET_PEERS_DIR)."""
    root = Path(root or os.environ.get("LORAFLEET_PEERS_DIR") or DEFAULT_DIR)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    bin_dir = root / "llama.cpp" / "bin"
    return Peers(
        root=root,
        server=bin_dir / "llama-server",
        lib_dir=bin_dir,
        convert=src / "convert_lora_to_gguf.py",
        batched_bench=bin_dir / "llama-batched-bench",
        perplexity=bin_dir / "llama-perplexity",
        quantize=bin_dir / "llama-quantize",
    )


def require(root: str | Path | None = None, tools: tuple[str, ...] = tuple(TOOLS)) -> Peers:
    """`locate`, or one line saying which of `tools` (TOOLS' names; all by default) and the
    shared libraries are missing, and to run `make bench-peers`."""
    peers = locate(root)
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise ValueError(f"unknown peer tools {unknown}: expected some of {sorted(TOOLS)}")
    checks = [(getattr(peers, name), TOOLS[name]) for name in tools]
    checks.append((peers.lib_dir / "libllama.so", "libllama.so"))
    missing = [f"{what} at {path}" for path, what in checks if path is None or not path.exists()]
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


LORA_OUTTYPES = ("f32", "bf16")  # convert_lora_to_gguf.py's --outtype names we use


def lora_outtype(dtype: str) -> str:
    """The GGUF LoRA type matching lorafleet's adapter slots in `dtype` (the engine keeps the
    adapters in its dtype): float32 -> f32, bfloat16 -> bf16."""
    found = {"float32": "f32", "bfloat16": "bf16"}.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise LorafleetError(f"no GGUF LoRA type matches adapters in {dtype}")
    return found


def convert_command(
    peers: Peers, base_config_dir: Path, jobs: list[tuple[Path, Path]], outtype: str = "f32"
) -> list:
    """One process running convert_lora_to_gguf.py once per (PEFT dir, out .gguf) pair, against
    the base's HF config dir, to `outtype` (f32 | bf16; imports paid once: ~25 s each on a
    loaded 2-core box)."""
    if outtype not in LORA_OUTTYPES:
        raise LorafleetError(f"GGUF LoRA outtype {outtype!r}: expected one of {LORA_OUTTYPES}")
    runs = [
        [
            "--base",
            str(base_config_dir),
            "--outfile",
            str(out),
            "--outtype",
            outtype,
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


def convert(
    peers: Peers, base_config_dir: Path, jobs: list[tuple[Path, Path]], outtype: str = "f32"
) -> list[Path]:
    """Convert each (PEFT dir, out) pair to `outtype`; each out appears only once complete
    (temp + rename). The script imports gguf-py from its own tree (the format the build reads)."""
    tmp_jobs = [(src, out.with_name(out.name + ".tmp")) for src, out in jobs]
    gguf_py = str(peers.convert.parent / "gguf-py")
    path = os.pathsep.join(p for p in (gguf_py, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        convert_command(peers, base_config_dir, tmp_jobs, outtype),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    if proc.returncode != 0 or not all(tmp.is_file() for _, tmp in tmp_jobs):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LorafleetError(f"convert_lora_to_gguf.py failed: {tail[0][:300]}")
    for (_, tmp), (_, out) in zip(tmp_jobs, jobs, strict=True):
        os.replace(tmp, out)
    return [out for _, out in jobs]


# -- llama-server ----------------------------------------------------------------------------------


def server_command(
    peers: Peers,
    gguf: Path,
    loras: list[Path],
    slots: int,
    slot_ctx: int,
    port: int,
    flags: tuple[str, ...] = (),
) -> list[str]:
    """llama-server with `slots` parallel slots (-np) of `slot_ctx` tokens each (-c is their
    sum), every LoRA loaded at scale 0 (each request picks its own through the `lora` field),
    no prompt cache in RAM, no web UI, then `flags` (threads, batch sizes, ...)."""
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
        "--cache-ram",
        "0",
        "--no-webui",
    ]
    for lora in loras:
        args += ["--lora", str(lora)]
    if loras:
        args.append("--lora-init-without-apply")
    return args + list(flags)


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak RSS (VmHWM) in MiB; None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
