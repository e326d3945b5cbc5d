"""Process-group setup from torchrun's environment, collectives that are no-ops alone, and full state dicts.

A model sharded with FSDP2 holds DTensors of its local shard; :func:`full_state_dict` gathers them
(rank 0 gets the tensors, the others ``{}``) and :func:`load_full_state_dict` broadcasts them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor
from transformers.utils import logging as transformers_logging

from utils.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def init_distributed() -> DistributedEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), once.

    nccl on CUDA (each process on its LOCAL_RANK device), gloo on CPU. Without those variables
    this is a single process and no process group is created.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedEnv(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
        logger.info("joined process group: rank %d of %d on %s", rank, world_size, device)
    return DistributedEnv(rank, world_size, local_rank, device)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group for the block: torchrun's, or else one of this process alone, destroyed afterwards.

    A single process then runs the same FSDP code as W ranks (sharding, gradient reduction, checkpoint
    collectives), so its numbers match theirs and its checkpoints are the same sharded kind.
    """
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def setup_logging(env: DistributedEnv) -> None:
    """INFO logs on the main rank, warnings elsewhere, rank-prefixed when there are several processes."""
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"{prefix}%(levelname)s %(name)s: %(message)s")  # fmt: skip
    transformers_logging.disable_progress_bar()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value`` (``value`` itself when alone): e.g. whether any rank saw a signal."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself when alone), so all ranks act on one decision."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same count on each), in rank order; exact float64 values."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name on rank 0 ({} on other ranks); a collective if sharded."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a full state dict held by rank 0 (others pass {}) into a possibly sharded model; ``strict=False``
    loads a subset (e.g. the trainable parameters)."""
    if not _is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, state, options=options)
