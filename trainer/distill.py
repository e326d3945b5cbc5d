"""The DMD distillation loop of stages 1 and 2 (Self-Forcing init and streaming long tuning).

Each iteration the critic learns flow matching on generator samples, and every
``dfake_gen_update_ratio`` iterations the generator takes a DMD step, both with gradient accumulation
to ``total_batch_size``; then EMA, logging, sample videos and checkpoints (:func:`run_loop`, shared
with the ODE initialisation). The pieces live beside it: the plan (:mod:`trainer.plan`), prompts
(:mod:`trainer.data`), networks (:mod:`trainer.networks`), checkpoint state and exports
(:mod:`trainer.state`), sample sources (:mod:`trainer.sources`) and reports (:mod:`trainer.metrics`).

Reproducibility: all randomness is keyed by (seed, iteration or data draw, global micro-batch),
where global micro-batch ``g = accumulation_step * world_size + rank``. A run of ``W`` ranks with
``A`` accumulation steps therefore sees the same samples, noise and score timesteps as one of
``W * A`` micro-batches on fewer ranks, and a resumed run continues with exactly the same draws.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memflow.scheduler import FlowMatchScheduler
from memflow.text import TextEncoder
from utils.signals import Preempted, StopRequest

from .data import PromptData
from .dmd import DMDObjective, ScoreTimestepSampler
from .ema import EMA
from .metrics import MetricsLog, SampleVideos, StepLog
from .networks import Networks, adamw, autocast, trainable_parameters
from .plan import TrainPlan
from .rollout import Purpose, derive_seed, shared_randint
from .sources import Stage1Source, Stage2Source
from .state import EMAState, ModelState, Saved, TrainState, base_export, lora_export, trainable_state

log = logging.getLogger(__name__)


class DistillTrainer:
    """Stages 1 and 2 of DMD distillation (see the module docstring)."""

    def __init__(self, plan: TrainPlan, nets: Networks, encoder: TextEncoder):
        cfg = plan.config
        self.plan, self.nets, self.encoder = plan, nets, encoder
        self.scheduler = FlowMatchScheduler(shift=plan.stream.timestep_shift)
        self.num_steps = len(plan.stream.denoising_step_list)
        with torch.no_grad():
            negative = encoder.encode([cfg.negative_prompt])
        sampler = ScoreTimestepSampler(plan.stream.timestep_shift, cfg.min_score_timestep, cfg.max_score_timestep)
        self.dmd = DMDObjective(nets.teacher, nets.critic, self.scheduler, sampler,
                                guidance_scale=cfg.guidance_scale, negative_context=negative)  # fmt: skip
        self.gen_opt = adamw(nets.generator, cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay)
        self.critic_opt = adamw(nets.critic, cfg.lr_critic, cfg.beta1_critic, cfg.beta2_critic, cfg.weight_decay)
        self.ema = EMA(nets.generator, cfg.ema_weight, cfg.ema_start_step)
        data = PromptData(plan.prompts, plan.switch_prompts, plan.batch_size, plan.seed)
        source = Stage2Source if plan.stage == "long" else Stage1Source
        self.source = source(plan, nets.generator, data, self._encode)
        self.state = TrainState(plan)
        self.step = 0

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode(texts).to(self.plan.device)

    # -- checkpoints ---------------------------------------------------------------------------------
    def parts(self) -> dict[str, ModelState | EMAState]:
        """What a checkpoint holds besides the sample source (torch.distributed.checkpoint's state dict)."""
        nets = self.nets
        return {"generator": ModelState("generator", nets.generator, self.gen_opt),
                "critic": ModelState("critic", nets.critic, self.critic_opt),
                "generator_ema": EMAState("generator_ema", self.ema)}  # fmt: skip

    def save(self) -> Path:
        """A checkpoint of every rank's shards, then the release export; a collective."""
        path = self.state.save(self.step, self.parts(), self.source)
        self.export()
        return path

    def load(self, saved: Saved) -> None:
        self.step = self.state.load(saved, self.parts(), self.source)

    def export(self) -> None:
        """Release files next to the checkpoints: ``lora.pt`` (LoRA runs) or ``base.pt`` (full); rank 0 writes."""
        nets, plan = self.nets, self.plan
        generator = trainable_state(nets.generator)
        if nets.lora:
            critic = trainable_state(nets.critic)
            if plan.rank == 0:
                self.state.export("lora.pt", {"generator_lora": lora_export(generator, plan.adapter.dtype),
                                              "critic_lora": lora_export(critic, plan.adapter.dtype)})  # fmt: skip
            return
        ema = self.ema.state_dict()
        if plan.rank == 0:
            self.state.export("base.pt", base_export(generator, ema))

    # -- one iteration -----------------------------------------------------------------------------------
    def _clip(self, model: nn.Module, key: str) -> torch.Tensor | None:
        limit = float(self.plan.config[key])
        if limit <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(trainable_parameters(model), limit)

    def iteration(self, it: int) -> dict[str, float]:
        """One optimiser step of the critic (and of the generator every ``dfake_gen_update_ratio``)."""
        plan, cfg = self.plan, self.plan.config
        exit_step = shared_randint(0, self.num_steps - 1, plan.seed, Purpose.EXIT, it, device=plan.device)
        generator_step = it % int(cfg.dfake_gen_update_ratio) == 0
        logs = StepLog()
        count = plan.accumulation
        if generator_step:
            self.gen_opt.zero_grad(set_to_none=True)
            for step in range(count):
                torch.manual_seed(derive_seed(plan.seed, Purpose.GEN_LOSS, it, plan.group(step)))
                with autocast(plan):
                    sample = self.source.sample(it, step, grad=True, exit_step=exit_step, generator_phase=True)
                    loss, info = self.dmd.generator_loss(sample.x0, sample.cond)
                (loss / count).backward()
                logs.add("generator_loss", loss)
                logs.add("dmd_gradient_norm", info["dmd_gradient_norm"])
            self._clip(self.nets.generator, "max_grad_norm")
            self.gen_opt.step()
            self.ema.update(it)
        self.critic_opt.zero_grad(set_to_none=True)
        for step in range(count):
            torch.manual_seed(derive_seed(plan.seed, Purpose.CRITIC_LOSS, it, plan.group(step)))
            with autocast(plan):
                sample = self.source.sample(it, step, grad=False, exit_step=exit_step, generator_phase=False)
                loss, _ = self.dmd.critic_loss(sample.x0, sample.cond)
            (loss / count).backward()
            logs.add("critic_loss", loss)
        self._clip(self.nets.critic, "max_grad_norm_critic")
        self.critic_opt.step()
        return {**logs.means(plan.device), "exit_step": float(exit_step)}

    # -- the run -------------------------------------------------------------------------------------
    def train(self, resume: bool = False, progress: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run to ``max_iters`` (resuming when the logdir has this run's checkpoint); returns the step logs."""
        return run_loop(self, resume, progress)


def run_loop(
    trainer: Any,
    resume: bool,
    progress: Callable[[int, dict], None] | None,
    *,
    allow_changed: Sequence[str] = (),
    stop: StopRequest | None = None,
) -> list[dict]:
    """The shared outer loop of the DMD and ODE trainers: resume, iterate, log, sample, checkpoint.

    ``trainer`` provides ``plan``, ``state``, ``step``, ``iteration(it)``, ``save()``, ``load(saved)``,
    ``encoder`` and ``nets.generator``. With ``stop``, a stop signal received by any rank ends the run at
    the next step boundary with a checkpoint of that step and :class:`~utils.signals.Preempted`.
    """
    plan, cfg = trainer.plan, trainer.plan.config
    found = trainer.state.find(resume, allow_changed)
    if found is not None:
        trainer.load(found)
    saved = trainer.step
    metrics = MetricsLog(plan, trainer.step)
    vis_interval = int(cfg.vis_interval)
    samples = SampleVideos(plan, trainer.nets.generator, trainer.encoder) if vis_interval else None
    history = []
    try:
        while trainer.step < int(cfg.max_iters):
            signum = stop.agreed(plan.device) if stop is not None else None
            if signum is not None:
                path = trainer.save() if trainer.step > saved else None
                raise Preempted(signum, trainer.step, path)
            values = trainer.iteration(trainer.step)
            for name, value in values.items():
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name} is {value} at step {trainer.step}")
            trainer.step += 1
            history.append({"step": trainer.step, **values})
            metrics.write(trainer.step, values)
            if progress is not None:
                progress(trainer.step, values)
            if trainer.step % int(cfg.log_iters) == 0:
                log.info("step %d: %s", trainer.step, ", ".join(f"{k} {v:.5g}" for k, v in values.items()))
            if samples is not None and trainer.step % vis_interval == 0:
                video = samples(trainer.step)
                if video is not None:
                    log.info("sample video: %s", video)
            if trainer.step % int(cfg.save_interval) == 0 or trainer.step == int(cfg.max_iters):
                trainer.save()
                saved = trainer.step
    finally:
        metrics.close()
    return history
