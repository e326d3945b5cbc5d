"""Distribution matching distillation (DMD): the generator loss and the critic's denoising loss.

Three networks take part (method section 6): the few-step generator whose samples ``x0`` come in
here, a frozen **real score** (the teacher, with classifier-free guidance) and a trainable
**fake score** (the critic). Both scores are callables with the ``WanDiT`` forward signature
``model(x_t [B, F, C, H, W], t [B] or [B, F], context [B, T, text_dim]) -> flow``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memflow.scheduler import FlowMatchScheduler
from utils.errors import ConfigError

ScoreModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    x0: torch.Tensor, real_x0_pred: torch.Tensor, fake_x0_pred: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD generator loss for samples x0 [B, F, ...] given the real and fake scores' x0 predictions.

    grad = (fake - real) / mean|x0 - real| (the mean per sample, over every non-batch dim), with
    NaNs set to zero; loss = 0.5 * mean((x0 - stopgrad(x0 - grad))**2) in float64, the release's
    mean-reduced MSE. Its value is 0.5 * mean(grad**2) and its gradient with respect to x0 is
    grad / x0.numel(): "0.5 * ||x0 - stopgrad(x0 - grad)||^2" divided by the number of elements.
    """
    with torch.no_grad():
        real = real_x0_pred.double()
        dims = tuple(range(1, x0.dim()))
        normalizer = (x0.double() - real).abs().mean(dim=dims, keepdim=True)
        grad = (fake_x0_pred.double() - real) / normalizer
        grad = torch.where(torch.isnan(grad), torch.zeros_like(grad), grad)
    x0_64 = x0.double()
    loss = 0.5 * (x0_64 - (x0_64 - grad).detach()).pow(2).mean()
    log = {"dmd_gradient_norm": grad.norm().detach(), "dmd_normalizer": normalizer.mean().detach()}
    return loss, log


class DMDObjective:
    """The generator's DMD loss and the critic's flow-matching loss on generator samples.

    ``negative_context`` is the embedded negative prompt ([1 or B, T, text_dim]); it is the
    unconditional branch of the real score's guidance whenever ``generator_loss`` gets no
    ``uncond``. As in the release, both scores see every frame of a sample at one score timestep.
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
    ):
        if guidance_scale < 0:
            raise ConfigError(f"guidance_scale={guidance_scale}: must be >= 0 (the release uses 3.0)")
        self.real_score = real_score
        self.fake_score = fake_score
        self.scheduler = scheduler
        self.timestep_sampler = timestep_sampler
        self.guidance_scale = guidance_scale
        self.negative_context = negative_context

    def _noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t [B], noise) with t from the score timestep sampler."""
        t = self.timestep_sampler(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def _x0(self, model: ScoreModel, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.scheduler.flow_to_x0(model(xt, t, context), xt, t)

    def _uncond(self, uncond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if uncond is None:
            if self.negative_context is None:
                raise ValueError("pass uncond or construct DMDObjective with negative_context")
            uncond = self.negative_context
        return uncond.expand(batch_size, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond

    def real_x0(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The guided real score in x0 space (the release converts flow to x0, then guides)."""
        x0_cond = self._x0(self.real_score, xt, t, cond)
        x0_uncond = self._x0(self.real_score, xt, t, uncond)
        return classifier_free_guidance(x0_cond, x0_uncond, self.guidance_scale)

    def generator_loss(
        self, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DMD loss of generator samples x0 [B, F, C, H, W]; gradient flows only into x0."""
        uncond = self._uncond(uncond, x0.shape[0])
        with torch.no_grad():
            xt, t, _ = self._noised(x0.detach())
            fake = self._x0(self.fake_score, xt, t, cond)
            real = self.real_x0(xt, t, cond, uncond)
        loss, log = dmd_loss(x0, real, fake)
        log["dmd_timestep_mean"] = t.float().mean()
        return loss, log

    def critic_loss(self, x0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching denoising loss of the fake score on (detached) generator samples.

        The target is the flow noise - x0 (``FlowMatchScheduler.training_target``), the quantity
        the critic predicts, as in the release; an x0-space MSE would be sigma^2 times this one
        and all but ignore the low-noise timesteps.
        """
        sample = x0.detach()
        xt, t, noise = self._noised(sample)
        flow = self.fake_score(xt, t, cond)
        target = self.scheduler.training_target(sample, noise)
        loss = (flow.float() - target.float()).pow(2).flatten(2).mean(dim=2).mean()
        return loss, {"critic_loss": loss.detach(), "critic_timestep_mean": t.float().mean()}
