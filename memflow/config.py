"""Model presets and streaming settings as plain dataclasses.

Every size the model, cache and pipelines use is derived from these objects and the requested
resolution; literal layer counts, head sizes or token counts appear only in ``PRESETS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from utils.errors import ConfigError

MEMORY_MODES = ("none", "nam", "nam_sma", "full")
BANK_RECORD_POLICIES = ("latest", "first")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a Wan2.1 text-to-video DiT."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_len: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_bands(self) -> tuple[int, int, int]:
        """Channels of one head given to (time, height, width) rotary bands."""
        spatial = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * spatial, spatial, spatial

    def latent_grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """Token grid (rows, columns) of one latent frame."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch {ph}x{pw}"
            )
        return latent_height // ph, latent_width // pw

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        rows, cols = self.latent_grid(latent_height, latent_width)
        return rows * cols


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # The golden-case model: 2 heads of 64, 2 blocks, 32-dim text.
    "tiny": DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32),
    # CPU benchmarks where attention matters (6.9M parameters; 256 tokens a frame at 256x256 with the tiny VAE):
    # the 1.3B's head size, UMT5 text width and dim : ffn ratio at 4 heads and 4 blocks.
    "mid": DiTConfig(dim=256, ffn_dim=1536, num_heads=4, num_layers=4),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """A preset, optionally with some fields replaced (e.g. ``text_dim=384``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {field.name for field in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a DiT config field; choose from {sorted(fields)}")
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(overrides["patch_size"])
    return dataclasses.replace(PRESETS[preset], **overrides)


def run_dit_config(preset: str, overrides: dict) -> DiTConfig:
    """:func:`dit_config` for a run config's ``model`` and ``model_overrides``: a bad one is a ConfigError."""
    try:
        return dit_config(preset, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_overrides={overrides}: {err}") from None


@dataclass(frozen=True)
class StreamConfig:
    """How frames are streamed and remembered (method sections 2-5).

    ``reference=True`` reproduces the released code where it differs from the paper: NAM
    relevance as averaged raw scaled scores over every text row, one SMA descriptor per chunk,
    the bank updated by pointer arithmetic at every chunk start (so a prototype may be appended
    more than once), and bank scores taken against an empty text cache right after a switch.
    ``reference=False`` follows the paper: softmax relevance over real text tokens, one SMA
    descriptor per query frame, each prototype inserted exactly once, scored with the new prompt.
    """

    num_frame_per_block: int = 3
    local_attn_size: int = 12
    sink_size: int = 3
    memory: str = "nam"
    bank_size: int = 3
    record_interval: int = 3
    bank_record: str = "first"
    top_k: int = 3
    reference: bool = True
    denoising_step_list: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_noise: float = 0.0
    global_sink: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory={self.memory!r}: choose one of {', '.join(MEMORY_MODES)}")
        if self.bank_record not in BANK_RECORD_POLICIES:
            raise ValueError(
                f"bank_record={self.bank_record!r}: choose one of {', '.join(BANK_RECORD_POLICIES)}"
            )
        if self.num_frame_per_block < 1:
            raise ValueError("num_frame_per_block must be >= 1")
        if self.sink_size < 0 or self.sink_size >= self.local_attn_size:
            raise ValueError(
                f"sink_size={self.sink_size} must be >= 0 and smaller than "
                f"local_attn_size={self.local_attn_size}"
            )
        if self.local_attn_size < self.num_frame_per_block:
            raise ValueError("local_attn_size must hold at least one chunk (num_frame_per_block frames)")
        if self.uses_bank and self.bank_size < 1:
            raise ValueError(f"memory={self.memory!r} needs bank_size >= 1")
        if self.uses_bank and self.window_size < self.num_frame_per_block:
            raise ValueError(
                f"memory={self.memory!r} records a chunk's first frame from the window, so local_attn_size - "
                f"sink_size must be at least num_frame_per_block={self.num_frame_per_block}"
            )
        if self.memory == "nam_sma" and self.top_k < 1:
            raise ValueError("memory='nam_sma' needs top_k >= 1")
        if self.record_interval < 1:
            raise ValueError("record_interval must be >= 1")
        object.__setattr__(self, "denoising_step_list", tuple(float(t) for t in self.denoising_step_list))

    @property
    def uses_bank(self) -> bool:
        return self.memory in ("nam", "nam_sma")

    @property
    def window_size(self) -> int:
        """Frames of the rolling local window (the cache minus the sink)."""
        return self.local_attn_size - self.sink_size

    @classmethod
    def from_dict(cls, values: dict) -> StreamConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown streaming setting(s) {unknown}; known: {sorted(names - {'extra'})}")
        return cls(**values)
