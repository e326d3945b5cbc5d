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

Under a memory policy (``settings.stream``) a chunk sees instead what the streaming generator holds when it
makes that chunk - the sink, the bank's frames as NAM chose them, the local window - by running the
generator's own commit passes over the true chunks (:func:`streamed_flow`): a model trained with its whole
past in view draws little from the one frame of a sighting that the bank keeps, and one tuned under the
policy draws from it nearly as much as from the whole sighting (docs/memflow_tiny_log.md, session 19).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow.attention import attention, block_causal_mask
from memflow.config import StreamConfig
from memflow.dit import WanDiT
from memflow.errors import ConfigError
from memflow.scheduler import FlowMatchScheduler
from pipeline.streaming import StreamingGenerator
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


def streamed_flow(
    streamer: StreamingGenerator, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """:func:`forced_flow` under ``streamer``'s memory policy: chunk by chunk, the flow of the noisy chunk (one
    timestep per chunk, ``t`` [B, F]) given the cache the streamer built by committing the true chunks before it.
    The cache is not differentiated, as in the generator's rollouts."""
    f, (h, w) = x0.shape[1], x0.shape[3:]
    streamer.start(context, num_frames=f, latent_height=h, latent_width=w)
    text_kv = streamer.dit.text_kv(context) if torch.is_grad_enabled() else None
    flows = []
    for start in range(0, f, streamer.chunk):
        chunk = slice(start, start + streamer.chunk)
        flows.append(streamer.chunk_flow(xt[:, chunk], t[:, start], text_kv))
        if start + streamer.chunk < f:
            streamer.commit_chunk(x0[:, chunk])
    return torch.cat(flows, dim=1)


def forcing_loss(
    model: WanDiT,
    scheduler: FlowMatchScheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    weight: torch.Tensor | None = None,
    streamer: StreamingGenerator | None = None,
) -> torch.Tensor:
    """:func:`trainer.teacher_train.flow_matching_loss` of :func:`forced_flow` (or, given a ``streamer`` of the
    model, :func:`streamed_flow`), every chunk at its own timestep."""
    if streamer is None:
        predict = lambda xt, t: forced_flow(model, x0, xt, t, context)
    else:
        predict = lambda xt, t: streamed_flow(streamer, x0, xt, t, context)
    return flow_matching_loss(model, scheduler, x0, context, generator, weight, chunk_noise=1.0, predict=predict)


@dataclass(frozen=True)
class ForcingSettings(TeacherSettings):
    """:class:`TeacherSettings` less ``chunk_noise`` (teacher forcing gives every chunk its own timestep), plus
    ``stream``: None, every earlier chunk in view; or :class:`memflow.config.StreamConfig` keys (``memory``,
    ``local_attn_size``, ``sink_size``, ``bank_size``, ...), each chunk seeing what that streaming generator
    holds there."""

    stream: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_noise:
            raise ConfigError(f"forcing settings.chunk_noise={self.chunk_noise}: teacher forcing noises every chunk "
                              "to its own timestep already; remove the key")  # fmt: skip
        if self.stream is not None:
            self.stream_config()

    def stream_config(self) -> StreamConfig:
        try:
            return StreamConfig(**self.stream)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"forcing settings.stream: {err}; give StreamConfig keys, e.g. "
                              "{memory: nam, local_attn_size: 12, sink_size: 3, bank_size: 3}") from None  # fmt: skip


class ForcingTrainer(TeacherTrainer):
    """:class:`TeacherTrainer` with the teacher-forcing loss: the model it trains and saves is a causal generator
    (load it with ``generator_ckpt``)."""

    Settings = ForcingSettings

    def __init__(self, settings: TeacherSettings, cache: dict[str, torch.Tensor]):
        settings = self.Settings(**vars(settings))
        super().__init__(settings, cache)
        self.model.causal = True
        self.streamer = None if settings.stream is None else StreamingGenerator(self.model, settings.stream_config())

    def loss(self, x0: torch.Tensor, context: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return forcing_loss(self.model, self.scheduler, x0, context, self.generator, weight, self.streamer)
