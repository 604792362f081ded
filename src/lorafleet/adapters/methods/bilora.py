"""BiLoRA (pseudo-SVD P diag(lambda) Q, bi-level optimisation on two data splits).

Trained by its own trainer kind (train/bilora.py: P and Q on D1, lambda on D2), saved as plain
PEFT LoRA with A = Q, B = P diag(lambda) and alpha = r, so its scale is exactly 1: a saved
BiLoRA adapter reads back (and is served) as LoRA.
"""

from __future__ import annotations

from lorafleet.adapters.methods import lora
from lorafleet.adapters.methods.base import BILEVEL_TRAINER, Method, PeftOptions


def _peft_config(options: PeftOptions):
    return lora.lora_config(options, lora_alpha=float(options.rank))


METHOD = Method(
    name="bilora",
    help="pseudo-SVD P diag(lambda) Q, bi-level on two data splits (see --bilevel)",
    title="BiLoRA",
    peft_type=lora.PEFT_TYPE,
    parts=lora.PARTS,
    peft_config=_peft_config,
    serve=lora.serve_lora,
    delta="s * B @ A",
    trainer=BILEVEL_TRAINER,
    factored=True,
)
