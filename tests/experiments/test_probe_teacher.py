"""experiments.probe_teacher: the teacher's and the generator's return of a subject."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import experiments.probe_teacher as probe
from tiny.oracle import Oracle
from tiny.world import (
    COLOURS,
    named_clip_from_seed,
    pixel_frame,
    return_story_from_seed,
    split_seeds,
    to_model_pixels,
)

from ..conftest import refusal, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]
STEPS = [1000.0, 750.0, 500.0, 250.0]  # the generator's few-step list in the toy config




def test_teacher_probe_scores_truth_perfectly_and_a_spliced_return_as_chance() -> None:
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


def test_sighting_reliance_is_one_for_a_teacher_blind_to_other_frames() -> None:
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
    proc = run_script("-m", "experiments.probe_teacher", "--clips", "2", "--frames", "9", "--gap", "0", "--steps", "2",
                      "--sheet", str(sheet), "--json", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["rows"]) == {"teacher", "teacher_spliced", "vae_roundtrip"}
    assert all(0.0 <= v <= 1.0 for row in result["rows"].values() for v in row.values())
    assert result["sampler"]["steps"] == 2 and result["teacher_vs_spliced"]["wins"] <= 2
    # two stories, each true over the teacher's sample; the last frame of each of 3 chunks
    assert np.asarray(Image.open(sheet)).shape == (2 * 2 * 64, 3 * 64, 3)


def test_named_clips_state_colour_and_shape_and_their_truth_scores_perfectly() -> None:
    oracle = Oracle()
    stories = [named_clip_from_seed(seed, 9) for seed in split_seeds("validation", 6)]
    assert all(len(s.segments) == 1 and s.segments[0].stated == {0: ("colour", "shape")} for s in stories)
    assert all(s.visible.all() for s in stories)  # in view throughout, as the teacher's clips have it: none enters
    truth = probe.mean_row([probe.named_scores(oracle.evaluate(s, s.frames)) for s in stories])
    assert truth == {"presence": 1.0, "adherence": 1.0, "duplicate_rate": 0.0}
    blank = [np.broadcast_to(s.frames[:, :1, :1], s.frames.shape) for s in stories]  # every pixel the corner's
    assert probe.mean_row([probe.named_scores(oracle.evaluate(s, v)) for s, v in zip(stories, blank, strict=True)]
                          )["presence"] == 0.0  # fmt: skip


def test_named_probe_prints_teacher_and_roundtrip_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert probe.main(["--stories", "named", "--clips", "2", "--steps", "2", "--json", *RANDOM_WEIGHTS]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["rows"]) == {"teacher", "vae_roundtrip"} and result["latent_frames"] == 9
    assert all(0.0 <= v <= 1.0 for row in result["rows"].values() for v in row.values())


def test_teacher_probe_reliance_only_skips_the_sampled_rows() -> None:
    proc = run_script("-m", "experiments.probe_teacher", "--clips", "2", "--reliance_only", "--json", *RANDOM_WEIGHTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["rows"] is None and result["teacher_vs_spliced"] is None
    assert set(result["sighting_reliance"]) == {"joint", "clean_context", "joint_recoloured",
                                                "clean_context_recoloured"}
    assert all(v > 0 for levels in result["sighting_reliance"].values() for v in levels.values())


def test_colour_probe_reads_a_returning_subject_from_its_true_latents_only() -> None:
    stories = [return_story_from_seed(seed, 24, 9) for seed in split_seeds("validation", 120)]
    video = torch.from_numpy(np.stack([to_model_pixels(s.frames) for s in stories]))
    latents = _PooledClip().encode(video)
    cells = probe.subject_coverage(video, (latents.shape[1], *latents.shape[3:]))
    assert torch.equal(cells > 0, probe.latent_subject_mask(video, (latents.shape[1], *latents.shape[3:])) > 0)
    cells[:, :21] = 0
    labels = torch.tensor([list(COLOURS).index(s.subjects[probe.returning_subject(s)[1]].colour) for s in stories])
    features = probe.return_features(latents, cells)
    truth = probe.nearest_colours(features[40:], labels[40:], features[:40])  # 40 queries, 80 references
    shuffled = probe.nearest_colours(features[40:], labels[40:], features[:40].roll(1, 0))
    assert (truth == labels[:40]).float().mean() >= 0.8 > (shuffled == labels[:40]).float().mean() + 0.4


def test_forced_past_probe_prints_json_rows() -> None:
    proc = run_script("-m", "experiments.probe_teacher", "--forced_past", "--clips", "2", "--reference", "24",
                      "--frames", "24", "--prompts", "switched", "--json", *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)["forced_past"]
    assert set(result["rows"]) == {"vae_roundtrip", "true", "removed", "recoloured"}
    assert result["back"] == 21 and result["steps"] == STEPS and result["memory"] == "full"
    assert all(len(result["rows"][name]["colour_by_step"]) == len(STEPS) for name in ("true", "removed", "recoloured"))
    assert all(0.0 <= row["colour"] <= 1.0 for row in result["rows"].values())
    assert result["true_vs_removed"]["pairs"] == 2


def test_own_past_probe_compares_the_memory_with_none(tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    proc = run_script("-m", "experiments.probe_teacher", "--own_past", "--memory", "nam", "--clips", "2",
                      "--reference", "24", "--frames", "24", "--sheet", str(sheet), "--json",
                      *RANDOM_WEIGHTS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)["own_past"]
    assert list(result["rows"]) == ["none", "nam"] and result["sighting"] == list(range(3, 12))
    assert result["back"] == 21 and result["steps"] == STEPS
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
                                         (["--sheet", "README.md"], "--sheet"),
                                         (["--stories", "named", "--gap", "9"], "--gap")])  # fmt: skip
def test_teacher_probe_rejects_bad_arguments_in_one_line(args: list[str], field: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The command line in this process (the JSON tests above run it as a script)."""
    assert field in refusal(probe.main, [*args, *RANDOM_WEIGHTS], capsys)
