"""MemFlow-Tiny's VAE trainer: phases, inflation, streaming caches, round trip and latent probes."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from memflow.vae import WanVAE
from tiny.vae_train import (
    CONTRAST_CHANGES,
    CausalCaches,
    VAESettings,
    VAETrainer,
    attribute_contrast,
    clip_video,
    colour_probe,
    foreground_weights,
    inflate_temporal,
    latent_chunks,
    reconstruction_error,
    roundtrip_report,
    streaming_loss,
    subject_mask,
    window_loss,
)
from tiny.world import (
    split_seeds,
)
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]




def test_vae_trainer_steps_and_saved_model_loads(tmp_path: Path) -> None:
    settings = VAESettings(base_dim=4, phases=((1, 1, 2, 0), (2, 1, 1, 2)), lr=1e-3, final_lr_scale=0.1,
                           stats_clips=2)  # fmt: skip
    trainer = VAETrainer(settings, seeds=[0, 1, 2])
    values = [trainer.step() for _ in range(3)]
    losses = [v["loss"] for v in values]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3
    assert values[0]["lr"] < 1e-3 and values[-1]["lr"] == pytest.approx(1e-4)  # cosine down to lr * 0.1
    assert values[0]["warmup"] == 0 and {v["warmup"] for v in values[1:]} <= {0, 1, 2}
    mean, std = trainer.fit_normalisation()
    assert len(mean) == len(std) == 16 and min(std) > 0
    vae = WanVAE.from_diffusers(trainer.save(tmp_path / "vae"))
    latents = vae.encode(torch.zeros(1, 5, 3, 64, 64))
    assert latents.shape == (1, 2, 16, 8, 8)
    assert vae.model.config.latents_std == pytest.approx(std)


def test_image_phase_trains_on_first_frames_alone() -> None:
    """A window of 1 latent frame without warm-up decodes each clip's first frame, once: an image step."""
    settings = VAESettings(base_dim=4, phases=((1, 2, 1, 0),), sample_posterior=False)
    trainer = VAETrainer(settings, seeds=[3, 4])
    decoded = []
    handle = trainer.model.decoder.register_forward_hook(lambda module, args, output: decoded.append(output.shape))
    values = trainer.step()
    handle.remove()
    assert decoded == [(2, 3, 1, 64, 64)] and values["warmup"] == 0 and np.isfinite(values["loss"])


def test_inflated_image_vae_codes_a_still_video_as_its_frame() -> None:
    """After inflation every latent frame of a still video is its frame's latent and every decoded frame its frame's
    decode; before it the untrained temporal weights make the video path differ from the image path."""
    settings = VAESettings(base_dim=4, phases=((1, 1, 1, 0),), sample_posterior=False)
    torch.manual_seed(0)
    model = AutoencoderKLWan(**settings.model_config()).eval()
    frame = clip_video([3], 1)
    still = frame.expand(-1, -1, 9, -1, -1)

    def gaps() -> tuple[float, float]:
        image, video = model.encode(frame).latent_dist.mode(), model.encode(still).latent_dist.mode()
        decoded = model.decode(image.expand(-1, -1, 3, -1, -1)).sample
        return (video - image).abs().max().item(), (decoded - model.decode(image).sample).abs().max().item()

    with torch.no_grad():
        before = gaps()
        inflate_temporal(model)
        after = gaps()
    assert min(before) > 1e-3 and max(after) < 1e-5


def test_inflate_setting_inflates_once_at_the_first_video_phase() -> None:
    settings = VAESettings(base_dim=4, phases=((1, 1, 1, 0), (2, 1, 2, 0)), inflate=True)
    trainer = VAETrainer(settings, seeds=[3, 4])
    conv = trainer.model.decoder.conv_in
    trainer.step()
    assert not trainer.inflated and conv.weight[:, :, 0].abs().sum() > 0
    with patch("tiny.vae_train.inflate_temporal", wraps=inflate_temporal) as inflate:
        trainer.step()
        trainer.step()
    assert trainer.inflated and inflate.call_count == 1


def test_an_image_only_run_is_inflated_before_its_statistics_are_fitted(tmp_path: Path) -> None:
    """With no video phase to inflate it, ``inflate: true`` still ships the image VAE applied to every frame."""
    settings = VAESettings(base_dim=4, phases=((1, 1, 1, 0),), inflate=True, stats_clips=2, sample_posterior=False)
    trainer = VAETrainer(settings, seeds=[3, 4])
    trainer.step()
    assert not trainer.inflated
    trainer.fit_normalisation()
    model = WanVAE.from_diffusers(trainer.save(tmp_path / "vae")).model.eval()
    frame = clip_video([3], 1)
    with torch.no_grad():
        image = model.encode(frame).latent_dist.mode()
        video = model.encode(frame.expand(-1, -1, 5, -1, -1)).latent_dist.mode()
    assert trainer.inflated and (video - image).abs().max() < 1e-5


class _Perfect:
    """A stand-in VAE whose round trip is exact."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class _Blank(_Perfect):
    """A stand-in VAE that decodes every video to a mid-grey one: it keeps nothing."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(latents)


def test_roundtrip_report_is_the_truth_for_an_exact_vae_and_nothing_for_a_blank_one() -> None:
    seeds = split_seeds("validation", 3)
    exact, blank = roundtrip_report(_Perfect(), seeds, 36), roundtrip_report(_Blank(), seeds, 36)
    assert exact["narratives"] == blank["narratives"] == 3 and exact["identity_tests"] >= 3
    assert exact["identity_consistency"] == exact["adherence"] == 1.0 and exact["duplicate_rate"] == 0.0
    assert exact["identity_above_chance"] > 0.5
    assert blank["identity_consistency"] == blank["adherence"] == 0.0


class _PooledPixels:
    """A stand-in VAE whose latents are the first frame's 8x8-pooled pixels: they keep every subject's colour."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(video[:, 0], 8)[:, None]


class _Noise:
    """A stand-in VAE whose latents ignore the video."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return torch.randn(video.shape[0], 1, 16, 8, 8, generator=self.generator)


def test_colour_probe_reads_colour_only_from_latents_that_carry_it() -> None:
    seeds = split_seeds("validation", 150)
    kept, lost = colour_probe(_PooledPixels(), seeds), colour_probe(_Noise(), seeds)
    assert kept.subjects == lost.subjects > 100 and kept.chance == lost.chance < 0.35
    assert kept.accuracy > 0.8 and lost.accuracy < kept.accuracy - 0.5
    with pytest.raises(ValueError, match="more seeds"):
        colour_probe(_PooledPixels(), seeds[:3])


class _Zero:
    """A stand-in VAE whose latents are all zero: it sees no subject."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return torch.zeros(video.shape[0], 1, 16, 8, 8)


def test_attribute_contrast_orders_what_latents_keep_and_is_zero_for_latents_that_see_nothing() -> None:
    pooled, blind = attribute_contrast(_PooledPixels()), attribute_contrast(_Zero())
    assert set(pooled) == set(CONTRAST_CHANGES) and all(value == 0.0 for value in blind.values())
    assert pooled["colour"] > pooled["shape"] > 0.0 and pooled["moved_2px"] > pooled["moved_1px"] > 0.0
    assert attribute_contrast(_PooledPixels(), count=4, seed=1) == attribute_contrast(_PooledPixels(), count=4, seed=1)


def test_posterior_mean_decoding_is_deterministic() -> None:
    """``sample_posterior: false`` trains on the latents inference uses; a sample would differ call to call."""
    video = clip_video([3], 2)
    losses = {}
    for sample in (True, False):
        settings = VAESettings(base_dim=4, phases=((1, 1, 2, 0),), sample_posterior=sample)
        torch.manual_seed(0)
        model = AutoencoderKLWan(**settings.model_config())
        losses[sample] = [streaming_loss(model, video, 0, settings)[0].item() for _ in range(2)]
    assert losses[False][0] == losses[False][1] and losses[True][0] != losses[True][1]


class _EraseSubjects:
    """A stand-in VAE whose round trip paints every subject pixel in its row's background colour."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, video: torch.Tensor) -> torch.Tensor:
        channels_first = video.transpose(1, 2)
        background = channels_first.median(dim=-1, keepdim=True).values.expand_as(channels_first)
        subjects = subject_mask(channels_first)
        return torch.where(subjects, background, channels_first).transpose(1, 2)


def test_reconstruction_error_separates_subjects_from_background() -> None:
    """Erasing the subjects moves the per-frame mean a little but shows fully in the subject error."""
    recon = reconstruction_error(_EraseSubjects(), [0, 1, 2, 3], 3)
    assert len(recon.per_frame) == 3 and recon.background == 0.0
    assert recon.subjects > 50.0 and recon.subjects > 3.0 * max(recon.per_frame)


def test_streaming_loss_sees_the_cache_of_a_whole_clip_decode() -> None:
    """Warm-up then window, chunk by chunk, reconstructs exactly what a whole-clip encode -> decode gives."""
    settings = VAESettings(base_dim=4, phases=((1, 1, 2, 2),), kl_weight=0.0, foreground_weight=0.0)
    model = AutoencoderKLWan(**settings.model_config()).eval()
    video = clip_video([5], 4)
    whole = model.decode(model.encode(video).latent_dist.mode()).sample
    recon = {}

    def keep(module, args, output):
        recon.setdefault("frames", []).append(output)

    handle = model.decoder.register_forward_hook(keep)
    torch.manual_seed(0)
    with torch.no_grad(), patch.object(DiagonalGaussianDistribution, "sample", DiagonalGaussianDistribution.mode):
        loss, _ = streaming_loss(model, video, warmup=2, settings=settings)
    handle.remove()
    window = torch.cat(recon["frames"][-2:], dim=2)
    torch.testing.assert_close(window.clamp(-1, 1), whole[:, :, 5:], rtol=0, atol=1e-5)  # decode() clamps
    expected = (window - video[:, :, 5:]).abs().mean() + (window - video[:, :, 5:]).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_windows_with_carried_caches_reproduce_a_whole_clip_decode() -> None:
    """Streaming a clip window by window, the caches detached between windows, decodes what the whole clip does."""
    settings = VAESettings(base_dim=4, phases=((1, 1, 2, 2),), kl_weight=0.0, foreground_weight=0.0)
    model = AutoencoderKLWan(**settings.model_config()).eval()
    video = clip_video([7], 4)
    whole = model.decode(model.encode(video).latent_dist.mode()).sample
    recon = []
    handle = model.decoder.register_forward_hook(lambda module, args, output: recon.append(output))
    caches, chunks = CausalCaches(model), latent_chunks(video)
    with torch.no_grad(), patch.object(DiagonalGaussianDistribution, "sample", DiagonalGaussianDistribution.mode):
        for start in (0, 2):
            caches.detach()
            window_loss(caches, chunks[start : start + 2], settings)
    handle.remove()
    torch.testing.assert_close(torch.cat(recon, dim=2).clamp(-1, 1), whole, rtol=0, atol=1e-5)


def test_streaming_phase_walks_each_narrative_window_by_window(monkeypatch) -> None:
    import tiny.vae_train as vae_train

    drawn = []
    monkeypatch.setattr(vae_train, "clip_video", lambda *args, **kwargs: drawn.append((args, kwargs)) or
                        clip_video(*args, **kwargs))  # fmt: skip
    settings = VAESettings(base_dim=4, phases=((10, 1, 3, 0, 27),), lr=1e-3, stats_clips=1)
    trainer = VAETrainer(settings, seeds=[3, 4, 5])
    depths = [trainer.step()["warmup"] for _ in range(10)]
    assert depths == [0, 3, 6, 9, 12, 15, 18, 21, 24, 0] and trainer.seen == 2  # then a new one, empty caches
    assert drawn == [(([3], 27), {"narratives": True}), (([4], 27), {"narratives": True})]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"phases": ()}, "phases"), ({"phases": ((10, 0, 3, 4),)}, "batch_size"),
     ({"final_lr_scale": 0.0}, "final_lr_scale"), ({"foreground_weight": -1.0}, "foreground_weight"),
     ({"phases": ((10, 2, 3, 4, 36),)}, "streaming phase"), ({"phases": ((10, 2, 4, 0, 6),)}, "multiple of window"),
     ({"phases": ((10, 2, 3, 0, 12),)}, "narrative length")],
)
def test_vae_settings_reject_bad_values_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        VAESettings(**overrides)


def test_foreground_weights_mark_subjects_only() -> None:
    video = clip_video([5], 2)
    weights = foreground_weights(video, 4.0)
    assert set(weights.unique().tolist()) == {1.0, 5.0}
    assert 0.0 < (weights == 5.0).float().mean() < 0.3
    assert foreground_weights(video, 0.0) == 1.0
