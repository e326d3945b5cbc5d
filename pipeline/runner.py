"""The video runner: a plan's videos generated and written chunk by chunk.

:func:`build_components` loads the DiT (``base.pt`` + LoRA, or a Wan2.1 folder, or random weights),
the text encoder and the VAE of a plan. :class:`VideoRunner` runs the one chunk loop of
:class:`~pipeline.streaming.StreamingGenerator` per video: per-chunk conditioning (switches,
transitions), denoise, commit, streaming VAE decode and MP4 write, the sidecar after every chunk,
then the memory-trace PNG and optionally the latents.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from memflow.dit import WanDiT
from memflow.loading import load_generator, load_text_encoder, load_vae
from memflow.text import TextEncoder
from memflow.vae import WanVAE
from memflow.weights import apply_lora

from .memory_trace import render_memory_trace
from .outputs import VideoWriter, make_folder, reserve_stem
from .plan import RunPlan, VideoJob
from .schedule import ChunkCondition, ChunkConditioning
from .sidecar import ChunkReport, VideoResult, conditioning_record, sidecar_data, write_sidecar
from .streaming import StreamingGenerator

# the sidecar first: its file is the claim on a stem (see reserve_stem)
OUTPUT_SUFFIXES = (".json", ".mp4", ".memory.png", ".latents.safetensors")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's max resident set size."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"kind": "cpu_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def format_bytes(count: int) -> str:
    """``1234567890`` -> ``1.15 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**power:.2f} {units[power]}"


@dataclass
class Components:
    """The loaded models of a run."""

    dit: WanDiT
    text_encoder: TextEncoder
    vae: WanVAE


def load_plan_generator(plan: RunPlan) -> WanDiT:
    """The plan's DiT: ``generator_ckpt`` (``generator_ema`` with ``use_ema``) or the Wan2.1 DiT, then the LoRA."""
    cfg = plan.config
    dit = load_generator(cfg.model, dict(cfg.model_overrides), checkpoint=cfg.generator_ckpt,
                         weights_dir=cfg.weights_dir, entry="generator_ema" if cfg.use_ema else "generator",
                         device=plan.device, dtype=plan.dtype, seed=cfg.seed)  # fmt: skip
    if cfg.lora_ckpt is not None:
        dit = apply_lora(dit, Path(cfg.lora_ckpt), cfg.adapter.rank, cfg.adapter.alpha, merge=cfg.merge_lora)
    return dit.eval().requires_grad_(False)


def build_components(plan: RunPlan) -> Components:
    """Load (or randomly initialise) the DiT + LoRA, text encoder and VAE of a plan on its device."""
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    dit = load_plan_generator(plan)
    encoder = load_text_encoder(cfg.text_encoder, cfg.weights_dir, text_len=plan.dit.text_len,
                                text_dim=plan.dit.text_dim, device=device, dtype=dtype,
                                offload=cfg.low_memory)  # fmt: skip
    vae = load_vae(cfg.vae, cfg.weights_dir, channels=plan.dit.out_dim, device=device, dtype=dtype, seed=cfg.seed)
    return Components(dit, encoder, vae)


class VideoRunner:
    """Generates the videos of a plan one by one, streaming each chunk to its MP4 as it is decoded."""

    def __init__(self, plan: RunPlan, components: Components):
        self.plan = plan
        self.components = components
        self.generator = StreamingGenerator(components.dit, plan.stream, trace=plan.config.save_trace,
                                            compile=plan.compile)  # fmt: skip
        self._embeddings: dict[str, torch.Tensor] = {}

    def encode_prompts(self, texts: Sequence[str]) -> None:
        """Encode every distinct text once (then the encoder is offloaded in low-memory mode)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if not new:
            return
        with torch.no_grad():
            encoded = self.components.text_encoder.encode(new)
        for text, embedding in zip(new, encoded, strict=True):
            self._embeddings[text] = embedding.to(self.plan.device, self.plan.dtype)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        self.encode_prompts(texts)
        return torch.stack([self._embeddings[t] for t in texts])

    def _sync(self) -> float:
        if self.plan.device.type == "cuda":
            torch.cuda.synchronize(self.plan.device)
        return time.perf_counter()

    def _condition(self, cond: ChunkCondition, current: tuple | None) -> tuple:
        """Start the video, switch the prompt (with the re-cache) or move along a transition."""
        gen, plan = self.generator, self.plan
        prompt = cond.embedding[None]
        if cond.chunk == 0:
            gen.start(prompt, num_frames=plan.num_frames, latent_height=plan.latent_height,
                      latent_width=plan.latent_width)  # fmt: skip
        elif cond.switch:
            gen.switch_prompt(prompt)
        elif (cond.segment, cond.alpha) != current:
            gen.set_prompt(prompt)
        return cond.segment, cond.alpha

    def _chunk(self, noise_gen: torch.Generator) -> torch.Tensor:
        """Denoise and commit the next chunk; its x0."""
        plan, gen = self.plan, self.generator
        shape = (1, gen.chunk, plan.dit.in_dim, plan.latent_height, plan.latent_width)
        noise = torch.randn(shape, generator=noise_gen, device=plan.device)
        x0 = gen.denoise_chunk(noise, generator=noise_gen)
        gen.commit_chunk(x0, generator=noise_gen)
        return x0

    def run(self, job: VideoJob, on_chunk: Callable[[ChunkReport], None] | None = None) -> VideoResult:
        """Generate one video; writes its sidecar at once, then ``<stem>.mp4`` and the sidecar chunk by chunk,
        then the trace. The output folder is made here, so a run that fails before its first video leaves none."""
        plan = self.plan
        conditioning = ChunkConditioning(job.schedule, self._encode)
        stem = reserve_stem(make_folder(plan.output_folder), job.stem, OUTPUT_SUFFIXES)
        result = VideoResult(job, plan.output_folder / f"{stem}.mp4", plan.output_folder / f"{stem}.json",
                             None, None, 0, 0.0, peak_memory(plan.device))  # fmt: skip
        write_sidecar(result.sidecar, sidecar_data(plan, result, None, complete=False), replace=True)
        noise_gen = torch.Generator(device=plan.device).manual_seed(job.seed)
        decoder = self.components.vae.streaming_decoder()
        latents: list[torch.Tensor] = []
        if plan.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        start = self._sync()
        with torch.no_grad(), VideoWriter(result.video) as writer:
            current = None
            for cond in conditioning:
                t0 = self._sync()
                current = self._condition(cond, current)
                x0 = self._chunk(noise_gen)
                t1 = self._sync()
                pixels = decoder.decode(x0)[0]
                t2 = self._sync()
                writer.write(pixels)
                t3 = time.perf_counter()
                if plan.config.save_latents:
                    latents.append(x0[0].float().cpu())
                report = ChunkReport(cond.chunk, len(conditioning), pixels.shape[0], writer.frames_written,
                                     t1 - t0, t2 - t1, t3 - t2, t3 - start, conditioning_record(job, cond))  # fmt: skip
                result.chunks.append(report)
                result.pixel_frames, result.seconds, result.peak_memory = (
                    writer.frames_written, t3 - start, peak_memory(plan.device))
                write_sidecar(result.sidecar, sidecar_data(plan, result, None, complete=False), replace=True)
                if on_chunk is not None:
                    on_chunk(report)
        result.seconds, result.peak_memory = time.perf_counter() - start, peak_memory(plan.device)
        return self._finish(result, stem, latents)

    def _finish(self, result: VideoResult, stem: str, latents: list[torch.Tensor]) -> VideoResult:
        """The latents file, the memory-trace PNG and the complete sidecar of a generated video."""
        plan = self.plan
        trace = self.generator.memory_trace() if plan.config.save_trace else None
        if latents:
            result.latents = plan.output_folder / f"{stem}.latents.safetensors"
            save_file({"latents": torch.stack(latents).flatten(0, 1).contiguous()}, str(result.latents),
                      metadata={"layout": "[F, C, H, W]", "seed": str(result.job.seed)})  # fmt: skip
        if trace is not None:
            result.trace = plan.output_folder / f"{stem}.memory.png"
            render_memory_trace(trace, result.trace)
        write_sidecar(result.sidecar, sidecar_data(plan, result, trace, complete=True), replace=True)
        return result
