"""`lorafleet serve`'s default precision, `auto`: the setting `lorafleet bench quality`'s rule
picks for this machine's kind of CPU (light: no torch, no server).

The rule (bench/quality_stats.py DEFAULT_RULE, written before measuring) keeps the settings
whose KL divergence is no worse than llama.cpp Q8_0's and whose task accuracy is not
significantly lower than float32's, then takes the fastest by `bench precision`'s speeds. The
KL half does not depend on the machine; the speed half does, on whether the CPU multiplies
bfloat16 natively (oneDNN's AVX512-BF16 / AMX kernels). PICKS holds the rule's verdict for each
kind of CPU, over every setting (`auto`) and over one dtype's settings (when --dtype is given
and --quantize is left `auto`), from the committed figures: bench/results/quality.json with
SPEEDS[kind]'s speeds. tests/serve/api/test_auto_precision.py applies the rule to those files again
and asserts that it still picks PICKS.

A GPU is not a kind the rule measured (int8 / int4 are CPU kernels): `auto` there is exact
float32, an explicit --dtype stays, and quantisation is off.
"""

from __future__ import annotations

from lorafleet import cpu

AUTO = "auto"
NATIVE_BFLOAT16 = "native bfloat16"
NO_NATIVE_BFLOAT16 = "no native bfloat16"
# kind of CPU -> {"auto" | dtype: (dtype, quantize)}: the rule's pick over those settings.
PICKS = {
    NATIVE_BFLOAT16: {
        AUTO: ("bfloat16", "none"),
        "float32": ("float32", "int4"),
        "bfloat16": ("bfloat16", "none"),
    },
    NO_NATIVE_BFLOAT16: {
        AUTO: ("float32", "int4"),
        "float32": ("float32", "int4"),
        "bfloat16": ("bfloat16", "none"),
    },
}
# The speeds each kind's picks were made with (bench/results/, `lorafleet bench precision`).
SPEEDS = {NATIVE_BFLOAT16: "precision.json", NO_NATIVE_BFLOAT16: "precision_avx2.json"}
GPU_AUTO_DTYPE = "float32"
HELP = (
    "auto (default) = the setting `lorafleet bench quality`'s rule picks for this CPU: "
    "bfloat16 where the CPU has native bfloat16 (AVX512-BF16 or AMX), else float32 + int4 "
    "(--quantize auto); exact float32 on a GPU"
)


def cpu_kind(flags: str | None = None) -> str:
    """NATIVE_BFLOAT16 or NO_NATIVE_BFLOAT16 for this CPU (or the given /proc/cpuinfo flags)."""
    return NATIVE_BFLOAT16 if cpu.native_bfloat16(flags) else NO_NATIVE_BFLOAT16


def resolve(
    dtype: str, quantize: str, device_type: str = "cpu", flags: str | None = None
) -> tuple[str, str]:
    """The (dtype, quantize) to run: each `auto` filled in by the rule's pick for this CPU
    (PICKS) or the GPU's; a value that is not `auto` is kept as given (checked later, where it
    is used). `device_type`: "cpu" or "cuda" (the resolved device)."""
    if device_type != "cpu":
        return (
            GPU_AUTO_DTYPE if dtype == AUTO else dtype,
            "none" if quantize == AUTO else quantize,
        )
    picks = PICKS[cpu_kind(flags)]
    # An unknown dtype is kept (load_base names it in its error); its quantize does not matter.
    picked_dtype, picked_quantize = (
        picks[AUTO] if dtype == AUTO else picks.get(dtype, (dtype, "none"))
    )
    return picked_dtype, picked_quantize if quantize == AUTO else quantize


def describe(dtype: str, quantize: str, device_type: str = "cpu") -> str:
    """One line for the startup message: the resolved setting and why, e.g.
    'bfloat16 (auto: the quality rule's pick on a native bfloat16 CPU)'."""
    got_dtype, got_quantize = resolve(dtype, quantize, device_type)
    name = got_dtype if got_quantize == "none" else f"{got_dtype} + {got_quantize}"
    if AUTO not in (dtype, quantize):
        return name
    where = "GPU" if device_type != "cpu" else f"{cpu_kind()} CPU"
    return f"{name} (auto: the quality rule's pick on a {where})"
