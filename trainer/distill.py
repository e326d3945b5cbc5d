"""The DMD distillation loop of stages 1 and 2 (Self-Forcing init and streaming long tuning).

Pieces, each small and reused by the ODE-initialisation loop (``trainer.ode_train``):

* :func:`plan_training` validates the whole config before anything is loaded: stage, streaming
  settings, frame counts, batch arithmetic, prompt files, model layouts, weight files, adapter.
* :class:`PromptData` deals prompts to (iteration draw, global micro-batch) slots deterministically.
* :func:`build_networks` loads the generator, the frozen teacher (real score) and the critic (fake
  score), attaches LoRA when an ``adapter`` is configured and shards them with FSDP.
* :class:`TrainState` reads/writes full checkpoints (atomic, rotated, per-rank files for rank state)
  and the release exports (``lora.pt`` / ``base.pt``).
* :class:`DistillTrainer` runs the iterations: critic every step, generator every
  ``dfake_gen_update_ratio`` steps, gradient accumulation to ``total_batch_size``, EMA, logging.

Reproducibility: all randomness is keyed by (seed, iteration or data draw, global micro-batch),
where global micro-batch ``g = accumulation_step * world_size + rank``. A run of ``W`` ranks with
``A`` accumulation steps therefore sees the same samples, noise and score timesteps as one of
``W * A`` micro-batches on fewer ranks, and a resumed run continues with exactly the same draws.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import register_fsdp_forward_method

from memflow.config import PRESETS, DiTConfig, StreamConfig, dit_config, run_dit_config
from memflow.dit import WanDiT, build_dit
from memflow.errors import ConfigError, WeightsError
from memflow.scheduler import FlowMatchScheduler
from memflow.text import TextEncoder
from memflow.vae import VAE_PRESETS, WanVAE
from memflow.weights import (
    compare_layout,
    dit_weights_file,
    load_dit,
    lora_target_modules,
    module_layout,
    safetensors_header,
    shard_files,
    to_original_dit,
)
from pipeline.inference import (
    DTYPES,
    TEXT_ENCODERS,
    Components,
    RunPlan,
    VideoJob,
    VideoRunner,
    load_text_encoder,
    load_vae,
    materialize,
    resolve_device,
    stream_config,
    vae_spatial_stride,
)
from pipeline.prompts import PromptSchedule, PromptSegment
from pipeline.streaming import StreamingGenerator
from utils.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from utils.config import (
    get_field,
    require_bool,
    require_choice,
    require_existing_path,
    require_int,
    require_int_list,
    require_multiple_of,
    require_number,
    require_positive_int,
    to_container,
)
from utils.distributed import all_reduce_mean, barrier, shard_model

from .dmd import SCORE_CONTEXTS, DMDObjective, ScoreTimestepSampler
from .ema import EMA
from .ode_init import record_indices
from .rollout import (
    ChunkNoise,
    RolloutResult,
    StreamingRollout,
    StreamingSettings,
    derive_seed,
    self_forcing_rollout,
    shared_randint,
)

log = logging.getLogger(__name__)

STAGES = ("ode_init", "init", "long")
SHARDING = {"full": "full", "hybrid": "hybrid", "hybrid_full": "hybrid"}
CHECKPOINT_FORMAT = "memflow-train-1"
# Keys that must match for a logdir's checkpoints to belong to this run (anything else may change on resume).
RUN_IDENTITY_KEYS = ("stage", "model", "model_overrides", "real_name", "fake_name", "seed", "adapter",
                     "num_frame_per_block", "batch_size", "total_batch_size")  # fmt: skip
# Purposes of keyed draws (the second key of derive_seed / shared_randint).
_EXIT, _NEW_FRAMES, _SWITCH, _GEN_LOSS, _CRITIC_LOSS, _NOISE, _DATA, _VIS, _LORA_INIT = range(9)


# ====================================================================================================
# Config -> plan


@dataclass(frozen=True)
class AdapterSettings:
    """LoRA on every linear layer of the blocks; ``dtype`` is the dtype of the exported ``lora.pt``."""

    rank: int
    alpha: float
    dropout: float
    dtype: torch.dtype


@dataclass(frozen=True)
class TrainPlan:
    """A validated training run: every number the loop needs, derived from the config."""

    config: DictConfig
    stage: str
    stream: StreamConfig
    dit: DiTConfig
    presets: dict[str, str]
    height: int
    width: int
    latent_height: int
    latent_width: int
    num_frames: int
    batch_size: int
    accumulation: int
    rank: int
    world_size: int
    adapter: AdapterSettings | None
    streaming: StreamingSettings | None
    prompts: list[str]
    switch_prompts: list[str] | None
    device: torch.device
    mixed_precision: bool
    sharding: str
    logdir: Path

    @property
    def seed(self) -> int:
        return int(self.config.seed)

    def group(self, accumulation_step: int) -> int:
        """Global index of this rank's micro-batch at ``accumulation_step``."""
        return accumulation_step * self.world_size + self.rank

    @property
    def groups(self) -> int:
        """Micro-batches per optimiser step over all ranks."""
        return self.accumulation * self.world_size

    def latent_shape(self, frames: int) -> tuple[int, int, int, int]:
        return frames, self.dit.in_dim, self.latent_height, self.latent_width


def preset_name(cfg: DictConfig, key: str) -> str:
    """A model name (``Wan2.1-T2V-14B``, ``wan2.1-t2v-1.3b``, ``tiny``) as a DiT preset."""
    name = get_field(cfg, key)
    preset = str(name).lower()
    if preset not in PRESETS:
        raise ConfigError(f"{key}={name!r} is not a known model; use one of {sorted(PRESETS)} (any letter case)")
    return preset


def read_prompt_lines(cfg: DictConfig, key: str) -> list[str]:
    """Non-blank lines of the prompt file named by ``key`` (one prompt per line)."""
    path = require_existing_path(cfg, key)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read {path} ({err})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts; write one prompt per line")
    return prompts


def _adapter(cfg: DictConfig) -> AdapterSettings | None:
    if get_field(cfg, "adapter") is None:
        return None
    require_choice(cfg, "adapter.type", ["lora"])
    return AdapterSettings(
        rank=require_positive_int(cfg, "adapter.rank"),
        alpha=require_number(cfg, "adapter.alpha", minimum=0.0),
        dropout=require_number(cfg, "adapter.dropout", minimum=0.0, maximum=1.0),
        dtype=DTYPES[require_choice(cfg, "adapter.dtype", list(DTYPES))],
    )


def _dit_layouts(cfg: DictConfig, overrides: dict, roles: Sequence[str]) -> tuple[DiTConfig, dict[str, str]]:
    """Generator layout and the presets of ``roles`` (``real``, ``fake``), checked to share latents and text."""
    model = require_choice(cfg, "model", sorted(PRESETS))
    dit = run_dit_config(model, overrides)
    presets = {role: preset_name(cfg, f"{role}_name") for role in roles}
    for role, preset in presets.items():
        key = f"{role}_name"
        other = dit_config(preset, **overrides)
        fields = ("in_dim", "out_dim", "text_dim", "text_len", "patch_size")
        diff = [f"{f}: {getattr(other, f)} vs {getattr(dit, f)}" for f in fields
                if getattr(other, f) != getattr(dit, f)]  # fmt: skip
        if diff:
            raise ConfigError(
                f"{key}={cfg[key]} does not match the generator's layout ({'; '.join(diff)}); the teacher and "
                "critic must take the generator's latents and text embeddings"
            )
    return dit, presets


def check_dit_weights(path: Path, preset: str, overrides: dict, key: str) -> None:
    """Names and shapes of a safetensors DiT (file, Wan folder or Diffusers folder) against ``preset``.

    Reads headers only, so a teacher of the wrong size fails in seconds, before any tensor is read;
    ``.pt`` checkpoints (``base.pt``) are checked exactly when loaded.
    """
    if not path.exists():
        raise WeightsError(f"{key}: {path} does not exist; download the weights or fix the path")
    file = dit_weights_file(path, preset)
    if file.name.endswith(".index.json"):
        header = {}
        for shard in shard_files(file):
            header.update(safetensors_header(shard))
    elif file.suffix == ".safetensors":
        header = safetensors_header(file)
    else:
        return
    with torch.device("meta"):
        expected = module_layout(build_dit(preset, **overrides))
    report = compare_layout(to_original_dit({k: shape for k, (shape, _) in header.items()}), expected)
    if not report.ok:
        raise WeightsError(f"{key}: {file} does not hold a {preset} DiT: {report.summary()}")


def _weights_paths(cfg: DictConfig, presets: dict[str, str], overrides: dict) -> None:
    """Every configured weight file exists and has the layout of its model (headers only)."""
    models = {"generator_ckpt": cfg.model, **{f"{role}_weights_dir": p for role, p in presets.items()}}
    for key in (*models, "weights_dir"):
        value = get_field(cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{key} must be a path or null, got {value!r}")
    for key, preset in models.items():
        if cfg[key] is not None:
            check_dit_weights(Path(cfg[key]), preset, overrides, key)
    if cfg.text_encoder == "umt5-xxl" and cfg.weights_dir is None:
        raise ConfigError("text_encoder=umt5-xxl loads from weights_dir, which is null; set weights_dir")
    if cfg.weights_dir is not None and not Path(cfg.weights_dir).is_dir():
        raise WeightsError(f"weights_dir: {cfg.weights_dir} is not a folder; download Wan2.1-T2V-1.3B there")


def _batch_arithmetic(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    batch = require_positive_int(cfg, "batch_size")
    total = require_positive_int(cfg, "total_batch_size")
    per_step = batch * world_size
    if total % per_step:
        raise ConfigError(
            f"total_batch_size={total} is not a multiple of batch_size x world size = {batch} x {world_size} = "
            f"{per_step}; set total_batch_size to a multiple of {per_step}"
        )
    return batch, total // per_step


def _geometry(cfg: DictConfig, dit: DiTConfig, batch: int, frames: int) -> tuple[int, int, int, int]:
    stride = vae_spatial_stride(require_choice(cfg, "vae", sorted(VAE_PRESETS)))
    _, ph, pw = dit.patch_size
    why = f"the VAE downsamples {stride}x and the DiT patches {{}} latents"
    height = require_multiple_of(cfg, "height", stride * ph, why.format(ph))
    width = require_multiple_of(cfg, "width", stride * pw, why.format(pw))
    shape = require_int_list(cfg, "image_or_video_shape")
    expected = [batch, frames, dit.in_dim, height // stride, width // stride]
    if shape != expected:
        raise ConfigError(
            f"image_or_video_shape={shape} does not match batch_size, the frames per rollout, the latent "
            f"channels and height/width (expected {expected}); set image_or_video_shape={expected}"
        )
    return height, width, height // stride, width // stride


def _check_common(cfg: DictConfig) -> None:
    """Optimiser, schedule and logging fields shared by every stage."""
    for key in ("lr", "weight_decay"):
        require_number(cfg, key, minimum=0.0)
    for key in ("beta1", "beta2"):
        require_number(cfg, key, minimum=0.0, maximum=0.999999)
    require_positive_int(cfg, "max_iters")
    require_positive_int(cfg, "log_iters")
    require_positive_int(cfg, "save_interval")
    require_int(cfg, "vis_interval", minimum=0)
    require_positive_int(cfg, "max_checkpoints")
    require_number(cfg, "ema_weight", minimum=0.0, maximum=0.999999)
    require_int(cfg, "ema_start_step", minimum=0)
    require_number(cfg, "max_grad_norm", minimum=0.0)
    require_int(cfg, "seed", minimum=0)
    for key in ("gradient_checkpointing", "mixed_precision"):
        require_bool(cfg, key)
    require_choice(cfg, "text_encoder", TEXT_ENCODERS)
    if not isinstance(get_field(cfg, "negative_prompt"), str):
        raise ConfigError("negative_prompt must be a string (the standard Wan2.1 negative prompt)")
    check_wandb(cfg)


def check_wandb(cfg: DictConfig) -> None:
    """wandb is optional: configured without the package installed is a one-line error."""
    if get_field(cfg, "wandb_key") is None and get_field(cfg, "wandb_project") is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "wandb_key/wandb_project are set but wandb is not installed; pip install wandb, or set "
            "wandb_key=null wandb_project=null"
        ) from None


def plan_training(
    cfg: DictConfig, logdir: str | Path, *, stage: str | None = None, rank: int = 0, world_size: int = 1,
    local_rank: int = 0,
) -> TrainPlan:  # fmt: skip
    """Validate every input of a training run (no model is loaded, nothing is written)."""
    configured = require_choice(cfg, "stage", STAGES)
    if stage is not None and stage != configured:
        raise ConfigError(
            f"--stage {stage} but the config is for stage {configured}; pass a stage-{stage} config "
            f"(e.g. configs/tiny/{'ode_init' if stage == 'ode_init' else 'train_' + stage}.yaml) or stage={stage}"
        )
    stage = configured
    stream = stream_config(cfg)
    chunk = stream.num_frame_per_block
    top_shift = require_number(cfg, "timestep_shift", minimum=0.0)
    if top_shift != stream.timestep_shift:
        raise ConfigError(
            f"timestep_shift={top_shift} differs from model_kwargs.timestep_shift={stream.timestep_shift}; set both "
            "to the same value (the release uses 5.0)"
        )
    overrides = get_field(cfg, "model_overrides")
    if not isinstance(overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping like {{text_dim: 384}}, got {overrides!r}")
    dit, presets = _dit_layouts(cfg, overrides, ("real",) if stage == "ode_init" else ("real", "fake"))
    batch, accumulation = _batch_arithmetic(cfg, world_size)
    why = f"whole {chunk}-frame chunks (num_frame_per_block)"
    num_frames = require_multiple_of(cfg, "num_training_frames", chunk, why)
    streaming = None
    switch_prompts = None
    if stage == "long":
        if not require_bool(cfg, "streaming_training"):
            raise ConfigError("stage long needs streaming_training=true (stage 2 streams one long rollout)")
        streaming = StreamingSettings(
            chunk=chunk,
            min_new_frames=require_positive_int(cfg, "streaming_min_new_frame"),
            max_new_frames=require_positive_int(cfg, "streaming_chunk_size"),
            window=require_positive_int(cfg, "slice_last_frames"),
            max_length=require_positive_int(cfg, "streaming_max_length"),
            switch_choices=tuple(require_int_list(cfg, "switch_choices")),
        )
        num_frames = streaming.window
    height, width, lh, lw = _geometry(cfg, dit, batch, num_frames)
    if stage != "ode_init":
        require_number(cfg, "lr_critic", minimum=0.0)
        for key in ("beta1_critic", "beta2_critic"):
            require_number(cfg, key, minimum=0.0, maximum=0.999999)
        require_positive_int(cfg, "dfake_gen_update_ratio")
        require_number(cfg, "max_grad_norm_critic", minimum=0.0)
        ScoreTimestepSampler(top_shift, require_number(cfg, "min_score_timestep"),
                             require_number(cfg, "max_score_timestep"))  # fmt: skip
        if require_choice(cfg, "score_context", SCORE_CONTEXTS) == "clean" and num_frames < 2 * chunk:
            raise ConfigError(
                f"score_context=clean keeps whole chunks clean and scores the rest, so it needs at least two "
                f"{chunk}-frame chunks per scored window, got {num_frames}; use score_context=joint or longer rollouts"
            )
    else:
        try:
            record_indices(stream.denoising_step_list, require_positive_int(cfg, "ode_steps"), 1000)
        except ConfigError as err:
            raise ConfigError(f"ode_steps: {err}") from None
        require_positive_int(cfg, "num_ode_pairs")
    require_number(cfg, "guidance_scale", minimum=0.0)
    _check_common(cfg)
    prompts = read_prompt_lines(cfg, "data_path")
    if stage == "long":
        switch_prompts = read_prompt_lines(cfg, "switch_prompt_path")
        if len(switch_prompts) != len(prompts):
            raise ConfigError(
                f"switch_prompt_path has {len(switch_prompts)} prompts but data_path {len(prompts)}; line i of "
                "one is switched to line i of the other, so give both the same number of lines"
            )
    adapter = _adapter(cfg)
    sharding = require_choice(cfg, "sharding_strategy", sorted(SHARDING))
    device = resolve_device(require_choice(cfg, "device", ["auto", "cpu", "cuda"]), local_rank)
    _weights_paths(cfg, presets, overrides)
    to_container(cfg)
    return TrainPlan(
        config=cfg, stage=stage, stream=stream, dit=dit, presets=presets, height=height,
        width=width, latent_height=lh, latent_width=lw, num_frames=num_frames, batch_size=batch,
        accumulation=accumulation, rank=rank, world_size=world_size, adapter=adapter, streaming=streaming,
        prompts=prompts, switch_prompts=switch_prompts, device=device,
        mixed_precision=bool(cfg.mixed_precision) and device.type == "cuda", sharding=SHARDING[sharding],
        logdir=Path(logdir),
    )  # fmt: skip


# ====================================================================================================
# Data


class PromptData:
    """Prompts dealt in a seeded order, epoch after epoch.

    Draw ``d`` (one optimiser step's worth of prompts) gives global micro-batch ``g`` the
    ``batch_size`` prompts at positions ``(d * groups + g) * batch_size ...`` of the endless
    sequence of per-epoch permutations; each rank reads only its own micro-batches, and the data
    position of a run is just the number of draws made.
    """

    def __init__(self, prompts: Sequence[Any], switch_prompts: Sequence[Any] | None, batch_size: int, seed: int):
        self.prompts = list(prompts)
        self.switch_prompts = None if switch_prompts is None else list(switch_prompts)
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _DATA, epoch))
            self._orders = {epoch: torch.randperm(len(self.prompts), generator=gen).tolist()}
        return self._orders[epoch][offset]

    def batch(self, draw: int, group: int, groups: int) -> tuple[list[Any], list[Any] | None]:
        """(prompts, switch prompts or None) of micro-batch ``group`` of ``draw``."""
        first = (draw * groups + group) * self.batch_size
        indices = [self._index(first + i) for i in range(self.batch_size)]
        switch = None if self.switch_prompts is None else [self.switch_prompts[i] for i in indices]
        return [self.prompts[i] for i in indices], switch

    def sample_ids(self, draw: int, group: int, groups: int) -> list[int]:
        """Global sample numbers of a micro-batch (keys of its noise)."""
        first = (draw * groups + group) * self.batch_size
        return list(range(first, first + self.batch_size))


# ====================================================================================================
# Networks


@dataclass
class Networks:
    """The models of a run: ``generator`` / ``critic`` are the (LoRA-injected, maybe sharded) DiTs."""

    generator: WanDiT
    teacher: WanDiT | None
    critic: WanDiT | None
    lora: bool


def _random_dit(preset: str, overrides: dict, device: torch.device, seed: int) -> WanDiT:
    """The seeded random DiT tiny inference builds for the same preset and seed (so exports match it)."""
    return materialize(lambda: build_dit(preset, **overrides), device, torch.float32, seed)


def load_generator(plan: TrainPlan) -> WanDiT:
    """``generator_ckpt`` (base.pt or a DiT), else the ``weights_dir`` DiT, else random (seed)."""
    cfg = plan.config
    overrides = dict(cfg.model_overrides)
    if cfg.generator_ckpt is not None:
        return load_dit(Path(cfg.generator_ckpt), cfg.model, device=plan.device, **overrides)
    if cfg.weights_dir is not None:
        return load_dit(Path(cfg.weights_dir), cfg.model, device=plan.device, **overrides)
    log.warning("generator_ckpt and weights_dir are null: the generator starts from random weights (seed %d)",
                plan.seed)  # fmt: skip
    return _random_dit(cfg.model, overrides, plan.device, plan.seed)


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
        return materialize(lambda: build_dit(preset, causal=False, **overrides), plan.device, dtype,
                           plan.seed + (1 if role == "fake" else 2))  # fmt: skip
    return load_dit(Path(path), preset, dtype=dtype, device=plan.device, causal=False, **overrides)


def attach_trainable_lora(model: WanDiT, adapter: AdapterSettings, seed: int) -> WanDiT:
    """Inject fresh LoRA adapters (peft's default init: B = 0, so the model is unchanged) and freeze the base.

    peft draws A from the global RNG, which is seeded here so every run starts from the same adapters.
    Returns the same DiT object, now holding the LoRA layers in its blocks.
    """
    torch.manual_seed(seed)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=lora_target_modules(model))  # fmt: skip
    return get_peft_model(model, config).get_base_model()


def prepare_trainable(model: WanDiT, plan: TrainPlan, role: int, *, checkpointing: bool) -> WanDiT:
    """LoRA (or full fine-tuning), gradient checkpointing and FSDP sharding of a trained DiT."""
    model.requires_grad_(True)
    if plan.adapter is not None:
        model = attach_trainable_lora(model, plan.adapter, derive_seed(plan.seed, _LORA_INIT, role))
    model.gradient_checkpointing = checkpointing
    return shard(model.train(), plan)


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
    generator = prepare_trainable(load_generator(plan), plan, 0, checkpointing=checkpointing)
    if not with_scores:
        return Networks(generator, None, None, plan.adapter is not None)
    teacher = shard(load_score_model(plan, "real").eval().requires_grad_(False), plan)
    critic = prepare_trainable(load_score_model(plan, "fake"), plan, 1, checkpointing=checkpointing)
    return Networks(generator, teacher, critic, plan.adapter is not None)


def build_text_encoder(plan: TrainPlan) -> TextEncoder:
    """The configured encoder on the training device (UMT5 in bf16: it is frozen)."""
    return load_text_encoder(plan.config, plan.dit, plan.device, torch.bfloat16)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model: nn.Module, lr: float, beta1: float, beta2: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


def autocast(plan: TrainPlan) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA with ``mixed_precision`` (master weights stay float32), else nothing."""
    if not plan.mixed_precision:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


# ====================================================================================================
# Checkpoint state


def _options(**kwargs: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the trainable parameters by name (rank 0; {} elsewhere); a collective."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_options())
    return {k: v for k, v in state.items() if k in names}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`trainable_state` output (rank 0 holds it; others pass {} when distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != names:
            raise WeightsError(
                f"checkpoint parameters do not match the trainable ones: missing {sorted(names - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - names)[:3]}"
            )
    options = _options(strict=False, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, state, options=options)


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


# ====================================================================================================
# Logging and samples


class MetricsLog:
    """Main-rank metrics: ``metrics.jsonl`` in the logdir, and wandb when configured."""

    def __init__(self, plan: TrainPlan, start_step: int):
        self.plan = plan
        self.path = plan.logdir / "metrics.jsonl"
        self.wandb = None
        if plan.rank != 0:
            return
        if self.path.exists():  # drop entries of steps a resumed run will redo
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        cfg = plan.config
        if cfg.wandb_key is not None or cfg.wandb_project is not None:
            import wandb

            if cfg.wandb_key is not None:
                wandb.login(key=cfg.wandb_key)
            mode = "online" if cfg.wandb_key is not None else "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, config=to_container(cfg),
                                    dir=str(plan.logdir), mode=mode, resume="allow")  # fmt: skip

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.plan.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class SampleVideos:
    """Sample videos of the generator through the inference runner, every ``vis_interval`` steps.

    All ranks run the same chunk loop (their model calls are FSDP collectives); rank 0 decodes and
    writes ``logdir/samples/step_XXXXXX/*.mp4`` with its sidecar.
    """

    def __init__(self, plan: TrainPlan, generator: WanDiT, encoder: TextEncoder):
        self.plan = plan
        cfg = plan.config
        frames = require_multiple_of(cfg, "vis_num_frames", plan.stream.num_frame_per_block, "whole chunks")
        segments = [PromptSegment(0, ((plan.prompts[0], 1.0),))]
        if plan.switch_prompts is not None:
            switch = next((f for f in plan.streaming.switch_choices if f < frames), None)
            if switch is not None:
                segments.append(PromptSegment(switch, ((plan.switch_prompts[0], 1.0),)))
        self.schedule = PromptSchedule(tuple(segments), frames, plan.stream.num_frame_per_block)
        self.generator = generator
        self.encoder = encoder
        self.vae = self._vae() if plan.rank == 0 else None

    def _vae(self) -> WanVAE:
        return load_vae(self.plan.config, self.plan.dit.out_dim, self.plan.device, torch.float32, self.plan.seed)

    @torch.no_grad()
    def __call__(self, step: int) -> Path | None:
        plan = self.plan
        self.generator.eval()
        try:
            if plan.rank != 0:
                texts = [seg.prompts[0][0] for seg in self.schedule.segments]
                prompts = [e[None] for e in self.encoder.encode(texts)]
                noise = torch.zeros(1, *plan.latent_shape(self.schedule.num_frames), device=plan.device)
                with autocast(plan):
                    gen = StreamingGenerator(self.generator, plan.stream)
                    gen.generate(noise, prompts, self.schedule.switch_frames)
                return None
            folder = plan.logdir / "samples" / f"step_{step:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            sample_cfg = OmegaConf.merge(plan.config, {"save_trace": False, "save_latents": False})
            job = VideoJob(0, 0, 0, self.schedule, "sample", derive_seed(plan.seed, _VIS))
            run_plan = RunPlan(
                config=sample_cfg, stream=plan.stream, dit=plan.dit, height=plan.height, width=plan.width,
                latent_height=plan.latent_height, latent_width=plan.latent_width,
                num_frames=self.schedule.num_frames, jobs=[job], total_videos=1, rank=0, world_size=1,
                output_folder=folder, device=plan.device, dtype=torch.float32,
            )  # fmt: skip
            runner = VideoRunner(run_plan, Components(self.generator, self.encoder, self.vae))
            with autocast(plan):
                return runner.run(job).video
        finally:
            self.generator.train()


# ====================================================================================================
# Sample sources


@dataclass
class Sample:
    """Generator samples of one micro-batch and their text conditioning."""

    x0: torch.Tensor
    cond: torch.Tensor


class Stage1Source:
    """Stage 1: every call is a fresh ``num_training_frames`` rollout of new prompts."""

    def __init__(self, plan: TrainPlan, generator: WanDiT, data: PromptData, encode: Callable):
        self.plan = plan
        self.gen = StreamingGenerator(generator, plan.stream)
        self.data = data
        self.encode = encode
        self.draws = 0

    def sample(self, iteration: int, step: int, *, grad: bool, exit_step: int, generator_phase: bool) -> Sample:
        """A rollout for accumulation step ``step``; each phase (generator, critic) draws new prompts."""
        plan = self.plan
        group = plan.group(step)
        texts, _ = self.data.batch(self.draws, group, plan.groups)
        ids = self.data.sample_ids(self.draws, group, plan.groups)
        if step == plan.accumulation - 1:
            self.draws += 1
        cond = self.encode(texts)
        seeds = [derive_seed(plan.seed, _NOISE, i) for i in ids]
        noise = ChunkNoise(seeds, plan.latent_shape(plan.stream.num_frame_per_block), device=plan.device,
                           dtype=torch.float32)  # fmt: skip
        with torch.set_grad_enabled(grad):
            result = self_forcing_rollout(self.gen, cond, noise, num_frames=plan.num_frames,
                                          latent_height=plan.latent_height, latent_width=plan.latent_width,
                                          exit_step=exit_step, grad_frames=plan.num_frames if grad else 0)  # fmt: skip
        return Sample(result.x0, result.prompt)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


class Stage2Source:
    """Stage 2: one :class:`StreamingRollout` per accumulation step, continued across iterations.

    All rollouts restart together (their lengths are shared), with the prompts of a new data draw,
    new noise keys and a new switch frame. On generator steps the critic reuses the generator
    phase's window (detached); otherwise the critic phase advances the rollouts without gradient.
    """

    def __init__(self, plan: TrainPlan, generator: WanDiT, data: PromptData, encode: Callable):
        self.plan = plan
        self.data = data
        self.encode = encode
        self.rollouts = [
            StreamingRollout(StreamingGenerator(generator, plan.stream), plan.streaming, plan.latent_height,
                             plan.latent_width)
            for _ in range(plan.accumulation)
        ]  # fmt: skip
        self.draws = 0
        self.rollout_index = -1
        self._last: dict[int, RolloutResult] = {}

    def _restart(self) -> None:
        plan = self.plan
        self.rollout_index += 1
        choices = plan.streaming.switch_choices
        pick = shared_randint(0, len(choices) - 1, plan.seed, _SWITCH, self.rollout_index, device=plan.device)
        switch = choices[pick]
        for step, rollout in enumerate(self.rollouts):
            group = plan.group(step)
            texts, switch_texts = self.data.batch(self.draws, group, plan.groups)
            ids = self.data.sample_ids(self.draws, group, plan.groups)
            noise = ChunkNoise([derive_seed(plan.seed, _NOISE, self.rollout_index, i) for i in ids],
                               plan.latent_shape(plan.stream.num_frame_per_block), device=plan.device,
                               dtype=torch.float32)  # fmt: skip
            rollout.begin(self.encode(texts), self.encode(switch_texts), switch, noise, self.rollout_index)
        self.draws += 1

    def sample(self, iteration: int, step: int, *, grad: bool, exit_step: int, generator_phase: bool) -> Sample:
        plan = self.plan
        reuse = not generator_phase and iteration % int(plan.config.dfake_gen_update_ratio) == 0
        if reuse:
            last = self._last[step]
            return Sample(last.x0.detach(), last.prompt)
        if step == 0 and self.rollouts[0].finished:
            self._restart()
        low, high = plan.streaming.new_chunk_range
        chunks = shared_randint(low, high, plan.seed, _NEW_FRAMES, iteration, device=plan.device)
        with torch.set_grad_enabled(grad):
            result = self.rollouts[step].step(chunks * plan.stream.num_frame_per_block, exit_step, grad=grad)
        self._last[step] = result
        return Sample(result.x0, result.prompt)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "rollout_index": self.rollout_index,
                "rollouts": [r.state_dict() for r in self.rollouts]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        self.rollout_index = int(state["rollout_index"])
        for rollout, saved in zip(self.rollouts, state["rollouts"], strict=True):
            rollout.load_state_dict(saved)


# ====================================================================================================
# The loop


@dataclass
class StepLog:
    """Losses of one iteration, averaged over micro-batches and ranks."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(all_reduce_mean(value.detach().float())) / count


class DistillTrainer:
    """Stages 1 and 2 of DMD distillation (see the module docstring)."""

    def __init__(self, plan: TrainPlan, nets: Networks, encoder: TextEncoder):
        cfg = plan.config
        self.plan, self.nets, self.encoder = plan, nets, encoder
        self.scheduler = FlowMatchScheduler(shift=plan.stream.timestep_shift)
        self.num_steps = len(plan.stream.denoising_step_list)
        with torch.no_grad():
            negative = encoder.encode([cfg.negative_prompt])
        sampler = ScoreTimestepSampler(plan.stream.timestep_shift, cfg.min_score_timestep, cfg.max_score_timestep)
        self.dmd = DMDObjective(nets.teacher, nets.critic, self.scheduler, sampler,
                                guidance_scale=cfg.guidance_scale, negative_context=negative,
                                score_context=cfg.score_context,
                                chunk_frames=plan.stream.num_frame_per_block)  # fmt: skip
        self.gen_opt = adamw(nets.generator, cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay)
        self.critic_opt = adamw(nets.critic, cfg.lr_critic, cfg.beta1_critic, cfg.beta2_critic, cfg.weight_decay)
        self.ema = EMA(nets.generator, cfg.ema_weight, cfg.ema_start_step)
        data = PromptData(plan.prompts, plan.switch_prompts, plan.batch_size, plan.seed)
        source = Stage2Source if plan.stage == "long" else Stage1Source
        self.source = source(plan, nets.generator, data, self._encode)
        self.state = TrainState(plan)
        self.step = 0

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode(texts).to(self.plan.device)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> None:
        nets = self.nets
        generator = trainable_state(nets.generator)
        main = {
            "step": self.step,
            "stage": self.plan.stage,
            "world_size": self.plan.world_size,
            "generator": generator,
            "critic": trainable_state(nets.critic),
            "generator_ema": self.ema.state_dict(),
            "generator_optimizer": optimizer_state(nets.generator, self.gen_opt),
            "critic_optimizer": optimizer_state(nets.critic, self.critic_opt),
            "config": to_container(self.plan.config),
        }
        rank = {"rng": capture_rng_state(), "source": self.source.state_dict()}
        self.state.save(self.step, main, rank)
        self.export(generator, main["critic"], main["generator_ema"])

    def export(self, generator: dict, critic: dict, ema: dict) -> None:
        """Release files next to the checkpoints: ``lora.pt`` (LoRA runs) or ``base.pt`` (full)."""
        if self.plan.rank != 0:
            return
        if self.nets.lora:
            dtype = self.plan.adapter.dtype
            self.state.export("lora.pt", {"generator_lora": lora_export(generator, dtype),
                                          "critic_lora": lora_export(critic, dtype)})  # fmt: skip
        else:
            self.state.export("base.pt", base_export(generator, ema))

    def load(self, main: dict, rank: dict) -> None:
        nets = self.nets
        load_trainable_state(nets.generator, main["generator"])
        load_trainable_state(nets.critic, main["critic"])
        self.ema.load_state_dict(main["generator_ema"])
        load_optimizer_state(nets.generator, self.gen_opt, main["generator_optimizer"])
        load_optimizer_state(nets.critic, self.critic_opt, main["critic_optimizer"])
        self.source.load_state_dict(rank["source"])
        restore_rng_state(rank["rng"])
        self.step = int(main["step"])

    # -- one iteration -----------------------------------------------------------------------------------
    def _clip(self, model: nn.Module, key: str) -> torch.Tensor | None:
        limit = float(self.plan.config[key])
        if limit <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(trainable_parameters(model), limit)

    def iteration(self, it: int) -> dict[str, float]:
        """One optimiser step of the critic (and of the generator every ``dfake_gen_update_ratio``)."""
        plan, cfg = self.plan, self.plan.config
        exit_step = shared_randint(0, self.num_steps - 1, plan.seed, _EXIT, it, device=plan.device)
        generator_step = it % int(cfg.dfake_gen_update_ratio) == 0
        logs = StepLog()
        count = plan.accumulation
        if generator_step:
            self.gen_opt.zero_grad(set_to_none=True)
            for step in range(count):
                torch.manual_seed(derive_seed(plan.seed, _GEN_LOSS, it, plan.group(step)))
                with autocast(plan):
                    sample = self.source.sample(it, step, grad=True, exit_step=exit_step, generator_phase=True)
                    loss, info = self.dmd.generator_loss(sample.x0, sample.cond)
                (loss / count).backward()
                logs.add("generator_loss", loss, count)
                logs.add("dmd_gradient_norm", info["dmd_gradient_norm"], count)
            self._clip(self.nets.generator, "max_grad_norm")
            self.gen_opt.step()
            self.ema.update(it)
        self.critic_opt.zero_grad(set_to_none=True)
        for step in range(count):
            torch.manual_seed(derive_seed(plan.seed, _CRITIC_LOSS, it, plan.group(step)))
            with autocast(plan):
                sample = self.source.sample(it, step, grad=False, exit_step=exit_step, generator_phase=False)
                loss, _ = self.dmd.critic_loss(sample.x0, sample.cond)
            (loss / count).backward()
            logs.add("critic_loss", loss, count)
        self._clip(self.nets.critic, "max_grad_norm_critic")
        self.critic_opt.step()
        logs.values["exit_step"] = float(exit_step)
        return logs.values

    # -- the run -------------------------------------------------------------------------------------
    def train(self, resume: bool = False, progress: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run to ``max_iters`` (resuming when the logdir has this run's checkpoint); returns the step logs."""
        return run_loop(self, resume, progress)


def run_loop(trainer: Any, resume: bool, progress: Callable[[int, dict], None] | None) -> list[dict]:
    """The shared outer loop of the DMD and ODE trainers: resume, iterate, log, sample, checkpoint.

    ``trainer`` provides ``plan``, ``state``, ``step``, ``iteration(it)``, ``save()``, ``load(main, rank)``,
    ``encoder`` and ``nets.generator``.
    """
    plan, cfg = trainer.plan, trainer.plan.config
    found = trainer.state.find_resume(resume)
    if found is not None:
        trainer.load(*found)
    metrics = MetricsLog(plan, trainer.step)
    vis_interval = int(cfg.vis_interval)
    samples = SampleVideos(plan, trainer.nets.generator, trainer.encoder) if vis_interval else None
    history = []
    try:
        while trainer.step < int(cfg.max_iters):
            values = trainer.iteration(trainer.step)
            for name, value in values.items():
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name} is {value} at step {trainer.step}")
            trainer.step += 1
            history.append({"step": trainer.step, **values})
            metrics.write(trainer.step, values)
            if progress is not None:
                progress(trainer.step, values)
            if trainer.step % int(cfg.log_iters) == 0:
                log.info("step %d: %s", trainer.step, ", ".join(f"{k} {v:.5g}" for k, v in values.items()))
            if samples is not None and trainer.step % vis_interval == 0:
                video = samples(trainer.step)
                if video is not None:
                    log.info("sample video: %s", video)
            if trainer.step % int(cfg.save_interval) == 0 or trainer.step == int(cfg.max_iters):
                trainer.save()
    finally:
        metrics.close()
    return history
