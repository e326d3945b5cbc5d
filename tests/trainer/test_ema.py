import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from memflow.dit import build_dit
from trainer.ema import EMA
from utils.errors import ConfigError


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_shadow_follows_params_before_start_then_decays():
    model = nn.Linear(3, 2)
    _set(model, 1.0)
    ema = EMA(model, decay=0.9, start_step=2)
    _set(model, 5.0)
    ema.update(0)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 5.0))
    _set(model, 3.0)
    ema.update(1)  # still before start_step: an exact copy
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 3.0))
    _set(model, 13.0)
    ema.update(2)  # 0.9 * 3 + 0.1 * 13
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 4.0))
    ema.update(3)  # 0.9 * 4 + 0.1 * 13
    assert torch.allclose(ema.shadow["bias"], torch.full((2,), 4.9))


def test_only_trainable_lora_params_are_tracked_and_copied_back():
    torch.manual_seed(0)
    model = get_peft_model(build_dit("tiny"), LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(model, decay=0.5, start_step=0)
    assert set(ema.shadow) == trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trainable:
                p.add_(2.0)
    ema.update(0)
    ema.copy_to(model)
    for n, p in model.named_parameters():
        expected = before[n] + 1.0 if n in trainable else before[n]
        assert torch.allclose(p, expected), n


def test_state_dict_round_trip_and_validation():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, start_step=0)
    state = {k: v + 1.0 for k, v in ema.state_dict().items()}
    ema.load_state_dict(state)
    assert torch.equal(ema.state_dict()["weight"], state["weight"])
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"weight": state["weight"]})
    with pytest.raises(ConfigError, match="ema_weight"):
        EMA(model, decay=1.0)
