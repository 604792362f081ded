"""Fine-tune a small-data LoRA for the Laplace prior experiment, recording its initial weights."""

# Usage: python bench/laplace_prior_train.py OUT TASK ROWS EPOCHS [SEED]
# Same recipe as `lorafleet train` (the Trainer), plus lora_init.safetensors: the adapter's
# weights right after PEFT initialised them (A kaiming-uniform from the torch RNG, B zero), so
# `calibrate --prior centred` can centre the prior there.
import sys
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from lorafleet.train.builders import build_model
from lorafleet.train.config import TrainConfig
from lorafleet.train.loop import Trainer

out, task, rows, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
init = {}


def builder(base_model, cfg):
    model = build_model(base_model, cfg)
    state = get_peft_model_state_dict(model)
    init.update({k: v.detach().clone().contiguous() for k, v in state.items()})
    return model


cfg = TrainConfig(
    base="default",
    data=task,
    out=out,
    rank=8,
    alpha=16,
    targets=["q_proj", "v_proj"],
    epochs=epochs,
    lr=1e-3,
    batch_size=8,
    max_length=128,
    train_limit=rows,
    eval_limit=20,
    save_every=10_000,
    seed=seed,
)
print(Trainer(cfg, model_builder=builder).run())
save_file(init, str(out / "lora_init.safetensors"))
print("init saved", len(init))
