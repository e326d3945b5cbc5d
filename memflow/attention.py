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


def gather_frames(memory: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The chosen frames of memory [B, H, M, T, D] per head (``chosen`` [B, H, k]) -> [B, H, k * T, D]."""
    t, d = memory.shape[-2:]
    return torch.gather(memory, 2, chosen[..., None, None].expand(-1, -1, -1, t, d)).flatten(2, 3)


def stage_frames(
    keys: torch.Tensor, values: torch.Tensor, memory_k: torch.Tensor, memory_v: torch.Tensor, chosen: torch.Tensor,
    at: int,
) -> None:
    """Write the chosen memory frames (``chosen`` [B, H, k]) into keys/values [B, H, L, D] from token ``at`` on.

    SMA with one descriptor per chunk stages them right after the window, so the window and its
    routed frames are one slice: only k frames are copied per head, never the window.
    """
    n = chosen.shape[-1] * memory_k.shape[-2]
    keys[:, :, at : at + n] = gather_frames(memory_k, chosen)
    values[:, :, at : at + n] = gather_frames(memory_v, chosen)


def routed_attention(
    q: torch.Tensor,
    memory_k: torch.Tensor,
    memory_v: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    chosen: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SMA's attention: each query sees its routed memory frames and the whole local window.

    q [B, H, Lq, D]; memory_k/v [B, H, M, T, D] (M frames of T tokens); window_k/v [B, H, W, D].
    ``chosen`` holds memory frame indices: [B, H, k] routes every query alike, [B, H, n, k] routes
    each of n query frames (Lq // n tokens) on its own. Only the chosen frames are gathered, so the
    cost grows with k, not M. ``mask`` [B, H, n, k * T + W] (bool) hides keys, routed frames first.
    """
    if chosen.dim() == 3:
        chosen = chosen[:, :, None]
    heads, n = q.shape[1], chosen.shape[2]

    def per_query_frame(memory: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        routed = gather_frames(memory[:, :, None].expand(-1, -1, n, -1, -1, -1).flatten(1, 2), chosen.flatten(1, 2))
        return torch.cat([routed, window.repeat_interleave(n, dim=1)], 2)

    if mask is not None:
        mask = mask.flatten(1, 2)[:, :, None]
    # the query frames become extra heads, each over its own keys: [B, H * n, Lq // n, D]
    out = attention(q.unflatten(2, (n, -1)).flatten(1, 2), per_query_frame(memory_k, window_k),
                    per_query_frame(memory_v, window_v), mask)
    return out.unflatten(1, (heads, n)).flatten(2, 3)


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
