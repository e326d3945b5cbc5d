"""Flow-matching training of the tiny bidirectional teacher DiT on VAE latents of story-world clips.

Clips are encoded once (:func:`build_latent_cache`: normalised VAE latents and MiniLM prompt embeddings
in one safetensors file). The teacher is our Wan DiT (``build_dit(preset, ...)``) trained
as Wan is: timesteps drawn uniformly on the shift-5 grid, x_t = (1 - sigma) x0 + sigma noise, MSE on
the flow ``noise - x0``. With probability ``cfg_dropout`` a sample's text is replaced by the embedding of
``uncond_prompt`` (the distillation configs' ``negative_prompt``), so classifier-free guidance works.

``subject_weight`` > 0 weights the squared error of every latent cell a subject covers by
``1 + subject_weight``. Subjects fill a few percent of a frame and a return fills one chunk of a clip,
so with a plain MSE bringing a subject back unchanged is worth almost nothing to the loss, and the
teacher that the distillation stages copy does not learn it (``python -m experiments.probe_teacher``). But a weight
that depends on the target biases the flow learnt: where the noise hides whether a cell shows a subject, the
weighted optimum ``E[w v | x_t] / E[w | x_t]`` leans towards subject colours wherever a subject could be, and
samples paint blobs of the prompted colour over the scene (docs/memflow_tiny_log.md, 2026-12-06). Keep it 0
for a model that is sampled.

``chunk_noise`` > 0 gives that share of samples one timestep per chunk (the world's ``CHUNK_FRAMES``
latent frames, as the generator makes them) instead of one per clip, as diffusion forcing does, so the
teacher also sees a clean sighting beside a noisy return, where copying the subject is the only way to
lower the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memflow.config import run_dit_config
from memflow.dit import WanDiT, build_dit
from memflow.scheduler import FlowMatchScheduler
from memflow.text import TextEncoder
from memflow.vae import WanVAE
from tiny.world import CHUNK_FRAMES, pixel_frame, to_model_pixels, training_clip
from utils.atomic import atomic_path
from utils.errors import ConfigError, WeightsError

from .vae_train import subject_mask

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@torch.no_grad()
def build_latent_cache(
    vae: WanVAE,
    encoder: TextEncoder,
    seeds: Sequence[int],
    latent_frames: int,
    uncond_prompt: str,
    path: Path,
    return_fraction: float = 0.0,
    return_gap: int = 0,
    batch_size: int = 16,
) -> Path:
    """Encode the clips of ``seeds`` and their prompts once; writes ``latents``, ``context``, ``uncond`` and
    ``subjects`` (:func:`latent_subject_mask` of each clip).

    A ``return_fraction`` of the seeds give return clips with a cut of ``return_gap`` frames
    (:func:`tiny.world.training_clip`); both, and ``uncond_prompt``, are stored in the file's metadata, so
    that :func:`check_latent_cache` can refuse a cache of another mix or another unconditional prompt.
    """
    latents, subjects, texts = [], [], []
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        clips = [training_clip(seed, latent_frames, return_fraction, return_gap) for seed in batch]
        video = torch.from_numpy(np.stack([to_model_pixels(c.frames) for c in clips]))
        latents.append(vae.encode(video))
        subjects.append(latent_subject_mask(video, tuple(latents[-1].shape[1:2] + latents[-1].shape[3:])))
        texts += [clip.text for clip in clips]
    context = torch.cat([encoder.encode(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    tensors = {
        "latents": torch.cat(latents).contiguous(),
        "subjects": torch.cat(subjects).contiguous(),
        "context": context.contiguous(),
        "uncond": encoder.encode([uncond_prompt]).contiguous(),
        "seeds": torch.tensor(list(seeds), dtype=torch.int64),
    }
    recipe = {"return_fraction": str(float(return_fraction)), "return_gap": str(int(return_gap)),
              "uncond_prompt": uncond_prompt}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=recipe)
    return Path(path)


def subject_coverage(video: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """``float [B, F, h, w]`` for pixels ``[B, T, 3, H, W]`` and latents of ``latent_shape`` (F, h, w): the share of
    each latent cell's pixels that show a subject, over the pixel frames its latent frame encodes."""
    mask = subject_mask(video.transpose(1, 2))[:, 0].float()  # [B, T, H, W]
    frames = torch.stack([mask[:, pixel_frame(f) : pixel_frame(f + 1)].mean(1) for f in range(latent_shape[0])], 1)
    return F.adaptive_avg_pool2d(frames, tuple(latent_shape[1:]))


def latent_subject_mask(video: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """``uint8 [B, F, h, w]``: the latent cells whose pixels, in any of the frames their latent frame encodes, show
    a subject (:func:`subject_coverage` above 0)."""
    return (subject_coverage(video, latent_shape) > 0).to(torch.uint8)


def load_latent_cache(path: Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`build_latent_cache` wrote."""
    tensors = load_file(str(path))
    missing = {"latents", "context", "uncond"} - set(tensors)
    if missing:
        raise WeightsError(f"{path}: not a latent cache (missing {sorted(missing)}); delete it to rebuild")
    return tensors


def check_latent_cache(
    cache: dict[str, torch.Tensor],
    path: Path,
    seeds: Sequence[int],
    latent_frames: int,
    text_len: int,
    return_fraction: float,
    return_gap: int,
    uncond_prompt: str = "",
) -> None:
    """Refuse a cache built for other clips than the config asks for: an existing cache is reused as is,
    so a stale one would silently train the teacher on the wrong clips or prompts."""
    with safe_open(str(path), framework="pt") as handle:
        recipe = handle.metadata() or {}
    found = {
        "num_clips": (len(cache["latents"]), len(seeds)),
        "clip_latent_frames": (cache["latents"].shape[1], latent_frames),
        "model_overrides.text_len": (cache["context"].shape[1], text_len),
        "return_fraction": (float(recipe.get("return_fraction", return_fraction)), float(return_fraction)),
        "return_gap": (int(recipe.get("return_gap", return_gap)), int(return_gap)),
        "uncond_prompt": (recipe.get("uncond_prompt", uncond_prompt), uncond_prompt),
    }
    fix = "delete the cache or give another cache_path"
    for name, (held, wanted) in found.items():
        if held != wanted:
            raise ConfigError(f"cache_path={path} holds clips with {name}={held!r}, the config asks for "
                              f"{wanted!r}; {fix}")  # fmt: skip
    if "seeds" in cache and cache["seeds"].tolist() != list(seeds):
        raise ConfigError(f"cache_path={path} holds other clips than the first {len(seeds)} training seeds; {fix}")


@dataclass(frozen=True)
class TeacherSettings:
    """Teacher architecture (overrides of a DiT preset) and optimisation."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 50
    steps: int = 1000
    cfg_dropout: float = 0.1
    shift: float = 5.0
    subject_weight: float = 0.0
    chunk_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        run_dit_config(self.preset, self.overrides)  # a bad field fails here, before minutes of cache encoding
        if self.subject_weight < 0:
            raise ConfigError(f"teacher settings.subject_weight={self.subject_weight}: must be >= 0 (0 = plain MSE)")
        if not 0 <= self.chunk_noise <= 1:
            raise ConfigError(f"teacher settings.chunk_noise={self.chunk_noise}: must be a share in [0, 1] "
                              "(0 = one timestep per clip)")  # fmt: skip


def sample_timesteps(
    scheduler: FlowMatchScheduler,
    shape: tuple[int, int],
    generator: torch.Generator,
    chunk_noise: float = 0.0,
    chunk_frames: int = CHUNK_FRAMES,
) -> torch.Tensor:
    """Shifted-grid timesteps for ``shape`` (batch, latent frames): ``[B]``, one per clip, or with
    ``chunk_noise`` > 0 ``[B, F]``, where that share of clips has one per chunk of ``chunk_frames``."""
    batch, frames = shape
    steps = len(scheduler.timesteps)
    index = torch.randint(0, steps, (batch,), generator=generator)
    if chunk_noise == 0:
        return scheduler.timesteps[index]
    chunks = -(-frames // chunk_frames)
    per_chunk = torch.randint(0, steps, (batch, chunks), generator=generator).repeat_interleave(chunk_frames, 1)
    split = torch.rand(batch, 1, generator=generator) < chunk_noise
    return scheduler.timesteps[torch.where(split, per_chunk[:, :frames], index[:, None])]


def flow_matching_loss(
    model: WanDiT,
    scheduler: FlowMatchScheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    weight: torch.Tensor | None = None,
    chunk_noise: float = 0.0,
) -> torch.Tensor:
    """MSE between the predicted and true flow at :func:`sample_timesteps`; ``weight`` [B, F, h, w] scales
    each latent cell's squared error (all channels alike)."""
    t = sample_timesteps(scheduler, tuple(x0.shape[:2]), generator, chunk_noise)
    noise = torch.randn(x0.shape, generator=generator)
    xt = scheduler.add_noise(x0, noise, t)
    prediction = model(xt, t, context)
    error = (prediction - scheduler.training_target(x0, noise)).pow(2)
    return error.mean() if weight is None else (error * weight[:, :, None]).mean()


def read_teacher(folder: Path, settings: TeacherSettings | None = None) -> dict[str, torch.Tensor]:
    """The weights of a teacher folder (``folder/diffusion_pytorch_model.safetensors``), for ``init_from``.

    With ``settings`` they are checked, by shape on the meta device, to fit the teacher those describe, so a
    wrong ``init_from`` fails before minutes of latent encoding rather than after.
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"init_from={folder} holds no {WEIGHTS_FILE}; give a folder a teacher run wrote")
    state = load_file(str(path))
    if settings is not None:
        with torch.device("meta"):
            expected = build_dit(settings.preset, **settings.overrides).state_dict()
        shapes = {name: tuple(value.shape) for name, value in state.items()}
        wanted = {name: tuple(value.shape) for name, value in expected.items()}
        if shapes != wanted:
            name = min(n for n in shapes.keys() | wanted.keys() if shapes.get(n) != wanted.get(n))
            found, given = shapes.get(name, "missing"), wanted.get(name, "none")
            raise WeightsError(f"init_from={folder} is a teacher of another shape than model/model_overrides "
                               f"({name}: {found}, the config gives {given}); give the model_overrides it was "
                               "trained with")  # fmt: skip
    return state


class TeacherTrainer:
    """Trains a fresh bidirectional DiT on a latent cache; ``save`` writes the Wan-named safetensors."""

    def __init__(self, settings: TeacherSettings, cache: dict[str, torch.Tensor]):
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.model = build_dit(settings.preset, **settings.overrides)
        self.scheduler = FlowMatchScheduler(shift=settings.shift)
        self.latents, self.context, self.uncond = cache["latents"], cache["context"], cache["uncond"]
        self.subjects = cache.get("subjects")
        if settings.subject_weight > 0 and self.subjects is None:
            raise WeightsError("the latent cache has no subject masks (built by an older version), which "
                               "settings.subject_weight needs; delete it to rebuild")  # fmt: skip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                           betas=(0.9, 0.99))  # fmt: skip
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.rng = np.random.default_rng(settings.seed)
        self.step_count = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Random clips with their prompt embeddings (each replaced by the unconditional one w.p. cfg_dropout)
        and their loss weights (None for a plain MSE)."""
        index = torch.from_numpy(self.rng.integers(0, len(self.latents), self.settings.batch_size))
        context = self.context[index].clone()
        drop = torch.from_numpy(self.rng.random(len(index)) < self.settings.cfg_dropout)
        context[drop] = self.uncond[0]
        weight = None
        if self.settings.subject_weight > 0:
            weight = 1.0 + self.settings.subject_weight * self.subjects[index].float()
        return self.latents[index], context, weight

    def load_weights(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Continue from a teacher this trainer saved in ``folder``; ``state`` is its :func:`read_teacher` with
        these settings, when already read (and so already checked)."""
        self.model.load_state_dict(read_teacher(folder, self.settings) if state is None else state)

    def loss(self, x0: torch.Tensor, context: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The training loss of one batch (:func:`flow_matching_loss`)."""
        return flow_matching_loss(self.model, self.scheduler, x0, context, self.generator, weight,
                                  self.settings.chunk_noise)  # fmt: skip

    def step(self) -> float:
        """One AdamW step (linear warm-up); returns the loss."""
        self.model.train()
        scale = min(1.0, (self.step_count + 1) / max(1, self.settings.warmup))
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * scale
        loss = self.loss(*self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step_count += 1
        return loss.item()

    def save(self, folder: Path) -> Path:
        """``folder/diffusion_pytorch_model.safetensors`` in the official Wan DiT names (``load_dit`` reads it)."""
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        path = Path(folder) / WEIGHTS_FILE
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        return path
