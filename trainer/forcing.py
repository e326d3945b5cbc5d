"""Teacher forcing: a causal generator trained by flow matching on data, each chunk given the true chunks before it.

The distillation stages teach the generator only through the teacher's score. Teacher forcing trains it on
the clips themselves, in the setting it is used in: a chunk is denoised while the cache holds the clean
keys and values of every earlier chunk. One step trains every chunk of a clip at once with two passes of
the same model. The clean pass (timestep ``context_timestep``, block-causal) records each layer's keys and
values as ``StreamingGenerator.commit_chunk`` writes them; in the noisy pass, each chunk, noised to its own
timestep, attends to the clean keys of the chunks before it and to its own noisy keys. So chunk c's
prediction is exactly what the streaming generator predicts for it with the true chunks 0..c-1 committed
under ``memory: full`` (tested), and the model can lower its loss at a returning subject only by copying
the subject's clean sighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow.attention import attention, block_causal_mask
from memflow.dit import WanDiT
from memflow.errors import ConfigError
from memflow.scheduler import FlowMatchScheduler
from utils.world import CHUNK_FRAMES

from .teacher_train import TeacherSettings, TeacherTrainer, flow_matching_loss


class TeacherForcingAttention:
    """Self-attention of the two passes: :meth:`record` for the clean one, then :meth:`force` for the noisy one."""

    def __init__(self, num_frames: int, frame_tokens: int, chunk_frames: int, device: torch.device | str | None = None):
        chunk = (torch.arange(num_frames, device=device) // chunk_frames).repeat_interleave(frame_tokens)
        self.clean_mask = block_causal_mask(num_frames, frame_tokens, chunk_frames, device)
        self.forcing_mask = torch.cat([chunk[:, None] > chunk[None, :], chunk[:, None] == chunk[None, :]], dim=1)
        self.clean: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    def record(self) -> TeacherForcingAttention:
        self.clean.clear()
        self.recording = True
        return self

    def force(self) -> TeacherForcingAttention:
        self.recording = False
        return self

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.clean[layer] = (k, v)
            return attention(q, k, v, self.clean_mask)
        clean_k, clean_v = self.clean[layer]
        return attention(q, torch.cat([clean_k, k], dim=2), torch.cat([clean_v, v], dim=2), self.forcing_mask)

    def checkpoint_view(self) -> None:
        """The passes keep state across layers, so a checkpointed block could not replay them."""
        return None


def forced_flow(
    model: WanDiT,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    chunk_frames: int = CHUNK_FRAMES,
    context_timestep: float = 0.0,
) -> torch.Tensor:
    """Flow predictions for the noisy latents ``xt`` at per-frame timesteps ``t`` [B, F], each chunk seeing the
    clean ``x0`` of the chunks before it (at ``context_timestep``) and its own noisy frames."""
    b, f, _, h, w = x0.shape
    rows, cols = model.config.latent_grid(h, w)
    forcing = TeacherForcingAttention(f, rows * cols, chunk_frames, x0.device)
    text_kv = model.text_kv(context)
    clean_t = torch.full((b, f), float(context_timestep), device=x0.device)
    model(x0, clean_t, text_kv=text_kv, attention_context=forcing.record())
    return model(xt, t, text_kv=text_kv, attention_context=forcing.force())


def forcing_loss(
    model: WanDiT,
    scheduler: FlowMatchScheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`trainer.teacher_train.flow_matching_loss` of :func:`forced_flow`, every chunk at its own timestep."""
    return flow_matching_loss(model, scheduler, x0, context, generator, weight, chunk_noise=1.0,
                              predict=lambda xt, t: forced_flow(model, x0, xt, t, context))  # fmt: skip


@dataclass(frozen=True)
class ForcingSettings(TeacherSettings):
    """:class:`TeacherSettings` less ``chunk_noise``: teacher forcing gives every chunk its own timestep."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_noise:
            raise ConfigError(f"forcing settings.chunk_noise={self.chunk_noise}: teacher forcing noises every chunk "
                              "to its own timestep already; remove the key")  # fmt: skip


class ForcingTrainer(TeacherTrainer):
    """:class:`TeacherTrainer` with the teacher-forcing loss: the model it trains and saves is a causal generator
    (load it with ``generator_ckpt``)."""

    Settings = ForcingSettings

    def __init__(self, settings: TeacherSettings, cache: dict[str, torch.Tensor]):
        super().__init__(self.Settings(**vars(settings)), cache)
        self.model.causal = True

    def loss(self, x0: torch.Tensor, context: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return forcing_loss(self.model, self.scheduler, x0, context, self.generator, weight)
