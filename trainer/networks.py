"""The networks of a training run: the generator, the frozen teacher (real score) and the critic (fake score).

Each is loaded through :mod:`memflow.loading` (or built with seeded random weights), given fresh LoRA
adapters when an ``adapter`` is configured (else trained in full), gradient checkpointing, and sharded
with PyTorch's FSDP2 (``fully_shard``: gloo on the CPU, nccl on CUDA; hybrid sharding through a 2-D
device mesh, sharded inside a node and replicated across nodes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from memflow.dit import Block, WanDiT, build_dit
from memflow.loading import load_generator, load_text_encoder, materialize
from memflow.text import TextEncoder
from memflow.weights import load_dit, lora_config
from utils.errors import ConfigError

from .plan import AdapterSettings, TrainPlan
from .rollout import Purpose, derive_seed

SHARDING_MODES = ("full", "hybrid")

log = logging.getLogger(__name__)


@dataclass
class Networks:
    """The models of a run: ``generator`` / ``critic`` are the (LoRA-injected, maybe sharded) DiTs."""

    generator: WanDiT
    teacher: WanDiT | None
    critic: WanDiT | None
    lora: bool


def load_trained_generator(plan: TrainPlan) -> WanDiT:
    """The generator to train: ``generator_ckpt`` (base.pt or a DiT), else the ``weights_dir`` DiT, else the
    seeded random DiT that tiny inference builds for the same preset and seed (so exports match it)."""
    cfg = plan.config
    return load_generator(cfg.model, dict(cfg.model_overrides), checkpoint=cfg.generator_ckpt,
                          weights_dir=cfg.weights_dir, device=plan.device, dtype=torch.float32,
                          seed=plan.seed)  # fmt: skip


def load_score_model(plan: TrainPlan, role: str) -> WanDiT:
    """The teacher (``real``) or critic (``fake``) DiT from its weights, else random (seed + 2 / + 1).

    The frozen teacher is held in bf16 under mixed precision (it needs no float32 master copy).
    """
    cfg = plan.config
    preset = plan.presets[role]
    path = cfg[f"{role}_weights_dir"]
    overrides = dict(cfg.model_overrides)
    dtype = torch.bfloat16 if role == "real" and plan.mixed_precision else torch.float32
    if path is None:
        log.warning("%s_weights_dir is null: the %s score starts from random weights", role, role)
        return materialize(lambda: build_dit(preset, **overrides), plan.device, dtype,
                           plan.seed + (1 if role == "fake" else 2))  # fmt: skip
    return load_dit(Path(path), preset, dtype=dtype, device=plan.device, **overrides)


def attach_trainable_lora(model: WanDiT, adapter: AdapterSettings, seed: int) -> WanDiT:
    """Inject fresh LoRA adapters (peft's default init: B = 0, so the model is unchanged) and freeze the base.

    peft draws A from the global RNG, which is seeded here so every run starts from the same adapters.
    Returns the same DiT object, now holding the LoRA layers in its blocks.
    """
    torch.manual_seed(seed)
    config = lora_config(model, adapter.rank, adapter.alpha, adapter.dropout)
    return get_peft_model(model, config).get_base_model()


def prepare_trainable(model: WanDiT, plan: TrainPlan, role: int, *, checkpointing: bool) -> WanDiT:
    """LoRA (or full fine-tuning), gradient checkpointing and FSDP sharding of a trained DiT."""
    model.requires_grad_(True)
    if plan.adapter is not None:
        model = attach_trainable_lora(model, plan.adapter, derive_seed(plan.seed, Purpose.LORA_INIT, role))
    model.gradient_checkpointing = checkpointing
    return shard(model.train(), plan)


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
    """Shard a Wan DiT in place with FSDP2: every block, then the root.

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



def shard(model: WanDiT, plan: TrainPlan) -> WanDiT:
    """FSDP per block (gloo on CPU); the root's ``text_kv`` becomes an FSDP forward method."""
    sharded = shard_model(model, mixed_precision=plan.mixed_precision, sharding=plan.sharding,
                          cpu=plan.device.type == "cpu")  # fmt: skip
    if dist.is_initialized():
        register_fsdp_forward_method(sharded, "text_kv")
    return sharded


def build_networks(plan: TrainPlan, *, with_scores: bool = True) -> Networks:
    """Generator (+ frozen teacher and trainable critic when ``with_scores``), ready to train.

    Gradient checkpointing covers the generator's rollouts too: a recomputed block attends to a
    snapshot of the streaming cache taken at forward time (``StreamingContext.checkpoint_view``).
    """
    checkpointing = bool(plan.config.gradient_checkpointing)
    generator = prepare_trainable(load_trained_generator(plan), plan, 0, checkpointing=checkpointing)
    if not with_scores:
        return Networks(generator, None, None, plan.adapter is not None)
    teacher = shard(load_score_model(plan, "real").eval().requires_grad_(False), plan)
    critic = prepare_trainable(load_score_model(plan, "fake"), plan, 1, checkpointing=checkpointing)
    return Networks(generator, teacher, critic, plan.adapter is not None)


def build_text_encoder(plan: TrainPlan) -> TextEncoder:
    """The configured encoder on the training device (UMT5 in bf16: it is frozen)."""
    cfg = plan.config
    return load_text_encoder(cfg.text_encoder, cfg.weights_dir, text_len=plan.dit.text_len,
                             text_dim=plan.dit.text_dim, device=plan.device, dtype=torch.bfloat16)  # fmt: skip


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model: nn.Module, lr: float, beta1: float, beta2: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


def autocast(plan: TrainPlan) -> contextlib.AbstractContextManager:
    """bf16 autocast with ``mixed_precision`` (master weights stay float32), on CUDA or the CPU, else nothing."""
    if not plan.mixed_precision:
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=torch.bfloat16)
