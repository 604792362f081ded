"""What the two llama.cpp peer tables share: lorafleet's settings and the GGUFs that match
them byte for byte, the prompts, and the random bench adapters as PEFT dirs and GGUF LoRAs.

The tables themselves: `peers_inproc` (`lorafleet bench engine --peers`: the engine against
llama-batched-bench, both in-process) and `peers_http` (`lorafleet bench serve --peers`:
`lorafleet serve` against a tuned llama-server, both behind the same HTTP client)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.bench import peer_tools
from lorafleet.bench.peers_config import TARGETS
from lorafleet.bench.settings import parse_setting
from lorafleet.errors import LorafleetError

SHIPPED = "shipped"  # the GGUF file an embedded base ships (default: SmolLM2's Q4_1)
# lorafleet's (dtype, quantize) -> the GGUF type that holds its weights in the same bytes:
# float32 = F32, bfloat16 = BF16, bfloat16 + int8 (per-row scales) ~ Q8_0 (8.5 bits a weight).
MATCHED = {("float32", "none"): "f32", ("bfloat16", "none"): "bf16", ("bfloat16", "int8"): "q8_0"}
GGUF_TITLES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", SHIPPED: "Q4_1 (shipped)"}


def serve_default_setting() -> str:
    """What `lorafleet serve` runs on this CPU with no --dtype / --quantize, read from its
    config at run time and resolved as serve resolves `auto` ('bfloat16', 'int4', ...): the
    setting `bench quality`'s rule picked for this kind of CPU."""
    from lorafleet.serve.api import precision
    from lorafleet.serve.api.config import SERVE_DTYPE, SERVE_QUANTIZE

    dtype, quantize = precision.resolve(SERVE_DTYPE, SERVE_QUANTIZE, "cpu")
    return setting_name(f"{dtype}+{quantize}")


def setting_name(setting: str) -> str:
    """The canonical text of a setting: 'float32', 'bfloat16', 'bfloat16+int8', 'int8', ..."""
    dtype, quantize = parse_setting(setting)
    if quantize == "none":
        return dtype
    return quantize if dtype == "float32" else f"{dtype}+{quantize}"


def label(setting: str) -> str:
    """The results key of lorafleet in one setting: "lorafleet float32", "lorafleet bfloat16"."""
    return f"lorafleet {setting_name(setting)}"


def matched_gguf(setting: str) -> str | None:
    """The GGUF type ("f32" / "bf16" / "q8_0") matching `setting`'s bytes; None if none does."""
    return MATCHED.get(parse_setting(setting))


@dataclass(frozen=True)
class Pair:
    """One row of the in-process table: lorafleet in `setting` against llama.cpp on the GGUF
    `gguf` ("f32" / "bf16" / "q8_0" made from the same safetensors, or SHIPPED), with a target
    ratio per workload ("parallel", "single"; absent = reported without a target)."""

    setting: str
    gguf: str
    targets: dict

    @property
    def title(self) -> str:
        return f"{GGUF_TITLES.get(self.gguf, self.gguf)} / {setting_name(self.setting)}"


def matched_pairs(default_setting: str) -> list[Pair]:
    """The issue's pairs: float32 vs F32, bfloat16 vs BF16, bfloat16+int8 vs Q8_0 (targets:
    parallel >= 1x, single >= 0.8x), and lorafleet's default setting vs the shipped Q4_1 (the
    user's pick; target: single >= 0.5x)."""
    matched = {"parallel": TARGETS["matched_parallel"], "single": TARGETS["matched_single"]}
    pairs = [Pair(setting, gguf, matched) for (setting, gguf) in _MATCHED_SETTINGS]
    pairs.append(
        Pair(setting_name(default_setting), SHIPPED, {"single": TARGETS["default_vs_q4_1_single"]})
    )
    return pairs


_MATCHED_SETTINGS = (("float32", "f32"), ("bfloat16", "bf16"), ("bfloat16+int8", "q8_0"))


def base_gguf(base: str) -> Path:
    """The GGUF file llama.cpp runs for `base` as shipped: an embedded model's file or a .gguf."""
    from lorafleet.models import resolve_base
    from lorafleet.models.sources import embedded_gguf_path
    from lorafleet.paths import cache_dir

    source = resolve_base(base)
    if source.kind == "embedded":
        return embedded_gguf_path(source.embedded, cache_dir() / "gguf")
    if source.kind == "gguf":
        return Path(source.location)
    raise LorafleetError(f"--base {base}: the llama.cpp peers need a GGUF base (e.g. default)")


def peer_gguf(peers, base: str, gguf: str) -> Path:
    """The GGUF of `base` that llama.cpp runs for `gguf`: SHIPPED as shipped, else converted by
    llama.cpp's convert_hf_to_gguf.py from lorafleet's safetensors (cached, bench/peer_ggufs)."""
    if gguf == SHIPPED:
        return base_gguf(base)
    from lorafleet.bench.peer_ggufs import base_gguf_for

    return base_gguf_for(peers, base, gguf)


def prompts_for(tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `prompt_tokens` ids cut from real text (gsm8k): each
    run of a table takes fresh ones, so no cache (lorafleet's prefix cache, llama-server's
    slots) serves one run from an earlier one."""
    from lorafleet.bench.engine import gsm8k_prompts

    return gsm8k_prompts(tokenizer, count, prompt_tokens)


def bench_adapters(
    peers, base: str, count: int, rank: int, lora_type: str | None
) -> tuple[list[Path], list[Path]]:
    """The `count` random rank-`rank` bench adapters (engine.random_adapters, fixed seeds) as
    PEFT dirs, and (lora_type "f32" / "bf16") as GGUF LoRAs by llama.cpp's
    convert_lora_to_gguf.py; both made once under build/peers/adapters/ and reused."""
    from lorafleet.adapters import read_adapter, write_adapter
    from lorafleet.bench.engine import random_adapters
    from lorafleet.models import load_base, resolve_base
    from lorafleet.models.cache import converted_dir

    loaded = load_base(base)
    work = peers.root / "adapters" / f"{loaded.fingerprint[:16]}-r{rank}"
    dirs = [work / f"a{i}" for i in range(count)]
    missing = [i for i in range(count) if not (dirs[i] / "adapter_config.json").is_file()]
    if missing:
        print(f"writing {len(missing)} random adapters -> {work}", flush=True)
        made = random_adapters(loaded.model, max(missing) + 1, rank)
        for i in missing:
            made[i].meta["base_fingerprint"] = loaded.fingerprint
            peer_tools.check_convertible(made[i].config, made[i].tensors)
            write_adapter(dirs[i], made[i])
    read_adapter(dirs[0])  # fail here, not in a child, on a damaged cache
    if lora_type is None:
        return dirs, []
    loras = [work / f"a{i}-{lora_type}.gguf" for i in range(count)]
    todo = [i for i in range(count) if not loras[i].is_file()]
    if todo:
        print(f"converting {len(todo)} adapters to {lora_type} GGUF LoRA -> {work}", flush=True)
        peer_tools.convert(
            peers,
            converted_dir(resolve_base(base)),
            [(dirs[i], loras[i]) for i in todo],
            lora_type,
        )
    return dirs, loras
