"""Training of the tiny Wan-architecture VAE (diffusers ``AutoencoderKLWan``) on story-world clips.

The model keeps Wan2.1's strides (4x in time, 8x in space: 64x64 pixels -> 8x8 latents, ``1 + 4 (n - 1)``
pixel frames per ``n`` latent frames) with small widths. Loss: L1 + MSE reconstruction of a posterior
sample plus a small KL term. Afterwards the per-channel latent mean / std are fitted on training clips
and stored in the model config, so :class:`memflow.vae.WanVAE` normalises latents as it does for Wan2.1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from memflow.errors import ConfigError
from memflow.vae import WanVAE, vae_config
from utils.atomic import atomic_path
from utils.world import clip_from_seed, split_seeds, to_model_pixels

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class VAESettings:
    """Architecture and optimisation of the tiny VAE.

    Training is a curriculum of ``phases``, each ``(latent_frames, steps, batch_size)``: short windows
    first (the first, uncached frame and one 4-frame group), then longer ones, whose later groups run
    through the causal temporal cache as every group of a long video does.
    """

    base_dim: int = 8
    z_dim: int = 16
    num_res_blocks: int = 1
    phases: tuple[tuple[int, int, int], ...] = ((2, 1000, 4), (3, 400, 4), (6, 150, 2))
    source_latent_frames: int = 9
    lr: float = 1e-3
    kl_weight: float = 1e-6
    stats_clips: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(tuple(int(v) for v in phase) for phase in self.phases))
        for frames, steps, batch in self.phases:
            if not 1 < frames <= self.source_latent_frames or steps < 0 or batch < 1:
                raise ConfigError(
                    f"vae phase {[frames, steps, batch]}: want [latent_frames in 2..{self.source_latent_frames}, "
                    "steps >= 0, batch_size >= 1]"
                )

    def model_config(self) -> dict:
        """``AutoencoderKLWan`` arguments: the tiny preset's strides with our widths (neutral stats)."""
        return vae_config(
            "tiny", base_dim=self.base_dim, z_dim=self.z_dim, num_res_blocks=self.num_res_blocks,
            latents_mean=[0.0] * self.z_dim, latents_std=[1.0] * self.z_dim,
        )  # fmt: skip


def clip_window(seed: int, latent_frames: int, source_latent_frames: int) -> np.ndarray:
    """``1 + 4 (latent_frames - 1)`` consecutive frames of a training clip, at a seeded offset, as [T, 3, H, W]."""
    frames = clip_from_seed(seed, source_latent_frames).frames
    length = 1 + 4 * (latent_frames - 1)
    start = int(np.random.default_rng([seed, 7]).integers(0, frames.shape[0] - length + 1))
    return to_model_pixels(frames[start : start + length])


def clip_batches(
    seeds: Sequence[int], batch_size: int, latent_frames: int, source_latent_frames: int
) -> Iterator[torch.Tensor]:
    """Endless batches of clip windows as VAE input ``[B, 3, T, 64, 64]`` in ``[-1, 1]``, cycling over ``seeds``."""
    position = 0
    while True:
        chunk = [seeds[(position + i) % len(seeds)] for i in range(batch_size)]
        position += batch_size
        pixels = [clip_window(seed, latent_frames, source_latent_frames) for seed in chunk]
        yield torch.from_numpy(np.stack(pixels)).transpose(1, 2)


def vae_loss(model: AutoencoderKLWan, video: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + MSE) of a posterior sample plus ``kl_weight`` x KL to N(0, I)."""
    posterior = model.encode(video).latent_dist
    recon = model.decode(posterior.sample()).sample
    l1 = (recon - video).abs().mean()
    mse = (recon - video).pow(2).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


class VAETrainer:
    """Trains a fresh tiny VAE on training-split clips; ``fit_normalisation`` then ``save``."""

    def __init__(self, settings: VAESettings, seeds: Sequence[int] | None = None):
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.model = AutoencoderKLWan(**settings.model_config())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=0.0)
        self.seeds = list(seeds if seeds is not None else split_seeds("train", 100_000))
        self.phase_batches = [
            (steps, clip_batches(self.seeds, batch, frames, settings.source_latent_frames))
            for frames, steps, batch in settings.phases
        ]
        self.step_count = 0

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps, _ in self.settings.phases)

    def load_weights(self, folder: Path) -> None:
        """Start from a saved VAE of the same architecture (``folder`` in the Diffusers ``vae/`` layout)."""
        self.model.load_state_dict(WanVAE.from_diffusers(folder).model.state_dict())

    def step(self) -> dict[str, float]:
        """One optimisation step on the next batch; returns its losses."""
        self.model.train()
        done, batches = 0, self.phase_batches[-1][1]
        for steps, phase in self.phase_batches:
            if self.step_count < done + steps:
                batches = phase
                break
            done += steps
        self.step_count += 1
        loss, values = vae_loss(self.model, next(batches), self.settings.kl_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return values

    @torch.no_grad()
    def fit_normalisation(self) -> tuple[list[float], list[float]]:
        """Per-channel mean / std of the latent means over ``stats_clips`` clips, stored in the config."""
        self.model.eval()
        count = self.settings.stats_clips
        batches = clip_batches(
            self.seeds[-count:], count, self.settings.phases[0][0], self.settings.source_latent_frames
        )
        mu = self.model.encode(next(batches)).latent_dist.mode()
        mean = mu.mean(dim=(0, 2, 3, 4))
        std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
        self.model.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        return mean.tolist(), std.tolist()

    def save(self, folder: Path) -> Path:
        """Write ``folder/config.json`` + ``diffusion_pytorch_model.safetensors`` (the Diffusers ``vae/`` layout)."""
        folder = Path(folder)
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        with atomic_path(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        return folder


@torch.no_grad()
def reconstruction_error(vae: WanVAE, seeds: Sequence[int], latent_frames: int) -> float:
    """Mean absolute pixel error (0-255 scale) of encode -> decode over clips of ``latent_frames``."""
    errors = []
    for seed in seeds:
        video = torch.from_numpy(clip_window(seed, latent_frames, latent_frames))[None]
        recon = vae.decode(vae.encode(video)).clamp(-1, 1)
        errors.append(float((recon - video).abs().mean()) * 127.5)
    return float(np.mean(errors))
