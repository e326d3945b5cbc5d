"""Release-format exports of a training run: ``lora.pt`` as the released inference code loads it."""

import json

import torch
from peft import get_peft_model_state_dict

from memflow.dit import build_dit
from trainer.networks import attach_trainable_lora
from trainer.plan import AdapterSettings
from trainer.state import lora_export, trainable_state


def test_lora_export_matches_the_release_layout(manifests_dir):
    adapter = AdapterSettings(rank=4, alpha=4, dropout=0.0, dtype=torch.bfloat16)
    model = attach_trainable_lora(build_dit("tiny"), adapter, seed=0)
    exported = lora_export(trainable_state(model), adapter.dtype)

    saved = get_peft_model_state_dict(model)
    assert set(exported) == {"base_model.model." + k for k in saved}
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    assert all(torch.equal(exported["base_model.model." + k], v.to(torch.bfloat16)) for k, v in saved.items())
    manifest = json.loads((manifests_dir / "memflow_lora_pt__generator_lora.json").read_text())["tensors"]
    release_block0 = {k for k in manifest if k.startswith("base_model.model.blocks.0.")}
    ours_block0 = {k for k in exported if k.startswith("base_model.model.blocks.0.")}
    assert ours_block0 == release_block0
