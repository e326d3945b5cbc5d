"""Timing one streaming configuration: chunk times with and without VAE decode, the transformer's own time and FLOPs.

A :class:`Configuration` is one memory mode at one bank size, eager or compiled, with its own generator and video.
Each :meth:`Configuration.repetition` starts a fresh video and reports its first chunk (denoise, commit and the
VAE's first decode), fills the cache and the bank with committed chunks (untimed), then times ``chunks`` steady
chunks: wall time with and without decode, and the time inside the DiT's forward calls alone (the
transformer-only figure the papers report), with the model FLOPs of those calls.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from memflow.config import DiTConfig, StreamConfig
from memflow.context import CallPlan, StreamingContext
from memflow.dit import WanDiT
from memflow.vae import WanVAE

from .streaming import StreamingGenerator


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured configuration: a memory mode at a bank size, eager or compiled (``"cudagraphs"`` too)."""

    mode: str
    compile: bool | str
    bank_size: int

    @property
    def name(self) -> str:
        return {False: "eager", True: "compiled"}.get(self.compile, str(self.compile))


def call_flops(dit: DiTConfig, stream: StreamConfig, plan: CallPlan, frame_tokens: int) -> int:
    """Model FLOPs of one DiT call (2 per multiply-add): the block matmuls and attention, patch embedding and head.

    Attention counts the keys the call attends to (SMA: its routed frames and the window), not masked ones; text
    keys/values (once per prompt), norms and element-wise work are left out.
    """
    n, d = plan.num_frames * frame_tokens, dit.dim
    memory = plan.bank_len + plan.sink_len
    if stream.memory == "nam_sma":
        memory = min(stream.top_k, memory)
    keys = (memory + plan.window_len) * frame_tokens
    projections = 2 * n * d * d * 6  # self q, k, v, o and cross q, o
    attention = 4 * n * d * (keys + dit.text_len)  # scores and values, self and cross
    ffn = 4 * n * d * dit.ffn_dim
    patch = dit.patch_size[1] * dit.patch_size[2]
    return dit.num_layers * (projections + attention + ffn) + 2 * n * d * patch * (dit.in_dim + dit.out_dim)


class DeviceClock:
    """Seconds on one device: wall time after synchronising CUDA; transformer time by CUDA events (no sync)."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self) -> torch.cuda.Event | float:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        """Seconds from ``start`` to ``end`` (marks); call after :meth:`now` on CUDA."""
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1000.0


class TransformerMeter:
    """Forward hooks on the DiT: the time inside its streaming calls and their FLOPs, while ``active``."""

    def __init__(self, dit: WanDiT, clock: DeviceClock):
        self.clock, self.config = clock, dit.config
        self.active = False
        self.flops = 0
        self._spans: list[tuple] = []
        self._start = None
        dit.register_forward_pre_hook(self._before, with_kwargs=True)
        dit.register_forward_hook(self._after)

    def _before(self, _module: WanDiT, _args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        context: StreamingContext = kwargs["attention_context"]
        self.flops += call_flops(self.config, context.config, context.plan, context.frame_tokens)
        self._start = self.clock.mark()

    def _after(self, *_: object) -> None:
        if self.active:
            self._spans.append((self._start, self.clock.mark()))

    def collect(self) -> tuple[float, int]:
        """(seconds, FLOPs) since the last collect; call after :meth:`DeviceClock.now`."""
        seconds = sum(self.clock.between(a, b) for a, b in self._spans)
        flops, self.flops, self._spans = self.flops, 0, []
        return seconds, flops


class Configuration:
    """One variant's generator and decoder; :meth:`repetition` measures one fresh video of it."""

    def __init__(self, dit: WanDiT, vae: WanVAE, meter: TransformerMeter, stream: StreamConfig, variant: Variant,
                 latent: tuple[int, int], prompt: torch.Tensor, *, chunks: int, decode: bool,
                 backend: str = "inductor"):  # fmt: skip
        """``stream``: the settings of every variant (the variant sets the memory mode and the bank size);
        ``chunks`` timed per repetition, each decoded by the VAE when ``decode``."""
        self.variant, self.latent, self.prompt, self.vae, self.meter = variant, latent, prompt, vae, meter
        self.chunks, self.decode, self.clock = chunks, decode, meter.clock
        self.stream = dataclasses.replace(stream, memory=variant.mode, bank_size=variant.bank_size)
        self.gen = StreamingGenerator(dit, self.stream, compile=variant.compile, compile_backend=backend)
        self.shape = (1, stream.num_frame_per_block, dit.config.in_dim, *latent)
        chunk = stream.num_frame_per_block
        if variant.mode == "full":  # its cache is sized by the video: the fill, then the timed chunks
            fill = -(-(stream.local_attn_size + variant.bank_size) // chunk) * chunk
        else:  # a bound only: the fill stops once steady
            fill = stream.local_attn_size + variant.bank_size * stream.record_interval * chunk + 64 * chunk
        self.frames = fill + (chunks + 2) * chunk

    def _steady(self) -> bool:
        """Window full and the bank full (``full``: the cache holds sink + window + bank_size frames)."""
        ctx, stream = self.gen.context, self.stream
        if stream.memory == "full":
            return ctx.committed >= stream.local_attn_size + stream.bank_size
        full_window = ctx.committed - ctx.origin >= stream.local_attn_size
        bank = ctx.bank
        if bank is None:
            return full_window
        filled = bank.local_end > bank.size if stream.reference else bank.filled == bank.size
        return full_window and filled

    def _start(self, seed: int) -> tuple[torch.Generator, Callable | None]:
        """A fresh video: its noise generator and the streaming decoder's ``decode`` (None without decode)."""
        self.gen.start(self.prompt, num_frames=self.frames, latent_height=self.latent[0],
                       latent_width=self.latent[1])  # fmt: skip
        noise = torch.Generator(device=self.prompt.device).manual_seed(seed)
        return noise, self.vae.streaming_decoder().decode if self.decode else None

    def _chunk(self, noise: torch.Generator, decoder: Callable | None) -> tuple[float, float, int]:
        """(generate s, decode s, pixel frames) of the next chunk."""
        t0 = self.clock.now()
        x = torch.randn(self.shape, generator=noise, device=self.prompt.device)
        x0 = self.gen.denoise_chunk(x, generator=noise)
        self.gen.commit_chunk(x0, generator=noise)
        t1 = self.clock.now()
        frames = decoder(x0).shape[1] if decoder is not None else 4 * x0.shape[1]
        return t1 - t0, self.clock.now() - t1, frames

    @torch.no_grad()
    def warm(self, chunks: int, seed: int) -> None:
        """An untimed video's first ``chunks + 1`` chunks (a compiled variant compiles on the first)."""
        noise, decoder = self._start(seed)
        for _ in range(min(chunks + 1, self.frames // self.stream.num_frame_per_block)):
            self._chunk(noise, decoder)

    @torch.no_grad()
    def repetition(self, seed: int) -> dict[str, float]:
        """One fresh video: its first chunk, an untimed fill to the steady state, then the timed chunks."""
        noise, decoder = self._start(seed)
        device = self.prompt.device
        first = sum(self._chunk(noise, decoder)[:2])
        while not self._steady():
            self.gen.commit_chunk(torch.randn(self.shape, generator=noise, device=device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.meter.active = True
        timed = [self._chunk(noise, decoder) for _ in range(self.chunks)]
        self.clock.now()
        self.meter.active = False
        transformer, flops = self.meter.collect()
        pixels = sum(f for _, _, f in timed)
        generate, decoding = sum(g for g, _, _ in timed), sum(d for _, d, _ in timed)
        figures = {
            "first_chunk_s": first,
            "steady_chunk_s": statistics.median(g + d for g, d, _ in timed),
            "steady_chunk_no_decode_s": statistics.median(g for g, _, _ in timed),
            "fps_no_decode": pixels / generate,
            "fps_transformer": pixels / transformer,
            "flops_per_chunk": flops / self.chunks,
            "transformer_s_per_chunk": transformer / self.chunks,
        }
        if decoder is not None:
            figures["fps"] = pixels / (generate + decoding)
        if device.type == "cuda":
            figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        return figures


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a square ``size`` matmul in ``dtype`` on ``device`` (the reference for utilisation)."""
    clock = DeviceClock(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock.now()
        a @ b
        best = min(best, clock.now() - start)
    return 2 * size**3 / best


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread of the repetitions of one figure."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
