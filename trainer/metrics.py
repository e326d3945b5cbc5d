"""What a training run reports: per-step losses (``metrics.jsonl``, wandb when configured) and sample videos."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from memflow.dit import WanDiT
from memflow.loading import load_vae
from memflow.text import TextEncoder
from memflow.vae import WanVAE
from pipeline.plan import plan_videos
from pipeline.runner import Components, VideoRunner
from pipeline.schedule import PromptSchedule, PromptSegment
from pipeline.streaming import StreamingGenerator
from utils.atomic import atomic_path
from utils.config import require_multiple_of, to_container
from utils.distributed import gather_floats

from .networks import autocast
from .plan import TrainPlan
from .rollout import Purpose, derive_seed

log = logging.getLogger(__name__)


class MetricsLog:
    """Main-rank metrics: ``metrics.jsonl`` in the logdir, and wandb when configured."""

    def __init__(self, plan: TrainPlan, start_step: int):
        self.plan = plan
        self.path = plan.logdir / "metrics.jsonl"
        self.wandb = None
        if plan.rank != 0:
            return
        if self.path.exists():
            self._truncate(start_step)
        cfg = plan.config
        if cfg.wandb_key is not None or cfg.wandb_project is not None:
            import wandb

            if cfg.wandb_key is not None:
                wandb.login(key=cfg.wandb_key)
            mode = "online" if cfg.wandb_key is not None else "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, config=to_container(cfg),
                                    dir=str(cfg.wandb_dir or plan.logdir), mode=mode, resume="allow")  # fmt: skip

    def _truncate(self, start_step: int) -> None:
        """Keep the entries of steps up to ``start_step`` (a resumed run redoes the later ones); drop lines that do
        not parse, such as the partial last line a killed run leaves; rewrite the file atomically."""
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                step = int(entry["step"])
            except (ValueError, TypeError, KeyError):
                dropped += 1
                continue
            if step <= start_step:
                kept.append(line)
        if dropped:
            log.warning("%s: dropped %d line(s) that do not parse (a killed run's last write)", self.path, dropped)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.plan.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class SampleVideos:
    """Sample videos of the generator through the inference runner, every ``vis_interval`` steps.

    All ranks run the same chunk loop (their model calls are FSDP collectives); rank 0 decodes and
    writes ``logdir/samples/step_XXXXXX/*.mp4`` with its sidecar.
    """

    def __init__(self, plan: TrainPlan, generator: WanDiT, encoder: TextEncoder):
        self.plan = plan
        cfg = plan.config
        frames = require_multiple_of(cfg, "vis_num_frames", plan.stream.num_frame_per_block, "whole chunks")
        segments = [PromptSegment(0, ((plan.prompts[0], 1.0),))]
        if plan.switch_prompts is not None:
            switch = next((f for f in plan.streaming.switch_choices if f < frames), None)
            if switch is not None:
                segments.append(PromptSegment(switch, ((plan.switch_prompts[0], 1.0),)))
        self.schedule = PromptSchedule(tuple(segments), frames, plan.stream.num_frame_per_block)
        self.generator = generator
        self.encoder = encoder
        self.vae = self._vae() if plan.rank == 0 else None

    def _vae(self) -> WanVAE:
        plan = self.plan
        return load_vae(plan.config.vae, plan.config.weights_dir, channels=plan.dit.out_dim, device=plan.device,
                        dtype=torch.float32, seed=plan.seed)  # fmt: skip

    @torch.no_grad()
    def __call__(self, step: int) -> Path | None:
        plan = self.plan
        self.generator.eval()
        try:
            if plan.rank != 0:
                texts = [seg.prompts[0][0] for seg in self.schedule.segments]
                prompts = [e[None] for e in self.encoder.encode(texts)]
                noise = torch.zeros(1, *plan.latent_shape(self.schedule.num_frames), device=plan.device)
                with autocast(plan):
                    gen = StreamingGenerator(self.generator, plan.stream)
                    gen.generate(noise, prompts, self.schedule.switch_frames)
                return None
            sample_cfg = OmegaConf.merge(plan.config, {"save_trace": False, "save_latents": False})
            run_plan = plan_videos(sample_cfg, plan.stream, plan.dit, [self.schedule],
                                   output_folder=plan.logdir / "samples" / f"step_{step:06d}", device=plan.device,
                                   dtype=torch.float32, seed=derive_seed(plan.seed, Purpose.VIS),
                                   stems=["sample"])  # fmt: skip
            runner = VideoRunner(run_plan, Components(self.generator, self.encoder, self.vae))
            with autocast(plan):
                return runner.run(run_plan.jobs[0]).video
        finally:
            self.generator.train()


@dataclass
class StepLog:
    """Losses of one iteration: the mean over every global micro-batch, whatever the number of ranks.

    Each rank adds one value per accumulation step; :meth:`means` gathers them from every rank and sums
    them exactly rounded (``math.fsum``), so W ranks x A steps report bit for bit what W * A steps on one
    rank report for the same samples.
    """

    local: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.local.setdefault(name, []).append(float(value.detach()))

    def means(self, device: torch.device) -> dict[str, float]:
        """{name: mean over all micro-batches of all ranks}; a collective (every rank adds the same names)."""
        names = list(self.local)
        flat = [v for name in names for v in self.local[name]]
        ranks = gather_floats(flat, device)
        out, offset = {}, 0
        for name in names:
            count = len(self.local[name])
            values = [v for rank in ranks for v in rank[offset : offset + count]]
            out[name] = math.fsum(values) / len(values)
            offset += count
        return out
