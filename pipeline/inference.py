"""Inference: a validated run plan -> models -> videos, generated and written chunk by chunk.

Three steps, each its own object so scripts, tests and benchmarks can reuse them:

* :func:`plan_run` reads the config (YAML + overrides, optionally a timeline's settings) and checks
  every input before anything is loaded or written: resolution, frame counts, prompts, switch
  points, streaming settings, weight files, the output folder. Its :class:`RunPlan` lists this
  rank's videos (sample ``g`` of ``G`` goes to rank ``g % world_size``) with their file stems and
  per-video seeds.
* :func:`build_components` loads the DiT (``base.pt`` + LoRA, or a Wan2.1 folder, or random
  weights), the text encoder and the VAE.
* :class:`VideoRunner` runs the one chunk loop of :class:`~pipeline.streaming.StreamingGenerator`
  per video: per-chunk conditioning (switches, transitions), denoise, commit, streaming VAE decode
  and MP4 write, then the sidecar JSON, the memory-trace PNG and optionally the latents.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from memflow.config import BANK_RECORD_POLICIES, MEMORY_MODES, PRESETS, DiTConfig, StreamConfig, run_dit_config
from memflow.dit import WanDiT, build_dit
from memflow.errors import ConfigError, WeightsError
from memflow.text import UMT5_PRESETS, WAN_T5_FILE, WAN_TOKENIZER_DIR, TextEncoder
from memflow.vae import VAE_PRESETS, WAN_VAE_FILE, WanVAE, vae_config
from memflow.weights import DOWNLOAD_HINTS, WAN_DIT_FILE, WAN_DIT_INDEX, apply_lora, load_dit
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

from .outputs import FPS, VideoWriter, check_writable, output_stem, render_memory_trace, unique_stem, write_sidecar
from .prompts import ChunkConditioning, PromptSchedule, load_jsonl_prompts, load_text_prompts, load_timeline
from .streaming import StreamingGenerator

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# UMT5 presets load from weights_dir (Wan or Diffusers layout); minilm is bundled with its weights.
TEXT_ENCODERS = (*UMT5_PRESETS, "minilm")
PROMPT_FORMATS = (".txt", ".jsonl", ".json")
OUTPUT_SUFFIXES = (".mp4", ".json", ".memory.png", ".latents.safetensors")

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


# --------------------------------------------------------------------------------------------
# Config -> streaming settings, device, dtype


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
    """The compute dtype; half precisions fall back to float32 on the CPU (with a warning)."""
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("dtype=%s is slow or unsupported on the CPU: using float32", name)
        return torch.float32
    return dtype


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's max resident set size."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"kind": "cpu_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


# --------------------------------------------------------------------------------------------
# Weights on disk


def weights_layout(folder: Path) -> str:
    """``diffusers`` for a Diffusers pipeline folder (also one holding only ``vae/``, its DiT given by
    ``generator_ckpt``), else ``original`` (the Wan2.1 release layout)."""
    diffusers = ("model_index.json", "transformer", "vae/config.json")
    return "diffusers" if any((folder / name).exists() for name in diffusers) else "original"


def _dit_present(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (WAN_DIT_INDEX, WAN_DIT_FILE))


def missing_weights(cfg: DictConfig) -> list[tuple[Path, str]]:
    """Every weight file or folder the config needs that is absent, each with its download command."""
    missing: list[tuple[Path, str]] = []
    model = cfg.model
    generator_ckpt, lora_ckpt, weights_dir = cfg.generator_ckpt, cfg.lora_ckpt, cfg.weights_dir
    if weights_dir is not None:
        folder = Path(weights_dir)
        if weights_layout(folder) == "diffusers":
            hint = DOWNLOAD_HINTS["diffusers"]
            if generator_ckpt is None and not _dit_present(folder / "transformer"):
                missing.append((folder / "transformer" / WAN_DIT_FILE, hint))
            if cfg.text_encoder != "minilm":
                for path in (folder / "text_encoder" / "config.json", folder / "tokenizer"):
                    if not path.exists():
                        missing.append((path, hint))
            for path in (folder / "vae" / "config.json", folder / "vae" / "diffusion_pytorch_model.safetensors"):
                if not path.exists():
                    missing.append((path, hint))
        else:
            hint = DOWNLOAD_HINTS.get(model, DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
            if generator_ckpt is None and not _dit_present(folder):
                missing.append((folder / WAN_DIT_FILE, hint))
            if cfg.text_encoder != "minilm":
                for path in (folder / WAN_T5_FILE, folder / WAN_TOKENIZER_DIR):
                    if not path.exists():
                        missing.append((path, hint))
            if not (folder / WAN_VAE_FILE).is_file():
                missing.append((folder / WAN_VAE_FILE, hint))
    for path in (generator_ckpt, lora_ckpt):
        if path is not None and not Path(path).is_file():
            missing.append((Path(path), DOWNLOAD_HINTS["memflow"]))
    return missing


def check_weights(cfg: DictConfig) -> None:
    """One WeightsError listing every missing file and the commands that download them."""
    missing = missing_weights(cfg)
    if missing:
        files = ", ".join(str(path) for path, _ in missing)
        commands = " && ".join(dict.fromkeys(hint for _, hint in missing))
        raise WeightsError(
            f"missing weights: {files}; download them with: {commands} "
            "(or point weights_dir / generator_ckpt / lora_ckpt at your copies)"
        )


# --------------------------------------------------------------------------------------------
# The plan


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


def vae_spatial_stride(preset: str) -> int:
    """Pixels per latent row/column of a VAE preset (each stage after the first halves the size)."""
    return 2 ** (len(vae_config(preset)["dim_mult"]) - 1)


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


def _load_schedules(cfg: DictConfig, num_frames: int, chunk: int) -> tuple[DictConfig, list[PromptSchedule]]:
    """The videos of ``data_path``; a timeline's settings become overrides of ``cfg``."""
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
    timeline = load_timeline(data_path, chunk, num_frames)
    if timeline.settings:
        log.info("timeline %s overrides %s", data_path, timeline.settings)
        cfg = OmegaConf.merge(cfg, timeline.settings)
    return cfg, [timeline.schedule]


def plan_run(cfg: DictConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> RunPlan:
    """Validate the whole config and list this rank's videos; creates only the output folder.

    Every user mistake is a :class:`~memflow.errors.MemFlowError` raised before any model is
    loaded or file written; the output folder is created (and proven writable) last.
    """
    chunk = require_positive_int(cfg, "num_frame_per_block")
    num_frames = require_multiple_of(
        cfg, "num_output_frames", chunk, f"a whole number of {chunk}-frame chunks (num_frame_per_block)"
    )
    cfg, schedules = _load_schedules(cfg, num_frames, chunk)
    stream = stream_config(cfg)

    model = require_choice(cfg, "model", sorted(PRESETS))
    overrides = get_field(cfg, "model_overrides")
    if not isinstance(overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping like {{text_dim: 384}}, got {overrides!r}")
    dit = run_dit_config(model, overrides)
    stride = vae_spatial_stride(require_choice(cfg, "vae", sorted(VAE_PRESETS)))
    _, patch_h, patch_w = dit.patch_size
    why = f"the VAE downsamples {stride}x and the DiT patches {{}} latents"
    height = require_multiple_of(cfg, "height", stride * patch_h, why.format(patch_h))
    width = require_multiple_of(cfg, "width", stride * patch_w, why.format(patch_w))

    seed = require_int(cfg, "seed", minimum=0)
    num_samples = require_positive_int(cfg, "num_samples")
    save_with_index = require_bool(cfg, "save_with_index")
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
    device = resolve_device(require_choice(cfg, "device", DEVICES), local_rank)
    dtype = resolve_dtype(require_choice(cfg, "dtype", list(DTYPES)), device)
    output_folder = get_field(cfg, "output_folder")
    if not isinstance(output_folder, str) or not output_folder:
        raise ConfigError(f"output_folder must be a folder path, got {output_folder!r}")
    to_container(cfg)  # a broken ${...} interpolation fails now, not after the first video
    check_weights(cfg)

    stems = plan_stems([s.segments[0].prompts[0][0] for s in schedules], num_samples, save_with_index)
    jobs = []
    for index, stem in enumerate(stems):
        if index % world_size == rank:
            prompt_index, sample = divmod(index, num_samples)
            jobs.append(VideoJob(index, prompt_index, sample, schedules[prompt_index], stem, video_seed(seed, index)))
    folder = check_writable(output_folder)
    return RunPlan(
        config=cfg, stream=stream, dit=dit, height=height, width=width,
        latent_height=height // stride, latent_width=width // stride, num_frames=num_frames,
        jobs=jobs, total_videos=len(stems), rank=rank, world_size=world_size, output_folder=folder, device=device,
        dtype=dtype,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models


@torch.no_grad()
def random_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Cheap seeded init: biases 0, 1-D weights and gains 1, others N(0, 1/fan_in).

    Good enough for random-weight runs (tests, speed measurements); meant for modules
    materialised from the meta device with ``to_empty``.
    """
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            param.zero_()
        elif leaf == "gamma" or param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
    return module


def materialize(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build a module on the meta device, allocate it on ``device`` and fill it by :func:`random_init`."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    random_init(module, torch.Generator(device=device).manual_seed(seed))
    if dtype != torch.float32:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def random_vae(preset: str, channels: int, device: torch.device, dtype: torch.dtype, seed: int) -> WanVAE:
    """A random-weight Wan VAE of ``preset`` with ``channels`` latent channels (neutral latent stats)."""
    config = vae_config(preset)
    if config["z_dim"] != channels:
        config = vae_config(preset, z_dim=channels, latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
    return WanVAE(materialize(lambda: AutoencoderKLWan(**config), device, dtype, seed))


@dataclass
class Components:
    """The loaded models of a run."""

    dit: WanDiT
    text_encoder: TextEncoder
    vae: WanVAE


def load_generator(plan: RunPlan) -> WanDiT:
    """``generator_ckpt`` (base.pt), else the Wan2.1 DiT of ``weights_dir``, else random; then the LoRA."""
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    overrides = dict(cfg.model_overrides)
    entry = "generator_ema" if cfg.use_ema else "generator"
    if cfg.generator_ckpt is not None:
        dit = load_dit(Path(cfg.generator_ckpt), cfg.model, entry=entry, dtype=dtype, device=device, **overrides)
    elif cfg.weights_dir is not None:
        dit = load_dit(Path(cfg.weights_dir), cfg.model, dtype=dtype, device=device, **overrides)
    else:
        log.warning("generator_ckpt and weights_dir are null: the DiT has random weights (seed %d)", cfg.seed)
        dit = materialize(lambda: build_dit(cfg.model, **overrides), device, dtype, cfg.seed)
    if cfg.lora_ckpt is not None:
        dit = apply_lora(dit, Path(cfg.lora_ckpt), cfg.adapter.rank, cfg.adapter.alpha, merge=cfg.merge_lora)
    return dit.eval().requires_grad_(False)


def load_text_encoder(
    cfg: DictConfig, dit: DiTConfig, device: torch.device, dtype: torch.dtype, offload: bool = False
) -> TextEncoder:
    """The encoder a config names (``text_encoder``: ``minilm``, or the UMT5 of ``weights_dir`` in ``dtype``),
    its width checked against the DiT's ``text_dim``; used by inference and training alike."""
    kwargs = dict(text_len=dit.text_len, device=device, offload_after_encode=offload)
    if cfg.text_encoder == "minilm":
        encoder = TextEncoder.from_minilm(**kwargs)
    elif weights_layout(Path(cfg.weights_dir)) == "diffusers":
        encoder = TextEncoder.from_diffusers(Path(cfg.weights_dir), dtype=dtype, **kwargs)
    else:
        encoder = TextEncoder.from_wan(Path(cfg.weights_dir), cfg.text_encoder, dtype=dtype, **kwargs)
    if encoder.dim != dit.text_dim:
        raise ConfigError(
            f"text_encoder={cfg.text_encoder} gives {encoder.dim}-dim embeddings but the DiT takes "
            f"text_dim={dit.text_dim}; set model_overrides.text_dim={encoder.dim} or use the matching encoder"
        )
    return encoder


def load_vae(cfg: DictConfig, channels: int, device: torch.device, dtype: torch.dtype, seed: int) -> WanVAE:
    """The VAE of ``weights_dir`` (random from ``seed`` without one), its latent channels checked against the
    DiT's ``channels``; used by inference and training alike."""
    if cfg.weights_dir is None:
        log.warning("weights_dir is null: the VAE has random weights (seed %d)", seed)
        return random_vae(cfg.vae, channels, device, dtype, seed)
    folder = Path(cfg.weights_dir)
    if weights_layout(folder) == "diffusers":
        vae = WanVAE.from_diffusers(folder, dtype=dtype, device=device)
    else:
        vae = WanVAE.from_wan(folder, cfg.vae, dtype=dtype, device=device)
    if vae.model.config.z_dim != channels:
        raise ConfigError(
            f"the VAE has {vae.model.config.z_dim} latent channels but the DiT {channels}; use a matching vae"
        )
    return vae


def build_text_encoder(plan: RunPlan) -> TextEncoder:
    """:func:`load_text_encoder` for an inference plan."""
    return load_text_encoder(plan.config, plan.dit, plan.device, plan.dtype, offload=plan.config.low_memory)


def build_vae(plan: RunPlan) -> WanVAE:
    """:func:`load_vae` for an inference plan."""
    return load_vae(plan.config, plan.dit.out_dim, plan.device, plan.dtype, plan.config.seed)


def build_components(plan: RunPlan) -> Components:
    """Load (or randomly initialise) the DiT, text encoder and VAE of a plan on its device."""
    return Components(load_generator(plan), build_text_encoder(plan), build_vae(plan))


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class ChunkReport:
    """Progress after one chunk: what is done and how long each part took (seconds)."""

    chunk: int
    num_chunks: int
    pixel_frames: int
    total_pixel_frames: int
    generate_s: float
    decode_s: float
    write_s: float
    elapsed_s: float

    @property
    def fps(self) -> float:
        return self.total_pixel_frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class VideoResult:
    """Files and figures of one finished video."""

    job: VideoJob
    video: Path
    sidecar: Path
    trace: Path | None
    latents: Path | None
    pixel_frames: int
    seconds: float
    peak_memory: dict[str, Any]
    chunks: list[ChunkReport] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.pixel_frames / self.seconds if self.seconds > 0 else 0.0


class VideoRunner:
    """Generates the videos of a plan one by one, streaming each chunk to its MP4 as it is decoded."""

    def __init__(self, plan: RunPlan, components: Components):
        self.plan = plan
        self.components = components
        self.generator = StreamingGenerator(components.dit, plan.stream, trace=plan.config.save_trace)
        self._embeddings: dict[str, torch.Tensor] = {}

    def encode_prompts(self, texts: Sequence[str]) -> None:
        """Encode every distinct text once (then the encoder is offloaded in low-memory mode)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if not new:
            return
        with torch.no_grad():
            encoded = self.components.text_encoder.encode(new)
        for text, embedding in zip(new, encoded, strict=True):
            self._embeddings[text] = embedding.to(self.plan.device, self.plan.dtype)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        self.encode_prompts(texts)
        return torch.stack([self._embeddings[t] for t in texts])

    def _sync(self) -> float:
        if self.plan.device.type == "cuda":
            torch.cuda.synchronize(self.plan.device)
        return time.perf_counter()

    def run(self, job: VideoJob, on_chunk: Callable[[ChunkReport], None] | None = None) -> VideoResult:
        """Generate one video; writes ``<stem>.mp4`` and its sidecar chunk by chunk, then the trace."""
        plan, gen = self.plan, self.generator
        conditioning = ChunkConditioning(job.schedule, self._encode)
        stem = unique_stem(plan.output_folder, job.stem, OUTPUT_SUFFIXES)
        video_path = plan.output_folder / f"{stem}.mp4"
        sidecar_path = plan.output_folder / f"{stem}.json"
        noise_gen = torch.Generator(device=plan.device).manual_seed(job.seed)
        shape = (1, gen.chunk, plan.dit.in_dim, plan.latent_height, plan.latent_width)
        decoder = self.components.vae.streaming_decoder()
        latents: list[torch.Tensor] = []
        reports: list[ChunkReport] = []
        if plan.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        start = self._sync()
        with torch.no_grad(), VideoWriter(video_path) as writer:
            current = None
            for cond in conditioning:
                t0 = self._sync()
                prompt = cond.embedding[None]
                if cond.chunk == 0:
                    gen.start(prompt, num_frames=plan.num_frames, latent_height=plan.latent_height,
                              latent_width=plan.latent_width)  # fmt: skip
                elif cond.switch:
                    gen.switch_prompt(prompt)
                elif (cond.segment, cond.alpha) != current:
                    gen.set_prompt(prompt)
                current = (cond.segment, cond.alpha)
                noise = torch.randn(shape, generator=noise_gen, device=plan.device).to(plan.dtype)
                x0 = gen.denoise_chunk(noise, generator=noise_gen)
                gen.commit_chunk(x0, generator=noise_gen)
                t1 = self._sync()
                pixels = decoder.decode(x0)[0]
                t2 = self._sync()
                writer.write(pixels)
                t3 = time.perf_counter()
                if plan.config.save_latents:
                    latents.append(x0[0].float().cpu())
                report = ChunkReport(cond.chunk, len(conditioning), pixels.shape[0], writer.frames_written,
                                     t1 - t0, t2 - t1, t3 - t2, t3 - start)  # fmt: skip
                reports.append(report)
                progress = VideoResult(job, video_path, sidecar_path, None, None, writer.frames_written,
                                       t3 - start, peak_memory(plan.device), reports)  # fmt: skip
                write_sidecar(sidecar_path, self._sidecar(progress, None, complete=False), replace=cond.chunk > 0)
                if on_chunk is not None:
                    on_chunk(report)
        seconds = time.perf_counter() - start
        memory = peak_memory(plan.device)
        trace = gen.memory_trace() if plan.config.save_trace else None
        latents_path = trace_path = None
        if latents:
            latents_path = plan.output_folder / f"{stem}.latents.safetensors"
            save_file({"latents": torch.stack(latents).flatten(0, 1).contiguous()}, str(latents_path),
                      metadata={"layout": "[F, C, H, W]", "seed": str(job.seed)})  # fmt: skip
        if trace is not None:
            trace_path = plan.output_folder / f"{stem}.memory.png"
            render_memory_trace(trace, trace_path)
        result = VideoResult(job, video_path, sidecar_path, trace_path, latents_path,
                             reports[-1].total_pixel_frames, seconds, memory, reports)  # fmt: skip
        write_sidecar(result.sidecar, self._sidecar(result, trace, complete=True), replace=True)
        return result

    def _sidecar(self, result: VideoResult, trace: dict | None, complete: bool) -> dict[str, Any]:
        """The sidecar, rewritten after every chunk (``complete: false``, no trace) so a killed run keeps one."""
        plan, job = self.plan, result.job
        return {
            "video": result.video.name,
            "complete": complete,
            "config": to_container(plan.config),
            "seed": plan.config.seed,
            "video_seed": job.seed,
            "sample_index": job.index,
            "prompt_index": job.prompt_index,
            "sample": job.sample,
            "rank": plan.rank,
            "world_size": plan.world_size,
            "prompts": job.schedule.to_dict(),
            "switch_frames": job.schedule.switch_frames,
            "resolution": {"height": plan.height, "width": plan.width},
            "latent_frames": plan.num_frames,
            "pixel_frames": result.pixel_frames,
            "fps_video": FPS,
            "device": str(plan.device),
            "dtype": str(plan.dtype).removeprefix("torch."),
            "timings": {
                "total_s": result.seconds,
                "fps": result.fps,
                "chunks": [
                    {
                        "chunk": r.chunk,
                        "pixel_frames": r.pixel_frames,
                        "generate_s": r.generate_s,
                        "decode_s": r.decode_s,
                        "write_s": r.write_s,
                    }
                    for r in result.chunks
                ],
            },
            "peak_memory": result.peak_memory,
            "files": {
                "latents": result.latents.name if result.latents else None,
                "memory_trace_png": result.trace.name if result.trace else None,
            },
            "memory_trace": trace,
        }


def format_bytes(count: int) -> str:
    """``1234567890`` -> ``1.15 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**power:.2f} {units[power]}"
