"""What a training run reports: per-step losses (``metrics.jsonl``, wandb when configured) and sample videos."""

from __future__ import annotations

import json
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
from utils.config import require_multiple_of, to_container
from utils.distributed import all_reduce_mean

from .networks import autocast
from .plan import TrainPlan
from .rollout import Purpose, derive_seed


class MetricsLog:
    """Main-rank metrics: ``metrics.jsonl`` in the logdir, and wandb when configured."""

    def __init__(self, plan: TrainPlan, start_step: int):
        self.plan = plan
        self.path = plan.logdir / "metrics.jsonl"
        self.wandb = None
        if plan.rank != 0:
            return
        if self.path.exists():  # drop entries of steps a resumed run will redo
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        cfg = plan.config
        if cfg.wandb_key is not None or cfg.wandb_project is not None:
            import wandb

            if cfg.wandb_key is not None:
                wandb.login(key=cfg.wandb_key)
            mode = "online" if cfg.wandb_key is not None else "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, config=to_container(cfg),
                                    dir=str(plan.logdir), mode=mode, resume="allow")  # fmt: skip

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
    """Losses of one iteration, averaged over micro-batches and ranks."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(all_reduce_mean(value.detach().float())) / count
