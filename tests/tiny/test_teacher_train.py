"""MemFlow-Tiny's teacher: flow matching on a latent cache, snapshots, and the toy stages' CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memflow.loading import random_vae as make_random_vae
from memflow.scheduler import FlowMatchScheduler
from memflow.weights import load_dit
from tiny.teacher_train import (
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
from tiny.train import main as train_toy
from tiny.world import (
    PROMPT_SEED_OFFSET,
    return_clip_from_seed,
    split_seeds,
    to_model_pixels,
)
from utils.errors import ConfigError, WeightsError

from ..conftest import refusal, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]




def test_teacher_trainer_steps_and_saved_model_loads(tmp_path: Path) -> None:
    overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 16, "text_len": 8}
    generator = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(4, 3, 16, 8, 8, generator=generator),
             "context": torch.randn(4, 8, 16, generator=generator), "uncond": torch.zeros(1, 8, 16)}  # fmt: skip
    trainer = TeacherTrainer(TeacherSettings(overrides=overrides, batch_size=2, warmup=1, steps=3), cache)
    losses = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3
    loaded = load_dit(trainer.save(tmp_path / "teacher"), "tiny", **overrides)
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
    assert mask[3:9].float().mean() < 0.4  # a subject covers about 16 of the 64 cells, not the frame


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


def test_prompts_follow_the_teacher_mix_given_on_the_command_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_script("scripts/train_toy.py", "prompts", "--count", "4", f"prompts_dir={tmp_path}",
                      "clip_latent_frames=21", "return_fraction=1.0", "return_gap=9")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["switch_first.txt", "switch_second.txt", "train.txt"]
    lines = (tmp_path / "train.txt").read_text().splitlines()
    seeds = split_seeds("train", 4, offset=PROMPT_SEED_OFFSET)
    assert lines == [return_clip_from_seed(seed, 21, 9).text for seed in seeds]
    assert "--count" in refusal(train_toy, ["prompts", "--count", "0", f"prompts_dir={tmp_path / 'new'}"], capsys)
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
                                        ("teacher", "model_overrides.text_dimm=384"),
                                        ("vae", "validation_narratives=-1"),
                                        ("vae", "validation_narrative_frames=9")])  # fmt: skip
def test_toy_stages_reject_bad_settings_and_write_nothing(tmp_path: Path, stage: str, bad: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cache = [] if stage == "vae" else [f"cache_path={tmp_path / 'cache.safetensors'}"]
    args = [stage, bad, f"output={tmp_path / 'out'}", *cache, f"metrics={tmp_path / 'metrics.jsonl'}"]
    assert bad.split("=")[0].split(".")[-1] in refusal(train_toy, args, capsys)
    assert list(tmp_path.iterdir()) == []
