"""Per-run streaming state: frame sink, rolling local window, memory bank and text cache.

One preallocated key/value buffer per run holds, for every layer, the tokens of

    [ bank (bank_size frames) | sink (sink_size frames) | window ring (window_size frames) ]

Absolute latent frame ``f`` lives in sink slot ``f - origin`` for the first ``sink_size`` frames
after ``origin`` (0, or the restart point of a re-cache without ``global_sink``) and in ring slot
``(f - origin - sink_size) % window_size`` afterwards. The ring never moves data: a new chunk
simply overwrites the slots of the frames it evicts. Attention order inside the key set does not
matter (positions are in the rotary phases), so a chunk's keys are one contiguous slice of the
buffer: the visible bank slots, the sink, and the filled part of the ring.

A model call is described by a ``CallPlan`` (pure integer bookkeeping on the host, no tensor
reads), so the per-chunk loop never synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import attention, routed_attention, stage_frames
from .config import StreamConfig
from .dit import LayerAttention, TextKV
from .fixed_shape import FixedCall, FixedLayer, SlotLayout, fixed_call, memory_visible
from .memory import MemoryBank, select_memory_frames

CALL_KINDS = ("denoise", "commit", "recache")


@dataclass(frozen=True)
class CallPlan:
    """What one model call over frames [start, start + num_frames) reads and writes."""

    start: int
    num_frames: int
    kind: str
    recompute: bool
    runs: tuple[tuple[int, int, int], ...]  # (buffer token offset, new-token offset, tokens)
    bank_len: int
    sink_len: int
    window_len: int
    record: bool

    @property
    def end(self) -> int:
        return self.start + self.num_frames

    @property
    def writes_cache(self) -> bool:
        return self.kind != "denoise"


@dataclass
class CallTrace:
    """What one call attended to (device tensors until read)."""

    start: int
    num_frames: int
    kind: str
    sink: list[int]
    window: list[int]
    bank: torch.Tensor | None  # [L, B, bank_len] absolute frame ids
    sma: list[torch.Tensor] = field(default_factory=list)  # per layer: frame ids [B, H, (n,) k], -1 = none
    fixed_sma: list[torch.Tensor] = field(default_factory=list)  # a fixed-shape call's memory indices, per layer


class StreamingContext:
    """The attention context of the streaming generator (implements ``SelfAttentionContext``)."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        frame_tokens: int,
        batch_size: int,
        max_frames: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.config = config
        self.frame_tokens = frame_tokens
        self.sink = config.sink_size
        self.window = max_frames - self.sink if config.memory == "full" else config.window_size
        if self.window < 1:
            raise ValueError(f"max_frames={max_frames} leaves no room after the {self.sink}-frame sink")
        self.bank_slots = config.bank_size if config.uses_bank else 0
        # SMA gathers its routed memory frames right after the filled window, so its keys are one slice
        self.stage = min(config.top_k, self.bank_slots + self.sink) if config.memory == "nam_sma" else 0
        self.layout = SlotLayout(frame_tokens, self.bank_slots, self.sink, self.window, self.stage)
        tokens = self.layout.frames * frame_tokens
        shape = (num_layers, batch_size, num_heads, tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)  # one persistent view per layer
        bank_tokens = self.bank_slots * frame_tokens
        self.bank = (
            MemoryBank(self.k[:, :, :, :bank_tokens], self.v[:, :, :, :bank_tokens], frame_tokens, config)
            if self.bank_slots
            else None
        )
        self.text_kv: TextKV | None = None
        self.text_mask: torch.Tensor | None = None
        self.tracing = False
        self.fixed: FixedCall | None = None
        self._fixed_calls: dict[tuple, FixedCall] = {}
        self.reset()

    # -- run state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: a new video starts."""
        self.k.zero_()
        self.v.zero_()
        self.origin = 0
        self.committed = 0
        self.plan: CallPlan | None = None
        self.text_scores_stale = False
        self.traces: list[CallTrace] = []
        if self.bank is not None:
            self.bank.reset()

    def restart_sink(self, origin: int) -> None:
        """Drop the sink and window (not the bank); frames from ``origin`` on refill them."""
        self.k[:, :, :, self.bank_slots * self.frame_tokens :].zero_()
        self.v[:, :, :, self.bank_slots * self.frame_tokens :].zero_()
        self.origin = origin
        self.committed = origin

    def state_dict(self) -> dict:
        """The cache, the bank and the pointers, on the CPU (the text cache is rebuilt from the prompt)."""
        state = {"k": self.k.cpu(), "v": self.v.cpu(), "origin": self.origin, "committed": self.committed,
                 "text_scores_stale": self.text_scores_stale}  # fmt: skip
        if self.bank is not None:
            state["bank"] = self.bank.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict` on a context of the same geometry."""
        if tuple(self.k.shape) != tuple(state["k"].shape):
            raise ValueError(f"saved cache {tuple(state['k'].shape)} does not fit this context's {tuple(self.k.shape)}")
        self.k.copy_(state["k"])
        self.v.copy_(state["v"])
        self.origin, self.committed = int(state["origin"]), int(state["committed"])
        self.text_scores_stale = bool(state["text_scores_stale"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])

    def set_text(self, text_kv: TextKV, text_mask: torch.Tensor | None, *, switch: bool) -> None:
        """Install a prompt's cross-attention keys/values (the text cache).

        In reference mode a switch leaves the bank scoring against an empty text cache until
        the first pass that is not a re-cache has run, as the released code does.
        """
        self.text_kv = text_kv
        self.text_mask = text_mask
        if switch and self.config.reference:
            self.text_scores_stale = True

    def update_bank(self, *, recache: bool = False) -> None:
        """Before a chunk (or a re-cache): let the pending prototype into the bank."""
        if self.bank is None:
            return
        text_k = None if self.text_scores_stale or self.text_kv is None else [k for k, _ in self.text_kv]
        self.bank.update(text_k, self.text_mask, recache=recache)

    # -- planning ----------------------------------------------------------------------------------
    def begin(self, start: int, num_frames: int, kind: str, *, fixed: bool = False) -> CallPlan:
        """Plan a model call over frames [start, start + num_frames).

        ``fixed`` also describes it as tensors (:class:`~memflow.fixed_shape.FixedCall`), for a compiled
        step whose shapes must not change from call to call; such a call runs without autograd.
        """
        if kind not in CALL_KINDS:
            raise ValueError(f"kind must be one of {CALL_KINDS}, got {kind!r}")
        if start < self.origin:
            raise ValueError(f"frame {start} lies before the current sink origin {self.origin}")
        end = start + num_frames
        recompute = end <= self.committed and start > self.origin
        high = max(self.committed, end)
        sink_end = self.origin + self.sink
        first = max(start, sink_end) if recompute else start
        t = self.frame_tokens
        runs = []
        for frame in range(first, min(end, sink_end)):
            runs.append(((self.bank_slots + frame - self.origin) * t, (frame - start) * t, t))
        for frame in range(max(first, sink_end, end - self.window), end):
            slot = self.bank_slots + self.sink + (frame - sink_end) % self.window
            runs.append((slot * t, (frame - start) * t, t))
        bank_len = 0 if self.bank is None else self.bank.visible(start, num_frames, kind == "recache")
        record = kind == "commit" and self.bank is not None and self.bank.records_at(start)
        self.plan = CallPlan(
            start=start,
            num_frames=num_frames,
            kind=kind,
            recompute=recompute,
            runs=_merge_runs(runs),
            bank_len=bank_len,
            sink_len=min(self.sink, high - self.origin),
            window_len=min(self.window, max(0, high - sink_end)),
            record=record,
        )
        if fixed:
            key = (self.plan.runs, bank_len, self.plan.sink_len, self.plan.window_len)
            if key not in self._fixed_calls:
                self._fixed_calls[key] = fixed_call(self.layout, *key, device=self.k.device)
            self.fixed = self._fixed_calls[key]
        if self.tracing:
            self.traces.append(self._trace(self.plan, fixed))
        return self.plan

    def end(self) -> None:
        """Finish the planned call: record the prototype, move the pointers of cache-writing passes."""
        plan = self.plan
        if self.tracing and self.traces[-1].fixed_sma:
            trace = self.traces[-1]
            trace.sma, trace.fixed_sma = [self._memory_frame_ids(i, c) for i, c in enumerate(trace.fixed_sma)], []
        if plan.record:  # the chunk's first frame, as just written (StreamConfig keeps a chunk in the window)
            dst, t = plan.runs[0][0], self.frame_tokens
            self.bank.record(self.k[:, :, :, dst : dst + t], self.v[:, :, :, dst : dst + t], plan.start)
        if plan.writes_cache and not plan.recompute:
            self.committed = max(self.committed, plan.end)
        if self.bank is not None and plan.writes_cache:
            self.bank.after_commit(plan.end, plan.record, plan.recompute)
        if plan.kind != "recache":
            self.text_scores_stale = False
        self.plan = None
        self.fixed = None

    def _trace(self, plan: CallPlan, fixed: bool) -> CallTrace:
        high = max(self.committed, plan.end)
        sink_end = self.origin + self.sink
        window_start = max(sink_end, high - self.window)
        routes = (*self.k.shape[1:3], *(() if self.config.reference else (plan.num_frames,)), self.stage)
        sma = [self.k.new_empty(routes, dtype=torch.long) for _ in self.k] if fixed and self.stage else []
        return CallTrace(
            start=plan.start,
            num_frames=plan.num_frames,
            kind=plan.kind,
            sink=list(range(self.origin, self.origin + plan.sink_len)),
            window=list(range(window_start, high)),
            bank=None if self.bank is None else self.bank.visible_frames(plan.bank_len).clone(),
            fixed_sma=sma,
        )

    # -- attention ---------------------------------------------------------------------------------
    def layer(self, index: int) -> LayerAttention:
        """Layer ``index``'s attention for the planned call (``SelfAttentionContext``): fixed-shape when the call
        was planned ``fixed`` (a compiled step), else the eager slices of :meth:`attend`."""
        if self.fixed is None:
            return _Layer(self, index)
        trace = self.traces[-1].fixed_sma[index] if self.tracing and self.stage else None
        return FixedLayer(self.layer_k[index], self.layer_v[index], self.fixed, self.layout, self.config, trace)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Place the call's keys/values in the layer's buffer and attend.

        Without autograd the new keys go straight into the live buffer (a denoising pass only
        touches the slots of the frames its chunk evicts). With autograd the pass attends to a
        copy, so the cache never becomes part of a graph; a cache-writing pass also stores
        detached keys/values in the live buffer.
        """
        plan = self.plan
        keys, values = self.k[layer], self.v[layer]
        if _needs_grad(q, k, v):
            keys, values = keys.clone(), values.clone()
            if plan.writes_cache:
                _place(self.k[layer], self.v[layer], k.detach(), v.detach(), plan)
        _place(keys, values, k, v, plan)
        return self._attend_keys(plan, layer, q, keys, values, trace=self.tracing)

    def checkpoint_view(self) -> _Snapshot | None:
        """A read-only copy of the buffers and the current plan, for gradient checkpointing.

        A checkpointed block runs its attention again during backward, after the live context
        has moved on; it must see exactly what the forward saw. Passes that write the cache
        cannot be replayed and return None (the caller then runs them without checkpointing).
        """
        if self.plan is None or self.plan.writes_cache:
            return None
        return _Snapshot(self, self.plan, self.k.clone(), self.v.clone())

    def _attend_keys(
        self, plan: CallPlan, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, trace: bool
    ) -> torch.Tensor:
        """Attention of ``q`` over the visible part of one layer's (filled) buffer."""
        t = self.frame_tokens
        lo = (self.bank_slots - plan.bank_len) * t
        mid = (self.bank_slots + plan.sink_len) * t
        hi = (self.bank_slots + self.sink + plan.window_len) * t if plan.window_len else mid
        if self.config.memory != "nam_sma":
            return attention(q, keys[:, :, lo:hi], values[:, :, lo:hi])
        return self._sparse_attend(layer, q, keys, values, lo, mid, hi, trace)

    def _sparse_attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lo: int, mid: int, hi: int,
        trace: bool,
    ) -> torch.Tensor:
        """SMA: each head attends to its ``top_k`` most relevant memory frames plus the window.

        With one descriptor per chunk the routed frames are gathered right after the filled window
        (the stage), so the keys are one slice and the window is never copied.
        """
        t = self.frame_tokens
        memory_k = keys[:, :, lo:mid].unflatten(2, (-1, t))  # [B, H, M, T, D]: bank then sink
        memory_v = values[:, :, lo:mid].unflatten(2, (-1, t))
        top_k = min(self.config.top_k, memory_k.shape[2])
        per_frame = None if self.config.reference else t
        chosen = select_memory_frames(q, memory_k, top_k, per_frame)
        if trace:
            self.traces[-1].sma.append(self._memory_frame_ids(layer, chosen + (self.bank_slots - self.plan.bank_len)))
        if per_frame is not None:
            return routed_attention(q, memory_k, memory_v, keys[:, :, mid:hi], values[:, :, mid:hi], chosen)
        stage_frames(keys, values, memory_k, memory_v, chosen, hi)
        end = hi + top_k * t
        return attention(q, keys[:, :, mid:end], values[:, :, mid:end])

    def _memory_frame_ids(self, layer: int, chosen: torch.Tensor) -> torch.Tensor:
        """Map memory indices (every bank slot in buffer order, then the sink) to frame ids; -1 where not visible."""
        plan = self.plan
        batch = chosen.shape[0]
        ids = torch.arange(self.origin, self.origin + self.sink, device=chosen.device).expand(batch, -1)
        if self.bank is not None:
            bank = self.bank.frames[layer].flip(-1)  # buffer order: [B, bank_slots]
            ids = torch.cat([bank, ids], dim=-1)
        visible = memory_visible(self.layout, plan.bank_len, plan.sink_len).to(chosen.device)
        ids = ids.masked_fill(~visible, -1)
        shape = (batch,) + (1,) * (chosen.dim() - 2) + (ids.shape[-1],)
        ids = ids.reshape(shape).expand(*chosen.shape[:-1], -1)
        return torch.gather(ids, -1, chosen)


class _Layer:
    """One layer of a context with ``attend(layer, q, k, v)`` (the live context or a snapshot)."""

    def __init__(self, context: StreamingContext | _Snapshot, index: int):
        self.context, self.index = context, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.context.attend(self.index, q, k, v)


class _Snapshot:
    """What one non-writing call attends to, frozen: a checkpointed block may replay it in backward."""

    def __init__(self, context: StreamingContext, plan: CallPlan, k: torch.Tensor, v: torch.Tensor):
        self.context, self.plan, self.k, self.v = context, plan, k, v

    def layer(self, index: int) -> _Layer:
        return _Layer(self, index)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.k[layer].clone(), self.v[layer].clone()
        _place(keys, values, k, v, self.plan)
        return self.context._attend_keys(self.plan, layer, q, keys, values, trace=False)

    def checkpoint_view(self) -> _Snapshot:
        return self


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _place(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan) -> None:
    """Copy the call's new keys/values into their slots of one layer's buffer."""
    for dst, src, n in plan.runs:
        keys[:, :, dst : dst + n] = k[:, :, src : src + n]
        values[:, :, dst : dst + n] = v[:, :, src : src + n]


def _merge_runs(runs: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """Coalesce consecutive (dst, src, n) runs into longer copies."""
    merged: list[list[int]] = []
    for dst, src, n in runs:
        if merged and merged[-1][0] + merged[-1][2] == dst and merged[-1][1] + merged[-1][2] == src:
            merged[-1][2] += n
        else:
            merged.append([dst, src, n])
    return tuple(tuple(r) for r in merged)
