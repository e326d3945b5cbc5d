"""3-D rotary position embedding indexed by absolute frame, row and column."""

from __future__ import annotations

import torch

from .config import DiTConfig


def _band_angles(max_len: int, band: int, theta: float) -> torch.Tensor:
    """Angles [max_len, band // 2] of one band, in float64 like the reference."""
    inv = 1.0 / theta ** (torch.arange(0, band, 2, dtype=torch.float64, device="cpu") / band)
    return torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv)


class RotaryEmbedding:
    """cos/sin tables for tokens ordered (frame, row, column); frames are absolute positions.

    Tables are built on the CPU (also under a meta-device context) and copied once per device.
    """

    def __init__(self, config: DiTConfig):
        self.max_len = config.rope_max_len
        angles = [_band_angles(config.rope_max_len, band, config.rope_theta) for band in config.rope_bands]
        self._tables = {torch.device("cpu"): ([a.cos().float() for a in angles], [a.sin().float() for a in angles])}

    def _on(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if device not in self._tables:
            cos, sin = self._tables[torch.device("cpu")]
            self._tables[device] = ([c.to(device) for c in cos], [s.to(device) for s in sin])
        return self._tables[device]

    def __call__(
        self, start_frame: int, num_frames: int, rows: int, cols: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_frames * rows * cols, head_dim // 2]."""
        if start_frame + num_frames > self.max_len or max(rows, cols) > self.max_len:
            raise ValueError(f"positions exceed the rotary table ({self.max_len} positions per axis)")
        out = []
        for table_t, table_h, table_w in self._on(torch.device(device)):
            t = table_t[start_frame:start_frame + num_frames]
            h, w = table_h[:rows], table_w[:cols]
            grid = torch.cat(
                [
                    t[:, None, None].expand(-1, rows, cols, -1),
                    h[None, :, None].expand(num_frames, -1, cols, -1),
                    w[None, None, :].expand(num_frames, rows, -1, -1),
                ],
                dim=-1,
            )
            out.append(grid.reshape(num_frames * rows * cols, -1))
        return tuple(out)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, L, H, D] by per-token angles [L, D/2]."""
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))
    real, imag = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None], sin[None, :, None]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).to(dtype)
