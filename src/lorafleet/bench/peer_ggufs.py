"""A base model as GGUF files made by llama.cpp's own convert_hf_to_gguf.py (F32, BF16, Q8_0),
from lorafleet's safetensors of the same weights, cached under build/peers/ggufs/.

The llama.cpp peers (`make bench-peers`) run these beside lorafleet at matched precision: F32
against float32, BF16 against bfloat16, Q8_0 against bfloat16+int8. The conversion runs the
script from the very llama.cpp sources the peers were built from, with this interpreter and
that tree's gguf-py on PYTHONPATH; the file appears only once complete (temp + rename)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorafleet.bench.peer_tools import NOT_INSTALLED, Peers
from lorafleet.errors import LorafleetError

OUTTYPES = ("f32", "bf16", "q8_0")  # convert_hf_to_gguf.py's --outtype names we use
CONVERT_SCRIPT = "convert_hf_to_gguf.py"


def llama_cpp_sources(peers: Peers) -> Path:
    """The llama.cpp source tree the peers were built from (holds the converter, gguf-py)."""
    return peers.convert.parent


def check_outtype(outtype: str) -> str:
    """'F32' / 'bf16' / 'Q8_0' -> its lower-case name; one-line error otherwise."""
    name = str(outtype).lower()
    if name not in OUTTYPES:
        raise LorafleetError(f"GGUF outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    return name


def safetensors_dir(base: str) -> Path:
    """The HF directory (config, tokenizer, safetensors) holding `base`'s weights as lorafleet
    loads them: a GGUF base's de-quantised cache (made by loading it once), or a local dir."""
    from lorafleet.models import load_base, resolve_base
    from lorafleet.models.cache import converted_dir

    source = resolve_base(base)
    if source.kind == "dir":
        return Path(source.location)
    if source.kind not in ("embedded", "gguf"):
        raise LorafleetError(
            f"--base {base}: GGUF conversion needs a local base (default, a .gguf or a directory)"
        )
    where = converted_dir(source)
    if not (where / "model.safetensors").is_file():
        load_base(base)  # converts the GGUF once into the cache
    if not (where / "model.safetensors").is_file():
        raise LorafleetError(f"--base {base}: no safetensors copy at {where}")
    return where


def gguf_path(peers: Peers, model_dir: Path, outtype: str) -> Path:
    """Where the `outtype` GGUF of `model_dir` is cached: build/peers/ggufs/<dir>-<type>.gguf."""
    return peers.root / "ggufs" / f"{model_dir.name}-{check_outtype(outtype)}.gguf"


def convert_command(peers: Peers, model_dir: Path, out: Path, outtype: str) -> list[str]:
    """convert_hf_to_gguf.py over `model_dir` to `out` in `outtype`, with this interpreter."""
    script = llama_cpp_sources(peers) / CONVERT_SCRIPT
    return [
        sys.executable,
        str(script),
        str(model_dir),
        "--outfile",
        str(out),
        "--outtype",
        check_outtype(outtype),
    ]


def convert_base(peers: Peers, model_dir: Path, outtype: str) -> Path:
    """The cached `outtype` GGUF of `model_dir`, converted now if missing (temp + rename)."""
    out = gguf_path(peers, model_dir, outtype)
    if out.is_file():
        return out
    sources = llama_cpp_sources(peers)
    if not (sources / CONVERT_SCRIPT).is_file():
        raise LorafleetError(NOT_INSTALLED.format(missing=f"{CONVERT_SCRIPT} in {sources}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # gguf-py from the same tree: the converter and the built llama.cpp agree on the format.
    path = os.pathsep.join(p for p in (str(sources / "gguf-py"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        convert_command(peers, model_dir, tmp, outtype),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LorafleetError(f"{CONVERT_SCRIPT} ({outtype}) failed: {tail[0][:300]}")
    os.replace(tmp, out)
    return out


def base_gguf_for(peers: Peers, base: str, outtype: str) -> Path:
    """`base` (e.g. "default") as a GGUF in `outtype` (f32 | bf16 | q8_0), made by llama.cpp's
    convert_hf_to_gguf.py from lorafleet's safetensors of the same weights; cached, so only the
    first call per (base, outtype) converts (tens of seconds)."""
    outtype = check_outtype(outtype)
    return convert_base(peers, safetensors_dir(base), outtype)
