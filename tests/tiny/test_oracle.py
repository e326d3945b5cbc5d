"""The oracle scores ground-truth story videos near-perfectly and each kind of corruption poorly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiny import oracle, world
from tiny.oracle import Oracle, aggregate
from tiny.world import COLOURS, SCENES, SHAPES, Actor, Motion, Narrative, Shot, Subject

LENGTHS = (30, 36, 42, 48)


@pytest.fixture(scope="module")
def narratives() -> list[Narrative]:
    return [world.narrative_from_seed(seed, LENGTHS[i % 4]) for i, seed in enumerate(world.split_seeds("test", 20))]


@pytest.fixture(scope="module")
def judge() -> Oracle:
    return Oracle()


@pytest.fixture(scope="module")
def clean(judge, narratives) -> dict[str, float]:
    return aggregate([judge.score(n, n.frames) for n in narratives])


def rerender(narrative: Narrative, changes: dict[int, Shot]) -> np.ndarray:
    """The narrative's video with the shots of some segments replaced."""
    frames = narrative.frames.copy()
    for index, shot in changes.items():
        segment = narrative.segments[index]
        frames[segment.pixel_start : segment.pixel_end] = world.render(shot, segment.pixel_end - segment.pixel_start)
    return frames


def with_returning_subject(narrative: Narrative, change) -> np.ndarray:
    """Re-render every return segment with ``change(subject)`` in place of the returning subject."""
    changes = {}
    for index, segment in enumerate(narrative.segments):
        if segment.returning_subjects:
            shot = narrative.shots[index]
            actors = tuple(replace(a, subject=change(a.subject)) if a.subject_id in segment.returning_subjects else a
                           for a in shot.actors)
            changes[index] = replace(shot, actors=actors)
    return rerender(narrative, changes)


def other(options: tuple[str, ...], value: str) -> str:
    return options[(options.index(value) + 1) % len(options)]


def scores(judge: Oracle, narratives: list[Narrative], corrupt) -> dict[str, float]:
    return aggregate([judge.score(n, corrupt(n)) for n in narratives])


def test_ground_truth_scores_near_perfectly(clean, narratives):
    result = clean
    assert result["identity_tests"] == len(narratives)  # every narrative has a returning-subject test
    assert result["background_tests"] > 0
    assert result["identity_consistency"] >= 0.95
    assert result["background_consistency"] >= 0.95
    assert result["adherence"] >= 0.95
    assert result["duplicate_rate"] <= 0.02
    assert result["smoothness"] >= 0.95


@pytest.mark.parametrize(
    "change, ceiling",
    [
        (lambda s: replace(s, colour=other(tuple(COLOURS), s.colour)), 0.7),
        (lambda s: replace(s, shape=other(SHAPES, s.shape)), 0.7),
        (lambda s: replace(s, colour=other(tuple(COLOURS), s.colour), shape=other(SHAPES, s.shape)), 0.1),
        (None, 0.0),  # the returning subject never comes back
    ],
    ids=["recoloured", "reshaped", "replaced", "missing"],
)
def test_changed_returning_subject_loses_identity(judge, narratives, change, ceiling):
    if change is None:
        def corrupt(n):
            return rerender(n, {i: Shot(s.scene) for i, s in enumerate(n.segments) if s.returning_subjects})
    else:
        def corrupt(n):
            return with_returning_subject(n, change)
    assert scores(judge, narratives[:10], corrupt)["identity_consistency"] <= ceiling


def test_swapped_returning_background_loses_background_consistency(judge, narratives, clean):
    def corrupt(n):
        return rerender(n, {i: replace(n.shots[i], scene=other(SCENES, s.scene))
                            for i, s in enumerate(n.segments) if s.returning_background})

    swapped = scores(judge, narratives, corrupt)
    assert swapped["background_consistency"] <= 0.2
    assert swapped["adherence"] < clean["adherence"]  # stated backgrounds of the swapped segments now fail


def test_pasted_copy_is_a_duplicate(judge, narratives):
    """The returning subject held in one corner: no duplicate; a copy of it added in the opposite corner (two
    subjects this large only fit one frame apart diagonally): its segments duplicate."""
    low, high = world.LOW, world.HIGH
    for narrative in narratives[:8]:
        moved, pasted = {}, {}
        for i, segment in enumerate(narrative.segments):
            if segment.returning_subjects:
                actor = narrative.shots[i].actors[0]
                held = replace(actor, motion=Motion("still", low, low, low, low))
                copy = Actor(99, actor.subject, Motion("still", high, high, high, high))
                moved[i] = replace(narrative.shots[i], actors=(held,))
                pasted[i] = replace(narrative.shots[i], actors=(held, copy))
        assert judge.score(narrative, rerender(narrative, moved))["duplicate_rate"] == 0.0
        assert judge.score(narrative, rerender(narrative, pasted))["duplicate_rate"] >= 1 / len(narrative.segments)


def test_shuffled_frames_are_not_smooth(judge, narratives):
    rng = np.random.default_rng(0)
    result = scores(judge, narratives[:8], lambda n: n.frames[rng.permutation(len(n.frames))])
    assert result["smoothness"] <= 0.3


def test_noise_scores_low_everywhere(judge, narratives):
    rng = np.random.default_rng(0)
    result = scores(judge, narratives[:5], lambda n: rng.integers(0, 256, n.frames.shape, dtype=np.uint8))
    for key in ("identity_consistency", "background_consistency", "adherence", "smoothness"):
        assert result[key] <= 0.1, key


def test_classifies_every_rendered_subject(judge):
    """Colour and shape of single subjects at random positions on every scene."""
    rng = np.random.default_rng(1)
    frames, truth = [], []
    for index in range(240):
        subject = world.random_subject(rng)
        x, y = rng.uniform(world.LOW, world.HIGH, 2)
        shot = Shot(SCENES[index % len(SCENES)], (Actor(0, subject, Motion("still", x, y, x, y)),))
        frames.append(world.render(shot, 1)[0])
        truth.append(subject)
    frames = np.stack(frames)
    _, comps = oracle.detect(frames, [(i, i + 1) for i in range(len(frames))])
    assert np.array_equal(np.bincount(comps.frame[comps.valid], minlength=len(frames)), np.ones(len(frames)))
    classes = judge.calibration.classify(comps)
    order = np.argsort(comps.frame[comps.valid])
    valid = np.flatnonzero(comps.valid)[order]
    seen = [Subject(SHAPES[classes.shape[i]], oracle.COLOUR_NAMES[comps.colour[i]]) for i in valid]
    assert np.mean([a == b for a, b in zip(seen, truth, strict=True)]) >= 0.98


def test_labels_components_like_a_flood_fill():
    rng = np.random.default_rng(2)
    mask = rng.random((3, 20, 20)) < 0.45
    labels = oracle.label_components(mask)
    for t in range(mask.shape[0]):
        expected = np.full(mask.shape[1:], -1)
        next_label = 0
        for y, x in zip(*np.nonzero(mask[t]), strict=True):
            if expected[y, x] >= 0:
                continue
            stack = [(y, x)]
            expected[y, x] = next_label
            while stack:
                cy, cx = stack.pop()
                for ny in range(max(cy - 1, 0), min(cy + 2, mask.shape[1])):
                    for nx in range(max(cx - 1, 0), min(cx + 2, mask.shape[2])):
                        if mask[t, ny, nx] and expected[ny, nx] < 0:
                            expected[ny, nx] = next_label
                            stack.append((ny, nx))
            next_label += 1
        got = labels[t]
        assert np.array_equal(got < 0, ~mask[t])
        pairs = {(int(a), int(b)) for a, b in zip(got[mask[t]], expected[mask[t]], strict=True)}
        assert len(pairs) == next_label == len({a for a, _ in pairs})  # a one-to-one relabelling


def test_rejects_frames_of_the_wrong_shape(judge, narratives):
    with pytest.raises(ValueError, match="expected uint8 frames"):
        judge.score(narratives[0], narratives[0].frames[:-1])
    with pytest.raises(ValueError, match="expected uint8 frames"):
        judge.score(narratives[0], narratives[0].frames.astype(np.float32))


def test_aggregate_skips_missing_tests():
    result = aggregate([
        {"identity_consistency": 1.0, "background_consistency": float("nan"), "identity_tests": 1.0},
        {"identity_consistency": 0.5, "background_consistency": 0.8, "identity_tests": 2.0},
    ])
    assert result == {"narratives": 2.0, "identity_consistency": 0.75, "background_consistency": 0.8,
                      "identity_tests": 3.0}


def test_chance_identity_is_the_floor_without_memory(judge, narratives):
    """Ground truth draws each story its own subject: far above chance. A generator that draws one subject for
    every story matches it perfectly everywhere, and chance says so: nothing above it."""
    reports = [judge.evaluate(n, n.frames) for n in narratives]
    pairs = [r["identity_pairs"] for r in reports]
    assert all(len(p) == r["metrics"]["identity_tests"] for p, r in zip(pairs, reports, strict=True))
    chance = oracle.chance_identity(pairs)
    identity = [r["metrics"]["identity_consistency"] for r in reports]
    assert np.nanmean(identity) == 1.0 and 0.05 < np.nanmean(chance) < 0.6
    one = reports[0]["identity_pairs"][0][0]
    assert oracle.chance_identity([[(one, one)]] * 3) == [1.0, 1.0, 1.0]
    missing = replace(one, presence=0.0)  # a return the generator never drew matches nothing
    first, second, untested = oracle.chance_identity([[(one, one)], [(missing, one)], []])
    assert (first, second) == (1.0, 0.0) and np.isnan(untested)
