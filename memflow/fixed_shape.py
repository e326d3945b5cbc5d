"""Fixed-shape attention for a compiled chunk step: every call of a kind has the same tensor shapes.

The eager path (:mod:`memflow.context`) slices the visible part of a layer's buffer, so shapes change
while the sink, the window and the bank fill, and its plan is Python integers, on which a compiler
would specialise. Here a call is described by tensors instead (:class:`FixedCall`): which buffer
tokens it writes and from which new tokens, and which buffer positions are visible. Each layer writes
its new keys with one indexed copy and attends to the whole buffer, so a compiled block sees the same
shapes from the first chunk to the last and across prompt switches (a re-cache has its own frame count,
hence its own graph). While the cache fills, a key mask hides what the call must not see (masked
positions get exactly zero weight, so the result equals the eager slices up to float rounding); once the
call sees its whole buffer there is no mask (``visible`` is None), so the fast unmasked attention kernels
(flash-attn on CUDA) serve the steady state: two graphs per call kind, the second from the first full
chunk on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attention, routed_attention, stage_frames
from .config import StreamConfig
from .memory import select_memory_frames


@dataclass(frozen=True)
class SlotLayout:
    """Frame slots of one layer's buffer: ``[bank | sink | window ring | SMA stage]``."""

    frame_tokens: int
    bank: int
    sink: int
    window: int
    stage: int

    @property
    def memory(self) -> int:
        """Frames SMA may route to: every bank slot, then the sink."""
        return self.bank + self.sink

    @property
    def frames(self) -> int:
        return self.bank + self.sink + self.window + self.stage


@dataclass(frozen=True)
class FixedCall:
    """One model call as tensors: the buffer tokens it writes, their new-token sources, what it sees."""

    dst: torch.Tensor  # [n] buffer token positions written
    src: torch.Tensor  # [n] positions among the call's new tokens
    visible: torch.Tensor | None  # [1, 1, 1, (bank + sink + window) tokens] bool; None: all of them
    memory: torch.Tensor  # [bank + sink] bool: memory frames that hold visible keys


def memory_visible(layout: SlotLayout, bank_len: int, sink_len: int) -> torch.Tensor:
    """[bank + sink] bool: the last ``bank_len`` bank slots (the visible ones) and the first ``sink_len`` sink slots."""
    visible = torch.zeros(layout.memory, dtype=torch.bool)
    visible[layout.bank - bank_len : layout.bank] = True
    visible[layout.bank : layout.bank + sink_len] = True
    return visible


def fixed_call(
    layout: SlotLayout,
    runs: tuple[tuple[int, int, int], ...],
    bank_len: int,
    sink_len: int,
    window_len: int,
    *,
    device: torch.device,
) -> FixedCall:
    """The :class:`FixedCall` of a planned call (``CallPlan`` runs and visible lengths)."""
    dst = torch.cat([torch.arange(d, d + n) for d, _, n in runs]) if runs else torch.zeros(0, dtype=torch.long)
    src = torch.cat([torch.arange(s, s + n) for _, s, n in runs]) if runs else torch.zeros(0, dtype=torch.long)
    window = torch.arange(layout.window) < window_len
    frames = torch.cat([memory_visible(layout, bank_len, sink_len), window])
    visible = None if frames.all() else frames.repeat_interleave(layout.frame_tokens)[None, None, None].to(device)
    return FixedCall(dst.to(device), src.to(device), visible, frames[: layout.memory].to(device))


class FixedLayer:
    """One layer's attention under a :class:`FixedCall` (``LayerAttention``); no layer index, no Python ints
    that change between calls, so one compiled block graph serves every layer and chunk."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        call: FixedCall,
        layout: SlotLayout,
        config: StreamConfig,
        trace: torch.Tensor | None,
    ):
        """keys/values: the layer's live buffers [B, H, tokens, D]; ``trace`` receives SMA's choices."""
        self.keys, self.values, self.call, self.layout = keys, values, call, layout
        self.config, self.trace = config, trace

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        call, keys, values = self.call, self.keys, self.values
        keys.index_copy_(2, call.dst, k.index_select(2, call.src))
        values.index_copy_(2, call.dst, v.index_select(2, call.src))
        if self.config.memory != "nam_sma":
            seen = (self.layout.memory + self.layout.window) * self.layout.frame_tokens
            return attention(q, keys[:, :, :seen], values[:, :, :seen], call.visible)
        return self._routed(q)

    def _routed(self, q: torch.Tensor) -> torch.Tensor:
        """SMA over every memory slot, the invisible ones excluded from routing and masked when chosen."""
        layout, call, keys, values = self.layout, self.call, self.keys, self.values
        t, memory = layout.frame_tokens, layout.memory * layout.frame_tokens
        ring_end = memory + layout.window * t
        memory_k = keys[:, :, :memory].unflatten(2, (-1, t))
        memory_v = values[:, :, :memory].unflatten(2, (-1, t))
        per_frame = None if self.config.reference else t
        hidden = call.visible is not None
        chosen = select_memory_frames(q, memory_k, layout.stage, per_frame, call.memory if hidden else None)
        if self.trace is not None:
            self.trace.copy_(chosen)
        if per_frame is not None:
            ring = slice(memory, ring_end)
            mask = self._mask(chosen, routed_first=True) if hidden else None
            return routed_attention(q, memory_k, memory_v, keys[:, :, ring], values[:, :, ring], chosen, mask)
        stage_frames(keys, values, memory_k, memory_v, chosen, ring_end)
        mask = self._mask(chosen, routed_first=False)[:, :, None] if hidden else None
        return attention(q, keys[:, :, memory:], values[:, :, memory:], mask)

    def _mask(self, chosen: torch.Tensor, *, routed_first: bool) -> torch.Tensor:
        """[B, H, (n,) keys] bool over the routed frames and the window, in the order they are attended."""
        t, memory = self.layout.frame_tokens, self.layout.memory * self.layout.frame_tokens
        routed = self.call.memory[chosen].repeat_interleave(t, dim=-1)  # [B, H, (n,) k * T]
        window = self.call.visible[0, 0, 0, memory:].expand(*routed.shape[:-1], -1)  # [B, H, (n,) W * T]
        return torch.cat([routed, window] if routed_first else [window, routed], -1)
