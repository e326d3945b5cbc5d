"""The one attention entry point: SDPA by default, flash-attn when installed and applicable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional dependency, never required
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention on head-first tensors q [B, H, Lq, D], k/v [B, H, Lk, D].

    ``mask`` is a boolean tensor broadcastable to [B, H, Lq, Lk] (True = attend).
    """
    if (
        mask is None
        and _flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def block_causal_mask(
    num_frames: int, frame_tokens: int, block_frames: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean [L, L] mask: a token sees every token of its own chunk and all earlier chunks."""
    block = torch.arange(num_frames, device=device) // block_frames
    block = block.repeat_interleave(frame_tokens)
    return block[:, None] >= block[None, :]


def sliding_block_mask(
    num_frames: int,
    frame_tokens: int,
    block_frames: int,
    sink_frames: int,
    window_frames: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Block-causal mask limited to a sink plus a window of recent frames ending with the chunk.

    This is the full-sequence equivalent of streaming with a sink and a rolling window.
    """
    frame = torch.arange(num_frames, device=device)
    block_end = (frame // block_frames + 1) * block_frames
    q_end = block_end[:, None]
    k = frame[None, :]
    visible = (k < q_end) & ((k < sink_frames) | (k >= q_end - window_frames))
    return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
