"""A benchmark's precision setting by name ('bfloat16+int8') as the engine takes it."""

from __future__ import annotations


def parse_setting(text: str) -> tuple[str, str]:
    """'bfloat16', 'int8', 'bfloat16+int4' -> (dtype, quantize) as the engine takes them; a part
    left out is float32 / none; one-line LorafleetError for an unknown part."""
    from lorafleet.layers import check_quantize
    from lorafleet.models import parse_dtype

    dtype, quantize = "float32", "none"
    for part in str(text).lower().split("+"):
        if part in ("int8", "int4", "none"):
            quantize = check_quantize(part)
        else:
            dtype = str(parse_dtype(part)).removeprefix("torch.")
    return dtype, quantize
