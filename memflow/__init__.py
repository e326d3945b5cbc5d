"""MemFlow model library: Wan2.1 DiT, streaming KV context, narrative memory, scheduler, weights."""

from .config import PRESETS, DiTConfig, StreamConfig, dit_config
from .dit import WanDiT, build_dit

__all__ = ["PRESETS", "DiTConfig", "StreamConfig", "WanDiT", "build_dit", "dit_config"]
