"""Wan2.1 text-to-video DiT, bidirectional or causal by the attention context it is given.

Parameter names match the official Wan2.1 checkpoints (``blocks.N.self_attn.q`` ...), so the
published ``diffusion_pytorch_model.safetensors`` and the MemFlow ``base.pt`` (after stripping
``model.``) load without renaming. The residual stream and all modulation run in float32, as in
the reference; linear layers run in the parameter dtype.

Self-attention goes through a ``SelfAttentionContext`` when one is given: the streaming engine
(``memflow.context.StreamingContext``) supplies cached sink / bank / window keys there, so the
model itself knows nothing about caches or memory policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import DiTConfig, dit_config
from .rope import RotaryEmbedding, apply_rope


class LayerAttention(Protocol):
    """One layer's self-attention over the keys/values a context supplies."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q/k/v [B, H, L, D] of the new tokens (normed, rotated) -> output [B, H, L, D]."""


class SelfAttentionContext(Protocol):
    """Supplies the keys/values a chunk's queries attend to, per layer."""

    def layer(self, index: int) -> LayerAttention:
        """The attention of layer ``index`` (blocks never see the layer index, so one compiled block serves all)."""

    def checkpoint_view(self) -> SelfAttentionContext | None:
        """A context that returns the same attention when a checkpointed block replays it, or None."""


BlockRunner = Callable[..., torch.Tensor]


TextKV = list[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """cat(cos, sin) timestep features computed in float64, as the reference does."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    args = torch.outer(t.reshape(-1).to(torch.float64), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float().reshape(*t.shape, dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _linear_in(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x.to(layer.weight.dtype)


def _float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` (linear layers and activations) run in float32 whatever its parameter dtype and any autocast.

    The reference computes the time embedding, the modulation projection and the output head under
    float32 autocast, so bf16 weights only round the parameters there, not the activations.
    """
    layers = module if isinstance(module, nn.Sequential) else [module]
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        for layer in layers:
            x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
    return x


class _Projections(nn.Module):
    """The q/k/v/o projections and q/k RMS norms shared by self- and cross-attention."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] -> [B, L, H, D]."""
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        """Head-first [B, H, L, D] -> projected [B, L, dim]."""
        return self.o(attn.transpose(1, 2).flatten(2))


class SelfAttention(_Projections):
    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: LayerAttention | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = _linear_in(x, self.q)
        q = apply_rope(self.heads(self.norm_q(self.q(x))), *rope).transpose(1, 2)
        k = apply_rope(self.heads(self.norm_k(self.k(x))), *rope).transpose(1, 2)
        v = self.heads(self.v(x)).transpose(1, 2)
        return self.out(attention(q, k, v, mask) if context is None else context.attend(q, k, v))


class CrossAttention(_Projections):
    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [B, H, T, D] of the embedded text; computed once per prompt."""
        text = _linear_in(text, self.k)
        k = self.heads(self.norm_k(self.k(text))).transpose(1, 2).contiguous()
        return k, self.heads(self.v(text)).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(_linear_in(x, self.q)))).transpose(1, 2)
        return self.out(attention(q, *kv))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = (
            LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_kv: tuple[torch.Tensor, torch.Tensor],
        context: LayerAttention | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, F, T, C] float32 residual stream; e [B, F, 6, C] per-frame modulation."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float()[:, None] + e).unsqueeze(3).unbind(2)
        )
        b, f, t, c = x.shape
        h = self.norm1(x) * (1 + scale_sa) + shift_sa
        y = self.self_attn(h.reshape(b, f * t, c), rope, context, mask)
        x = x + y.float().view(b, f, t, c) * gate_sa
        y = self.cross_attn(self.norm3(x).reshape(b, f * t, c), text_kv)
        x = x + y.float().view(b, f, t, c)
        y = self.ffn(_linear_in(self.norm2(x) * (1 + scale_ff) + shift_ff, self.ffn[0]))
        return x + y.float() * gate_ff


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unsqueeze(3).unbind(2)
        return _float32(self.head, self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan2.1 DiT on latents laid out [B, F, C, H, W] (frames before channels)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    # -- text ---------------------------------------------------------------------------------
    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, T<=text_len, text_dim] prompt embeddings -> [B, text_len, dim], zero-padded first."""
        pad = self.config.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"context has {context.shape[1]} rows; the model takes at most {self.config.text_len}")
        context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def text_kv(self, context: torch.Tensor) -> TextKV:
        """Per-layer cross-attention keys/values of a prompt (the text cache)."""
        text = self.embed_text(context)
        return [block.cross_attn.text_kv(text) for block in self.blocks]

    # -- forward ------------------------------------------------------------------------------
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> tokens [B, F, rows*cols, dim] (a patch conv written as a matmul)."""
        b, f, c, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if pt != 1:
            raise NotImplementedError("temporal patching (patch_size[0] > 1) is not supported")
        rows, cols = self.config.latent_grid(h, w)
        x = x.reshape(b, f, c, rows, ph, cols, pw).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, rows * cols, -1)
        weight = self.patch_embedding.weight.flatten(1)
        return F.linear(x.to(weight.dtype), weight, self.patch_embedding.bias)

    def _unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, f, _, _ = tokens.shape
        _, ph, pw = self.config.patch_size
        rows, cols = self.config.latent_grid(h, w)
        c = self.config.out_dim
        x = tokens.reshape(b, f, rows, cols, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, c, h, w)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        text_kv: TextKV | None = None,
        start_frame: int = 0,
        attention_context: SelfAttentionContext | None = None,
        mask: torch.Tensor | None = None,
        run_block: BlockRunner | None = None,
    ) -> torch.Tensor:
        """Flow prediction for latents x [B, F, C, H, W] at timesteps t ([B] or [B, F]).

        Text comes as raw embeddings (``context``) or as a precomputed ``text_kv``. Without an
        ``attention_context`` the frames attend to each other (optionally under ``mask``);
        with one, they attend to what it supplies, positioned from ``start_frame``.
        ``run_block(block, tokens, *args)`` calls each block instead of ``block(tokens, *args)``
        (a compiled block step); it is not used under gradient checkpointing.
        """
        b, f, _, h, w = x.shape
        if text_kv is None:
            if context is None:
                raise ValueError("pass either context (prompt embeddings) or text_kv")
            text_kv = self.text_kv(context)
        if t.dim() == 1:
            t = t[:, None].expand(b, f)
        rows, cols = self.config.latent_grid(h, w)
        rope = self.rope(start_frame, f, rows, cols, x.device)

        e = _float32(self.time_embedding, sinusoidal_embedding(self.config.freq_dim, t))
        e0 = _float32(self.time_projection, e).unflatten(-1, (6, -1))

        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        if checkpointing and attention_context is not None:
            replayable = attention_context.checkpoint_view()
            checkpointing = replayable is not None
            attention_context = replayable or attention_context
        tokens = self._patchify(x).float()
        for i, block in enumerate(self.blocks):
            layer = None if attention_context is None else attention_context.layer(i)
            args = (e0, rope, text_kv[i], layer, mask)
            if checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, *args, use_reentrant=False)
            elif run_block is not None:
                tokens = run_block(block, tokens, *args)
            else:
                tokens = block(tokens, *args)
        out = self.head(tokens, e)
        return self._unpatchify(out.float(), h, w)


def build_dit(preset: str = "wan2.1-t2v-1.3b", **overrides) -> WanDiT:
    """Build a Wan DiT from a preset name (keyword overrides replace config fields).

    The same module serves the teacher / critic (bidirectional forward) and the streaming generator
    (forward with a ``StreamingContext``). Works under ``torch.device("meta")`` for shape-only checks
    and zero-copy loading.
    """
    return WanDiT(dit_config(preset, **overrides))
