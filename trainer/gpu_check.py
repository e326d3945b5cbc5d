"""The prepared device check (``scripts/gpu_check.py``): one command, one JSON, every figure the first GPU hour needs.

On one GPU it runs, in order: the environment; the golden cases on CUDA in bfloat16 (and float32); the 1.3B
benchmark at 832x480 (every memory mode, eager and compiled, with and without decode, first-chunk latency, peak
memory); two stage-1 iterations of the 1.3B generator with a 1.3B stand-in teacher and critic (random weights,
MiniLM text) under FSDP on one GPU; the peak memory of a video with and without ``low_memory`` (a random-weight
UMT5-XXL offloaded after encoding); then, if time is left, the compiled benchmark with CUDA graphs. ``--smoke``
runs the same steps at tiny size on the CPU (the compiled variants traced with ``aot_eager``).

Every step is timed and caught: a failing step records its error and the next one runs; a step that would not
finish within ``--budget`` seconds (by a rough estimate) is skipped. The JSON is rewritten after every step, so
a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from transformers import UMT5EncoderModel

from memflow.dit import build_dit
from memflow.loading import materialize, random_vae
from memflow.text import TextEncoder, umt5_config
from pipeline.benchmark import DEFAULT_CONFIG, BenchmarkSettings
from pipeline.benchmark import run as run_benchmark
from pipeline.golden import check_cases
from pipeline.plan import stream_config, vae_spatial_stride
from pipeline.runner import peak_memory
from pipeline.streaming import StreamingGenerator
from utils.atomic import atomic_path
from utils.config import load_config
from utils.errors import ConfigError

from .distill import DistillTrainer
from .networks import build_networks, build_text_encoder
from .plan import plan_training

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN = ROOT.parent / "shared" / "golden"
TRAIN_1_3B = [
    "generator_ckpt=null", "real_name=wan2.1-t2v-1.3b", "weights_dir=null", "real_weights_dir=null",
    "fake_weights_dir=null", "text_encoder=minilm", "model_overrides.text_dim=384", "total_batch_size=1",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CheckSize:
    """What the steps run on: the full-size GPU check or the tiny CPU smoke run."""

    device: str
    preset: str
    height: int
    width: int
    vae: str
    text_encoder: str
    chunks: int
    backend: str
    train_config: Path
    train_overrides: tuple[str, ...]
    golden_dtypes: tuple[torch.dtype, ...]
    golden_cases: tuple[str, ...] | None  # None: all


SIZES = {
    "gpu": CheckSize("cuda", "wan2.1-t2v-1.3b", 480, 832, "wan2.1", "umt5-xxl", 4, "inductor",
                     ROOT / "configs" / "train_init.yaml", tuple(TRAIN_1_3B), (torch.bfloat16, torch.float32), None),
    # the smoke run keeps the suite fast: bf16 only, the cases that cover the DiT, a switch, the VAE and T5
    "smoke": CheckSize("cpu", "tiny", 32, 32, "tiny", "tiny", 2, "aot_eager",
                       ROOT / "configs" / "tiny" / "train_init.yaml", ("total_batch_size=1",), (torch.bfloat16,),
                       ("dit_forward", "flow_scheduler", "interactive_switch", "vae_roundtrip", "t5_encoder")),
}  # fmt: skip
GOLDEN_ATOL = {torch.bfloat16: 0.3, torch.float32: 1e-4}
# rough seconds per step on one H100 (unmeasured guesses; a step is skipped when the budget cannot hold it)
ESTIMATES = {"golden": 30, "benchmark": 200, "training": 100, "low_memory": 60, "benchmark_cudagraphs": 120}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.UTC).isoformat()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version())  # fmt: skip
        try:
            import flash_attn

            env["flash_attn"] = flash_attn.__version__
        except ImportError:
            env["flash_attn"] = None
    return env


class SkipStep(Exception):
    """A step that cannot run here (its data is absent); recorded as skipped with the reason."""


def golden_step(size: CheckSize, golden_dir: Path) -> dict:
    """The golden cases on the check's device, bfloat16 within its bound (then float32 on a GPU)."""
    if not (golden_dir / "cases.json").is_file():
        raise SkipStep(f"{golden_dir / 'cases.json'} not found (pass --golden DIR)")
    device = torch.device(size.device)
    out = {}
    for dtype in size.golden_dtypes:
        lines, failed = check_cases(golden_dir, GOLDEN_ATOL[dtype], dtype, device, size.golden_cases)
        out[str(dtype).removeprefix("torch.")] = {"failed": failed, "lines": lines}
    if any(result["failed"] for result in out.values()):
        raise RuntimeError(f"golden cases failed: {json.dumps(out)}")
    return out


def benchmark_step(size: CheckSize, variants: tuple) -> dict:
    """The benchmark's JSON, with the compiler's counters (graphs, and CUDA graph skips with their reasons)."""
    settings = BenchmarkSettings(size.preset, size.device, size.height, size.width, chunks=size.chunks, warmup=1,
                                 dtype="auto", modes=("none", "nam", "nam_sma"), config=str(DEFAULT_CONFIG),
                                 repeats=3, variants=variants, backend=size.backend)  # fmt: skip
    counters.clear()
    result = run_benchmark(settings)
    result["compiler_counters"] = {group: dict(values) for group, values in counters.items()}
    return result


@contextlib.contextmanager
def _one_process_group(device: torch.device) -> Iterator[None]:
    """A one-rank process group (nccl on CUDA, gloo on the CPU), so the networks are sharded with FSDP."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def training_step(size: CheckSize, logdir: Path) -> dict:
    """Two stage-1 iterations (the first a generator step) under bf16 autocast and FSDP on one device."""
    overrides = [*size.train_overrides, f"device={size.device}", "mixed_precision=true", "sharding_strategy=full",
                 "vis_interval=0"]  # fmt: skip
    cfg = load_config(size.train_config, overrides)
    device = torch.device(size.device)
    with _one_process_group(device):
        plan = plan_training(cfg, logdir, stage="init")
        logdir.mkdir(parents=True, exist_ok=True)
        trainer = DistillTrainer(plan, build_networks(plan), build_text_encoder(plan))
        sharded = type(trainer.nets.generator).__name__
        iterations = []
        for it in range(2):
            start = time.perf_counter()
            values = trainer.iteration(it)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            iterations.append({**values, "seconds": time.perf_counter() - start})
    return {"generator_class": sharded, "iterations": iterations, "peak_memory": peak_memory(device)}


@torch.no_grad()
def _video_peak(size: CheckSize, low_memory: bool) -> dict:
    """Peak memory of encoding a prompt with the text encoder and streaming a few decoded chunks."""
    device = torch.device(size.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = materialize(lambda: UMT5EncoderModel(umt5_config(size.text_encoder)), device, dtype, 0)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied, as loaded weights are
    encoder = TextEncoder(model, None, device=device, offload_after_encode=low_memory)
    ids = torch.randint(0, encoder.model.config.vocab_size, (1, 512), device=device)
    prompt = encoder.encode_ids(ids, torch.ones_like(ids))
    if low_memory:
        encoder.offload()
    dit = materialize(lambda: build_dit(size.preset, text_dim=encoder.dim), device, dtype, 0)
    vae = random_vae(size.vae, dit.config.out_dim, device, dtype, 0)
    stride = vae_spatial_stride(size.vae)
    latent = (size.height // stride, size.width // stride)
    gen = StreamingGenerator(dit, stream_config(load_config(DEFAULT_CONFIG)))
    gen.start(prompt, num_frames=3 * size.chunks, latent_height=latent[0], latent_width=latent[1])
    decoder = vae.streaming_decoder()
    for _ in range(size.chunks):
        x0 = gen.denoise_chunk(torch.randn(1, 3, dit.config.in_dim, *latent, device=device))
        gen.commit_chunk(x0)
        decoder.decode(x0)
    return peak_memory(device)


def low_memory_step(size: CheckSize) -> dict:
    out = {}
    for low_memory in (False, True):
        if size.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out[f"low_memory_{str(low_memory).lower()}"] = _video_peak(size, low_memory)
    return out


class Check:
    """The steps, their timings and the JSON they fill."""

    def __init__(self, out: Path, budget: float, smoke: bool):
        self.out, self.budget, self.smoke = out, budget, smoke
        self.start = time.perf_counter()
        self.report: dict = {"check": "smoke" if smoke else "gpu", "budget_s": budget, "steps": {}}

    def write(self) -> None:
        self.report["total_s"] = time.perf_counter() - self.start
        with atomic_path(self.out) as tmp:
            tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def step(self, name: str, run: Callable[[], dict]) -> None:
        """Run one step unless the budget cannot hold it; record its result or its error."""
        elapsed = time.perf_counter() - self.start
        if not self.smoke and elapsed + ESTIMATES[name] > self.budget:
            self.report["steps"][name] = {"status": "skipped", "reason": f"{elapsed:.0f} s used of {self.budget:.0f}"}
        else:
            start = time.perf_counter()
            try:
                entry = {"status": "ok", "result": run()}
            except SkipStep as why:
                entry = {"status": "skipped", "reason": str(why)}
            except Exception as err:  # a failing step must not cost the others their run
                entry = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback":
                         traceback.format_exc(limit=8)}  # fmt: skip
            entry["seconds"] = time.perf_counter() - start
            self.report["steps"][name] = entry
        self.write()
        print(f"{name:22s} {self.report['steps'][name]['status']}", flush=True)


def main(argv: list[str]) -> int:
    """``scripts/gpu_check.py``: 0 when every step that ran passed, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="gpu_check.py", description="The prepared GPU check, one JSON.")
    parser.add_argument("--smoke", action="store_true", help="the same steps at tiny size on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, help="the golden cases folder")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later steps are skipped past it")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "gpu"]
    device = torch.device(size.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("no CUDA device is available; run scripts/gpu_check.py --smoke for the CPU form")
    check = Check(args.out, args.budget, args.smoke)
    check.report["environment"] = environment(device)
    check.step("golden", lambda: golden_step(size, args.golden))
    check.step("benchmark", lambda: benchmark_step(size, (False, True)))
    check.step("training", lambda: training_step(size, args.out.parent / f"{args.out.stem}_train"))
    check.step("low_memory", lambda: low_memory_step(size))
    if device.type == "cuda":
        check.step("benchmark_cudagraphs", lambda: benchmark_step(size, ("cudagraphs",)))
    failed = [name for name, step in check.report["steps"].items() if step["status"] == "failed"]
    print(f"{args.out}: {len(check.report['steps']) - len(failed)} steps ok or skipped, {len(failed)} failed")
    return 1 if failed else 0
