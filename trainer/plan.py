"""Training plans: a config becomes a validated :class:`TrainPlan` before any model is loaded.

:func:`plan_training` checks the stage, streaming settings, frame counts, batch arithmetic, prompt
files, model layouts (teacher and critic headers against the generator's), weight files and the
adapter, each problem one :class:`~utils.errors.ConfigError` naming the key and the fix. Streaming
settings, the DiT layout, the resolution and the device come from the same functions inference uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from memflow.config import PRESETS, DiTConfig, StreamConfig, dit_config
from pipeline.plan import DTYPES, TEXT_ENCODERS, Resolution, dit_settings, resolution, resolve_device, stream_config
from utils.config import (
    get_field,
    require_bool,
    require_choice,
    require_int,
    require_int_list,
    require_multiple_of,
    require_number,
    require_positive_int,
    to_container,
)
from utils.errors import ConfigError

from .checks import check_training_weights
from .data import read_prompt_lines
from .dmd import ScoreTimestepSampler
from .ode_init import record_indices
from .rollout import StreamingSettings

log = logging.getLogger(__name__)

STAGES = ("ode_init", "init", "long")
SHARDING = {"full": "full", "hybrid": "hybrid", "hybrid_full": "hybrid"}


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


def _dit_layouts(cfg: DictConfig, roles: Sequence[str]) -> tuple[DiTConfig, dict[str, str]]:
    """Generator layout and the presets of ``roles`` (``real``, ``fake``), checked to share latents and text."""
    dit = dit_settings(cfg)
    overrides = dict(cfg.model_overrides)
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


def _batch_arithmetic(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps): ``total_batch_size`` fixes the accumulation, or the release's
    ``gradient_accumulation_steps`` when it is set (the release trains batch x accumulation x world size)."""
    batch = require_positive_int(cfg, "batch_size")
    total = require_positive_int(cfg, "total_batch_size")
    per_step = batch * world_size
    if get_field(cfg, "gradient_accumulation_steps") is not None:
        accumulation = require_positive_int(cfg, "gradient_accumulation_steps")
        if total != per_step * accumulation:
            log.info("total_batch_size=%d is not batch_size x gradient_accumulation_steps x world size = %d: "
                     "the release trains with the latter, and so does this run", total,
                     per_step * accumulation)  # fmt: skip
        return batch, accumulation
    if total % per_step:
        raise ConfigError(
            f"total_batch_size={total} is not a multiple of batch_size x world size = {batch} x {world_size} = "
            f"{per_step}; set total_batch_size to a multiple of {per_step}"
        )
    return batch, total // per_step


def _geometry(cfg: DictConfig, dit: DiTConfig, batch: int, frames: Sequence[int]) -> Resolution:
    """The run's resolution, checked against ``image_or_video_shape`` (the release states the latent shape;
    its frame count may be any of ``frames``, the first being the frames scored)."""
    size = resolution(cfg, dit)
    shape = require_int_list(cfg, "image_or_video_shape")
    expected = [batch, frames[0], dit.in_dim, size.latent_height, size.latent_width]
    if len(shape) != 5 or shape[1] not in frames or [*shape[:1], *shape[2:]] != [*expected[:1], *expected[2:]]:
        raise ConfigError(
            f"image_or_video_shape={shape} does not match batch_size, the frames per rollout, the latent "
            f"channels and height/width (expected {expected}); set image_or_video_shape={expected}"
        )
    return size


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


def _stage(cfg: DictConfig, stage: str | None) -> str:
    """The config's ``stage``, which must agree with the one the entry point asks for."""
    configured = require_choice(cfg, "stage", STAGES)
    if stage is not None and stage != configured:
        raise ConfigError(
            f"--stage {stage} but the config is for stage {configured}; pass a stage-{stage} config "
            f"(e.g. configs/tiny/{'ode_init' if stage == 'ode_init' else 'train_' + stage}.yaml) or stage={stage}"
        )
    return configured


def _stream(cfg: DictConfig) -> StreamConfig:
    """The streaming settings; the release states the timestep shift twice, and both must agree."""
    stream = stream_config(cfg)
    top_shift = require_number(cfg, "timestep_shift", minimum=0.0)
    if top_shift != stream.timestep_shift:
        raise ConfigError(
            f"timestep_shift={top_shift} differs from model_kwargs.timestep_shift={stream.timestep_shift}; set both "
            "to the same value (the release uses 5.0)"
        )
    return stream


def _streaming(cfg: DictConfig, chunk: int) -> StreamingSettings:
    """Stage 2's long-rollout settings."""
    if not require_bool(cfg, "streaming_training"):
        raise ConfigError("stage long needs streaming_training=true (stage 2 streams one long rollout)")
    return StreamingSettings(
        chunk=chunk,
        min_new_frames=require_positive_int(cfg, "streaming_min_new_frame"),
        max_new_frames=require_positive_int(cfg, "streaming_chunk_size"),
        window=require_positive_int(cfg, "slice_last_frames"),
        max_length=require_positive_int(cfg, "streaming_max_length"),
        switch_choices=tuple(require_int_list(cfg, "switch_choices")),
    )


def _check_stage_keys(cfg: DictConfig, stage: str, stream: StreamConfig) -> None:
    """The critic and DMD keys of stages 1 and 2, or the trajectory keys of the ODE initialisation."""
    if stage != "ode_init":
        require_number(cfg, "lr_critic", minimum=0.0)
        for key in ("beta1_critic", "beta2_critic"):
            require_number(cfg, key, minimum=0.0, maximum=0.999999)
        require_positive_int(cfg, "dfake_gen_update_ratio")
        require_number(cfg, "max_grad_norm_critic", minimum=0.0)
        ScoreTimestepSampler(stream.timestep_shift, require_number(cfg, "min_score_timestep"),
                             require_number(cfg, "max_score_timestep"))  # fmt: skip
    else:
        try:
            record_indices(stream.denoising_step_list, require_positive_int(cfg, "ode_steps"), 1000)
        except ConfigError as err:
            raise ConfigError(f"ode_steps: {err}") from None
        require_positive_int(cfg, "num_ode_pairs")
    require_number(cfg, "guidance_scale", minimum=0.0)


def _prompts(cfg: DictConfig, stage: str) -> tuple[list[str], list[str] | None]:
    """The training prompts and, for stage 2, the prompts each one switches to."""
    prompts = read_prompt_lines(cfg, "data_path")
    if stage != "long":
        return prompts, None
    switch_prompts = read_prompt_lines(cfg, "switch_prompt_path")
    if len(switch_prompts) != len(prompts):
        raise ConfigError(
            f"switch_prompt_path has {len(switch_prompts)} prompts but data_path {len(prompts)}; line i of "
            "one is switched to line i of the other, so give both the same number of lines"
        )
    return prompts, switch_prompts


def _logdir(logdir: str | Path) -> Path:
    """The logdir, which may be new but must not be (or lie inside) a file."""
    path = Path(logdir)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--logdir {path}: {folder} is a file, not a folder; choose another --logdir")
            break
    return path


def plan_training(
    cfg: DictConfig, logdir: str | Path, *, stage: str | None = None, rank: int = 0, world_size: int = 1,
    local_rank: int = 0,
) -> TrainPlan:  # fmt: skip
    """Validate every input of a training run (no model is loaded, nothing is written)."""
    logdir = _logdir(logdir)
    stage = _stage(cfg, stage)
    stream = _stream(cfg)
    chunk = stream.num_frame_per_block
    dit, presets = _dit_layouts(cfg, ("real",) if stage == "ode_init" else ("real", "fake"))
    batch, accumulation = _batch_arithmetic(cfg, world_size)
    num_frames = require_multiple_of(cfg, "num_training_frames", chunk, f"whole {chunk}-frame chunks "
                                     "(num_frame_per_block)")  # fmt: skip
    minimum = get_field(cfg, "min_num_training_frames")
    if minimum is not None and minimum != num_frames:
        raise ConfigError(f"min_num_training_frames={minimum}: rollouts have one length here; set it to "
                          f"num_training_frames={num_frames} or null")  # fmt: skip
    streaming = _streaming(cfg, chunk) if stage == "long" else None
    if streaming is not None:
        num_frames = streaming.window
    size = _geometry(cfg, dit, batch, (num_frames, streaming.max_length) if streaming else (num_frames,))
    _check_stage_keys(cfg, stage, stream)
    _check_common(cfg)
    prompts, switch_prompts = _prompts(cfg, stage)
    adapter = _adapter(cfg)
    sharding = require_choice(cfg, "sharding_strategy", sorted(SHARDING))
    device = resolve_device(require_choice(cfg, "device", ["auto", "cpu", "cuda"]), local_rank)
    check_training_weights(cfg, presets, dict(cfg.model_overrides))
    to_container(cfg)
    return TrainPlan(
        config=cfg, stage=stage, stream=stream, dit=dit, presets=presets, height=size.height,
        width=size.width, latent_height=size.latent_height, latent_width=size.latent_width, num_frames=num_frames,
        batch_size=batch, accumulation=accumulation, rank=rank, world_size=world_size, adapter=adapter,
        streaming=streaming, prompts=prompts, switch_prompts=switch_prompts, device=device,
        mixed_precision=bool(cfg.mixed_precision), sharding=SHARDING[sharding],
        logdir=logdir,
    )  # fmt: skip
