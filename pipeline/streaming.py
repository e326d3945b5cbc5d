"""StreamingGenerator: the one chunk loop shared by inference, training rollouts and benchmarks.

A video is produced chunk by chunk (``num_frame_per_block`` latent frames each):

* ``denoise_chunk``: from noise, run the few-step sampler; every step reads the cache (sink,
  bank, window) and none writes it;
* ``commit_chunk``: run the model once more on the finished chunk at ``context_noise`` to write
  its keys/values into the cache (and record its prototype for the memory bank); the chunk may
  also be given instead of sampled (a true past, as the probes give it);
* before a chunk's first call of either kind, the bank takes in the pending prototype, once;
* ``switch_prompt``: new text conditioning, then the KV re-cache of the most recent frames.

The sampler state (noise, x0, the re-cache's recent frames) is float32 whatever the model dtype, as
the DiT's output is. ``compile`` runs the blocks of every call without autograd through
``torch.compile`` on the fixed-shape context (:mod:`memflow.fixed_shape`): one graph for the chunk
calls (denoising steps and commits share their shapes) and one per re-cache length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memflow.config import StreamConfig
from memflow.context import StreamingContext
from memflow.dit import BlockRunner, TextKV, WanDiT
from memflow.scheduler import FlowMatchScheduler

NoiseFn = Callable[[int, int], torch.Tensor]
# compile setting -> torch.compile mode; "cudagraphs" also captures CUDA graphs (reduce-overhead)
COMPILE_MODES: dict[bool | str, str | None] = {True: None, "cudagraphs": "reduce-overhead"}


def _call_block(block: torch.nn.Module, tokens: torch.Tensor, *args) -> torch.Tensor:
    return block(tokens, *args)


def compiled_block_runner(compile: bool | str, backend: str = "inductor") -> BlockRunner:
    """A ``run_block`` for :meth:`WanDiT.forward` that compiles the block call (one graph serves every layer)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}: choose false, true or 'cudagraphs'")
    options = {"mode": COMPILE_MODES[compile]} if backend == "inductor" else {}
    return torch.compile(_call_block, backend=backend, fullgraph=True, dynamic=False, **options)


class StreamingGenerator:
    """Causal few-step generation over a ``StreamingContext``."""

    def __init__(
        self,
        dit: WanDiT,
        config: StreamConfig,
        scheduler: FlowMatchScheduler | None = None,
        *,
        trace: bool = False,
        compile: bool | str = False,
        compile_backend: str = "inductor",
    ):
        """``trace=True`` keeps, for every model call, what it attended to (``context.traces``); ``compile``
        (true or ``"cudagraphs"``) compiles the calls without autograd (``compile_backend``: a torch.compile
        backend, ``eager`` to trace only)."""
        self.dit = dit
        self.config = config
        self.trace = trace
        self.compile = compile
        self._run_block = compiled_block_runner(compile, compile_backend) if compile else None
        self.scheduler = scheduler or FlowMatchScheduler(shift=config.timestep_shift)
        steps = config.denoising_step_list
        self.timesteps = (
            self.scheduler.warp(steps) if config.warp_denoising_step else torch.tensor(steps, dtype=torch.float32)
        )
        self.context: StreamingContext | None = None
        self._geometry: tuple | None = None

    @property
    def chunk(self) -> int:
        return self.config.num_frame_per_block

    # -- run lifecycle ---------------------------------------------------------------------------------
    def start(
        self,
        prompt: torch.Tensor,
        *,
        num_frames: int,
        latent_height: int,
        latent_width: int,
        batch_size: int | None = None,
    ) -> None:
        """Begin a new video of ``num_frames`` latent frames conditioned on ``prompt`` [B, T, text_dim].

        The context buffers are allocated once and reused across videos of the same geometry.
        """
        if num_frames % self.chunk:
            raise ValueError(f"num_frames={num_frames} is not a multiple of num_frame_per_block={self.chunk}")
        batch = batch_size or prompt.shape[0]
        cfg = self.dit.config
        param = next(self.dit.parameters())
        geometry = (batch, num_frames if self.config.memory == "full" else None, latent_height, latent_width,
                    param.dtype, param.device)
        if geometry != self._geometry:
            self.context = StreamingContext(
                self.config,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                frame_tokens=cfg.tokens_per_frame(latent_height, latent_width),
                batch_size=batch,
                max_frames=num_frames,
                dtype=param.dtype,
                device=param.device,
            )
            self._geometry = geometry
            if self.compile == "cudagraphs":  # the graphs write the cache in place: its addresses never change
                for buffer in (*self.context.layer_k, *self.context.layer_v):
                    torch._dynamo.mark_static_address(buffer)
        else:
            self.context.reset()
        self.context.tracing = self.trace
        self.timesteps = self.timesteps.to(param.device)
        self._context_t = torch.tensor(self.config.context_noise, dtype=torch.float32, device=param.device)
        self.num_frames = num_frames
        self.batch = batch
        self.frame = 0
        self._bank_frame = -1
        self._recent: list[torch.Tensor] = []
        self.set_prompt(prompt)

    def set_prompt(self, prompt: torch.Tensor, *, switch: bool = False) -> None:
        """Condition the following chunks on ``prompt`` [B, T, text_dim] (no re-cache)."""
        self.prompt = prompt
        with torch.no_grad():
            text_kv = self.dit.text_kv(prompt)
        rows = prompt.abs().sum(-1) > 0
        mask = torch.zeros(prompt.shape[0], self.dit.config.text_len, dtype=torch.bool, device=prompt.device)
        mask[:, : rows.shape[1]] = rows
        self.context.set_text(text_kv, mask, switch=switch)

    def switch_prompt(self, prompt: torch.Tensor) -> None:
        """Prompt switch before the next chunk: new text cache, then re-cache recent frames (KV re-cache)."""
        self.set_prompt(prompt, switch=True)
        if self.frame == 0:
            return
        span = self.frame if self.config.memory == "full" else min(self.config.local_attn_size, self.frame)
        start = self.frame - span
        if not self.config.global_sink:
            self.context.restart_sink(start)
        self.context.update_bank(recache=True)
        frames = torch.cat(self._recent, dim=1)[:, -span:]
        with torch.no_grad():
            self._forward(frames, start, self._context_t, "recache")

    # -- one chunk ---------------------------------------------------------------------------------------
    def denoise_chunk(
        self,
        noise: torch.Tensor,
        *,
        renoise: NoiseFn | None = None,
        generator: torch.Generator | None = None,
        exit_step: int | None = None,
        requires_grad: bool = False,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Sample the next chunk from ``noise`` [B, chunk, C, H, W]; returns its x0 prediction (float32).

        ``renoise(chunk_index, step)`` supplies the fresh noise after each step (default: Gaussian
        from ``generator``). ``exit_step`` stops early (Self-Forcing); only that step runs with
        autograd when ``requires_grad``, its text keys/values recomputed from the prompt so the
        text path trains too. ``on_step(step, x0)`` sees every step's prediction.
        """
        if noise.shape[1] != self.chunk:
            raise ValueError(f"a chunk has {self.chunk} latent frames, got {noise.shape[1]}")
        if self.frame >= self.num_frames:
            raise ValueError(f"all {self.num_frames} frames of this video are already generated")
        last = len(self.timesteps) - 1 if exit_step is None else exit_step
        self._enter_chunk()
        x = noise.to(torch.float32)
        for step in range(last + 1):
            t = self.timesteps[step]
            grad = requires_grad and step == last
            with torch.set_grad_enabled(grad):
                text_kv = self.dit.text_kv(self.prompt) if grad else None
                flow = self._forward(x, self.frame, t, "denoise", text_kv)
                x0 = self.scheduler.flow_to_x0(flow, x, self._t(x, t))
            if on_step is not None:
                on_step(step, x0)
            if step == last:
                return x0
            next_t = self.timesteps[step + 1]
            eps = renoise(self.frame // self.chunk, step) if renoise else _randn_like(x0, generator)
            x = self.scheduler.add_noise(x0, eps.to(x0.device, x0.dtype), self._t(x0, next_t))
        raise AssertionError("unreachable")

    def commit_chunk(self, x0: torch.Tensor, *, generator: torch.Generator | None = None) -> None:
        """Write the finished chunk into the cache with one clean pass at ``context_noise``."""
        self._enter_chunk()
        t = self._context_t
        clean = x = x0.detach().to(torch.float32)
        if self.config.context_noise > 0:
            x = self.scheduler.add_noise(x, _randn_like(x, generator), self._t(x, t))
        with torch.no_grad():
            self._forward(x, self.frame, t, "commit")
        self._recent.append(clean)
        keep = self.num_frames if self.config.memory == "full" else self.config.local_attn_size
        while sum(c.shape[1] for c in self._recent) - self._recent[0].shape[1] >= keep:
            self._recent.pop(0)
        self.frame += x0.shape[1]

    # -- whole video -------------------------------------------------------------------------------------
    def generate(
        self,
        noise: torch.Tensor,
        prompts: Sequence[torch.Tensor],
        switch_frames: Sequence[int] = (),
        *,
        renoise: NoiseFn | None = None,
        generator: torch.Generator | None = None,
        on_chunk: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Latents [B, F, C, H, W] from noise, switching to ``prompts[i + 1]`` at ``switch_frames[i]``.

        ``on_chunk(chunk_index, x0)`` is called as each chunk is finished (e.g. to decode it).
        """
        if len(prompts) != len(switch_frames) + 1:
            raise ValueError(
                f"{len(prompts)} prompts need {len(prompts) - 1} switch frames, got {len(switch_frames)}"
            )
        b, f, _, h, w = noise.shape
        self.start(prompts[0], num_frames=f, latent_height=h, latent_width=w, batch_size=b)
        out = torch.empty_like(noise, dtype=torch.float32)
        segment = 0
        for start in range(0, f, self.chunk):
            while segment < len(switch_frames) and start >= switch_frames[segment]:
                segment += 1
                self.switch_prompt(prompts[segment])
            x0 = self.denoise_chunk(
                noise[:, start : start + self.chunk], renoise=renoise, generator=generator, on_step=on_step
            )
            self.commit_chunk(x0, generator=generator)
            out[:, start : start + self.chunk] = x0
            if on_chunk is not None:
                on_chunk(start // self.chunk, x0)
        return out

    # -- resumable state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position, recent latents (for re-caching) and the context, on the CPU: enough to continue."""
        return {"frame": self.frame, "recent": [x.cpu() for x in self._recent], "context": self.context.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict, prompt: torch.Tensor) -> None:
        """Continue a saved video on a generator already ``start``-ed with the same geometry.

        ``prompt`` is the active prompt; its text cache is rebuilt with the current weights.
        """
        self.set_prompt(prompt)
        self.context.load_state_dict(state["context"])
        device = self.context.k.device
        self._recent = [x.to(device) for x in state["recent"]]
        self.frame = int(state["frame"])
        self._bank_frame = -1

    # -- what memory did ---------------------------------------------------------------------------------
    def memory_trace(self, sample: int = 0) -> dict:
        """Per chunk, what its first denoising pass attended to (needs ``trace=True``).

        Schema: ``{"num_frames", "chunk_frames", "num_layers", "num_heads", "chunks": [{"chunk",
        "start_frame", "num_frames", "switch", "sink", "window", "bank", "sma"}]}``; ``window``
        lists earlier frames only, ``bank`` is per layer, ``sma`` per layer and head (or null).
        """
        if not self.trace or self.context is None:
            raise ValueError("construct the StreamingGenerator with trace=True to record a memory trace")
        chunks, switch = [], False
        for call in self.context.traces:
            if call.kind == "recache":
                switch = True
            if call.kind != "denoise" or (chunks and chunks[-1]["start_frame"] == call.start):
                continue
            sma = None
            if call.sma:
                sma = [[sorted(set(head) - {-1}) for head in layer[sample].flatten(1).tolist()] for layer in call.sma]
            chunks.append({
                "chunk": call.start // self.chunk,
                "start_frame": call.start,
                "num_frames": call.num_frames,
                "switch": switch,
                "sink": [f for f in call.sink if f < call.start] or call.sink,
                "window": [f for f in call.window if f < call.start],
                "bank": None if call.bank is None else call.bank[:, sample].tolist(),
                "sma": sma,
            })
            switch = False
        cfg = self.dit.config
        return {"num_frames": self.num_frames, "chunk_frames": self.chunk, "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads, "chunks": chunks}

    # -- internals ---------------------------------------------------------------------------------------
    def _enter_chunk(self) -> None:
        """Let the pending prototype into the bank before the chunk at ``self.frame``, once: every call on a
        chunk (sampling steps, an early exit sampled again, the commit of a given chunk) sees the same bank."""
        if self._bank_frame != self.frame:
            self.context.update_bank()
            self._bank_frame = self.frame

    @staticmethod
    def _t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A scalar device timestep broadcast to [B, frames]."""
        return t.expand(x.shape[0], x.shape[1])

    def _forward(
        self, x: torch.Tensor, start: int, t: torch.Tensor, kind: str, text_kv: TextKV | None = None
    ) -> torch.Tensor:
        run_block = None if torch.is_grad_enabled() else self._run_block
        self.context.begin(start, x.shape[1], kind, fixed=run_block is not None)
        if run_block is not None and self.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.dit(
                x,
                self._t(x, t),
                text_kv=text_kv or self.context.text_kv,
                start_frame=start,
                attention_context=self.context,
                run_block=run_block,
            )
        finally:
            self.context.end()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
