"""Narrative Adaptive Memory (the bank of prototypes) and Sparse Memory Activation (routing).

The bank keeps, for every layer, the keys/values of at most ``bank_size`` latent frames: the
*prototypes* (first latent frame) of earlier chunks. Before a chunk is generated the pending
prototype enters the bank; once the bank is full, every slot is scored against the current
prompt's cross-attention keys and only the most relevant ``bank_size - 1`` survive, per layer.

Two update rules are offered (``StreamConfig.reference``):

* reference: the released code's pointer arithmetic, reproduced exactly - the pending prototype
  is (re)written at every chunk start, the slot pointer advances once per ``record_interval``
  chunks, so a prototype may be appended several times once the bank is full.
* paper: each recorded prototype enters the bank exactly once.

Bank slots live inside the attention buffer owned by ``memflow.context.StreamingContext``:
logical slot ``j`` is stored at physical slot ``bank_size - 1 - j`` so that the visible slots
are always contiguous with the frame sink that follows them.
"""

from __future__ import annotations

import math

import torch

from .config import StreamConfig


class MemoryBank:
    """Per-layer prototype memory; holds views into the context's key/value buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, frame_tokens: int, config: StreamConfig):
        """k, v: views [layers, B, H, bank_size * frame_tokens, D] of the attention buffers."""
        self.config = config
        self.size = config.bank_size
        self.frame_tokens = frame_tokens
        layers, batch, heads, _, dim = k.shape
        shape = (layers, batch, heads, self.size, frame_tokens, dim)
        self.k, self.v = k.view(shape), v.view(shape)
        pending = (layers, batch, heads, frame_tokens, dim)
        self.pending_k = k.new_zeros(pending)
        self.pending_v = v.new_zeros(pending)
        self.frames = torch.full((layers, batch, self.size), -1, dtype=torch.long, device=k.device)
        self.reset()

    def reset(self) -> None:
        self.frames.fill_(-1)
        self.pending_frame = -1
        self.pending_fresh = False
        self.filled = 0
        # reference pointers, in units of recorded groups (see ``_end_slot``)
        self.local_end = 0
        self.global_end = 0

    _TENSORS = ("pending_k", "pending_v", "frames")
    _SCALARS = ("pending_frame", "pending_fresh", "filled", "local_end", "global_end")

    def state_dict(self) -> dict:
        """Everything but the slot contents (those live in the context's buffers), on the CPU."""
        state = {name: getattr(self, name).cpu() for name in self._TENSORS}
        state.update({name: getattr(self, name) for name in self._SCALARS})
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self._TENSORS:
            getattr(self, name).copy_(state[name])
        for name in self._SCALARS:
            setattr(self, name, state[name])

    # -- recording ------------------------------------------------------------------------------
    def record(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """Keep a chunk's first latent frame (k, v [layers, B, H, frame_tokens, D]) as the prototype."""
        self.pending_k.copy_(k)
        self.pending_v.copy_(v)
        self.pending_frame = frame
        self.pending_fresh = True

    def records_at(self, start: int) -> bool:
        """Whether the clean (commit) pass of the chunk starting at ``start`` records a prototype."""
        chunk = start // self.config.num_frame_per_block
        if self.config.reference and self.config.bank_record == "latest":
            return True
        return chunk % self.config.record_interval == 0

    def _end_slot(self, end: int) -> int:
        """Reference: number of recorded groups once ``end`` frames exist."""
        return ((end // self.config.num_frame_per_block) - 1) // self.config.record_interval + 1

    def after_commit(self, end: int, recorded: bool, recompute: bool) -> None:
        """Advance the reference pointers after a cache-writing pass."""
        if self.config.reference and recorded and not recompute:
            slots = self.local_end + self._end_slot(end) - self.global_end
            self.global_end, self.local_end = self._end_slot(end), slots

    # -- update before a chunk -------------------------------------------------------------------
    def update(
        self, text_k: list[torch.Tensor] | None, text_mask: torch.Tensor | None, *, recache: bool = False
    ) -> None:
        """Let the pending prototype in, compressing by text relevance when the bank is full.

        ``text_k``: per-layer cross-attention keys [B, H, T, D] of the current prompt, or None
        when the text cache is empty (the reference scores against zeros then). The paper leaves
        the bank alone during a re-cache; the reference updates it then too.
        """
        if self.config.reference:
            if self.local_end < 1:
                return
            if self.local_end <= self.size:
                self._write(self.local_end - 1)
            else:
                self._compress(text_k, text_mask)
            return
        if recache or not self.pending_fresh:
            return
        if self.filled < self.size:
            self._write(self.filled)
            self.filled += 1
        else:
            self._compress(text_k, text_mask)
        self.pending_fresh = False

    def _slot(self, logical: int) -> int:
        return self.size - 1 - logical

    def _write(self, logical: int) -> None:
        slot = self._slot(logical)
        self.k[:, :, :, slot].copy_(self.pending_k)
        self.v[:, :, :, slot].copy_(self.pending_v)
        self.frames[:, :, logical] = self.pending_frame

    def _compress(self, text_k: list[torch.Tensor] | None, text_mask: torch.Tensor | None) -> None:
        """Keep the ``size - 1`` slots most relevant to the prompt (per layer), then the prototype."""
        physical = self.k.flip(3)  # logical order, a copy: [L, B, H, S, T, D]
        values = self.v.flip(3)
        scores = self.relevance(physical, text_k, text_mask)  # [L, B, S]
        keep = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : self.size - 1]
        index = keep[:, :, None, :, None, None].expand(-1, -1, physical.shape[2], -1, *physical.shape[4:])
        kept_k = torch.gather(physical, 3, index)
        kept_v = torch.gather(values, 3, index)
        for logical in range(self.size - 1):
            slot = self._slot(logical)
            self.k[:, :, :, slot].copy_(kept_k[:, :, :, logical])
            self.v[:, :, :, slot].copy_(kept_v[:, :, :, logical])
        self.frames[..., : self.size - 1] = torch.gather(self.frames, 2, keep)
        self._write(self.size - 1)

    def relevance(
        self, bank_k: torch.Tensor, text_k: list[torch.Tensor] | None, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Score [L, B, S] of every bank frame against the prompt's text keys, per layer.

        Reference: the mean over text rows (padding included), heads and frame tokens of the
        scaled dot products. Paper: text queries attend (softmax) over all bank tokens; a frame's
        score is the attention mass it receives, averaged over real text tokens and heads.
        """
        layers, batch, _, slots, tokens, dim = bank_k.shape
        if text_k is None:
            return bank_k.new_zeros(layers, batch, slots, dtype=torch.float32)
        text = torch.stack(text_k).float()  # [L, B, H, T, D]
        bank = bank_k.float()
        scale = 1.0 / math.sqrt(dim)
        if self.config.reference:
            mean_text = text.mean(dim=3)  # [L, B, H, D]
            mean_frame = bank.mean(dim=4)  # [L, B, H, S, D]
            return (torch.einsum("lbhd,lbhsd->lbhs", mean_text, mean_frame) * scale).mean(dim=2)
        logits = torch.einsum("lbhtd,lbhsnd->lbhtsn", text, bank) * scale
        mass = logits.flatten(-2).softmax(dim=-1).unflatten(-1, (slots, tokens)).sum(-1)  # [L,B,H,T,S]
        if text_mask is None:
            return mass.mean(dim=(2, 3))
        weight = text_mask.float()[None, :, None, :, None]
        return (mass * weight).sum(dim=3).mean(dim=2) / weight.sum(dim=3).mean(dim=2).clamp_min(1)

    # -- visibility --------------------------------------------------------------------------------
    def visible(self, start: int, num_frames: int, recache: bool) -> int:
        """How many logical slots the call starting at ``start`` attends to."""
        if not self.config.reference:
            return self.filled
        chunk = self.config.num_frame_per_block
        slots = self.local_end + self._end_slot(start + num_frames) - self.global_end
        if not recache and (start // chunk) % self.config.record_interval == 0:
            slots -= num_frames // chunk
        return max(0, min(slots, self.size))

    def visible_frames(self, count: int) -> torch.Tensor:
        """Absolute frame ids [L, B, count] of the first ``count`` logical slots."""
        return self.frames[..., :count]


def select_memory_frames(
    q: torch.Tensor, memory_k: torch.Tensor, top_k: int, per_frame: int | None, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """SMA routing: indices of the ``top_k`` memory frames most relevant to the query.

    q [B, H, Lq, D]; memory_k [B, H, M, T, D]. Relevance is the dot product of the mean query
    with each frame's mean key (no scaling), accumulated in float32. With ``per_frame=None`` one
    descriptor serves the whole chunk -> [B, H, top_k]; otherwise every query frame of ``per_frame``
    tokens gets its own -> [B, H, Lq // per_frame, top_k]. ``visible`` [M] (bool) excludes frames
    (they are chosen last). The indices come in no particular order (attention does not depend on it).
    """
    mean_k = memory_k.mean(dim=3, dtype=torch.float32)  # [B, H, M, D]
    if per_frame is None:
        scores = torch.matmul(mean_k, q.mean(dim=2, dtype=torch.float32)[..., None])[..., 0]  # [B, H, M]
    else:
        q_frames = q.unflatten(2, (-1, per_frame)).mean(dim=3, dtype=torch.float32)  # [B, H, n, D]
        scores = torch.matmul(q_frames, mean_k.transpose(-1, -2))  # [B, H, n, M]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.topk(top_k, dim=-1, sorted=False).indices
