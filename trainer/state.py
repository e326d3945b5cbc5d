"""Checkpoints of a training run (sharded, readable by any number of ranks) and the release-format exports.

A checkpoint is a folder ``checkpoint_{step:06d}/`` that every rank writes its part of:

* ``.metadata`` + ``__{rank}_0.distcp`` (torch.distributed.checkpoint): the trainable parameters of the
  generator and critic, both AdamW states and the generator's EMA, each rank writing only the shards it
  holds; any number of ranks reads them back, each taking its own shards.
* ``source_{g:04d}.pt``: the sample source of global micro-batch ``g`` (stage 2: its rollout with the
  KV cache), written by the rank that owns ``g``; a run with other ranks x accumulation steps but the
  same global batch reads the same files.
* ``meta.pt`` (rank 0, last): the step, the run's identity (:mod:`trainer.identity`), its config and
  the data position.

The folder is written under a temporary name and renamed once complete (the commit point), so a
checkpoint is whole or absent; rotation keeps ``max_checkpoints``. No RNG state is saved: every draw is
keyed by (seed, iteration or data draw, global micro-batch) and the global RNGs are reseeded before
each use, so a resumed run repeats the same draws on any number of ranks. Beside the checkpoints,
``lora.pt`` (LoRA runs) or ``base.pt`` (full fine-tuning) in the layout the released inference code
loads. Checkpoints of earlier versions (``checkpoint_{step}.pt`` + ``rank_{step}_{r}.pt``) are read too.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from utils.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from utils.config import to_container
from utils.distributed import barrier, broadcast_object, full_state_dict, load_full_state_dict
from utils.errors import ConfigError, WeightsError

from .ema import EMA
from .identity import FIXED, identity_changes, run_identity
from .plan import TrainPlan

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "memflow-train-2"
LEGACY_FORMAT = "memflow-train-1"
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


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


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a full optimizer state dict held by rank 0 (earlier checkpoints' layout)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
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


class ModelState:
    """A trained model's parameters and optimiser state for torch.distributed.checkpoint, sharded by name.

    Only trainable parameters are saved. After loading, the configured hyperparameters (lr, betas,
    eps, weight decay) replace the saved ones; they differ only when a run resumes with ``--allow_changed``.
    """

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.name, self.model, self.optimizer = name, model, optimizer

    def state_dict(self) -> dict:
        options = StateDictOptions(ignore_frozen_params=True)
        model, optim = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        with self._configured():
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=StateDictOptions(strict=False))  # fmt: skip

    def load_legacy(self, main: dict) -> None:
        """From an earlier single-file checkpoint: full tensors under ``name`` and ``name + "_optimizer"``."""
        with self._configured():
            load_trainable_state(self.model, main[self.name])
            load_optimizer_state(self.model, self.optimizer, main[f"{self.name}_optimizer"])

    @contextlib.contextmanager
    def _configured(self) -> Iterator[None]:
        configured = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in self.optimizer.param_groups]
        yield
        for group, values in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(values)


class EMAState:
    """The EMA's shadow tensors (sharded like the parameters); torch.distributed.checkpoint loads them in place."""

    def __init__(self, name: str, ema: EMA):
        self.name, self.ema = name, ema

    def state_dict(self) -> dict:
        return dict(self.ema.shadow)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if value is not self.ema.shadow[key]:
                self.ema.shadow[key].copy_(value)

    def load_legacy(self, main: dict) -> None:
        self.ema.load_state_dict(main[self.name])


class Source(Protocol):
    """A sample source's checkpoint state: a part all ranks share, and one part per global micro-batch."""

    def state_dict(self) -> dict: ...

    def group_states(self) -> dict[int, dict]: ...

    def load_state_dict(self, shared: dict, groups: Mapping[int, dict]) -> None: ...


@dataclass(frozen=True)
class Saved:
    """A checkpoint found in the logdir: its step and what was read of it (``meta.pt``, or a whole earlier file)."""

    path: Path
    step: int
    data: dict
    legacy: bool


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every call without a process group, which is just a 1-process run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable")
        yield


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def saved_config(logdir: str | Path) -> dict | None:
    """The config of the newest checkpoint in ``logdir`` (any format), or None when it holds none."""
    latest = CheckpointManager(logdir).latest()
    if latest is None:
        return None
    data = load_checkpoint(latest / "meta.pt" if latest.is_dir() else latest)
    return data.get("config") or data["identity"]


class TrainState:
    """Finding, loading and writing the checkpoints of one logdir (see the module docstring)."""

    def __init__(self, plan: TrainPlan):
        self.plan = plan
        self.manager = CheckpointManager(plan.logdir, int(plan.config.max_checkpoints))

    def _groups(self) -> list[int]:
        return [self.plan.group(step) for step in range(self.plan.accumulation)]

    def _identity(self) -> dict:
        plan = self.plan
        prompts = {"data_path": plan.prompts}
        if plan.switch_prompts is not None:
            prompts["switch_prompt_path"] = plan.switch_prompts
        return run_identity(to_container(plan.config), prompts)

    # -- finding ----------------------------------------------------------------------------------------
    def find(self, resume: bool, allow_changed: Sequence[str] = ()) -> Saved | None:
        """The checkpoint to continue from, or None for a fresh run; rank 0 picks it for every rank.

        Refuses (one ConfigError) a logdir whose newest checkpoint belongs to another run, naming every
        identity key that differs and is not in ``allow_changed``.
        """
        latest = broadcast_object(self.manager.latest() if self.plan.rank == 0 else None)
        if latest is None:
            if resume:
                log.warning("--resume: %s holds no checkpoint; starting from step 0", self.plan.logdir)
            return None
        saved, identity, current = self._read(latest)
        changes = identity_changes(identity, current, allow_changed)
        if changes:
            raise self._refusal(latest, changes, resume)
        return saved

    def _read(self, path: Path) -> tuple[Saved, dict, dict]:
        """The checkpoint at ``path`` with its saved identity and this run's, computed the same way."""
        if path.is_dir():
            meta = load_checkpoint(path / "meta.pt")
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise WeightsError(f"{path} is not a MemFlow training checkpoint (format {meta.get('format')!r})")
            return Saved(path, int(meta["step"]), meta, False), meta["identity"], self._identity()
        main = load_checkpoint(path)
        if main.get("format") != LEGACY_FORMAT:
            raise WeightsError(f"{path} is not a MemFlow training checkpoint (format {main.get('format')!r})")
        saved_config = main.get("config") or main["identity"]
        config = to_container(self.plan.config)
        current = run_identity({k: v for k, v in config.items() if k in saved_config})
        return Saved(path, int(main["step"]), main, True), run_identity(saved_config), current

    def _refusal(self, path: Path, changes: list[str], resume: bool) -> ConfigError:
        keys = ",".join(change.split(" ", 1)[0] for change in changes)
        fixed = any(key.split(".", 1)[0] in FIXED for key in keys.split(","))
        allow = "" if fixed else f", --allow_changed {keys} to continue it with these changes on purpose"
        if resume:
            return ConfigError(f"--resume: {path} belongs to a different run: {'; '.join(changes)}; use its "
                               f"config{allow}, or choose a new --logdir")  # fmt: skip
        return ConfigError(
            f"logdir {self.plan.logdir} holds another run's checkpoints ({path.name}: {'; '.join(changes)}); pass "
            f"--resume with its config to continue it{allow}, or choose a new --logdir"
        )

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, saved: Saved, parts: dict[str, Any], source: Source | None = None) -> int:
        """Restore ``parts`` (name -> ModelState / EMAState) and ``source`` from ``saved``; returns its step."""
        log.info("resuming from %s (step %d)", saved.path, saved.step)
        if saved.legacy:
            self._load_legacy(saved, parts, source)
            return saved.step
        with _single_process_quiet():
            dcp.load(parts, checkpoint_id=saved.path)
        if source is not None:
            per_group = any(saved.path.glob("source_*.pt"))  # stage 1 keeps nothing per micro-batch
            groups = {g: load_checkpoint(saved.path / f"source_{g:04d}.pt") for g in self._groups() if per_group}
            source.load_state_dict(saved.data["source"], groups)
        return saved.step

    def _load_legacy(self, saved: Saved, parts: dict[str, Any], source: Source | None) -> None:
        """Earlier checkpoints: full tensors in one file; per-rank files of ``world_size`` ranks, where rank r's
        accumulation step s held global micro-batch ``s * world_size + r``."""
        for part in parts.values():
            part.load_legacy(saved.data)
        if source is None:
            return
        world, step = int(saved.data["world_size"]), saved.step
        files: dict[int, dict] = {}
        groups = {}
        for g in self._groups():
            rank = g % world
            if rank not in files:
                files[rank] = load_checkpoint(self.plan.logdir / f"rank_{step:06d}_{rank:03d}.pt")["source"]
            if "rollouts" in files[rank]:
                groups[g] = files[rank]["rollouts"][g // world]
        shared = {k: v for k, v in next(iter(files.values())).items() if k != "rollouts"}
        source.load_state_dict(shared, groups)

    # -- writing ----------------------------------------------------------------------------------------
    def save(self, step: int, parts: dict[str, Any], source: Source | None = None) -> Path:
        """Write the checkpoint of ``step`` from every rank, commit it (rank 0) and rotate; a collective."""
        plan, start = self.plan, time.perf_counter()
        tmp = self.manager.temporary(step)
        if plan.rank == 0:
            self.manager.begin(step)
        barrier()
        with _single_process_quiet():
            dcp.save(parts, checkpoint_id=tmp)
        shared = {}
        if source is not None:
            for group, state in source.group_states().items():
                save_checkpoint(state, tmp / f"source_{group:04d}.pt")
            shared = source.state_dict()
        barrier()
        if plan.rank == 0:
            meta = {"format": CHECKPOINT_FORMAT, "step": step, "stage": plan.stage, "world_size": plan.world_size,
                    "groups": plan.groups, "identity": self._identity(), "config": to_container(plan.config),
                    "source": shared}  # fmt: skip
            save_checkpoint(meta, tmp / "meta.pt")
            size = _folder_size(tmp)
            path = self.manager.commit(step)
            log.info("wrote %s: %.2f MB in %.2f s", path.name, size / 1e6, time.perf_counter() - start)
        barrier()
        return self.manager.path(step)

    def export(self, name: str, state: dict) -> Path:
        """A release-format file (``lora.pt`` / ``base.pt``) in the logdir, written atomically."""
        return save_checkpoint(state, self.plan.logdir / name)
