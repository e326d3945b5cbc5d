"""Streaming speed per memory mode, eager and compiled, with random weights (speed does not depend on their values).

Configurations are measured in groups: the main table (every mode, each variant, at the config's bank size) and,
with ``sweep``, one group per bank size (``record_interval`` 1, so the bank fills within ``bank_size`` chunks).
Every configuration of a group is warmed first (a video's first chunks; a compiled variant compiles there), then
``repeats`` repetitions each measure every configuration once, the order rotated by one per repetition, so no
mode always runs first. Every figure is the median of the repetitions with its min and max; a repetition is one
fresh video (:mod:`pipeline.speed`). What each figure means: docs/benchmark.md.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from pathlib import Path

import torch

from memflow.config import StreamConfig, dit_config
from memflow.dit import build_dit
from memflow.loading import materialize, random_vae
from utils.config import ScriptParser, load_config
from utils.errors import ConfigError

from .plan import DTYPE_CHOICES, resolve_device, resolve_dtype, stream_config, vae_spatial_stride
from .runner import peak_memory
from .speed import Configuration, DeviceClock, TransformerMeter, Variant, matmul_peak, summary

MODES = ("none", "nam", "nam_sma", "full")
SWEEP_MODES = ("nam", "nam_sma", "full")
VAE_OF_PRESET = {"tiny": "tiny", "mid": "tiny", "wan2.1-t2v-1.3b": "wan2.1"}
DEFAULT_SIZE = {"tiny": (32, 32), "mid": (256, 256), "wan2.1-t2v-1.3b": (480, 832)}
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.yaml"
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure: the DiT preset at a resolution, on a device, for some modes and variants."""

    preset: str
    device: str
    height: int
    width: int
    chunks: int
    warmup: int
    dtype: str
    modes: tuple[str, ...]
    config: str
    seed: int = 0
    repeats: int = 3
    variants: tuple[bool | str, ...] = (False,)
    sweep: tuple[int, ...] = ()
    sweep_modes: tuple[str, ...] = SWEEP_MODES
    decode: bool = True
    backend: str = "inductor"


class Bench:
    """Random-weight DiT + VAE on one device and the groups of configurations measured on them."""

    def __init__(self, settings: BenchmarkSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.base = stream_config(load_config(settings.config))
        self.config = dit_config(settings.preset)
        self.dit = materialize(lambda: build_dit(settings.preset), self.device, self.dtype, settings.seed)
        vae = VAE_OF_PRESET[settings.preset]
        self.vae = random_vae(vae, self.config.out_dim, self.device, self.dtype, settings.seed)
        stride = vae_spatial_stride(vae)
        self.latent = (settings.height // stride, settings.width // stride)
        gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        prompt = torch.randn(1, self.config.text_len, self.config.text_dim, generator=gen, device=self.device)
        self.prompt = prompt.to(self.dtype)
        self.meter = TransformerMeter(self.dit, DeviceClock(self.device))
        self.peak = matmul_peak(self.device, self.dtype, MATMUL_SIZE[self.device.type])

    def group(self, variants: list[Variant], stream: StreamConfig, decode: bool) -> list[dict]:
        """Warm every configuration, then time rotated repetitions: one entry per variant."""
        s = self.settings
        if any(v.compile for v in variants):
            torch.compiler.reset()  # each group compiles its own shapes; earlier groups' graphs are done with
        configs = [Configuration(self.dit, self.vae, self.meter, stream, v, self.latent, self.prompt, chunks=s.chunks,
                                 decode=decode, backend=s.backend) for v in variants]  # fmt: skip
        for config in configs:
            config.warm(s.warmup, s.seed)
        reps: list[list[dict]] = [[] for _ in configs]
        for r in range(s.repeats):
            for i in [(r + j) % len(configs) for j in range(len(configs))]:
                figures = configs[i].repetition(s.seed + r)
                figures["utilisation"] = figures["flops_per_chunk"] / figures["transformer_s_per_chunk"] / self.peak
                reps[i].append(figures)
        return [_entry(v, runs) for v, runs in zip(variants, reps, strict=True)]


def _entry(variant: Variant, runs: list[dict]) -> dict:
    figures = {key: summary([run[key] for run in runs]) for key in runs[0]}
    return {"mode": variant.mode, "variant": variant.name, "bank_size": variant.bank_size, **figures}


def _ratios(entries: list[dict], key: str, to: dict[str, str]) -> dict[str, dict[str, float]]:
    """Median of ``key`` over the median of the entry ``to`` names (same variant and bank size), per entry."""
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        base = next((b for b in entries if all(b[k] == e[k] for k in ("variant", "bank_size")) and
                     all(b[k] == v for k, v in to.items())), None)  # fmt: skip
        if base is not None:
            out.setdefault(e["variant"], {})[f"{e['mode']}@{e['bank_size']}"] = e[key]["median"] / base[key]["median"]
    return out


def _speedup(entries: list[dict]) -> dict[str, float]:
    """Compiled over eager transformer-only FPS, per mode (same bank size)."""
    eager = {(e["mode"], e["bank_size"]): e for e in entries if e["variant"] == "eager"}
    return {f"{e['mode']}@{e['bank_size']}": e["fps_transformer"]["median"] / eager[e["mode"], e["bank_size"]]
            ["fps_transformer"]["median"] for e in entries if e["variant"] == "compiled" and
            (e["mode"], e["bank_size"]) in eager}  # fmt: skip


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _commit() -> str | None:
    """The checkout's commit, ``-dirty`` when tracked files differ from it (None outside git)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if not head.stdout.strip():
        return None
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def run(settings: BenchmarkSettings) -> dict:
    """Every configuration of ``settings`` measured in this process (see the module docstring)."""
    bench = Bench(settings)
    bank = bench.base.bank_size
    variants = [Variant(mode, compile, bank) for mode in settings.modes for compile in settings.variants]
    table = bench.group(variants, bench.base, settings.decode)
    sweep = []
    swept = dataclasses.replace(bench.base, record_interval=1)
    for bank in settings.sweep:
        sweep += bench.group([Variant(m, c, bank) for m in settings.sweep_modes for c in settings.variants], swept,
                             decode=False)  # fmt: skip
    result = {
        "preset": settings.preset, "device": str(bench.device), "device_name": _device_name(bench.device),
        "dtype": str(bench.dtype).removeprefix("torch."), "height": settings.height, "width": settings.width,
        "tokens_per_frame": bench.config.tokens_per_frame(*bench.latent),
        "latent_frames_per_chunk": bench.base.num_frame_per_block,
        "denoising_steps": len(bench.base.denoising_step_list), "chunks": settings.chunks,
        "warmup_chunks": settings.warmup, "repeats": settings.repeats, "decode": settings.decode,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": _commit(),
        "matmul_peak_flops": bench.peak, "matmul_size": MATMUL_SIZE[bench.device.type],
        "table": table,
        "ratio_to_none": _ratios(table, "fps_transformer", {"mode": "none"}),
        "compiled_speedup": _speedup(table),
        "sweep": sweep,
        "sweep_ratio_to_nam": _ratios(sweep, "fps_transformer", {"mode": "nam"}),
    }  # fmt: skip
    if bench.device.type == "cpu":
        result["peak_memory"] = peak_memory(bench.device)
    return result


def _cell(figure: dict, digits: int = 2) -> str:
    """``median (min-max)`` of one figure."""
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"


def table(result: dict) -> str:
    """The result of :func:`run` as text tables: median (min-max) of the repetitions."""
    head = (f"{result['preset']} on {result['device_name']} ({result['dtype']}, {result['threads']} threads), "
            f"{result['width']}x{result['height']} ({result['tokens_per_frame']} tokens/frame), {result['repeats']} "
            f"repetitions of {result['chunks']} steady chunks of {result['latent_frames_per_chunk']} latent frames, "
            f"{result['denoising_steps']} steps; matmul peak {result['matmul_peak_flops'] / 1e9:.1f} "
            "GFLOP/s")  # fmt: skip
    cols = ("mode", "variant", "bank", "FPS", "FPS no decode", "FPS transformer", "first chunk s", "steady chunk s",
            "GFLOP/chunk", "util %", "vs none")  # fmt: skip
    ratios = result["ratio_to_none"]
    rows = [cols] + [_row(e, ratios.get(e["variant"], {})) for e in result["table"]]
    text = [head, *_lines(rows)]
    if result["sweep"]:
        text += ["", "bank_size sweep (record_interval 1, no decode):"]
        ratios = result["sweep_ratio_to_nam"]
        cols = (*cols[:-1], "vs nam")
        text += _lines([cols] + [_row(e, ratios.get(e["variant"], {})) for e in result["sweep"]])
    return "\n".join(text)


def _row(entry: dict, ratios: dict[str, float]) -> tuple[str, ...]:
    fps = _cell(entry["fps"]) if "fps" in entry else "-"
    ratio = ratios.get(f"{entry['mode']}@{entry['bank_size']}")
    return (entry["mode"], entry["variant"], str(entry["bank_size"]), fps, _cell(entry["fps_no_decode"]),
            _cell(entry["fps_transformer"]), _cell(entry["first_chunk_s"], digits=3),
            _cell(entry["steady_chunk_s"], digits=3), f"{entry['flops_per_chunk']['median'] / 1e9:.3g}",
            f"{entry['utilisation']['median'] * 100:.1f}", "-" if ratio is None else f"{ratio:.3f}")  # fmt: skip


def _lines(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def parse_args(argv: list[str]) -> tuple[BenchmarkSettings, bool]:
    """The settings of a command line and whether it asked for JSON."""
    parser = ScriptParser(prog="benchmark.py", description="Streaming speed per memory mode, with random weights.")
    parser.add_argument("--preset", choices=sorted(VAE_OF_PRESET), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--height", type=int, help="pixels (default 32 tiny, 256 mid, 480 for 1.3B)")
    parser.add_argument("--width", type=int, help="pixels (default 32 tiny, 256 mid, 832 for 1.3B)")
    parser.add_argument("--chunks", type=int, default=4, help="timed steady chunks per repetition")
    parser.add_argument("--warmup", type=int, default=1, help="chunks after the first of each warm-up video")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (median and spread are reported)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["none", "nam", "nam_sma"])
    parser.add_argument("--compile", action="store_true", help="also measure the compiled chunk step")
    parser.add_argument("--cudagraphs", action="store_true", help="also measure it with CUDA graphs (CUDA only)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    parser.add_argument("--sweep", nargs="*", type=int, default=[], help="bank sizes to sweep, e.g. 3 6 12 24")
    parser.add_argument("--sweep-modes", nargs="+", choices=SWEEP_MODES, default=list(SWEEP_MODES))
    parser.add_argument("--no-decode", action="store_true", help="skip the VAE decode (no with-decode FPS)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="streaming settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    height, width = DEFAULT_SIZE[args.preset]
    args.height, args.width = args.height or height, args.width or width
    multiple = vae_spatial_stride(VAE_OF_PRESET[args.preset]) * max(dit_config(args.preset).patch_size[1:])
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < multiple or value % multiple:
            raise ConfigError(f"--{name} {value} must be a positive multiple of {multiple} (VAE stride x DiT patch)")
    if args.chunks < 1 or args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--chunks and --repeats must be >= 1 and --warmup >= 0")
    if any(bank < 1 for bank in args.sweep):
        raise ConfigError(f"--sweep {args.sweep}: every bank size must be >= 1")
    if args.cudagraphs and args.device != "cuda":
        raise ConfigError("--cudagraphs needs --device cuda")
    variants = (False, *([True] if args.compile else []), *(["cudagraphs"] if args.cudagraphs else []))
    modes = tuple(dict.fromkeys(["none", *args.modes]))
    return BenchmarkSettings(args.preset, args.device, args.height, args.width, args.chunks, args.warmup, args.dtype,
                             modes, args.config, args.seed, args.repeats, variants, tuple(args.sweep),
                             tuple(args.sweep_modes), not args.no_decode, args.compile_backend), args.json  # fmt: skip


def main(argv: list[str]) -> int:
    """``scripts/benchmark.py``: the JSON of :func:`run` or its tables."""
    settings, as_json = parse_args(argv)
    result = run(settings)
    print(json.dumps(result, indent=2) if as_json else table(result))
    return 0
