"""MemFlow-Tiny's evaluation: narratives per memory mode scored by the oracle."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

import tiny.evaluate as eval_toy
from tiny.world import (
    narrative_from_seed,
    pixel_frame,
    return_clip_from_seed,
    return_story_from_seed,
    split_seeds,
)

from ..conftest import refusal, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]




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


def test_eval_scores_return_stories_from_their_joined_prompt(capsys: pytest.CaptureFixture[str]) -> None:
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
    seed = split_seeds("validation", 1)[0]
    story = return_story_from_seed(seed, 21, 9)
    assert eval_toy.prompt_schedule(story, "joined") == {0: return_clip_from_seed(seed, 21, 9).text}
    assert eval_toy.prompt_schedule(story, "switched") == {s.start: s.prompt for s in story.segments}
    narrative = narrative_from_seed(split_seeds("test", 1)[0], 36)
    assert eval_toy.prompt_schedule(narrative, "switched") == {s.start: s.prompt for s in narrative.segments}
    bad = refusal(eval_toy.main, ["--stories", "returns", "--frames", "12", *RANDOM_WEIGHTS], capsys)
    assert "--frames 12 --gap 9" in bad
    assert "--gap 12" in refusal(eval_toy.main, ["--gap", "12", *RANDOM_WEIGHTS], capsys)  # narratives set their cuts


def test_eval_table_gives_every_row_a_cell_per_column() -> None:
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


def test_bank_recall_counts_layers_whose_bank_shows_the_returning_subject() -> None:
    narrative = narrative_from_seed(split_seeds("test", 1)[0], 36)
    (segment,) = [s for s in narrative.segments if s.memory_subjects]
    (sid,) = segment.memory_subjects
    shown = [f for f in range(segment.start) if narrative.visible[pixel_frame(f) : pixel_frame(f + 1), sid].any()]
    hidden = [f for f in range(segment.start) if f not in shown]
    banks = [[hidden[0], shown[0]], [hidden[0]], [], [shown[-1]]]  # layers 0 and 3 hold the subject
    trace = {"chunks": [{"start_frame": 0, "bank": [[]] * 4}, {"start_frame": segment.start, "bank": banks}]}
    assert eval_toy.bank_recall(narrative, trace) == 0.5
    assert math.isnan(eval_toy.bank_recall(dataclasses.replace(narrative, segments=narrative.segments[:1]), trace))


def test_paired_identity_difference_counts_wins_and_skips_untested_narratives() -> None:
    key = "identity_consistency"
    mode = [{key: 1.0}, {key: 2 / 3}, {key: 0.0}, {key: float("nan")}]
    none = [{key: 0.0}, {key: 2 / 3}, {key: 1 / 3}, {key: 1.0}]
    result = eval_toy.paired_difference(mode, none, key)
    diffs = np.array([1.0, 0.0, -1 / 3])
    assert result["pairs"] == 3 and result["wins"] == 1 and result["losses"] == 1
    assert result["mean"] == pytest.approx(diffs.mean())
    assert result["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))


def test_eval_rejects_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert refusal(eval_toy.main, ["--modes", "none,bogus", *RANDOM_WEIGHTS], capsys).startswith("error: --modes")
    assert "--split" in refusal(eval_toy.main, ["--split", "train", *RANDOM_WEIGHTS], capsys)
