"""Exponential moving average of the trainable parameters (the release: 0.99 from step 200).

Only parameters with ``requires_grad`` are tracked, so LoRA-only training averages just the
adapters. Under FSDP the parameters are sharded DTensors: the average is kept and updated shard
by shard on each rank, and gathered to full tensors only for ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from utils.errors import ConfigError


class EMA:
    """shadow = decay * shadow + (1 - decay) * param from ``start_step`` on.

    Before ``start_step`` the shadow follows the parameters exactly, which is the release's
    behaviour of creating the average at ``start_step``. The shadow is kept in float32. Build
    it after ``shard_model`` / ``get_peft_model``: it holds the parameters it was built from.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, start_step: int = 200):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema_weight={decay}: the EMA decay must lie in [0, 1) (the release uses 0.99)")
        if start_step < 0:
            raise ConfigError(f"ema_start_step={start_step}: must be >= 0 (the release uses 200)")
        self.decay = decay
        self.start_step = start_step
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError("the model has no trainable parameters to average")
        self._params = {name: p for name, p in model.named_parameters() if name in self.shadow}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current parameters after optimizer step ``step``."""
        weight = 1.0 if step < self.start_step else 1.0 - self.decay
        for name, shadow in self.shadow.items():
            shadow.lerp_(self._params[name].detach().float(), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into the same-named parameters of ``model``."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"model lacks averaged parameters {missing[:3]}")
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors by parameter name (a collective when the parameters are sharded)."""
        return {
            name: (s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu() for name, s in self.shadow.items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict`` output, re-sharding like the live parameters."""
        if set(state) != set(self.shadow):
            raise ValueError(
                f"EMA state does not match the trainable parameters: missing "
                f"{sorted(set(self.shadow) - set(state))[:3]}, unexpected {sorted(set(state) - set(self.shadow))[:3]}"
            )
        for name, shadow in self.shadow.items():
            full = state[name].float()
            if isinstance(shadow, DTensor):
                full = distribute_tensor(full.to(shadow.device), shadow.device_mesh, shadow.placements)
            shadow.copy_(full)
