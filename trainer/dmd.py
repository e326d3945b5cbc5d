"""Distribution matching distillation (DMD): the generator loss and the critic's denoising loss.

Three networks take part (method section 6): the few-step generator whose samples ``x0`` come in
here, a frozen **real score** (the teacher, with classifier-free guidance) and a trainable
**fake score** (the critic). Both scores are callables with the ``WanDiT`` forward signature
``model(x_t [B, F, C, H, W], t [B] or [B, F], context [B, T, text_dim]) -> flow``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memflow.errors import ConfigError
from memflow.scheduler import FlowMatchScheduler

from .forcing import forced_flow

ScoreModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# How the real and fake scores see a generated window (DMDObjective): all frames equally noisy (the release),
# a clean leading context with only the later chunks noised, or every chunk noised given the clean chunks before it.
SCORE_CONTEXTS = ("joint", "clean", "forced")


class ScoreTimestepSampler:
    """Timesteps at which the DMD gradient and the critic loss are evaluated.

    As in the release: an integer drawn uniformly from [0, num_train_timesteps), shifted like the
    noise schedule (t' = shift * u / (1 + (shift - 1) * u) on u = t / 1000, times 1000) and
    clamped to [min_score_timestep, max_score_timestep].
    """

    def __init__(
        self,
        shift: float = 5.0,
        min_score_timestep: float = 20.0,
        max_score_timestep: float = 980.0,
        num_train_timesteps: int = 1000,
    ):
        if shift <= 0:
            raise ConfigError(f"timestep_shift={shift}: must be > 0 (the release uses 5.0)")
        if not 0 <= min_score_timestep < max_score_timestep <= num_train_timesteps:
            raise ConfigError(
                f"min_score_timestep={min_score_timestep}, max_score_timestep={max_score_timestep}: need "
                f"0 <= min < max <= {num_train_timesteps} (the release uses 20 and 980)"
            )
        self.shift = shift
        self.min_score_timestep = min_score_timestep
        self.max_score_timestep = max_score_timestep
        self.num_train_timesteps = num_train_timesteps

    def __call__(
        self,
        batch_size: int,
        num_frames: int | None = None,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """float32 timesteps [B] (one per sample) or, with ``num_frames``, [B, F] (one per frame)."""
        shape = (batch_size,) if num_frames is None else (batch_size, num_frames)
        n = self.num_train_timesteps
        u = torch.randint(0, n, shape, generator=generator, device=device).double() / n
        shifted = self.shift * u / (1 + (self.shift - 1) * u) * n
        return shifted.clamp(self.min_score_timestep, self.max_score_timestep).float()


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """cond + scale * (cond - uncond): the release's form, so scale 3.0 is an effective scale of 4.

    Predictions may be x0 or flow: for a fixed x_t and sigma, x0 = x_t - sigma * flow is affine in
    the flow, so guiding either one gives the same result.
    """
    return cond + scale * (cond - uncond)


def dmd_loss(
    x0: torch.Tensor, real_x0_pred: torch.Tensor, fake_x0_pred: torch.Tensor, scored: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD generator loss for samples x0 [B, F, ...] given the real and fake scores' x0 predictions.

    grad = (fake - real) / mean|x0 - real| (the mean per sample, over every non-batch dim), with
    NaNs set to zero; loss = 0.5 * mean((x0 - stopgrad(x0 - grad))**2) in float64, the release's
    mean-reduced MSE. Its value is 0.5 * mean(grad**2) and its gradient with respect to x0 is
    grad / x0.numel(): "0.5 * ||x0 - stopgrad(x0 - grad)||^2" divided by the number of elements.

    ``scored`` [B, F] (bool) limits all three means to those frames and zeroes the gradient of the
    others: the frames that were given as clean context are not being judged.
    """
    with torch.no_grad():
        real = real_x0_pred.double()
        dims = tuple(range(1, x0.dim()))
        weight = torch.ones_like(real) if scored is None else _frame_mask(scored, real)
        count = weight.sum(dim=dims, keepdim=True)
        normalizer = ((x0.double() - real).abs() * weight).sum(dim=dims, keepdim=True) / count
        grad = (fake_x0_pred.double() - real) / normalizer * weight
        grad = torch.where(torch.isnan(grad), torch.zeros_like(grad), grad)
    x0_64 = x0.double()
    loss = 0.5 * ((x0_64 - (x0_64 - grad).detach()).pow(2) * weight).sum() / count.sum()
    log = {"dmd_gradient_norm": grad.norm().detach(), "dmd_normalizer": normalizer.mean().detach()}
    return loss, log


def _frame_mask(frames: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-frame [B, F] mask broadcast to ``like`` [B, F, ...] in its dtype."""
    return frames.reshape(*frames.shape, *([1] * (like.dim() - 2))).to(like.dtype).expand_as(like)


def _scored_mean(values: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample [B] or per-frame [B, F] values over the scored frames (all when ``scored`` is None)."""
    return values.mean() if scored is None else values[scored].mean()


class DMDObjective:
    """The generator's DMD loss and the critic's flow-matching loss on generator samples.

    ``negative_context`` is the embedded negative prompt ([1 or B, T, text_dim]); it is the
    unconditional branch of the real score's guidance whenever ``generator_loss`` gets no
    ``uncond``. With ``per_frame_timesteps`` every latent frame gets its own score timestep
    (the release uses one per sample). ``weight_critic_loss`` weights the critic's per-frame
    loss by the scheduler's ``linear_timesteps_weights`` (off by default, as in the release's
    flow loss, which is an unweighted MSE).

    ``score_context`` says how both scores see a generated window of ``chunk_frames``-frame chunks:

    - ``joint`` (the release): every frame of a sample equally noisy.
    - ``clean``: each sample keeps a random number of whole leading chunks (at least one, never all)
      almost clean (the scheduler's lowest timestep) and noises the rest; both losses judge only the
      noised frames. A causal generator makes each chunk from clean earlier chunks, and a score that
      sees them clean says how a chunk should follow from them (bring a subject back as it was), which a
      score of equally noisy frames barely can.
    - ``forced``: every chunk (every frame with ``per_frame_timesteps``) is noised to its own timestep and
      scored given the clean sample's earlier chunks (:func:`trainer.forcing.forced_flow`), so both scores
      must be ``WanDiT`` models, the real one a teacher-forced generator (``train_toy.py forcing``). Summed
      over chunks the KL of the conditionals is the KL of the whole window, and each is taken over the
      generator's own past: the data's answer to "what follows what I drew", which teacher forcing alone
      never asks.
    """

    def __init__(
        self,
        real_score: ScoreModel,
        fake_score: ScoreModel,
        scheduler: FlowMatchScheduler,
        timestep_sampler: ScoreTimestepSampler,
        *,
        guidance_scale: float = 3.0,
        negative_context: torch.Tensor | None = None,
        per_frame_timesteps: bool = False,
        weight_critic_loss: bool = False,
        score_context: str = "joint",
        chunk_frames: int = 3,
    ):
        if score_context not in SCORE_CONTEXTS:
            raise ConfigError(f"score_context={score_context!r}: choose one of {', '.join(SCORE_CONTEXTS)}")
        if guidance_scale < 0:
            raise ConfigError(f"guidance_scale={guidance_scale}: must be >= 0 (the release uses 3.0)")
        self.real_score = real_score
        self.fake_score = fake_score
        self.scheduler = scheduler
        self.timestep_sampler = timestep_sampler
        self.guidance_scale = guidance_scale
        self.negative_context = negative_context
        self.per_frame_timesteps = per_frame_timesteps
        self.weight_critic_loss = weight_critic_loss
        self.score_context = score_context
        self.chunk_frames = chunk_frames

    def _noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x_t, t, noise, scored frames [B, F] or None for all) with t from the score timestep sampler."""
        b, f = x0.shape[:2]
        chunk = self.chunk_frames
        if self.per_frame_timesteps:
            t = self.timestep_sampler(b, f, device=x0.device)
        elif self.score_context == "forced":
            t = self.timestep_sampler(b, -(-f // chunk), device=x0.device).repeat_interleave(chunk, dim=1)[:, :f]
        else:
            t = self.timestep_sampler(b, None, device=x0.device)
        scored = None
        if self.score_context == "clean":
            chunks = f // chunk
            if chunks < 2:
                raise ValueError(f"a clean context needs two {chunk}-frame chunks, got {f} frames")
            start = torch.randint(1, chunks, (b, 1), device=x0.device) * chunk
            scored = torch.arange(f, device=x0.device)[None] >= start
            clean = self.scheduler.timesteps[-1].to(device=x0.device, dtype=t.dtype)
            t = torch.where(scored, t if t.dim() == 2 else t[:, None], clean)
        noise = torch.randn_like(x0)
        return self.scheduler.add_noise(x0, noise, t), t, noise, scored

    def _flow(self, model: ScoreModel, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              x0: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if self.score_context == "forced":
            return forced_flow(model, x0, xt, t, context, self.chunk_frames)
        return model(xt, t, context)

    def _x0(self, model: ScoreModel, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            x0: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return self.scheduler.flow_to_x0(self._flow(model, xt, t, context, x0), xt, t)

    def _uncond(self, uncond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if uncond is None:
            if self.negative_context is None:
                raise ValueError("pass uncond or construct DMDObjective with negative_context")
            uncond = self.negative_context
        return uncond.expand(batch_size, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond

    def real_x0(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                x0: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The guided real score in x0 space (the release converts flow to x0, then guides); ``x0`` is the clean
        sample, the past of ``forced`` scoring."""
        x0_cond = self._x0(self.real_score, xt, t, cond, x0)
        x0_uncond = self._x0(self.real_score, xt, t, uncond, x0)
        return classifier_free_guidance(x0_cond, x0_uncond, self.guidance_scale)

    def generator_loss(
        self, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD loss of generator samples x0 [B, F, C, H, W]; gradient flows only into x0."""
        uncond = self._uncond(uncond, x0.shape[0])
        with torch.no_grad():
            sample = x0.detach()
            xt, t, _, scored = self._noised(sample)
            fake = self._x0(self.fake_score, xt, t, cond, sample)
            real = self.real_x0(xt, t, cond, uncond, sample)
        loss, log = dmd_loss(x0, real, fake, scored)
        log["dmd_timestep_mean"] = _scored_mean(t.float(), scored)
        return loss, log

    def critic_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching denoising loss of the fake score on (detached) generator samples.

        The target is the flow noise - x0 (``FlowMatchScheduler.training_target``), the quantity
        the critic predicts, as in the release; an x0-space MSE would be sigma^2 times this one
        and all but ignore the low-noise timesteps.
        """
        sample = x0.detach()
        xt, t, noise, scored = self._noised(sample)
        flow = self._flow(self.fake_score, xt, t, cond, sample)
        target = self.scheduler.training_target(sample, noise)
        per_frame = (flow.float() - target.float()).pow(2).flatten(2).mean(dim=2)
        if self.weight_critic_loss:
            weights = self._timestep_weights(t)
            per_frame = per_frame * (weights if weights.dim() == 2 else weights[:, None])
        loss = _scored_mean(per_frame, scored)
        return loss, {"critic_loss": loss.detach(), "critic_timestep_mean": _scored_mean(t.float(), scored)}

    def _timestep_weights(self, t: torch.Tensor) -> torch.Tensor:
        """``linear_timesteps_weights`` at the grid timestep nearest to each t."""
        grid = self.scheduler.timesteps.to(t.device)
        idx = (grid[None] - t.reshape(-1, 1).float()).abs().argmin(dim=1)
        return self.scheduler.linear_timesteps_weights.to(t.device)[idx].reshape(t.shape)
