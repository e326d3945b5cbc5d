"""Run planning: a config becomes a validated :class:`RunPlan` before any model is loaded or file written.

:func:`plan_run` checks every input of an inference run - resolution, frame counts, prompts, switch
points, streaming settings, weight files, the output folder - and lists this rank's videos (sample
``g`` of ``G`` goes to rank ``g % world_size``) with their file stems and per-video seeds. The
geometry and settings checks are shared with training (:func:`stream_config`, :func:`dit_settings`,
:func:`resolution`), and training's sample videos are planned by :func:`plan_videos` as inference's are.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from memflow.config import BANK_RECORD_POLICIES, MEMORY_MODES, PRESETS, DiTConfig, StreamConfig, run_dit_config
from memflow.loading import check_weights, missing_weights
from memflow.text import UMT5_PRESETS
from memflow.vae import VAE_PRESETS, vae_config
from utils.config import (
    get_field,
    require_bool,
    require_choice,
    require_int,
    require_multiple_of,
    require_number,
    require_positive_int,
    to_container,
)
from utils.errors import ConfigError

from .compat import OUTPUT_NAMES, first_iterations, model_type, release_stems, timeline_config
from .outputs import check_writable, output_stem
from .prompts import load_jsonl_prompts, load_text_prompts
from .schedule import PromptSchedule
from .timeline import load_timeline

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bfloat16 on CUDA, float32 on the CPU
# UMT5 presets load from weights_dir (Wan or Diffusers layout); minilm is bundled with its weights.
TEXT_ENCODERS = (*UMT5_PRESETS, "minilm")
PROMPT_FORMATS = (".txt", ".jsonl", ".json")

MAX_SEED = 2**64 - 1  # torch generators take seeds below 2^64

# StreamConfig field -> the config key that sets it.
STREAM_KEYS = {
    "num_frame_per_block": "num_frame_per_block",
    "local_attn_size": "model_kwargs.local_attn_size",
    "sink_size": "model_kwargs.sink_size",
    "memory": "model_kwargs.memory",
    "bank_size": "model_kwargs.bank_size",
    "record_interval": "model_kwargs.record_interval",
    "bank_record": "model_kwargs.bank_record",
    "top_k": "model_kwargs.top_k",
    "reference": "model_kwargs.reference",
    "denoising_step_list": "denoising_step_list",
    "warp_denoising_step": "warp_denoising_step",
    "timestep_shift": "model_kwargs.timestep_shift",
    "context_noise": "context_noise",
    "global_sink": "global_sink",
}


# -- settings shared with training -----------------------------------------------------------------
def _step_list(cfg: DictConfig) -> list[float]:
    steps = get_field(cfg, "denoising_step_list")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"denoising_step_list must be a non-empty list like [1000, 750, 500, 250], got {steps!r}")
    for t in steps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1000:
            raise ConfigError(f"denoising_step_list: {t!r} is not a timestep in (0, 1000]")
    if any(b >= a for a, b in pairwise(steps)):
        raise ConfigError(f"denoising_step_list={steps} must decrease strictly")
    return [float(t) for t in steps]


def stream_config(cfg: DictConfig) -> StreamConfig:
    """The :class:`StreamConfig` a config describes; every problem names its config key.

    ``model_kwargs.SMA`` is the release's switch for Sparse Memory Activation: ``SMA: true`` is
    the same as ``memory: nam_sma``, and a config saying one without the other is refused.
    """
    memory = require_choice(cfg, "model_kwargs.memory", MEMORY_MODES)
    sma = require_bool(cfg, "model_kwargs.SMA")
    if sma != (memory == "nam_sma"):
        raise ConfigError(
            f"model_kwargs.SMA={str(sma).lower()} contradicts model_kwargs.memory={memory} (SMA: true means "
            "memory nam_sma); set both model_kwargs.memory=nam_sma model_kwargs.SMA=true, or SMA=false with "
            "another memory mode"
        )
    values = {
        "num_frame_per_block": require_positive_int(cfg, "num_frame_per_block"),
        "local_attn_size": require_positive_int(cfg, "model_kwargs.local_attn_size"),
        "sink_size": require_int(cfg, "model_kwargs.sink_size", minimum=0),
        "memory": memory,
        "bank_size": require_int(cfg, "model_kwargs.bank_size", minimum=0),
        "record_interval": require_positive_int(cfg, "model_kwargs.record_interval"),
        "bank_record": require_choice(cfg, "model_kwargs.bank_record", BANK_RECORD_POLICIES),
        "top_k": require_int(cfg, "model_kwargs.top_k", minimum=0),
        "reference": require_bool(cfg, "model_kwargs.reference"),
        "denoising_step_list": _step_list(cfg),
        "warp_denoising_step": require_bool(cfg, "warp_denoising_step"),
        "timestep_shift": require_number(cfg, "model_kwargs.timestep_shift", minimum=0.0),
        "context_noise": require_number(cfg, "context_noise", minimum=0.0, maximum=1000.0),
        "global_sink": require_bool(cfg, "global_sink"),
    }
    try:
        return StreamConfig(**values)
    except ValueError as err:
        raise ConfigError(f"{_stream_key(str(err))}: {err}") from None


def _stream_key(message: str) -> str:
    """The config key of the StreamConfig field a ValueError message mentions first."""
    found = [(message.find(name), key) for name, key in STREAM_KEYS.items() if name in message]
    return min(found)[1] if found else "model_kwargs"


def dit_settings(cfg: DictConfig) -> DiTConfig:
    """The generator's layout: the ``model`` preset with ``model_overrides`` (any DiT config field)."""
    model = require_choice(cfg, "model", sorted(PRESETS))
    overrides = get_field(cfg, "model_overrides")
    if not isinstance(overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping like {{text_dim: 384}}, got {overrides!r}")
    return run_dit_config(model, overrides)


def vae_spatial_stride(preset: str) -> int:
    """Pixels per latent row/column of a VAE preset (each stage after the first halves the size)."""
    return 2 ** (len(vae_config(preset)["dim_mult"]) - 1)


@dataclass(frozen=True)
class Resolution:
    """Pixel and latent frame size of a run."""

    height: int
    width: int
    latent_height: int
    latent_width: int


def resolution(cfg: DictConfig, dit: DiTConfig) -> Resolution:
    """``height`` / ``width``, checked to be whole latent patches of the configured ``vae`` and DiT."""
    stride = vae_spatial_stride(require_choice(cfg, "vae", sorted(VAE_PRESETS)))
    _, patch_h, patch_w = dit.patch_size
    why = f"the VAE downsamples {stride}x and the DiT patches {{}} latents"
    height = require_multiple_of(cfg, "height", stride * patch_h, why.format(patch_h))
    width = require_multiple_of(cfg, "width", stride * patch_w, why.format(patch_w))
    return Resolution(height, width, height // stride, width // stride)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available, else the CPU (with a warning); ``cuda`` without CUDA is an error."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ConfigError("device=cuda but no CUDA device is available; set device=auto or device=cpu")
    if name == "auto" and not cuda:
        log.warning("no CUDA device found: running on the CPU, which is far slower")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is bfloat16 on CUDA and float32 on the CPU; a named dtype is used as given."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and name != "float32":
        log.info("dtype=%s on the CPU: correct, but slower than float32 without native %s matmul", name, name)
    return DTYPES[name]


# -- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoJob:
    """One video of the run: ``index`` is its global sample index (prompt-major, then sample)."""

    index: int
    prompt_index: int
    sample: int
    schedule: PromptSchedule
    stem: str
    seed: int


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, validated: the config, settings, geometry and this rank's videos."""

    config: DictConfig
    stream: StreamConfig
    dit: DiTConfig
    height: int
    width: int
    latent_height: int
    latent_width: int
    num_frames: int
    jobs: list[VideoJob]
    total_videos: int
    rank: int
    world_size: int
    output_folder: Path
    device: torch.device
    dtype: torch.dtype
    compile: bool = False


def video_seed(seed: int, index: int) -> int:
    """A per-video seed mixed from the run seed and the global sample index (no overlap between runs)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def plan_stems(first_prompts: Sequence[str], num_samples: int, save_with_index: bool) -> list[str]:
    """File stems of every video, prompt-major; distinct within the run, so ranks never collide.

    Repeated prompt slugs get ``_p<prompt>`` and several samples ``_s<sample>``; slugs never hold
    ``_``, so these cannot clash with another prompt's slug or with ``unique_stem``'s ``-N``.
    """
    slugs = [output_stem(i, prompt, save_with_index) for i, prompt in enumerate(first_prompts)]
    counts = Counter(slugs)
    stems = []
    for i, slug in enumerate(slugs):
        base = slug if counts[slug] == 1 else f"{slug}_p{i}"
        stems.extend(base if num_samples == 1 else f"{base}_s{s}" for s in range(num_samples))
    return stems


def plan_videos(
    config: DictConfig,
    stream: StreamConfig,
    dit: DiTConfig,
    schedules: Sequence[PromptSchedule],
    *,
    output_folder: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    num_samples: int = 1,
    stems: Sequence[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    compile: bool = False,
) -> RunPlan:
    """The plan of ``num_samples`` videos per schedule, those of ``rank`` listed; creates the output folder.

    ``stems`` names the videos (default: from their first prompts, as ``save_with_index`` and
    ``output_names`` say).
    """
    if stems is None:
        first = [s.segments[0].prompts[0][0] for s in schedules]
        save_with_index = require_bool(config, "save_with_index")
        if require_choice(config, "output_names", OUTPUT_NAMES) == "release":
            stems = release_stems(first, num_samples, save_with_index, world_size, model_type(config))
        else:
            stems = plan_stems(first, num_samples, save_with_index)
    jobs = []
    for index, stem in enumerate(stems):
        if index % world_size == rank:
            prompt_index, sample = divmod(index, num_samples)
            jobs.append(VideoJob(index, prompt_index, sample, schedules[prompt_index], stem, video_seed(seed, index)))
    size = resolution(config, dit)
    return RunPlan(
        config=config, stream=stream, dit=dit, height=size.height, width=size.width,
        latent_height=size.latent_height, latent_width=size.latent_width, num_frames=schedules[0].num_frames,
        jobs=jobs, total_videos=len(stems), rank=rank, world_size=world_size,
        output_folder=check_writable(output_folder), device=device, dtype=dtype, compile=compile,
    )  # fmt: skip


def _load_schedules(
    cfg: DictConfig, num_frames: int, chunk: int, command_line: frozenset[str]
) -> tuple[DictConfig, list[PromptSchedule]]:
    """The videos of ``data_path``; a timeline's length and settings become overrides of ``cfg``."""
    data_path = get_field(cfg, "data_path")
    if not isinstance(data_path, str) or not data_path:
        raise ConfigError(f"data_path must be a path to a .txt, .jsonl or .json prompt file, got {data_path!r}")
    suffix = Path(data_path).suffix.lower()
    if suffix not in PROMPT_FORMATS:
        raise ConfigError(
            f"data_path={data_path}: unknown prompt format {suffix or '(no suffix)'!r}; use .txt (one prompt "
            "per line), .jsonl (release interactive format) or .json (Scope timeline)"
        )
    switches = get_field(cfg, "switch_frame_indices")
    if suffix == ".jsonl":
        if not isinstance(switches, list):
            raise ConfigError(f"switch_frame_indices must be a list of integers like [40, 80], got {switches!r}")
        return cfg, load_jsonl_prompts(data_path, switches, num_frames, chunk)
    if switches:
        log.warning("switch_frame_indices=%s ignored: only JSONL prompt files switch at configured frames", switches)
    if suffix == ".txt":
        return cfg, load_text_prompts(data_path, num_frames, chunk)
    given = num_frames if "num_output_frames" in command_line else None
    timeline = load_timeline(data_path, chunk, given)
    return timeline_config(cfg, timeline, command_line, data_path), [timeline.schedule]


def missing_run_weights(cfg: DictConfig) -> list[tuple[Path, str]]:
    """Every weight file an inference config needs that is absent, each with its download command."""
    return missing_weights(cfg.model, cfg.weights_dir, text_encoder=cfg.text_encoder,
                           generator_ckpt=cfg.generator_ckpt, checkpoints=[cfg.lora_ckpt])  # fmt: skip


def _check_model_fields(cfg: DictConfig) -> None:
    """The weight-path, adapter and switch fields that the loaders read later."""
    for key in ("use_ema", "low_memory", "merge_lora", "save_latents", "save_trace"):
        require_bool(cfg, key)

    require_choice(cfg, "adapter.type", ["lora"])
    require_positive_int(cfg, "adapter.rank")
    require_number(cfg, "adapter.alpha", minimum=0.0)
    require_choice(cfg, "adapter.dtype", list(DTYPES))
    text_encoder = require_choice(cfg, "text_encoder", TEXT_ENCODERS)
    for key in ("generator_ckpt", "lora_ckpt", "weights_dir"):
        value = get_field(cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{key} must be a path or null, got {value!r}")
    if text_encoder != "minilm" and cfg.weights_dir is None:
        raise ConfigError(
            f"text_encoder={text_encoder} loads from weights_dir, which is null; set "
            "weights_dir=wan_models/Wan2.1-T2V-1.3B or text_encoder=minilm (with model_overrides.text_dim=384)"
        )


def plan_run(
    cfg: DictConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
    command_line: frozenset[str] = frozenset(),
) -> RunPlan:  # fmt: skip
    """Validate the whole config and list this rank's videos; creates only the output folder.

    ``command_line`` holds the keys the user set on the command line: they win over a timeline's own
    length and settings, which win over the config file. Every user mistake is a
    :class:`~utils.errors.MemFlowError` raised before any model is loaded or file written; the output
    folder is created (and proven writable) last.
    """
    chunk = require_positive_int(cfg, "num_frame_per_block")
    num_frames = require_multiple_of(
        cfg, "num_output_frames", chunk, f"a whole number of {chunk}-frame chunks (num_frame_per_block)"
    )
    cfg, schedules = _load_schedules(cfg, num_frames, chunk, command_line)
    schedules = first_iterations(schedules, require_int(cfg, "inference_iter", minimum=-1), world_size)
    stream = stream_config(cfg)
    dit = dit_settings(cfg)
    resolution(cfg, dit)
    seed = require_int(cfg, "seed", minimum=0, maximum=MAX_SEED)
    num_samples = require_positive_int(cfg, "num_samples")
    require_bool(cfg, "save_with_index")
    require_choice(cfg, "output_names", OUTPUT_NAMES)
    _check_model_fields(cfg)
    device = resolve_device(require_choice(cfg, "device", DEVICES), local_rank)
    dtype = resolve_dtype(require_choice(cfg, "dtype", DTYPE_CHOICES), device)
    compile = require_bool(cfg, "compile")
    output_folder = get_field(cfg, "output_folder")
    if not isinstance(output_folder, str) or not output_folder:
        raise ConfigError(f"output_folder must be a folder path, got {output_folder!r}")
    to_container(cfg)  # a broken ${...} interpolation fails now, not after the first video
    check_weights(missing_run_weights(cfg))
    return plan_videos(cfg, stream, dit, schedules, output_folder=output_folder, device=device, dtype=dtype,
                       seed=seed, num_samples=num_samples, rank=rank, world_size=world_size,
                       compile=compile)  # fmt: skip
