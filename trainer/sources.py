"""Where the generator's training samples come from: Self-Forcing rollouts of stage 1 and stage 2.

Stage 1 makes a fresh short rollout per call; stage 2 continues one long rollout per accumulation step
across iterations (:class:`~trainer.rollout.StreamingRollout`). Both draw their prompts from
:class:`~trainer.data.PromptData` and their noise from keys, so a resumed run repeats them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from memflow.dit import WanDiT
from pipeline.streaming import StreamingGenerator

from .data import PromptData
from .plan import TrainPlan
from .rollout import (
    ChunkNoise,
    Purpose,
    RolloutResult,
    StreamingRollout,
    derive_seed,
    self_forcing_rollout,
    shared_randint,
)


@dataclass
class Sample:
    """Generator samples of one micro-batch and their text conditioning."""

    x0: torch.Tensor
    cond: torch.Tensor


class Stage1Source:
    """Stage 1: every call is a fresh ``num_training_frames`` rollout of new prompts."""

    def __init__(self, plan: TrainPlan, generator: WanDiT, data: PromptData, encode: Callable):
        self.plan = plan
        self.gen = StreamingGenerator(generator, plan.stream)
        self.data = data
        self.encode = encode
        self.draws = 0

    def sample(self, iteration: int, step: int, *, grad: bool, exit_step: int, generator_phase: bool) -> Sample:
        """A rollout for accumulation step ``step``; each phase (generator, critic) draws new prompts."""
        plan = self.plan
        group = plan.group(step)
        texts, _ = self.data.batch(self.draws, group, plan.groups)
        ids = self.data.sample_ids(self.draws, group, plan.groups)
        if step == plan.accumulation - 1:
            self.draws += 1
        cond = self.encode(texts)
        seeds = [derive_seed(plan.seed, Purpose.NOISE, i) for i in ids]
        noise = ChunkNoise(seeds, plan.latent_shape(plan.stream.num_frame_per_block), device=plan.device,
                           dtype=torch.float32)  # fmt: skip
        with torch.set_grad_enabled(grad):
            result = self_forcing_rollout(self.gen, cond, noise, num_frames=plan.num_frames,
                                          latent_height=plan.latent_height, latent_width=plan.latent_width,
                                          exit_step=exit_step, grad_frames=plan.num_frames if grad else 0)  # fmt: skip
        return Sample(result.x0, result.prompt)

    def state_dict(self) -> dict:
        """The data position, shared by all ranks (each rollout is fresh: nothing per micro-batch)."""
        return {"draws": self.draws}

    def group_states(self) -> dict[int, dict]:
        return {}

    def load_state_dict(self, shared: dict, groups: Mapping[int, dict]) -> None:
        self.draws = int(shared["draws"])


class Stage2Source:
    """Stage 2: one :class:`StreamingRollout` per accumulation step, continued across iterations.

    All rollouts restart together (their lengths are shared), with the prompts of a new data draw,
    new noise keys and a new switch frame. On generator steps the critic reuses the generator
    phase's window (detached); otherwise the critic phase advances the rollouts without gradient.
    """

    def __init__(self, plan: TrainPlan, generator: WanDiT, data: PromptData, encode: Callable):
        self.plan = plan
        self.data = data
        self.encode = encode
        self.rollouts = [
            StreamingRollout(StreamingGenerator(generator, plan.stream), plan.streaming, plan.latent_height,
                             plan.latent_width)
            for _ in range(plan.accumulation)
        ]  # fmt: skip
        self.draws = 0
        self.rollout_index = -1
        self._last: dict[int, RolloutResult] = {}

    def _restart(self) -> None:
        plan = self.plan
        self.rollout_index += 1
        choices = plan.streaming.switch_choices
        pick = shared_randint(0, len(choices) - 1, plan.seed, Purpose.SWITCH, self.rollout_index, device=plan.device)
        switch = choices[pick]
        for step, rollout in enumerate(self.rollouts):
            group = plan.group(step)
            texts, switch_texts = self.data.batch(self.draws, group, plan.groups)
            ids = self.data.sample_ids(self.draws, group, plan.groups)
            noise = ChunkNoise([derive_seed(plan.seed, Purpose.NOISE, self.rollout_index, i) for i in ids],
                               plan.latent_shape(plan.stream.num_frame_per_block), device=plan.device,
                               dtype=torch.float32)  # fmt: skip
            rollout.begin(self.encode(texts), self.encode(switch_texts), switch, noise, self.rollout_index)
        self.draws += 1

    def sample(self, iteration: int, step: int, *, grad: bool, exit_step: int, generator_phase: bool) -> Sample:
        plan = self.plan
        reuse = not generator_phase and iteration % int(plan.config.dfake_gen_update_ratio) == 0
        if reuse:
            last = self._last[step]
            return Sample(last.x0.detach(), last.prompt)
        if step == 0 and self.rollouts[0].finished:
            self._restart()
        low, high = plan.streaming.new_chunk_range
        chunks = shared_randint(low, high, plan.seed, Purpose.NEW_FRAMES, iteration, device=plan.device)
        with torch.set_grad_enabled(grad):
            result = self.rollouts[step].step(chunks * plan.stream.num_frame_per_block, exit_step, grad=grad)
        self._last[step] = result
        return Sample(result.x0, result.prompt)

    def state_dict(self) -> dict:
        """The data position and rollout count, shared by all ranks."""
        return {"draws": self.draws, "rollout_index": self.rollout_index}

    def group_states(self) -> dict[int, dict]:
        """This rank's rollouts (with their caches) by global micro-batch, so any rank layout can take them over."""
        return {self.plan.group(step): rollout.state_dict() for step, rollout in enumerate(self.rollouts)}

    def load_state_dict(self, shared: dict, groups: Mapping[int, dict]) -> None:
        self.draws = int(shared["draws"])
        self.rollout_index = int(shared["rollout_index"])
        for step, rollout in enumerate(self.rollouts):
            rollout.load_state_dict(groups[self.plan.group(step)])
