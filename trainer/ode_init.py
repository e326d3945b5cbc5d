"""ODE-regression initialisation of the causal few-step generator (the release's starting point).

The bidirectional teacher integrates its probability-flow ODE from pure noise with an Euler
sampler under classifier-free guidance; the latents at the generator's (warped) denoising steps
and the final x0 form a trajectory. The causal student then learns to map each of those noisy
states straight to the trajectory's x0, with every chunk at its own noise level and a
block-causal attention mask, so its first Self-Forcing rollouts already produce videos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from memflow.attention import block_causal_mask
from memflow.scheduler import FlowMatchScheduler
from utils.atomic import atomic_path
from utils.errors import ConfigError, WeightsError

from .dmd import ScoreModel, classifier_free_guidance

SHARD_GLOB = "ode_pairs_*.safetensors"


def ode_sigmas(scheduler: FlowMatchScheduler, num_steps: int) -> torch.Tensor:
    """float64 noise levels [num_steps + 1] of the teacher's Euler sampler, from 1 down to 0.

    They follow the same shift as the training schedule, so the nominal steps k * 1000 / num_steps
    land exactly on the generator's warped denoising steps.
    """
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    shift = scheduler.shift
    return shift * s / (1 + (shift - 1) * s)


def record_indices(record_steps: Sequence[float], num_steps: int, num_train_timesteps: int) -> list[int]:
    """Euler step index of each nominal record step (e.g. 1000, 750, 500, 250)."""
    indices = []
    for step in record_steps:
        position = (num_train_timesteps - step) * num_steps / num_train_timesteps
        if not 0 <= position < num_steps or abs(position - round(position)) > 1e-6:
            raise ConfigError(
                f"num_steps={num_steps} puts no Euler step at record step {step}: pick num_steps so that "
                f"num_steps * ({num_train_timesteps} - step) / {num_train_timesteps} is a whole number below "
                f"num_steps for every record step (e.g. 48 for [1000, 750, 500, 250])"
            )
        indices.append(round(position))
    return indices


@torch.no_grad()
def generate_ode_pairs(
    teacher: ScoreModel,
    scheduler: FlowMatchScheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    record_steps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the teacher's guided Euler ODE from ``noise`` [B, F, C, H, W].

    Guidance is ``cond + guidance_scale * (cond - uncond)`` on the flow (Wan's usual 5.0 in the
    ``uncond + s * (cond - uncond)`` form is guidance_scale 4.0 here). Returns the states at
    the record steps followed by the final x0, [B, S + 1, F, C, H, W], and the float32
    timesteps [S] of the recorded states.
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps={num_steps}: the ODE sampler needs at least one step")
    indices = record_indices(record_steps, num_steps, scheduler.num_train_timesteps)
    sigmas = ode_sigmas(scheduler, num_steps)
    timesteps = (sigmas * scheduler.num_train_timesteps).float()
    x = noise.double()
    states: dict[int, torch.Tensor] = {}
    batch = noise.shape[0]
    for i in range(num_steps):
        if i in indices:
            states[i] = x.to(noise.dtype)
        xt = x.to(noise.dtype)
        t = timesteps[i].expand(batch).to(noise.device)
        flow = classifier_free_guidance(teacher(xt, t, cond), teacher(xt, t, uncond), guidance_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * flow.double()
    trajectory = torch.stack([states[i] for i in indices] + [x.to(noise.dtype)], dim=1)
    return trajectory, timesteps[indices]


def ode_regression_loss(
    student: ScoreModel,
    scheduler: FlowMatchScheduler,
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    chunk_frames: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the student's x0 and the trajectory's final x0, chunks at independent steps.

    ``trajectory`` [B, S + 1, F, C, H, W] and ``timesteps`` [S] come from ``generate_ode_pairs``.
    For every sample and every chunk of ``chunk_frames`` frames one recorded step is drawn; the
    student (a ``WanDiT``, possibly wrapped, exposing ``.config``) sees those states with
    per-frame timesteps [B, F] under a block-causal mask and its flow is converted to x0.
    """
    b, s_plus_1, f, _, h, w = trajectory.shape
    if f % chunk_frames:
        raise ConfigError(f"chunk_frames={chunk_frames} must divide the {f} latent frames of the ODE pairs")
    if timesteps.shape != (s_plus_1 - 1,):
        raise ValueError(f"timesteps has shape {tuple(timesteps.shape)}; expected ({s_plus_1 - 1},)")
    device = trajectory.device
    step = torch.randint(0, s_plus_1 - 1, (b, f // chunk_frames), generator=generator, device="cpu")
    step = step.repeat_interleave(chunk_frames, dim=1).to(device)
    frame = torch.arange(f, device=device)
    xt = trajectory[torch.arange(b, device=device)[:, None], step, frame[None]]
    t = timesteps.to(device)[step]
    mask = block_causal_mask(f, student.config.tokens_per_frame(h, w), chunk_frames, device)
    x0_pred = scheduler.flow_to_x0(student(xt, t, cond, mask=mask), xt, t)
    return F.mse_loss(x0_pred.float(), trajectory[:, -1].float())


def save_ode_shard(
    path: str | os.PathLike, trajectory: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str]
) -> Path:
    """Write one shard of ODE pairs (atomically) as safetensors, prompts in the metadata."""
    if len(prompts) != trajectory.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {trajectory.shape[0]} trajectories")
    path = Path(path)
    tensors = {"trajectory": trajectory.contiguous().cpu(), "timesteps": timesteps.contiguous().cpu()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"prompts": json.dumps(list(prompts))})
    return path


class ODEPairDataset(Dataset):
    """Every trajectory in the ``ode_pairs_*.safetensors`` shards of a folder, read lazily.

    An item is ``{"trajectory": [S + 1, F, C, H, W], "timesteps": [S], "prompt": str}``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.shards = sorted(Path(folder).glob(SHARD_GLOB))
        if not self.shards:
            raise ConfigError(f"ode_pairs folder {folder} holds no {SHARD_GLOB} files: generate ODE pairs first")
        self._index: list[tuple[Path, int]] = []
        self._prompts: dict[Path, list[str]] = {}
        for shard in self.shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    count = f.get_slice("trajectory").get_shape()[0]
                    prompts = json.loads((f.metadata() or {}).get("prompts", "null"))
            except Exception as err:
                raise WeightsError(f"{shard}: not a readable ODE-pair shard ({err})") from err
            if not isinstance(prompts, list) or len(prompts) != count:
                raise WeightsError(f"{shard}: metadata must list one prompt per trajectory; regenerate it")
            self._prompts[shard] = prompts
            self._index.extend((shard, i) for i in range(count))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        shard, i = self._index[index]
        with safe_open(shard, framework="pt") as f:
            trajectory = f.get_slice("trajectory")[i]
            timesteps = f.get_tensor("timesteps")
        return {"trajectory": trajectory, "timesteps": timesteps, "prompt": self._prompts[shard][i]}
