"""The teacher: the source base + source adapter gives the output for every kept input.

Choice tasks: its answer among the task's labels (highest log-likelihood, as `lorafleet eval`
scores them). Generation tasks: its greedy reply, decoded in the engine's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from lorafleet.adapters import load_adapter, read_adapter
from lorafleet.eval.scoring import choice_logprobs
from lorafleet.models import Base
from lorafleet.serve import Engine, SamplingParams
from lorafleet.transfer.synth import engine_generate, seq_len
from lorafleet.transfer.task import TaskFormat


def label_inputs(
    base: Base,
    adapter_dir: Path,
    task: TaskFormat,
    chat: bool,
    template: dict,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[dict]:
    """[{"input", "output"[, "label"]}] for every text (`template`: a seed row for the task's
    other fields). The base model is changed in place (an adapter is attached)."""
    tok = base.tokenizer
    examples = [task.example(tok, chat, t, template) for t in texts]
    if not examples:
        return []
    if examples[0].choices:
        _, model = load_adapter(adapter_dir, base.model, base_fingerprint=base.fingerprint)
        with tqdm(total=sum(len(e.choices) for e in examples), desc="teacher (choices)") as bar:
            scores = choice_logprobs(
                model, tok, examples, batch_size=batch_size, progress=bar.update
            )
        picks = scores.argmax(dim=1).tolist()
        return [
            {"input": t, "label": k, "output": e.choices[k].strip()}
            for t, e, k in zip(texts, examples, picks, strict=True)
        ]
    adapter = read_adapter(adapter_dir)
    longest = max(len(tok(e.prompt)["input_ids"]) for e in examples) + 1
    engine = Engine(
        base,
        max_slots=1,
        max_rank=max(1, adapter.rank),
        max_batch_size=batch_size,
        max_seq_len=seq_len(base, longest + max_new_tokens + 8),
        max_batch_tokens=max(2048, 2 * longest),
        seed=0,
    )
    try:
        engine.load_adapter("source", adapter)
        params = [SamplingParams(max_tokens=max_new_tokens)] * len(examples)
        with tqdm(total=len(examples), desc="teacher (greedy)") as bar:
            outputs = engine_generate(
                engine,
                [e.prompt for e in examples],
                params,
                "source",
                on_done=lambda n, _e: bar.update(n),
            )
    finally:
        engine.close()
    return [{"input": t, "output": o.strip()} for t, o in zip(texts, outputs, strict=True)]
