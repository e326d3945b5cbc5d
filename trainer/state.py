"""Checkpoint state of a training run and the release-format exports.

A logdir holds ``checkpoint_{step}.pt`` (rank 0: generator, critic, EMA, both optimisers, the step,
the config and the run's identity) plus per-rank ``rank_{step}_{r}.pt`` (RNG states, data position,
the stage-2 rollout with its cache), written atomically and rotated; beside them ``lora.pt`` (LoRA
runs) or ``base.pt`` (full fine-tuning) in the layout the released inference code loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from utils.config import to_container
from utils.distributed import barrier, full_state_dict, load_full_state_dict
from utils.errors import ConfigError, WeightsError

from .plan import TrainPlan

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "memflow-train-1"
# Keys that must match for a logdir's checkpoints to belong to this run (anything else may change on resume).
RUN_IDENTITY_KEYS = ("stage", "model", "model_overrides", "real_name", "fake_name", "seed", "adapter",
                     "num_frame_per_block", "batch_size", "total_batch_size")  # fmt: skip


def _options(**kwargs: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the trainable parameters by name (rank 0; {} elsewhere); a collective."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full_state_dict(model).items() if k in names}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`trainable_state` output (rank 0 holds it; others pass {} when distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != names:
            raise WeightsError(
                f"checkpoint parameters do not match the trainable ones: missing {sorted(names - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - names)[:3]}"
            )
    load_full_state_dict(model, state, strict=False)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state` output; parameters that never had a gradient have no state, as saved."""
    options = _options(broadcast_from_rank0=dist.is_initialized(), strict=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


def lora_export(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors by module name -> peft's saved names (``base_model.model...lora_A.weight``)."""
    return {"base_model.model." + k.replace(".default.", "."): v.to(dtype) for k, v in state.items()}


def base_export(generator: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> dict:
    """The release ``base.pt`` layout: ``{"generator": {"model." + name: tensor}, "generator_ema": ...}``."""
    out = {"generator": {"model." + k: v for k, v in generator.items()}}
    if ema is not None:
        out["generator_ema"] = {"model." + k: ema.get(k, v) for k, v in generator.items()}
    return out


def _identity(cfg: DictConfig) -> dict:
    values = to_container(cfg)
    return {key: values.get(key) for key in RUN_IDENTITY_KEYS}


class TrainState:
    """Checkpoints of one logdir: ``checkpoint_{step}.pt`` (rank 0) plus per-rank ``rank_{step}_{r}.pt``.

    Rank files (RNG states, rollout caches) are written first; the main checkpoint is the commit
    point, written atomically last, so the newest main checkpoint always has complete rank files.
    """

    def __init__(self, plan: TrainPlan):
        self.plan = plan
        self.manager = CheckpointManager(plan.logdir, int(plan.config.max_checkpoints))

    def rank_path(self, step: int, rank: int) -> Path:
        return self.plan.logdir / f"rank_{step:06d}_{rank:03d}.pt"

    def find_resume(self, resume: bool) -> tuple[dict, dict] | None:
        """(main checkpoint, this rank's state) to continue from, or None for a fresh run.

        Refuses a logdir holding another run's checkpoints.
        """
        latest = self.manager.latest()
        if latest is None:
            if resume:
                log.warning("--resume: %s holds no checkpoint; starting from step 0", self.plan.logdir)
            return None
        main = load_checkpoint(latest)
        saved = main.get("identity")
        if saved != _identity(self.plan.config):
            if resume:
                raise ConfigError(
                    f"--resume: {latest} belongs to a different run (saved {saved}); use its config or a new logdir"
                )
            raise ConfigError(
                f"logdir {self.plan.logdir} holds another run's checkpoints ({latest.name}); pass --resume to continue "
                "it with its config, or choose a new --logdir"
            )
        return self._check(latest, main), load_checkpoint(self.rank_path(int(main["step"]), self.plan.rank))

    def save(self, step: int, main: dict, rank_state: dict) -> None:
        """Write this rank's file, then (rank 0) the main checkpoint, then rotate."""
        save_checkpoint(rank_state, self.rank_path(step, self.plan.rank))
        barrier()
        if self.plan.rank == 0:
            self.manager.save({"format": CHECKPOINT_FORMAT, "identity": _identity(self.plan.config), **main}, step)
            kept = {s for s, _ in self.manager.checkpoints()}
            for path in self.plan.logdir.glob("rank_*_*.pt"):
                if int(path.name.split("_")[1]) not in kept:
                    path.unlink(missing_ok=True)
        barrier()

    def _check(self, path: Path, main: dict) -> dict:
        if main.get("format") != CHECKPOINT_FORMAT:
            raise WeightsError(f"{path} is not a MemFlow training checkpoint (format {main.get('format')!r})")
        if main["world_size"] != self.plan.world_size:
            raise ConfigError(
                f"{path} was written by {main['world_size']} processes, this run has {self.plan.world_size}; resume "
                "with the same number of processes"
            )
        log.info("resuming from %s", path)
        return main

    def export(self, name: str, state: dict) -> Path:
        """A release-format file (``lora.pt`` / ``base.pt``) in the logdir, written atomically."""
        return save_checkpoint(state, self.plan.logdir / name)
