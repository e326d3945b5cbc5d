"""Training of the tiny Wan-architecture VAE (diffusers ``AutoencoderKLWan``) on story-world clips.

The model keeps Wan2.1's strides (4x in time, 8x in space: 64x64 pixels -> 8x8 latents, ``1 + 4 (n - 1)``
pixel frames per ``n`` latent frames) with small widths.

Wan's VAE is causal: every temporal convolution reads the last frames of the previous chunk from a
feature cache, so a chunk deep inside a long video sees a cache state that a short training clip never
produces, and a VAE trained on short clips alone drifts after as many latent frames as its clips hold.
Each step therefore runs the encoder and decoder chunk by chunk (one latent frame at a time, exactly as
whole-video encode and decode do) over a random number of ``warmup`` latent frames without gradients,
then trains on the next ``window`` latent frames with the caches the warm-up left: truncated
backpropagation through time, at the cost of a forward pass over the warm-up. Warm-ups that reach the
decoder's whole temporal receptive field (about 18 latent frames) would cost several times the window,
so a streaming phase instead walks whole clips one window per step, carrying the caches (detached)
from step to step: every depth of a long video is trained at the cost of the window alone.

Loss: L1 + MSE of a posterior sample's reconstruction, each pixel weighted by ``1 + foreground_weight``
where it stands out from its row's background (subjects are a few percent of the pixels but all of
what the story is about), plus a small KL term. Afterwards the per-channel latent mean / std are fitted on
training clips and stored in the model config, so :class:`memflow.vae.WanVAE` normalises latents as it
does for Wan2.1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import save_file

from memflow.vae import WanVAE, conv_cache, vae_config
from tiny import oracle
from tiny.world import (
    CHUNK_FRAMES,
    COLOURS,
    HALF_EXTENT,
    SCENES,
    SHAPES,
    SIZE,
    Actor,
    Motion,
    Shot,
    Subject,
    clip_from_seed,
    coverage,
    from_model_pixels,
    min_narrative_latent_frames,
    narrative_from_seed,
    random_subject,
    render,
    split_seeds,
    to_model_pixels,
    visibility,
)
from utils.atomic import atomic_path
from utils.errors import ConfigError

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
MIN_CLIP_LATENT_FRAMES = 2
# the oracle's foreground threshold (RGB distance from the row's background) in the model's [-1, 1] units
FOREGROUND_DISTANCE = oracle.FOREGROUND_DISTANCE / 127.5


@dataclass(frozen=True)
class Phase:
    """A stretch of training: ``steps`` of ``batch_size`` clips, each step training a ``window`` of latent frames.

    With ``stream == 0`` every step draws fresh clips and a warm-up of ``0..max_warmup`` latent frames;
    ``window == 1`` with no warm-up trains on the clips' first frames alone, as images (the causal
    convolutions see only their zero padding in time): the cheap phase in which small subjects are learnt.
    With ``stream > 0`` the batch streams training-split narratives of ``stream`` latent frames (scene
    cuts included, as generated videos have them) one window per step, the causal caches carried
    (detached) from step to step: every depth of a long video is trained, at the cost of the window
    alone (``max_warmup`` must then be 0).
    """

    steps: int
    batch_size: int
    window: int
    max_warmup: int
    stream: int = 0

    def __post_init__(self) -> None:
        minimum = {"steps": 0, "batch_size": 1, "window": 1, "max_warmup": 0, "stream": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ConfigError(f"vae phase {self.values}: {name} must be >= {low} "
                                  "(phases are [steps, batch_size, window, max_warmup, stream])")  # fmt: skip
        if self.stream and (self.max_warmup or self.stream % self.window):
            raise ConfigError(f"vae phase {self.values}: a streaming phase needs max_warmup 0 and stream a "
                              "multiple of window")  # fmt: skip
        shortest = min_narrative_latent_frames()
        if self.stream and (self.stream < shortest or self.stream % CHUNK_FRAMES):
            raise ConfigError(f"vae phase {self.values}: stream must be a narrative length, a multiple of "
                              f"{CHUNK_FRAMES} latent frames and at least {shortest}")  # fmt: skip

    @property
    def values(self) -> list[int]:
        return list(vars(self).values())

    @property
    def clip_latent_frames(self) -> int:
        """Latent frames drawn per clip (at least the world's shortest clip; a step may use fewer)."""
        return self.stream or max(self.max_warmup + self.window, MIN_CLIP_LATENT_FRAMES)


@dataclass(frozen=True)
class VAESettings:
    """Architecture and optimisation of the tiny VAE (see the module docstring for warm-up and window).

    ``phases`` run in order; the learning rate follows a cosine from ``lr`` to ``lr * final_lr_scale`` over
    all their steps (1: constant). Windows of at least 3 latent frames train every cache regime of the
    decoder's temporal upsamplers (skipped on the first frame, zero history on the second, a real
    cache from the third on); a warm-up from the first step keeps the deep-video state in distribution.
    ``sample_posterior: false`` decodes the posterior mean (what inference encodes) instead of a sample,
    whose noise can drown what small subjects look like (see :func:`colour_probe`). ``inflate: true``
    starts the first video phase from the per-frame image VAE that image phases (of this run or of the
    ``init_from`` VAE) trained (:func:`inflate_temporal`); a run of image phases alone is inflated before its
    latent statistics are fitted and saved, so it becomes that image VAE applied to every frame of a video.
    """

    base_dim: int = 16
    z_dim: int = 16
    num_res_blocks: int = 1
    phases: tuple[Phase, ...] = (Phase(3600, 2, 3, 4),)
    foreground_weight: float = 2.0
    lr: float = 1e-3
    final_lr_scale: float = 1.0
    kl_weight: float = 1e-6
    stats_clips: int = 32
    seed: int = 0
    sample_posterior: bool = True
    inflate: bool = False

    def __post_init__(self) -> None:
        phases = tuple(p if isinstance(p, Phase) else Phase(*(int(v) for v in p)) for p in self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases:
            raise ConfigError("vae settings.phases is empty; give at least one [steps, batch_size, window, max_warmup]")
        if not 0.0 < self.final_lr_scale <= 1.0:
            raise ConfigError(f"vae settings.final_lr_scale={self.final_lr_scale}: must be in (0, 1] "
                              "(the share of lr left at the last step)")  # fmt: skip
        if self.foreground_weight < 0:
            raise ConfigError(f"vae settings.foreground_weight={self.foreground_weight}: must be >= 0")

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)

    @property
    def clip_latent_frames(self) -> int:
        """Latent frames of the longest training clip: the longest warm-up plus its window."""
        return max(phase.clip_latent_frames for phase in self.phases)

    def phase_at(self, step: int) -> Phase:
        """The phase that step ``step`` (counted from 0) belongs to."""
        for phase in self.phases:
            if step < phase.steps:
                return phase
            step -= phase.steps
        return self.phases[-1]

    def model_config(self) -> dict:
        """``AutoencoderKLWan`` arguments: the tiny preset's strides with our widths (neutral stats)."""
        return vae_config(
            "tiny", base_dim=self.base_dim, z_dim=self.z_dim, num_res_blocks=self.num_res_blocks,
            latents_mean=[0.0] * self.z_dim, latents_std=[1.0] * self.z_dim,
        )  # fmt: skip


@torch.no_grad()
def inflate_temporal(model: AutoencoderKLWan) -> None:
    """Turn a VAE trained on single frames into that image VAE applied to every frame of a video.

    Image phases train only each causal convolution's current-frame tap (the past taps read zero padding)
    and never run the temporal resamplers, so a video phase after them starts from random temporal weights.
    Here the past taps are zeroed, the encoder's temporal downsamplers keep the latest frame and the
    decoder's upsamplers repeat each frame: a still video then encodes and decodes exactly as its frame does,
    and the video phase only has to learn motion.
    """
    resamplers = [m for m in model.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")]
    temporal = {id(m.time_conv) for m in resamplers}
    for module in model.modules():
        if isinstance(module, WanCausalConv3d) and id(module) not in temporal and module.kernel_size[0] > 1:
            module.weight[:, :, :-1] = 0
    for resampler in resamplers:
        conv = resampler.time_conv
        copies = conv.out_channels // conv.in_channels  # 2 frames per frame up, 1 down
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(copies):
            block = conv.weight[k * conv.in_channels : (k + 1) * conv.in_channels, :, -1, 0, 0]
            block.copy_(torch.eye(conv.in_channels))


def latent_chunks(video: torch.Tensor) -> list[torch.Tensor]:
    """``[B, 3, 1 + 4k, H, W]`` -> the pixel chunks of its latent frames: the first frame, then groups of 4."""
    return [video[:, :, :1]] + [video[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((video.shape[2] - 1) // 4)]


def subject_mask(video: torch.Tensor) -> torch.Tensor:
    """``bool [B, 1, T, H, W]`` of a ``[B, 3, T, H, W]`` video: pixels far from their row's median colour."""
    background = video.median(dim=-1, keepdim=True).values
    return (video - background).pow(2).sum(1, keepdim=True) > FOREGROUND_DISTANCE**2


def foreground_weights(video: torch.Tensor, weight: float) -> torch.Tensor | float:
    """``1 + weight`` on the subjects' pixels, 1 elsewhere."""
    if weight == 0:
        return 1.0
    return 1.0 + weight * subject_mask(video).to(video.dtype)


class CausalCaches:
    """The encoder's and decoder's causal feature caches of one batch of videos, and the next latent frame's index."""

    def __init__(self, model: AutoencoderKLWan):
        self.model = model
        self.encoder, self.decoder = conv_cache(model.encoder), conv_cache(model.decoder)
        self.index = 0

    def encode(self, chunk: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.model.quant_conv(self.model.encoder(chunk, feat_cache=self.encoder, feat_idx=[0]))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.model.decoder(self.model.post_quant_conv(z), feat_cache=self.decoder, feat_idx=[0],
                                 first_chunk=self.index == 0)  # fmt: skip
        self.index += 1
        return out

    def detach(self) -> None:
        """Cut the graph behind the caches (truncated backpropagation through time)."""
        for cache in (self.encoder, self.decoder):
            cache[:] = [c.detach() if isinstance(c, torch.Tensor) else c for c in cache]


def window_loss(
    caches: CausalCaches, chunks: Sequence[torch.Tensor], settings: VAESettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss on the pixel ``chunks`` of the next latent frames, encoded and decoded through ``caches``."""
    recon, kl = [], []
    for chunk in chunks:
        posterior = caches.encode(chunk)
        recon.append(caches.decode(posterior.sample() if settings.sample_posterior else posterior.mode()))
        kl.append(posterior.kl().mean() / posterior.mean[0].numel())
    target = torch.cat(list(chunks), dim=2)
    error = torch.cat(recon, dim=2) - target
    weights = foreground_weights(target, settings.foreground_weight)
    l1 = (weights * error.abs()).mean()
    mse = (weights * error.pow(2)).mean()
    kl_mean = torch.stack(kl).mean()
    loss = l1 + mse + settings.kl_weight * kl_mean
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl_mean.item()}


def streaming_loss(
    model: AutoencoderKLWan, video: torch.Tensor, warmup: int, settings: VAESettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss on the latent frames after the first ``warmup`` of ``video`` (which has ``warmup + window``).

    The warm-up runs without gradients and only fills the encoder's and decoder's causal caches.
    """
    chunks = latent_chunks(video)
    caches = CausalCaches(model)
    with torch.no_grad():
        for chunk in chunks[:warmup]:
            caches.decode(caches.encode(chunk).mode())
    loss, values = window_loss(caches, chunks[warmup:], settings)
    return loss, {**values, "warmup": warmup}


def clip_video(seeds: Sequence[int], latent_frames: int, narratives: bool = False) -> torch.Tensor:
    """Training clips (or narratives) of ``latent_frames`` as VAE input ``[B, 3, 1 + 4 (latent_frames - 1), 64, 64]``
    in [-1, 1]."""
    source = narrative_from_seed if narratives else clip_from_seed
    pixels = [to_model_pixels(source(seed, latent_frames).frames) for seed in seeds]
    return torch.from_numpy(np.stack(pixels)).transpose(1, 2)


class VAETrainer:
    """Trains a fresh tiny VAE on training-split clips; ``fit_normalisation`` then ``save``."""

    def __init__(self, settings: VAESettings, seeds: Sequence[int] | None = None):
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.model = AutoencoderKLWan(**settings.model_config())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, settings.steps), eta_min=settings.lr * settings.final_lr_scale
        )
        self.seeds = list(seeds if seeds is not None else split_seeds("train", 100_000))
        self.step_count = 0
        self.seen = 0
        self.inflated = False
        self._stream: tuple[list[torch.Tensor], CausalCaches] | None = None

    def load_weights(self, folder: Path) -> None:
        """Start from a saved VAE of the same architecture (``folder`` in the Diffusers ``vae/`` layout)."""
        self.model.load_state_dict(WanVAE.from_diffusers(folder).model.state_dict())

    def step(self) -> dict[str, float]:
        """One optimisation step: a window of fresh clips after a seeded random warm-up, or of the streamed clips."""
        settings, phase = self.settings, self.settings.phase_at(self.step_count)
        if phase.window > 1:
            self._inflate_once()
        self.step_count += 1
        self.model.train()
        if phase.stream:
            loss, values = self._stream_loss(phase)
        else:
            warmup = int(np.random.default_rng([settings.seed, self.step_count - 1]).integers(0, phase.max_warmup + 1))
            video = self._next_clips(phase)[:, :, : 1 + 4 * (warmup + phase.window - 1)]
            loss, values = streaming_loss(self.model, video, warmup, settings)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return {**values, "lr": self.schedule.get_last_lr()[0]}

    def _inflate_once(self) -> None:
        if self.settings.inflate and not self.inflated:
            inflate_temporal(self.model)
            self.inflated = True

    def _next_clips(self, phase: Phase) -> torch.Tensor:
        seeds = [self.seeds[(self.seen + i) % len(self.seeds)] for i in range(phase.batch_size)]
        self.seen += phase.batch_size
        return clip_video(seeds, phase.clip_latent_frames, narratives=phase.stream > 0)

    def _stream_loss(self, phase: Phase) -> tuple[torch.Tensor, dict[str, float]]:
        """The next window of the streamed narratives (new ones and empty caches once they are used up)."""
        if self._stream is None or self._stream[1].index >= phase.stream:
            self._stream = (latent_chunks(self._next_clips(phase)), CausalCaches(self.model))
        chunks, caches = self._stream
        caches.detach()
        depth = caches.index
        loss, values = window_loss(caches, chunks[depth : depth + phase.window], self.settings)
        return loss, {**values, "warmup": depth}

    @torch.no_grad()
    def fit_normalisation(self) -> tuple[list[float], list[float]]:
        """Per-channel mean / std of the latent means over ``stats_clips`` clips, stored in the config (of the
        inflated VAE when ``inflate`` is set and no video phase has inflated it yet)."""
        self._inflate_once()
        self.model.eval()
        video = clip_video(self.seeds[-self.settings.stats_clips :], self.settings.clip_latent_frames)
        mu = self.model.encode(video).latent_dist.mode()
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


@dataclass(frozen=True)
class Reconstruction:
    """Mean absolute pixel error (0-255 scale) of whole-clip encode -> decode: per latent frame, and over the
    subjects' pixels versus the background's. Subjects cover a few percent of a frame, so the per-frame
    mean is mostly background and can look good while subjects come out as faded blobs."""

    per_frame: list[float]
    subjects: float
    background: float


@torch.no_grad()
def roundtrip_frames(vae: WanVAE, frames: np.ndarray) -> np.ndarray:
    """A story-world video (``uint8 [T, 64, 64, 3]``) encoded and decoded whole: the best any generator
    working in this VAE's latents can draw it."""
    video = torch.from_numpy(to_model_pixels(frames))[None]
    return from_model_pixels(vae.decode(vae.encode(video))[0].float().numpy())


@torch.no_grad()
def reconstruction_error(vae: WanVAE, seeds: Sequence[int], latent_frames: int) -> Reconstruction:
    """Encode and decode the clips of ``seeds`` whole (the inference path) and measure the error."""
    clips = clip_video(seeds, latent_frames)
    video = clips.transpose(1, 2)
    error = (vae.decode(vae.encode(video)).clamp(-1, 1) - video).abs() * 127.5
    per_frame = error.mean(dim=(0, 2, 3, 4))
    subjects = subject_mask(clips).transpose(1, 2)
    pixel_error = error.mean(dim=2, keepdim=True)
    return Reconstruction(
        per_frame=[float(chunk.mean()) for chunk in latent_chunks(per_frame[None, None])],
        subjects=float(pixel_error[subjects].mean()),
        background=float(pixel_error[~subjects].mean()),
    )


@torch.no_grad()
def roundtrip_report(vae: WanVAE, seeds: Sequence[int], latent_frames: int) -> dict[str, float]:
    """The oracle's scores of the narratives of ``seeds`` encoded and decoded whole (with identity by chance): the
    ceiling of every generator that works in this VAE's latents, and the measure a VAE is chosen by."""
    judge = oracle.Oracle()
    scores, pairs = [], []
    for seed in seeds:
        narrative = narrative_from_seed(seed, latent_frames)
        report = judge.evaluate(narrative, roundtrip_frames(vae, narrative.frames))
        scores.append(report["metrics"])
        pairs.append(report["identity_pairs"])
    oracle.add_chance(scores, pairs)
    return oracle.aggregate(scores)


ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS)}
MOVES = {"moved_1px": 1.0, "moved_2px": 2.0}  # pixels to the right
CONTRAST_CHANGES = (*ATTRIBUTE_VALUES, *MOVES)
TOUCHED = 0.3  # latent RMS over channels by which a cell must differ from the empty scene to count as the subject's


def _changed(subject: Subject, change: str, rng: np.random.Generator) -> Subject:
    """``subject`` with attribute ``change`` replaced by another of its values; any other change keeps it."""
    if change not in ATTRIBUTE_VALUES:
        return subject
    others = [v for v in ATTRIBUTE_VALUES[change] if v != subject.attribute(change)]
    return replace(subject, **{change: others[int(rng.integers(len(others)))]})


def attribute_contrast(vae: WanVAE, count: int = 24, seed: int = 0) -> dict[str, float]:
    """How far the latents move when a subject changes one attribute, or moves by 1 or 2 pixels.

    ``count`` still subjects, each on a random scene at a random place, are encoded as one frame beside copies
    that differ in one way; the result is the RMS difference of the latents over the cells the subject touches,
    averaged over subjects. A flow model trained by squared error learns the large directions first, so an
    attribute whose contrast is no larger than a pixel's move is the last thing a small teacher draws.
    """
    rng = np.random.default_rng(seed)
    sums = dict.fromkeys(CONTRAST_CHANGES, 0.0)
    for _ in range(count):
        subject, scene = random_subject(rng), SCENES[int(rng.integers(len(SCENES)))]
        low, high = HALF_EXTENT + 2, SIZE - HALF_EXTENT - 2 - max(MOVES.values())  # room for the largest move
        x, y = (float(v) for v in rng.uniform(low, high, size=2))
        shots = [Shot(scene)]
        for change in ("none", *CONTRAST_CHANGES):
            shifted = x + MOVES.get(change, 0.0)
            shown = _changed(subject, change, rng)
            shots.append(Shot(scene, (Actor(0, shown, Motion("still", shifted, y, shifted, y)),)))
        pixels = np.stack([to_model_pixels(render(shot, 1)) for shot in shots])
        latents = vae.encode(torch.from_numpy(pixels))[:, 0].float()  # [1 + 1 + changes, C, h, w]
        empty, original, changed = latents[0], latents[1], latents[2:]
        touched = ((latents[1:] - empty).pow(2).mean(dim=1).sqrt() > TOUCHED).any(dim=0)
        if not touched.any():
            continue  # the latents do not show the subject at all: every contrast is 0
        for change, latent in zip(CONTRAST_CHANGES, changed, strict=True):
            sums[change] += float((latent - original)[:, touched].pow(2).mean().sqrt())
    return {change: total / count for change, total in sums.items()}


@dataclass(frozen=True)
class ColourProbe:
    """How well a subject's colour can be read from the latent vector of the cell it covers most: the accuracy of a
    k-nearest-neighbour vote over reference subjects on held-out ones, against always answering the
    reference's commonest colour. Latents that do not carry the colour cap every generator and every memory
    policy: no decoder can redraw what the encoder dropped."""

    accuracy: float
    chance: float
    subjects: int


def nearest_colours(reference: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                    neighbours: int = 5) -> torch.Tensor:  # fmt: skip
    """The colour index (into ``COLOURS``) most common among each query's ``neighbours`` nearest reference features
    [N, C], all standardised by the reference's per-channel statistics."""
    mean, std = reference.mean(0), reference.std(0).clamp_min(1e-6)
    nearest = torch.cdist((queries - mean) / std, (reference - mean) / std).topk(neighbours, largest=False).indices
    return torch.nn.functional.one_hot(labels[nearest], len(COLOURS)).sum(1).argmax(1)


@torch.no_grad()
def colour_probe(vae: WanVAE, seeds: Sequence[int], neighbours: int = 5) -> ColourProbe:
    """Probe the first-frame latents of the training clips of ``seeds`` (the first two thirds of the subjects
    are the reference, the rest are scored)."""
    clips = [clip_from_seed(seed, MIN_CLIP_LATENT_FRAMES) for seed in seeds]
    first = torch.from_numpy(np.stack([to_model_pixels(clip.frames[:1]) for clip in clips]))
    latents = vae.encode(first)[:, 0].float()  # [N, C, h, w]
    height, width = latents.shape[-2:]
    features, colours = [], []
    names = list(COLOURS)
    for clip, latent in zip(clips, latents, strict=True):
        shot, frames = clip.shots[0], clip.frames.shape[0]
        for actor, shown in zip(shot.actors, visibility(shot, frames)[0], strict=True):
            if shown:
                cells = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(coverage(actor, 1)), (height, width))
                row, col = divmod(int(cells.flatten().argmax()), width)
                features.append(latent[:, row, col])
                colours.append(names.index(actor.subject.colour))
    if len(colours) < 3 * neighbours:
        raise ValueError(f"{len(colours)} visible subjects in {len(seeds)} clips; the probe needs more seeds")
    x, labels = torch.stack(features), torch.tensor(colours)
    split = 2 * len(labels) // 3
    commonest = torch.bincount(labels[:split], minlength=len(names)).argmax()
    held_out = labels[split:]
    return ColourProbe(
        accuracy=float((nearest_colours(x[:split], labels[:split], x[split:], neighbours) == held_out).float().mean()),
        chance=float((held_out == commonest).float().mean()),
        subjects=len(labels),
    )
