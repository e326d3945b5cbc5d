"""Process-group setup from torchrun's environment and FSDP sharding of Wan DiTs.

Sharding uses PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): it runs on CPU with
gloo as well as on CUDA with nccl, takes a ``MixedPrecisionPolicy`` and does hybrid sharding
(shard inside a node, replicate across nodes) through a 2-D device mesh. Parameters become
DTensors holding the local shard; ``full_state_dict`` gathers them for checkpoints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers.utils import logging as transformers_logging

from memflow.dit import Block
from memflow.errors import ConfigError

SHARDING_MODES = ("full", "hybrid")

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


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; the input itself when alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def _mesh(sharding: str, device_type: str, shard_group_size: int | None) -> DeviceMesh:
    world = dist.get_world_size()
    if sharding == "full":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if shard_group_size is None:
        shard_group_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shard_group_size < 1 or world % shard_group_size:
        raise ConfigError(
            f"shard_group_size={shard_group_size} must divide the world size {world} for hybrid sharding "
            "(use the number of GPUs per node)"
        )
    return init_device_mesh(
        device_type, (world // shard_group_size, shard_group_size), mesh_dim_names=("replicate", "shard")
    )


def shard_model(
    model: nn.Module,
    *,
    mixed_precision: bool,
    sharding: str = "full",
    cpu: bool = False,
    shard_group_size: int | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: every ``memflow.dit.Block``, then the root.

    ``sharding="hybrid"`` shards within groups of ``shard_group_size`` ranks (default: the
    node, LOCAL_WORLD_SIZE) and replicates across groups. ``mixed_precision`` computes in
    bf16 and reduces gradients in bf16 on CUDA while the sharded master weights stay float32;
    on CPU everything stays float32. Each block's cross-attention is its own unit with
    ``text_kv`` registered as a forward method, because the DiT builds the text cache outside
    the blocks' forward. Without a process group the model is returned unchanged.
    """
    if sharding not in SHARDING_MODES:
        raise ConfigError(f"sharding={sharding!r}: choose one of {', '.join(SHARDING_MODES)}")
    if not dist.is_initialized():
        return model
    mesh = _mesh(sharding, "cpu" if cpu else "cuda", shard_group_size)
    if mixed_precision and not cpu:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    else:
        policy = MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} contains no memflow.dit.Block to shard")
    for block in blocks:
        fully_shard(block.cross_attn, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(block.cross_attn, "text_kv")
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name on rank 0 ({} on other ranks); a collective if sharded."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict held by rank 0 (others pass {}) into a possibly sharded model."""
    if not _is_sharded(model):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
