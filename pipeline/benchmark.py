"""Streaming speed per memory mode, with random weights (speed does not depend on their values).

Every mode is measured in the same process: a warm-up video of ``warmup`` chunks, then a timed video
of ``chunks`` chunks, each chunk denoised, committed and decoded by the streaming VAE decoder (random
weights of the real Wan VAE config for the 1.3B preset, the tiny VAE for tiny). Pixel frames follow
the VAE: the first chunk of n latent frames gives 1 + 4(n - 1), later chunks 4n. Reports per mode:
FPS with and without VAE decode (whole video and steady state), first-chunk latency, the median
steady per-chunk time (chunks after the first), peak memory (CUDA max allocated; on the CPU the
process's max RSS, which only grows), and each mode's ratio to ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from memflow.config import dit_config
from memflow.dit import build_dit
from memflow.loading import materialize, random_vae
from utils.config import ScriptParser, load_config
from utils.errors import ConfigError

from .plan import DTYPES, resolve_device, resolve_dtype, stream_config, vae_spatial_stride
from .runner import format_bytes, peak_memory
from .streaming import StreamingGenerator

MODES = ("none", "nam", "nam_sma")
VAE_OF_PRESET = {"tiny": "tiny", "wan2.1-t2v-1.3b": "wan2.1"}
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.yaml"


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure: the DiT preset at a resolution, on a device, for some modes."""

    preset: str
    device: str
    height: int
    width: int
    chunks: int
    warmup: int
    dtype: str | None
    modes: tuple[str, ...]
    config: str
    seed: int = 0


class Bench:
    """Random-weight DiT + VAE on one device, timing streaming videos chunk by chunk."""

    def __init__(self, args: BenchmarkSettings):
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"), self.device)
        self.base = stream_config(load_config(args.config))
        self.config = dit_config(args.preset)
        self.dit = materialize(lambda: build_dit(args.preset), self.device, self.dtype, args.seed)
        self.vae = random_vae(VAE_OF_PRESET[args.preset], self.config.out_dim, self.device, self.dtype, args.seed)
        stride = vae_spatial_stride(VAE_OF_PRESET[args.preset])
        self.latent = (args.height // stride, args.width // stride)
        self.seed = args.seed
        gen = torch.Generator(device=self.device).manual_seed(args.seed)
        self.prompt = torch.randn(1, self.config.text_len, self.config.text_dim, generator=gen, device=self.device)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.no_grad()
    def video(self, gen: StreamingGenerator, chunks: int) -> list[tuple[int, float, float]]:
        """(pixel frames, generate seconds, decode seconds) per chunk of one video."""
        noise_gen = torch.Generator(device=self.device).manual_seed(self.seed)
        gen.start(self.prompt.to(self.dtype), num_frames=chunks * gen.chunk, latent_height=self.latent[0],
                  latent_width=self.latent[1])  # fmt: skip
        decoder = self.vae.streaming_decoder()
        shape = (1, gen.chunk, self.config.in_dim, *self.latent)
        out = []
        for _ in range(chunks):
            t0 = self._sync()
            noise = torch.randn(shape, generator=noise_gen, device=self.device).to(self.dtype)
            x0 = gen.denoise_chunk(noise, generator=noise_gen)
            gen.commit_chunk(x0, generator=noise_gen)
            t1 = self._sync()
            frames = decoder.decode(x0).shape[1]
            t2 = self._sync()
            out.append((frames, t1 - t0, t2 - t1))
        return out

    def measure(self, mode: str, chunks: int, warmup: int) -> dict:
        gen = StreamingGenerator(self.dit, dataclasses.replace(self.base, memory=mode))
        if warmup:
            self.video(gen, warmup)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        timed = self.video(gen, chunks)
        frames = sum(f for f, _, _ in timed)
        generate = sum(g for _, g, _ in timed)
        decode = sum(d for _, _, d in timed)
        steady = timed[1:] or timed
        steady_frames = statistics.median(f for f, _, _ in steady)
        steady_total = statistics.median(g + d for _, g, d in steady)
        steady_generate = statistics.median(g for _, g, _ in steady)
        memory = peak_memory(self.device)
        return {
            "pixel_frames": frames,
            "fps": frames / (generate + decode),
            "fps_no_decode": frames / generate,
            "steady_fps": steady_frames / steady_total,
            "steady_fps_no_decode": steady_frames / steady_generate,
            "first_chunk_s": timed[0][1] + timed[0][2],
            "steady_chunk_s": steady_total,
            "steady_chunk_no_decode_s": steady_generate,
            "peak_memory_bytes": memory["bytes"],
            "peak_memory_kind": memory["kind"],
        }


RATIO_KEYS = ("fps", "fps_no_decode", "steady_fps", "steady_fps_no_decode", "steady_chunk_s")


def run(args: BenchmarkSettings) -> dict:
    """Every mode of ``args.modes`` measured in this process, with its ratios to ``none``."""
    bench = Bench(args)
    modes = {mode: bench.measure(mode, args.chunks, args.warmup) for mode in args.modes}
    base = modes["none"]
    return {
        "preset": args.preset,
        "device": str(bench.device),
        "device_name": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "dtype": str(bench.dtype).removeprefix("torch."),
        "height": args.height,
        "width": args.width,
        "latent_frames_per_chunk": bench.base.num_frame_per_block,
        "tokens_per_frame": bench.config.tokens_per_frame(*bench.latent),
        "denoising_steps": len(bench.base.denoising_step_list),
        "chunks": args.chunks,
        "warmup_chunks": args.warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "modes": modes,
        "ratio_to_none": {m: {k: r[k] / base[k] for k in RATIO_KEYS} for m, r in modes.items()},
    }


def table(result: dict) -> str:
    """The result of :func:`run` as a text table."""
    head = (f"{result['preset']} on {result['device_name']} ({result['dtype']}), {result['width']}x{result['height']}, "
            f"{result['chunks']} chunks of {result['latent_frames_per_chunk']} latent frames, "
            f"{result['denoising_steps']} steps")  # fmt: skip
    cols = ("mode", "FPS", "FPS no-dec", "steady FPS", "steady no-dec", "first chunk s", "steady chunk s",
            "peak mem", "FPS vs none")  # fmt: skip
    rows = [cols]
    for mode, r in result["modes"].items():
        rows.append((mode, f"{r['fps']:.2f}", f"{r['fps_no_decode']:.2f}", f"{r['steady_fps']:.2f}",
                     f"{r['steady_fps_no_decode']:.2f}", f"{r['first_chunk_s']:.3f}", f"{r['steady_chunk_s']:.3f}",
                     format_bytes(r["peak_memory_bytes"]), f"{result['ratio_to_none'][mode]['fps']:.3f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([head, *lines])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ScriptParser(prog="benchmark.py", description="Streaming speed per memory mode, with random weights.")
    parser.add_argument("--preset", choices=sorted(VAE_OF_PRESET), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 32 tiny, 480 otherwise)")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 32 tiny, 832 otherwise)")
    parser.add_argument("--chunks", type=int, default=8, help="timed chunks per mode")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up chunks per mode (not timed)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="streaming settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    tiny = args.preset == "tiny"
    args.height = args.height or (32 if tiny else 480)
    args.width = args.width or (32 if tiny else 832)
    multiple = vae_spatial_stride(VAE_OF_PRESET[args.preset]) * max(dit_config(args.preset).patch_size[1:])
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < multiple or value % multiple:
            raise ConfigError(f"--{name} {value} must be a positive multiple of {multiple} (VAE stride x DiT patch)")
    if args.chunks < 1 or args.warmup < 0:
        raise ConfigError("--chunks must be >= 1 and --warmup >= 0")
    if "none" not in args.modes:
        args.modes = ["none", *args.modes]
    return args


def main(argv: list[str]) -> int:
    """``scripts/benchmark.py``: the JSON of :func:`run` or its table."""
    args = parse_args(argv)
    settings = BenchmarkSettings(args.preset, args.device, args.height, args.width, args.chunks, args.warmup,
                                 args.dtype, tuple(args.modes), args.config, args.seed)  # fmt: skip
    result = run(settings)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
