"""Rebuild a `lorafleet train` adapter's initial LoRA weights by replaying the trainer's setup."""

# Usage: python bench/laplace_prior_replay_init.py ADAPTER [OUT.safetensors]
# PEFT draws lora_A from the global torch RNG when the adapter is created. `lorafleet train`
# seeds that RNG (train_config.json's seed) before loading the base, building the data and
# creating the adapter, so replaying the same setup with the same config and code draws the same
# A. Writes ADAPTER/lora_init.safetensors (or OUT) and prints how far the trained A lies from the
# replayed init, relative to its norm: about 1.4 (sqrt 2) means the replay drew another init.
import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorafleet.train.builders import build_model
from lorafleet.train.config import TrainConfig
from lorafleet.train.loop import Trainer

adapter = Path(sys.argv[1])
out = Path(sys.argv[2]) if len(sys.argv) > 2 else adapter / "lora_init.safetensors"
cfg_dict = json.loads((adapter / "train_config.json").read_text())
cfg_dict["out"] = "/tmp/replay-unused"
cfg_dict["val_metrics"] = tuple(cfg_dict["val_metrics"]) if cfg_dict.get("val_metrics") else None
init = {}


def builder(base_model, cfg):
    model = build_model(base_model, cfg)
    init.update(
        {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    )
    return model


Trainer(TrainConfig(**cfg_dict), model_builder=builder).setup()
trained = load_file(str(adapter / "adapter_model.safetensors"))
a_keys = [k for k in trained if "lora_A" in k]
moved = sum(float((trained[k] - init[k]).pow(2).sum()) for k in a_keys)
norm = sum(float(trained[k].pow(2).sum()) for k in a_keys)
print(f"||A - A_replayed|| / ||A|| = {(moved / norm) ** 0.5:.4f}")
if (adapter / "lora_init.safetensors").exists() and out != adapter / "lora_init.safetensors":
    rec = load_file(str(adapter / "lora_init.safetensors"))
    same = all(torch.equal(rec[k], init[k]) for k in rec)
    print("identical to the recorded init:", same)
save_file(init, str(out))
