"""MemFlow-Tiny: the VAE / teacher trainers, the shipped checkpoints, the demo and the evaluation script."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from memflow.errors import ConfigError, WeightsError
from memflow.scheduler import FlowMatchScheduler
from memflow.vae import WanVAE
from memflow.weights import load_dit
from pipeline.inference import VideoRunner, build_components, plan_run
from pipeline.inference import random_vae as make_random_vae
from trainer.forcing import ForcingSettings, ForcingTrainer
from trainer.teacher_train import (
    WEIGHTS_FILE,
    TeacherSettings,
    TeacherTrainer,
    build_latent_cache,
    check_latent_cache,
    latent_subject_mask,
    load_latent_cache,
    read_teacher,
    sample_timesteps,
)
from trainer.vae_train import (
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
from utils.config import load_config
from utils.oracle import Oracle
from utils.world import (
    COLOURS,
    PROMPT_SEED_OFFSET,
    narrative_from_seed,
    pixel_frame,
    return_clip_from_seed,
    return_story_from_seed,
    split_seeds,
    to_model_pixels,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip


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
    with patch("trainer.vae_train.inflate_temporal", wraps=inflate_temporal) as inflate:
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
    seeds = split_seeds("validation", 60)
    kept, lost = colour_probe(_PooledPixels(), seeds), colour_probe(_Noise(), seeds)
    assert kept.subjects == lost.subjects > 40 and kept.chance == lost.chance < 0.3
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
    """Erasing the subjects barely moves the per-frame mean but shows fully in the subject error."""
    recon = reconstruction_error(_EraseSubjects(), [0, 1, 2, 3], 3)
    assert len(recon.per_frame) == 3 and recon.background == 0.0
    assert recon.subjects > 50.0 and recon.subjects > 10.0 * max(recon.per_frame)


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
    import trainer.vae_train as vae_train

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


def test_teacher_trainer_steps_and_saved_model_loads(tmp_path: Path) -> None:
    overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8}
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(4, 3, 16, 8, 8, generator=generator),
             "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16)}  # fmt: skip
    trainer = TeacherTrainer(TeacherSettings(overrides=overrides, batch_size=2, warmup=1, steps=3), cache)
    losses = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3
    loaded = load_dit(trainer.save(tmp_path / "teacher"), "tiny", causal=False, **overrides)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_teacher_continues_from_a_saved_teacher_and_rejects_another_shape(tmp_path: Path) -> None:
    overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8}
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(4, 3, 16, 8, 8, generator=generator),
             "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16)}  # fmt: skip
    first = TeacherTrainer(TeacherSettings(overrides=overrides, batch_size=2, warmup=1), cache)
    first.step()
    first.save(tmp_path / "teacher")
    second = TeacherTrainer(TeacherSettings(overrides=overrides, batch_size=2, warmup=1, seed=1), cache)
    second.load_weights(tmp_path / "teacher")
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value)
    wider = TeacherTrainer(TeacherSettings(overrides={**overrides, "dim": 64}, batch_size=2), cache)
    with pytest.raises(WeightsError, match=r"init_from=.*model_overrides"):
        wider.load_weights(tmp_path / "teacher")
    with pytest.raises(WeightsError, match=r"init_from=.*\(blocks\.0\..*model_overrides"):
        read_teacher(tmp_path / "teacher", wider.settings)  # by shape alone, before any cache is encoded
    assert read_teacher(tmp_path / "teacher", second.settings).keys() == first.model.state_dict().keys()
    with pytest.raises(WeightsError, match="holds no"):
        wider.load_weights(tmp_path)


def test_latent_cache_holds_clips_and_prompts(tmp_path: Path) -> None:
    from memflow.text import TextEncoder

    vae = make_random_vae("tiny", 16, torch.device("cpu"), torch.float32, 0)
    encoder = TextEncoder.from_minilm(text_len=8)
    cache = load_latent_cache(build_latent_cache(vae, encoder, [3, 4], 3, "", tmp_path / "cache.safetensors"))
    assert cache["latents"].shape == (2, 3, 16, 8, 8)
    assert cache["context"].shape == (2, 8, 384) and cache["uncond"].shape == (1, 8, 384)
    assert cache["seeds"].tolist() == [3, 4]
    assert cache["subjects"].shape == (2, 3, 8, 8) and cache["subjects"].dtype == torch.uint8
    returns = load_latent_cache(build_latent_cache(vae, encoder, [3], 9, "", tmp_path / "returns.safetensors", 1.0))
    assert returns["latents"].shape == (1, 9, 16, 8, 8)
    assert torch.equal(returns["context"], encoder.encode([return_clip_from_seed(3, 9).text]))


def test_a_stale_latent_cache_is_refused_naming_the_field(tmp_path: Path) -> None:
    from memflow.text import TextEncoder

    vae = make_random_vae("tiny", 16, torch.device("cpu"), torch.float32, 0)
    path = build_latent_cache(vae, TextEncoder.from_minilm(text_len=8), [3, 4], 9, "", tmp_path / "c.safetensors",
                              0.5, 0)  # fmt: skip
    cache = load_latent_cache(path)
    check_latent_cache(cache, path, [3, 4], 9, 8, 0.5, 0)
    for field, args in (("num_clips", ([3], 9, 8, 0.5, 0)), ("clip_latent_frames", ([3, 4], 12, 8, 0.5, 0)),
                        ("text_len", ([3, 4], 9, 16, 0.5, 0)), ("return_fraction", ([3, 4], 9, 8, 0.8, 0)),
                        ("return_gap", ([3, 4], 9, 8, 0.5, 3)), ("training seeds", ([3, 5], 9, 8, 0.5, 0)),
                        ("uncond_prompt", ([3, 4], 9, 8, 0.5, 0, "blurry"))):
        with pytest.raises(ConfigError, match=field):
            check_latent_cache(cache, path, *args)


def test_latent_subject_mask_marks_the_cells_a_subject_covers() -> None:
    clip = return_clip_from_seed(3, 21, 9)  # an empty opening chunk, the subject, a cut, its return
    video = torch.from_numpy(to_model_pixels(clip.frames))[None]
    mask = latent_subject_mask(video, (21, 8, 8))[0]
    assert mask.shape == (21, 8, 8) and set(mask.unique().tolist()) <= {0, 1}
    assert mask[:3].sum() == 0  # the opening chunk shows no subject
    assert (mask[3:9].flatten(1).sum(1) > 0).all() and (mask[18:].flatten(1).sum(1) > 0).all()
    assert mask[3:9].float().mean() < 0.2  # a subject covers a few cells, not the frame


def test_subject_weight_scales_only_the_subject_cells() -> None:
    overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8}
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(4, 3, 16, 8, 8, generator=generator),
             "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16)}  # fmt: skip
    with pytest.raises(WeightsError, match="delete it to rebuild"):
        TeacherTrainer(TeacherSettings(overrides=overrides, subject_weight=5.0), cache)

    def first_loss(weight: float, subjects: torch.Tensor) -> float:
        settings = TeacherSettings(overrides=overrides, batch_size=2, warmup=1, subject_weight=weight)
        return TeacherTrainer(settings, {**cache, "subjects": subjects}).step()

    empty, some = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    some[:, :, 2:4, 2:4] = 1
    assert first_loss(5.0, empty) == pytest.approx(first_loss(0.0, empty))  # no subject: the plain MSE
    assert first_loss(5.0, some) > first_loss(0.0, some)


def test_chunk_noise_gives_chunks_their_own_timesteps_and_leaves_the_rest_alone() -> None:
    scheduler = FlowMatchScheduler(shift=5.0)
    plain = sample_timesteps(scheduler, (64, 7), torch.Generator().manual_seed(0))
    assert plain.shape == (64,)  # one per clip, and the same draws as before chunk_noise existed
    reference = scheduler.timesteps[torch.randint(0, len(scheduler.timesteps), (64,),
                                                  generator=torch.Generator().manual_seed(0))]  # fmt: skip
    assert torch.equal(plain, reference)
    t = sample_timesteps(scheduler, (64, 7), torch.Generator().manual_seed(0), chunk_noise=0.5, chunk_frames=3)
    assert t.shape == (64, 7)
    assert torch.equal(t[:, 0], t[:, 2]) and torch.equal(t[:, 3], t[:, 5])  # one timestep per 3-frame chunk
    split = (t != t[:, :1]).any(1)
    assert 10 < split.sum() < 54  # about half the clips, the others noised to one level
    everywhere = sample_timesteps(scheduler, (64, 7), torch.Generator().manual_seed(0), chunk_noise=1.0)
    assert (everywhere != everywhere[:, :1]).any(1).float().mean() > 0.9


def test_prompts_follow_the_teacher_mix_given_on_the_command_line(tmp_path: Path) -> None:
    proc = run_script("scripts/train_toy.py", "prompts", "--count", "4", f"prompts_dir={tmp_path}",
                      "clip_latent_frames=21", "return_fraction=1.0", "return_gap=9")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["switch_first.txt", "switch_second.txt", "train.txt"]
    lines = (tmp_path / "train.txt").read_text().splitlines()
    seeds = split_seeds("train", 4, offset=PROMPT_SEED_OFFSET)
    assert lines == [return_clip_from_seed(seed, 21, 9).text for seed in seeds]
    bad = run_script("scripts/train_toy.py", "prompts", "--count", "0", f"prompts_dir={tmp_path / 'new'}")
    assert bad.returncode == 2 and "--count" in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert not (tmp_path / "new").exists()


def test_teacher_snapshots_equal_shorter_runs(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(4, 3, 16, 8, 8, generator=generator),
               "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16)},
              str(tmp_path / "cache.safetensors"))  # fmt: skip
    tiny = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_heads=2",
            "model_overrides.num_layers=1", "model_overrides.text_dim=16", "model_overrides.text_len=8",
            "settings.batch_size=2", f"cache_path={tmp_path / 'cache.safetensors'}", "threads=1",
            "num_clips=4", "clip_latent_frames=3"]  # fmt: skip
    for name, steps, every in (("long", 4, 2), ("short", 2, 0)):
        proc = run_script("scripts/train_toy.py", "teacher", *tiny, f"settings.steps={steps}",
                          f"snapshot_every={every}", f"output={tmp_path / name}", f"metrics={tmp_path / name}.jsonl")
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["long", "long-step2", "short"]
    snapshot, short = (load_file(str(tmp_path / n / WEIGHTS_FILE)) for n in ("long-step2", "short"))
    assert all(torch.equal(snapshot[k], short[k]) for k in short)


@pytest.mark.parametrize("stage, bad", [("teacher", "return_fraction=1.5"), ("teacher", "return_gap=12"),
                                        ("teacher", "settings.subject_weight=-1"),
                                        ("teacher", "settings.chunk_noise=2"), ("teacher", "snapshot_every=-1"),
                                        ("forcing", "settings.chunk_noise=0.5"),
                                        ("forcing", "return_gap=20"),
                                        ("forcing", "settings.stream={memory: bogus}"),
                                        ("teacher", "model_overrides.text_dimm=384"),
                                        ("forcing", "model_overrides.text_dimm=384"),
                                        ("vae", "validation_narratives=-1"),
                                        ("vae", "validation_narrative_frames=9")])  # fmt: skip
def test_toy_stages_reject_bad_settings_and_write_nothing(tmp_path: Path, stage: str, bad: str) -> None:
    cache = [] if stage == "vae" else [f"cache_path={tmp_path / 'cache.safetensors'}"]
    proc = run_script("scripts/train_toy.py", stage, bad, f"output={tmp_path / 'out'}", *cache,
                      f"metrics={tmp_path / 'metrics.jsonl'}")
    field = bad.split("=")[0].split(".")[-1]
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and field in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stream", [None, {"memory": "nam", "local_attn_size": 3, "sink_size": 0, "bank_size": 1,
                                    "record_interval": 1}])  # fmt: skip
def test_forcing_trainer_steps_and_saves_a_generator(tmp_path: Path, stream: dict | None) -> None:
    overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8}
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(4, 6, 16, 8, 8, generator=generator),
             "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16),
             "subjects": (torch.rand(4, 6, 8, 8, generator=generator) < 0.1).to(torch.uint8)}  # fmt: skip
    settings = ForcingSettings(overrides=overrides, batch_size=2, warmup=1, subject_weight=10.0, stream=stream)
    trainer = ForcingTrainer(settings, cache)
    losses = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
    loaded = load_dit(trainer.save(tmp_path / "forcing"), "tiny", **overrides)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    with pytest.raises(ConfigError, match="chunk_noise"):
        ForcingTrainer(dataclasses.replace(settings, chunk_noise=0.5), cache)


@pytest.mark.skipif(not (SHIPPED / "generator.safetensors").is_file(),
                    reason="checkpoints/memflow-tiny not produced yet (bash scripts/train_toy.sh)")  # fmt: skip
def test_shipped_checkpoints_generate_a_video(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompts": ["A red square in a meadow.", "It moves to the left."]}) + "\n")
    overrides = [f"data_path={prompts}", "num_output_frames=6", "switch_frame_indices=[3]",
                 f"output_folder={tmp_path / 'out'}", "save_latents=true"]  # fmt: skip
    plan = plan_run(load_config(CONFIG, overrides))
    result = VideoRunner(plan, build_components(plan)).run(plan.jobs[0])
    assert result.video.stat().st_size > 0 and result.trace.is_file()
    assert result.pixel_frames == 1 + 4 * 5


def test_demo_writes_video_trace_and_oracle_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--frames", "27", f"output_folder={out}", *RANDOM_WEIGHTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".mp4") for n in names) and any(n.endswith(".memory.png") for n in names)
    report = json.loads(next(out.glob("*.oracle.json")).read_text())
    assert set(report["metrics"]) >= {"identity_consistency", "adherence", "duplicate_rate", "smoothness"}
    assert report["narrative"]["seed"] == 1_000_000 and "oracle:" in proc.stdout


def test_demo_refuses_a_training_seed_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--seed", "5", f"output_folder={out}", *RANDOM_WEIGHTS)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "test seed" in proc.stderr
    assert not out.exists()


def test_eval_prints_json_per_mode(tmp_path: Path) -> None:
    proc = run_script("scripts/eval_toy.py", "--narratives", "1", "--modes", "none,nam", "--frames", "27", "--json",
                      "--split", "validation", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["split"] == "validation" and result["seeds"] == [900_000, 900_000]
    assert 0.0 <= result["modes"]["nam"]["bank_recall"] <= 1.0 and result["modes"]["none"]["bank_recall"] is None
    assert set(result["modes"]) == {"ground_truth", "none", "nam"}
    assert result["modes"]["none"]["fps_vs_none"] == 1.0 and result["modes"]["nam"]["generate_fps"] > 0
    assert result["modes"]["nam"]["identity_vs_none"]["pairs"] in (0, 1)
    # one story: no other story to set a chance floor against
    assert result["modes"]["nam"]["identity_chance"] is None and "above_chance_vs_none" in result["modes"]["nam"]
    assert result["modes"]["ground_truth"]["adherence"] > 0.9


def test_eval_scores_return_stories_from_their_joined_prompt(monkeypatch) -> None:
    proc = run_script("scripts/eval_toy.py", "--stories", "returns", "--narratives", "2", "--modes", "none,nam",
                      "--json", "--split", "validation", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert (result["stories"], result["prompting"], result["gap"], result["latent_frames"]) == ("returns", "joined",
                                                                                                9, 21)
    assert result["modes"]["nam"]["identity_vs_none"]["pairs"] == 2  # every return story tests identity
    assert result["modes"]["nam"]["above_chance_vs_none"]["pairs"] == 2
    truth = result["modes"]["ground_truth"]
    assert truth["identity_consistency"] == 1.0 and truth["identity_chance"] < 1.0
    assert truth["identity_above_chance"] == pytest.approx(1.0 - truth["identity_chance"])
    assert 0.0 <= result["modes"]["nam"]["bank_recall"] <= 1.0
    eval_toy = load_eval_toy(monkeypatch)
    seed = split_seeds("validation", 1)[0]
    story = return_story_from_seed(seed, 21, 9)
    assert eval_toy.prompt_schedule(story, "joined") == {0: return_clip_from_seed(seed, 21, 9).text}
    assert eval_toy.prompt_schedule(story, "switched") == {s.start: s.prompt for s in story.segments}
    narrative = narrative_from_seed(split_seeds("test", 1)[0], 36)
    assert eval_toy.prompt_schedule(narrative, "switched") == {s.start: s.prompt for s in narrative.segments}
    bad = run_script("scripts/eval_toy.py", "--stories", "returns", "--frames", "12", *RANDOM_WEIGHTS)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--frames 12 --gap 9" in bad.stderr
    stray = run_script("scripts/eval_toy.py", "--gap", "12", *RANDOM_WEIGHTS)  # narratives set their own cuts
    assert stray.returncode == 2 and stray.stderr.strip().count("\n") == 0 and "--gap 12" in stray.stderr


def test_eval_euler_sampler_guided_by_the_prompt_itself_is_the_unguided_sample(monkeypatch, tmp_path: Path) -> None:
    """u + g (c - u) = c when the unconditional prompt is the conditional one: the stacked, twice-cached guided
    video must then equal the unguided one, which checks that both halves are started, switched and committed
    alike."""
    eval_toy = load_eval_toy(monkeypatch)
    torch.manual_seed(0)
    plan = plan_run(load_config(CONFIG, [*RANDOM_WEIGHTS, f"output_folder={tmp_path}"]))
    components = build_components(plan)
    story = return_story_from_seed(split_seeds("validation", 1)[0], 21, 9)
    schedule = eval_toy.prompt_schedule(story, "joined")
    texts = list(schedule.values())
    with torch.no_grad():
        embedded = dict(zip(texts, components.text_encoder.encode(texts), strict=True))
    prompts = {first: embedded[text] for first, text in schedule.items()}
    latent_size = (plan.latent_height, plan.latent_width)

    def render(guidance: float, uncond: torch.Tensor) -> np.ndarray:
        euler = eval_toy.EulerSampling(3, guidance, uncond)
        renderer = eval_toy.NarrativeRenderer(components, plan.stream, latent_size, euler=euler)
        return renderer.render(story, prompts, seed=7).frames.astype(int)

    plain = render(1.0, embedded[texts[0]][None])
    assert len(texts) == 1  # one prompt over the whole story, so it can stand in for the unconditional one
    assert np.abs(render(2.5, embedded[texts[0]][None]) - plain).max() <= 1
    assert np.abs(render(2.5, torch.zeros_like(embedded[texts[0]][None])) - plain).max() > 8


def test_eval_euler_sampler_flags(tmp_path: Path) -> None:
    proc = run_script("scripts/eval_toy.py", "--stories", "returns", "--narratives", "1", "--modes", "none", "--json",
                      "--sampler", "ode", "--steps", "2", "--guidance", "2", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["sampler"] == {"steps": 2, "guidance": 2.0, "negative_prompt": ""}
    for flags, message in ((["--guidance", "2"], "--guidance with --sampler few_step"),
                           (["--steps", "8"], "--steps with --sampler few_step"),
                           (["--negative_prompt", "blur"], "--negative_prompt with --sampler few_step"),
                           (["--sampler", "ode", "--steps", "0"], "--steps 0"),
                           (["--sampler", "ode", "--guidance", "-1"], "--guidance -1")):  # fmt: skip
        bad = run_script("scripts/eval_toy.py", *flags, *RANDOM_WEIGHTS)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr


def load_eval_toy(monkeypatch):
    spec = importlib.util.spec_from_file_location("eval_toy", ROOT / "scripts" / "eval_toy.py")
    eval_toy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "eval_toy", eval_toy)  # its dataclasses look their module up there
    spec.loader.exec_module(eval_toy)
    return eval_toy


def test_eval_table_gives_every_row_a_cell_per_column(monkeypatch) -> None:
    eval_toy = load_eval_toy(monkeypatch)
    paired = {"mean": 0.1, "se": 0.02, "wins": 3.0, "losses": 1.0, "pairs": 4.0}
    scores = dict.fromkeys(eval_toy.METRICS, 0.5)
    rows = {"ground_truth": {**scores, "identity_chance": math.nan},
            "none": {**scores, "generate_fps": 100.0, "fps_vs_none": 1.0},
            "nam": {**scores, "generate_fps": 98.0, "fps_vs_none": 0.98, "identity_vs_none": paired,
                    "above_chance_vs_none": {**paired, "mean": -0.05}, "bank_recall": 0.5}}  # fmt: skip
    head, rule, *lines = eval_toy.markdown(rows).splitlines()
    assert {line.count("|") for line in (head, rule, *lines)} == {head.count("|")}
    assert "| identity by chance |" in head and lines[0].startswith("| ground_truth | 0.500 | - |")
    assert lines[2].endswith("| +0.100 ± 0.020 (3:1) | -0.050 ± 0.020 (3:1) | 0.50 |")


def test_bank_recall_counts_layers_whose_bank_shows_the_returning_subject(monkeypatch) -> None:
    eval_toy = load_eval_toy(monkeypatch)
    narrative = narrative_from_seed(split_seeds("test", 1)[0], 36)
    (segment,) = [s for s in narrative.segments if s.memory_subjects]
    (sid,) = segment.memory_subjects
    shown = [f for f in range(segment.start) if narrative.visible[pixel_frame(f) : pixel_frame(f + 1), sid].any()]
    hidden = [f for f in range(segment.start) if f not in shown]
    banks = [[hidden[0], shown[0]], [hidden[0]], [], [shown[-1]]]  # layers 0 and 3 hold the subject
    trace = {"chunks": [{"start_frame": 0, "bank": [[]] * 4}, {"start_frame": segment.start, "bank": banks}]}
    assert eval_toy.bank_recall(narrative, trace) == 0.5
    assert math.isnan(eval_toy.bank_recall(dataclasses.replace(narrative, segments=narrative.segments[:1]), trace))


def test_paired_identity_difference_counts_wins_and_skips_untested_narratives(monkeypatch) -> None:
    eval_toy = load_eval_toy(monkeypatch)
    key = "identity_consistency"
    mode = [{key: 1.0}, {key: 2 / 3}, {key: 0.0}, {key: float("nan")}]
    none = [{key: 0.0}, {key: 2 / 3}, {key: 1 / 3}, {key: 1.0}]
    result = eval_toy.paired_difference(mode, none, key)
    diffs = np.array([1.0, 0.0, -1 / 3])
    assert result["pairs"] == 3 and result["wins"] == 1 and result["losses"] == 1
    assert result["mean"] == pytest.approx(diffs.mean())
    assert result["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))


def test_eval_rejects_unknown_mode() -> None:
    proc = run_script("scripts/eval_toy.py", "--modes", "none,bogus", *RANDOM_WEIGHTS)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --modes")
    proc = run_script("scripts/eval_toy.py", "--split", "train", *RANDOM_WEIGHTS)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--split" in proc.stderr


def load_probe_teacher(monkeypatch):
    spec = importlib.util.spec_from_file_location("probe_teacher", ROOT / "scripts" / "probe_teacher.py")
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "probe_teacher", probe)
    spec.loader.exec_module(probe)
    return probe


def test_teacher_probe_scores_truth_perfectly_and_a_spliced_return_as_chance(monkeypatch) -> None:
    probe = load_probe_teacher(monkeypatch)
    oracle = Oracle()
    stories = [return_story_from_seed(seed, 21, 9) for seed in split_seeds("validation", 6)]
    truth = probe.score(oracle, stories, [s.frames for s in stories])
    assert truth["identity_consistency"] == 1.0 and truth["sighting_presence"] == truth["return_presence"] == 1.0
    spliced = probe.splice([s.frames for s in stories], stories)
    assert all(np.array_equal(v[: s.segments[-1].pixel_start], s.frames[: s.segments[-1].pixel_start])
               for v, s in zip(spliced, stories, strict=True))  # fmt: skip
    assert probe.score(oracle, stories, spliced)["identity_consistency"] < 0.5


class _PooledClip:
    """A stand-in VAE whose latent frame f is pixel frame ``pixel_frame(f)`` pooled 8x8."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = [pixel_frame(f) for f in range(1 + (video.shape[1] - 1) // 4)]
        return torch.stack([torch.nn.functional.avg_pool2d(video[:, f], 8) for f in frames], 1)


class _BlankText:
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 4, 8)


def test_sighting_reliance_is_one_for_a_teacher_blind_to_other_frames(monkeypatch) -> None:
    probe = load_probe_teacher(monkeypatch)
    stories = [return_story_from_seed(seed, 21, 9) for seed in split_seeds("validation", 3)]
    latents = _PooledClip().encode(torch.from_numpy(to_model_pixels(stories[0].frames))[None])[0]
    ablated = probe.without_sighting(latents, stories[0])
    changed = [f for f in range(21) if not torch.equal(ablated[f], latents[f])]
    assert changed == list(range(3, 9)) and torch.equal(ablated[3], latents[1])
    video = torch.from_numpy(to_model_pixels(stories[0].frames))
    recoloured = probe.recoloured_sighting(video, stories[0])
    moved = (recoloured != video).any(1)  # [T, H, W]: pixels whose colour changed
    changed_frames = moved.flatten(1).any(1).nonzero().flatten().tolist()
    assert changed_frames and pixel_frame(3) <= min(changed_frames) and max(changed_frames) < pixel_frame(9)
    assert torch.equal(recoloured[moved[:, None].expand_as(video)].sort().values,
                       video[moved[:, None].expand_as(video)].sort().values)  # same values, channels rolled

    def per_frame(xt, t, context):
        return 0.5 * xt

    def whole_clip(xt, t, context):
        return xt.mean(1, keepdim=True).expand_as(xt)

    blind = probe.sighting_reliance(per_frame, _BlankText(), _PooledClip(), stories, 5.0, 0)
    assert all(v == 1.0 for levels in blind.values() for v in levels.values())
    seeing = probe.sighting_reliance(whole_clip, _BlankText(), _PooledClip(), stories, 5.0, 0)
    assert all(v != 1.0 for levels in seeing.values() for v in levels.values())


def test_teacher_probe_prints_json_rows(tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    proc = run_script("scripts/probe_teacher.py", "--clips", "2", "--frames", "9", "--gap", "0", "--steps", "2",
                      "--sheet", str(sheet), "--json", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["rows"]) == {"teacher", "teacher_spliced", "vae_roundtrip"}
    assert all(0.0 <= v <= 1.0 for row in result["rows"].values() for v in row.values())
    assert result["rows"]["vae_roundtrip"]["adherence"] > result["rows"]["teacher"]["adherence"]
    assert result["sampler"]["steps"] == 2 and result["teacher_vs_spliced"]["wins"] <= 2
    # two stories, each true over the teacher's sample; the last frame of each of 3 chunks
    assert np.asarray(Image.open(sheet)).shape == (2 * 2 * 64, 3 * 64, 3)


def test_teacher_probe_reliance_only_skips_the_sampled_rows() -> None:
    proc = run_script("scripts/probe_teacher.py", "--clips", "2", "--reliance_only", "--json", *RANDOM_WEIGHTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["rows"] is None and result["teacher_vs_spliced"] is None
    assert set(result["sighting_reliance"]) == {"joint", "clean_context", "joint_recoloured",
                                                "clean_context_recoloured"}
    assert all(v > 0 for levels in result["sighting_reliance"].values() for v in levels.values())


def test_colour_probe_reads_a_returning_subject_from_its_true_latents_only(monkeypatch) -> None:
    probe = load_probe_teacher(monkeypatch)
    stories = [return_story_from_seed(seed, 24, 9) for seed in split_seeds("validation", 60)]
    video = torch.from_numpy(np.stack([to_model_pixels(s.frames) for s in stories]))
    latents = _PooledClip().encode(video)
    cells = probe.subject_coverage(video, (latents.shape[1], *latents.shape[3:]))
    assert torch.equal(cells > 0, probe.latent_subject_mask(video, (latents.shape[1], *latents.shape[3:])) > 0)
    cells[:, :21] = 0
    labels = torch.tensor([list(COLOURS).index(s.subjects[probe.returning_subject(s)[1]].colour) for s in stories])
    features = probe.return_features(latents, cells)
    truth = probe.nearest_colours(features[20:], labels[20:], features[:20])
    shuffled = probe.nearest_colours(features[20:], labels[20:], features[:20].roll(1, 0))
    assert (truth == labels[:20]).float().mean() >= 0.8 > (shuffled == labels[:20]).float().mean() + 0.4


def test_forced_past_probe_prints_json_rows() -> None:
    proc = run_script("scripts/probe_teacher.py", "--forced_past", "--clips", "2", "--reference", "24", "--frames",
                      "24", "--sampler", "ode", "--steps", "3", "--prompts", "switched", "--json",
                      *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)["forced_past"]
    assert set(result["rows"]) == {"vae_roundtrip", "true", "removed", "recoloured"}
    assert result["back"] == 21 and result["steps"] == 3 and result["memory"] == "full"
    assert all(len(result["rows"][name]["colour_by_step"]) == 3 for name in ("true", "removed", "recoloured"))
    assert all(0.0 <= row["colour"] <= 1.0 for row in result["rows"].values())
    assert result["true_vs_removed"]["pairs"] == 2


def test_own_past_probe_compares_the_memory_with_none(tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    proc = run_script("scripts/probe_teacher.py", "--own_past", "--memory", "nam", "--clips", "2", "--reference",
                      "24", "--frames", "24", "--sampler", "ode", "--steps", "2", "--guidance", "2", "--sheet",
                      str(sheet), "--json", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)["own_past"]
    assert list(result["rows"]) == ["none", "nam"] and result["sighting"] == list(range(3, 12))
    assert result["back"] == 21 and result["steps"] == 2 and result["guidance"] == 2.0
    probed = ("sighting_true_colour", "return_true_colour", "follows", "follows_chance", "sighting_drawn",
              "return_drawn", "adherence", "duplicate_rate", "identity_consistency")  # fmt: skip
    for row in result["rows"].values():
        assert all(0.0 <= row[key] <= 1.0 for key in probed)
        assert row["identity_above_chance"] == pytest.approx(row["identity_consistency"] - row["identity_chance"])
    # two stories, each true over its sample under none and under nam; the last frame of each of 8 chunks
    assert np.asarray(Image.open(sheet)).shape == (2 * 3 * 64, 8 * 64, 3)
    versus = result["follows_vs_none"]["nam"]
    assert versus["pairs"] == 2
    assert versus["mean"] == pytest.approx(result["rows"]["nam"]["follows"] - result["rows"]["none"]["follows"])


@pytest.mark.parametrize("args, field", [(["--clips", "1"], "--clips"), (["--frames", "12", "--gap", "9"], "--gap"),
                                         (["--steps", "0"], "--steps"),
                                         (["--reliance_only", "--gap", "0"], "--reliance_only"),
                                         (["--forced_past", "--gap", "0"], "--forced_past"),
                                         (["--forced_past", "--reference", "8"], "--reference"),
                                         (["--own_past", "--memory", "none"], "--own_past"),
                                         (["--own_past", "--forced_past"], "--own_past"),
                                         (["--forced_past", "--guidance", "2"], "--guidance"),
                                         (["--forced_past", "--sheet", "x.png"], "--sheet"),
                                         (["--sheet", "README.md"], "--sheet")])  # fmt: skip
def test_teacher_probe_rejects_bad_arguments_in_one_line(args: list[str], field: str) -> None:
    proc = run_script("scripts/probe_teacher.py", *args, *RANDOM_WEIGHTS)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and field in proc.stderr
