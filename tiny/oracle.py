"""Measure a generated story-world video against its narrative, from the pixels alone.

Given a :class:`~tiny.world.Narrative` (its segments, expected subjects, stated attributes and
visibility - never its ground-truth frames) and generated frames ``uint8 [T, 64, 64, 3]``, the oracle

1. estimates each frame's background as a per-row colour profile (median over columns, then over a
   short window of frames of the same segment), marks pixels far from it as foreground and labels
   8-connected components in all frames at once;
2. describes every component: colour (majority vote of its interior pixels over the palette) and shape
   (nearest calibrated prototype of fill, rotational inertia, vertical centroid offset, centre fill and
   aspect ratio). Prototypes are calibrated by running this very detector on frames rendered by the
   world, so the oracle and the renderer cannot drift apart;
3. scores, all in [0, 1]:

   - ``identity_consistency``: a returning subject's colour and shape compared with its own
     earlier appearance in the SAME video (0 when either appearance is missing). A generator with no
     memory at all still scores by chance, the more so the more alike it draws every subject and the
     more reliably it draws one at all; :func:`chance_identity` measures that floor across videos;
   - ``background_consistency``: a returning scene's row-colour profile compared with its earlier
     appearance in the same video, zero unless at least half of both is recognisable background;
   - ``adherence``: share of attributes the prompts state (colour, shape, scene) that
     are detected;
   - ``duplicate_rate`` (lower is better): share of segments in which, in at least a quarter of the
     frames, more subjects are detected than the narrative has in view;
   - ``smoothness``: background steadiness between consecutive frames times the share of consecutive
     frames whose subjects move continuously (each within ``JUMP`` pixels of one in the previous frame).

NaN marks a score a narrative has no test for; :func:`aggregate` averages over the narratives that do.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tiny import world
from tiny.world import COLOURS, SCENES, SHAPES, Narrative, SegmentInfo

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background row profile that marks a foreground pixel
PALETTE_DISTANCE = 45.0  # RGB distance from a subject colour within which a pixel is left out of the background
BACKGROUND_WINDOW = 4  # frames either side pooled for a frame's background estimate
MIN_AREA = world.MIN_VISIBLE_AREA
MAX_AREA = 1400  # larger blobs (e.g. a whole noisy frame) are not subjects; a disc covers about 800 pixels
MAX_EXTENT = 40  # a subject spans 2 * world.HALF_EXTENT = 32 pixels
PRESENT = 0.5  # share of its visible frames in which a subject must be found to count as present
DUPLICATE_FRAMES = 0.25
JUMP = 6.0  # pixels per frame; the world never moves faster than world.MAX_SPEED = 3.5
FLICKER = 20.0  # mean absolute background change (0-255) per frame that scores zero steadiness
BACKGROUND_SCALE = 60.0  # mean row-profile distance that scores zero background consistency
MIN_BACKGROUND = 0.5  # share of the frame that must be background for a background to count
FEATURE_SCALES = np.array([0.08, 0.06, 0.04, 0.35, 0.1])  # fill, inertia, offset, centre fill, aspect

COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def neighbourhood(reduce: np.ufunc, frames: np.ndarray, fill: object) -> np.ndarray:
    """``reduce`` over each pixel's 3x3 neighbourhood in every frame of ``frames [T, H, W]``, ``fill`` off the edge."""
    h, w = frames.shape[1:]
    padded = np.pad(frames, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return functools.reduce(reduce, (padded[:, 1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)))  # fmt: skip


def background_rows(frames: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Per-frame background row profiles ``float32 [T, H, 3]``, pooled over frames of the same segment only.

    A row's profile is the median of its pixels that are neither near a subject colour nor beside one (an
    anti-aliased rim): a subject may cover half a row, which would pull a plain median onto it. Rows with no
    such pixel fall back to the plain median.
    """
    pixels = frames.astype(np.float32)
    near = (((pixels[..., None, :] - _PALETTE) ** 2).sum(-1) < PALETTE_DISTANCE**2).any(-1)
    near = neighbourhood(np.logical_or, near, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        profiles = np.nanmedian(np.where(near[..., None], np.nan, pixels), axis=2)
    profiles = np.where(np.isnan(profiles), np.median(pixels, axis=2), profiles)
    out = np.empty_like(profiles)
    for start, end in bounds:
        padded = np.pad(profiles[start:end], ((BACKGROUND_WINDOW, BACKGROUND_WINDOW), (0, 0), (0, 0)), mode="edge")
        windows = sliding_window_view(padded, 2 * BACKGROUND_WINDOW + 1, axis=0)
        out[start:end] = np.median(windows, axis=-1)
    return out


def segment_background(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background image ``[H, W, 3]`` of a segment: each pixel's mean over the frames where it is not
    foreground (NaN where it always is)."""
    clear = ~mask[..., None]
    count = clear.sum(axis=0)
    total = (frames.astype(np.float32) * clear).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def row_profiles(*images: np.ndarray) -> list[np.ndarray]:
    """Row colour profiles ``[H, 3]`` of background images, each over the pixels known in all of them,
    so that a textured row is summarised over the same columns; rows known nowhere are NaN."""
    known = np.logical_and.reduce([~np.isnan(image[..., 0]) for image in images])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [np.nanmedian(np.where(known[..., None], image, np.nan), axis=1) for image in images]


def foreground(frames: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``bool [T, H, W]``: pixels farther than ``FOREGROUND_DISTANCE`` from their row's background."""
    diff = frames.astype(np.float32) - rows[:, :, None, :]
    return np.einsum("thwc,thwc->thw", diff, diff) > FOREGROUND_DISTANCE**2


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of every frame at once: ``int64 [T, H, W]``, -1 off the mask, else a root index.

    Every pixel starts as its own root. Each round hooks every root to the smallest root seen in the
    3x3 neighbourhood of any of its pixels, then compresses paths so each pixel points at its root again;
    components merge at least pairwise per round, so even a frame full of noise takes a few dozen rounds.
    """
    t, h, w = mask.shape
    none = t * h * w
    flat_mask = mask.ravel()
    inside = np.flatnonzero(flat_mask)
    labels = np.where(flat_mask, np.arange(none), none)
    while True:
        smallest = neighbourhood(np.minimum, labels.reshape(t, h, w), none).ravel()
        updated = labels.copy()
        np.minimum.at(updated, labels[inside], smallest[inside])
        while True:
            jumped = updated[updated[inside]]
            if np.array_equal(jumped, updated[inside]):
                break
            updated[inside] = jumped
        if np.array_equal(updated, labels):
            return np.where(flat_mask, labels, -1).reshape(t, h, w)
        labels = updated


@dataclass(frozen=True)
class Components:
    """Connected components of a video, one entry per component (arrays of equal length)."""

    frame: np.ndarray
    area: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    extent: np.ndarray  # max(bounding-box width, height)
    border: np.ndarray  # touches the frame's edge
    colour: np.ndarray  # index into COLOURS
    features: np.ndarray  # [n, 5] shape descriptor
    valid: np.ndarray  # plausible as a subject (area and extent within bounds)


def describe(frames: np.ndarray, mask: np.ndarray) -> Components:
    """Label ``mask`` and describe every component of ``frames`` (see the module docstring)."""
    h, w = mask.shape[1:]
    labels = label_components(mask)
    roots = labels[mask]
    ids, comp = np.unique(roots, return_inverse=True)
    n = len(ids)
    fy, fx = np.nonzero(mask)[1:]
    fy, fx = fy.astype(np.float64), fx.astype(np.float64)
    area = np.bincount(comp, minlength=n).astype(np.float64)
    cx = np.bincount(comp, fx, n) / area
    cy = np.bincount(comp, fy, n) / area
    inertia = np.bincount(comp, (fx - cx[comp]) ** 2 + (fy - cy[comp]) ** 2 + 1.0 / 6.0, n)
    x_lo, y_lo = np.full(n, w), np.full(n, h)
    x_hi, y_hi = np.full(n, -1), np.full(n, -1)
    np.minimum.at(x_lo, comp, fx.astype(int))
    np.minimum.at(y_lo, comp, fy.astype(int))
    np.maximum.at(x_hi, comp, fx.astype(int))
    np.maximum.at(y_hi, comp, fy.astype(int))
    width, height = x_hi - x_lo + 1, y_hi - y_lo + 1
    frame = ids // (h * w)
    centre = np.zeros(n)
    my, mx = (y_lo + y_hi) // 2, (x_lo + x_hi) // 2
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = np.clip(my + dy, 0, h - 1), np.clip(mx + dx, 0, w - 1)
            centre += labels[frame, yy, xx] == ids
    features = np.stack([area / (width * height), 2.0 * np.pi * inertia / area**2,
                         (cy - (y_lo + y_hi) / 2.0) / height, centre / 9.0, width / height], axis=1)
    pixels = frames[mask].astype(np.float32)
    nearest = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    interior = mask & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    use = interior[mask]
    weight = np.where(np.bincount(comp, use, n)[comp] > 0, use, True).astype(np.float64)  # rims only if nothing else
    k = len(COLOURS)
    votes = np.bincount(comp * k + nearest, weight, n * k).reshape(n, k)
    extent = np.maximum(width, height)
    border = (x_lo == 0) | (y_lo == 0) | (x_hi == w - 1) | (y_hi == h - 1)
    valid = (area >= MIN_AREA) & (area <= MAX_AREA) & (extent <= MAX_EXTENT)
    return Components(frame, area, cx, cy, extent, border, votes.argmax(1), features, valid)


def detect(frames: np.ndarray, bounds: list[tuple[int, int]]) -> tuple[np.ndarray, Components]:
    """Foreground mask and described components of a video split into segments at ``bounds``."""
    mask = foreground(frames, background_rows(frames, bounds))
    return mask, describe(frames, mask)


@dataclass(frozen=True)
class Classes:
    """Per-component class indices into SHAPES."""

    shape: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """Shape prototypes (one per shape, index as in SHAPES) and scene row profiles, measured on rendered frames."""

    prototypes: np.ndarray  # [len(SHAPES), 5]
    scene_rows: np.ndarray  # [n_scenes, H, 3]

    def classify(self, comps: Components) -> Classes:
        """Nearest shape prototype of every component."""
        distance = (((comps.features[:, None] - self.prototypes[None]) / FEATURE_SCALES) ** 2).sum(-1)
        return Classes(shape=distance.argmin(1) if len(distance) else np.zeros(0, dtype=int))

    def scene(self, rows: np.ndarray) -> int:
        """Index of the scene whose row profile is nearest (rows that are NaN are ignored; 0 if all are)."""
        known = np.isfinite(rows[:, 0])
        if not known.any():
            return 0
        return int(np.linalg.norm(self.scene_rows[:, known] - rows[None, known], axis=-1).mean(1).argmin())


@functools.cache
def calibration() -> Calibration:
    """Run the detector on every shape, at a few sub-pixel positions and on every scene."""
    frames, truth = [], []
    offsets = ((32.0, 32.0), (30.3, 33.6), (33.7, 30.5), (31.5, 31.2))
    for index, shape in enumerate(SHAPES):
        subject = world.Subject(shape, "red")
        for x, y in offsets:
            actor = world.Actor(0, subject, world.Motion("still", x, y, x, y))
            frames += [world.render(world.Shot(scene, (actor,)), 1)[0] for scene in SCENES]
            truth += [index] * len(SCENES)
    frames = np.stack(frames)
    components = describe(frames, foreground(frames, background_rows(frames, [(i, i + 1) for i in range(len(frames))])))
    largest = np.array([np.flatnonzero(components.frame == i)[components.area[components.frame == i].argmax()]
                        for i in range(len(frames))])
    features, truth = components.features[largest], np.array(truth)
    prototypes = np.stack([features[truth == index].mean(0) for index in range(len(SHAPES))])
    scene_rows = np.stack([np.median(world.scene_image(scene), axis=1) for scene in SCENES])
    return Calibration(prototypes, scene_rows)


@dataclass(frozen=True)
class Observation:
    """What the detector saw of one subject over a set of frames; None where it could not tell."""

    presence: float
    colour: str | None
    shape: str | None

    def attribute(self, name: str) -> str | None:
        return getattr(self, name)


def _mode(values: np.ndarray, names: tuple[str, ...]) -> str | None:
    return names[Counter(values.tolist()).most_common(1)[0][0]] if len(values) else None


def identity_similarity(now: Observation, before: Observation) -> float:
    """Share of colour and shape that agree (ignoring those unknown in both); 0 if either is missing."""
    if now.presence < PRESENT or before.presence < PRESENT:
        return 0.0
    pairs = [(now.attribute(a), before.attribute(a)) for a in world.ATTRIBUTES]
    pairs = [(a, b) for a, b in pairs if a is not None or b is not None]
    return float(np.mean([a == b for a, b in pairs])) if pairs else 0.0


class Oracle:
    """Scores generated videos of narratives; see the module docstring for the measures."""

    def __init__(self) -> None:
        self.calibration = calibration()

    def score(self, narrative: Narrative, frames: np.ndarray) -> dict[str, float]:
        """The five measures (NaN where the narrative has no such test) and how many tests each used."""
        return self.evaluate(narrative, frames)["metrics"]

    def evaluate(self, narrative: Narrative, frames: np.ndarray) -> dict:
        """``{"metrics": {...}, "segments": [per-segment observations], "identity_pairs": [(now, before)]}``: the
        observations each identity test compared, for :func:`chance_identity`."""
        frames = np.asarray(frames)
        if frames.shape != narrative.frames.shape or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape {narrative.frames.shape}, got {frames.dtype} "
                             f"{frames.shape}")
        bounds = [(s.pixel_start, s.pixel_end) for s in narrative.segments]
        mask, comps = detect(frames, bounds)
        classes = self.calibration.classify(comps)
        assigned = self._assign(narrative, comps, classes)
        observations = [{sid: self._observe(narrative, [segment], sid, assigned, comps, classes)
                         for sid in segment.subjects} for segment in narrative.segments]
        pairs = []
        for index, segment in enumerate(narrative.segments):
            for sid in segment.returning_subjects:
                earlier = [s for s in narrative.segments[:index] if sid in s.subjects]
                pairs.append((observations[index][sid], self._observe(narrative, earlier, sid, assigned, comps,
                                                                      classes)))
        identity = [identity_similarity(now, before) for now, before in pairs]
        backgrounds = [segment_background(frames[s.pixel_start : s.pixel_end], mask[s.pixel_start : s.pixel_end])
                       for s in narrative.segments]
        clean = [1.0 - mask[s.pixel_start : s.pixel_end].mean() for s in narrative.segments]
        background = []
        for index, segment in enumerate(narrative.segments):
            if segment.returning_background:
                ref = max(i for i in range(index) if narrative.segments[i].scene == segment.scene)
                now, before = row_profiles(backgrounds[index], backgrounds[ref])
                gaps = np.linalg.norm(now - before, axis=-1)
                distance = np.nanmean(gaps) if np.isfinite(gaps).any() else np.inf
                usable = min(1.0, clean[index] / MIN_BACKGROUND) * min(1.0, clean[ref] / MIN_BACKGROUND)
                background.append(max(0.0, 1.0 - distance / BACKGROUND_SCALE) * usable)
        checks = []
        seen_scenes = [SCENES[self.calibration.scene(row_profiles(b)[0])] for b in backgrounds]
        for index, segment in enumerate(narrative.segments):
            for sid, names in segment.stated.items():
                checks += [observations[index][sid].attribute(a) == segment.subjects[sid].attribute(a) for a in names]
            if segment.stated_background:
                checks.append(seen_scenes[index] == segment.scene and clean[index] >= MIN_BACKGROUND)
        metrics = {
            "identity_consistency": _mean(identity),
            "background_consistency": _mean(background),
            "adherence": _mean(checks),
            "duplicate_rate": self._duplicates(narrative, comps),
            "smoothness": self._smoothness(frames, mask, comps, bounds),
            "identity_tests": float(len(identity)),
            "background_tests": float(len(background)),
        }
        segments = [
            {"start": s.start, "end": s.end, "scene_seen": seen_scenes[i], "background_share": float(clean[i]),
             "subjects": {str(sid): vars(obs) for sid, obs in observations[i].items()}}
            for i, s in enumerate(narrative.segments)
        ]
        return {"metrics": metrics, "segments": segments, "identity_pairs": pairs}

    @staticmethod
    def _assign(narrative: Narrative, comps: Components, classes: Classes) -> dict[tuple[int, int], int]:
        """(frame, subject id) -> component. Each frame's expected subjects take its largest valid components;
        when several subjects are in view, each takes the one agreeing best with its colour and shape."""
        assigned: dict[tuple[int, int], int] = {}
        order = np.lexsort((-comps.area, comps.frame))
        candidates = order[comps.valid[order]]
        starts = np.searchsorted(comps.frame[candidates], np.arange(narrative.frames.shape[0] + 1))
        for segment in narrative.segments:
            for t in range(segment.pixel_start, segment.pixel_end):
                expected = [sid for sid in segment.subjects if narrative.visible[t, sid]]
                found = list(candidates[starts[t] : starts[t + 1]][: len(expected)])
                for sid in expected[: len(found)]:
                    truth = segment.subjects[sid]
                    best = max(found, key=lambda c, truth=truth: (COLOUR_NAMES[comps.colour[c]] == truth.colour)
                               + (SHAPES[classes.shape[c]] == truth.shape))
                    assigned[(t, sid)] = best
                    found.remove(best)
        return assigned

    @staticmethod
    def _observe(narrative: Narrative, segments: list[SegmentInfo], sid: int, assigned: dict[tuple[int, int], int],
                 comps: Components, classes: Classes) -> Observation:
        """Majority classes of a subject over the frames of ``segments`` in which it should be visible."""
        frames = [t for s in segments for t in range(s.pixel_start, s.pixel_end) if narrative.visible[t, sid]]
        found = np.array([assigned[(t, sid)] for t in frames if (t, sid) in assigned], dtype=int)
        whole = found[~comps.border[found]]
        return Observation(
            presence=len(found) / len(frames) if frames else 0.0,
            colour=_mode(comps.colour[found], COLOUR_NAMES),
            shape=_mode(classes.shape[whole], SHAPES),
        )

    @staticmethod
    def _duplicates(narrative: Narrative, comps: Components) -> float:
        detected = np.bincount(comps.frame[comps.valid], minlength=narrative.frames.shape[0])
        over = detected > narrative.visible.sum(1)
        flagged = [over[s.pixel_start : s.pixel_end].mean() >= DUPLICATE_FRAMES for s in narrative.segments]
        return float(np.mean(flagged))

    @staticmethod
    def _smoothness(frames: np.ndarray, mask: np.ndarray, comps: Components, bounds: list[tuple[int, int]]) -> float:
        pairs = np.concatenate([np.arange(start, end - 1) for start, end in bounds])
        steady_pixels = ~mask[pairs] & ~mask[pairs + 1]
        change = np.abs(frames[pairs + 1].astype(np.float32) - frames[pairs].astype(np.float32)).mean(-1)
        share = steady_pixels.mean((1, 2))
        flicker = (change * steady_pixels).sum((1, 2)) / np.maximum(steady_pixels.sum((1, 2)), 1)
        steadiness = np.where(share >= MIN_BACKGROUND, 1.0 - np.minimum(1.0, flicker / FLICKER), 0.0)
        t = frames.shape[0]
        valid = np.flatnonzero(comps.valid)
        count = np.bincount(comps.frame[valid], minlength=t)
        slots = np.full((t, max(1, count.max(initial=0)), 2), np.nan)
        rank = np.arange(len(valid)) - np.searchsorted(comps.frame[valid], comps.frame[valid])
        slots[comps.frame[valid], rank] = np.stack([comps.cx[valid], comps.cy[valid]], axis=1)
        both = (count[pairs] > 0) & (count[pairs + 1] > 0)
        now, before = slots[pairs + 1][both], slots[pairs][both]
        gaps = np.linalg.norm(now[:, :, None] - before[:, None], axis=-1)
        nearest = np.nanmin(np.where(np.isnan(gaps), np.inf, gaps), axis=2)
        moved = np.where(np.isnan(now[..., 0]), 0.0, nearest)
        continuous = (count[pairs + 1][both] == count[pairs][both]) & (moved.max(1) <= JUMP)
        motion = continuous.mean() if len(continuous) else 1.0
        return float(steadiness.mean() * motion)


def chance_identity(pairs: Sequence[Sequence[tuple[Observation, Observation]]]) -> list[float]:
    """Per video, the identity its returning subjects score against the earlier subjects of every OTHER video
    (``pairs[i]``: video i's (now, before) identity tests, all from one generator): what that generator reaches
    with no memory of the video at hand. NaN for a video without a test, or when no other video has one."""
    chance = []
    for i, tests in enumerate(pairs):
        others = [before for j, other in enumerate(pairs) if j != i for _, before in other]
        chance.append(_mean([identity_similarity(now, before) for now, _ in tests for before in others])
                      if tests and others else float("nan"))  # fmt: skip
    return chance


def add_chance(scores: list[dict], pairs: Sequence[Sequence[tuple[Observation, Observation]]]) -> None:
    """Give each video's scores its ``identity_chance`` (:func:`chance_identity`, over the other videos) and
    ``identity_above_chance``: identity minus that floor, the part only this video's own earlier frames (or a
    prompt shared by its sighting and return) explain."""
    for score, chance in zip(scores, chance_identity(pairs), strict=True):
        score["identity_chance"] = chance
        score["identity_above_chance"] = score["identity_consistency"] - chance


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each measure over the narratives that have it; test counts are summed."""
    out: dict[str, float] = {"narratives": float(len(scores))}
    for key in scores[0] if scores else ():
        values = np.array([s[key] for s in scores], dtype=np.float64)
        if key.endswith("_tests"):
            out[key] = float(values.sum())
        else:
            out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def paired_difference(scores: list[dict], baseline: list[dict], key: str) -> dict[str, float]:
    """``key`` of each score minus the baseline's on the same narrative (same prompts and noise): the mean
    difference over the pairs where both are tested, its standard error, and how many pairs each side wins."""
    pairs = np.array([(a[key], b[key]) for a, b in zip(scores, baseline, strict=True)], dtype=np.float64)
    tested = pairs[np.isfinite(pairs).all(axis=1)]
    diff = tested[:, 0] - tested[:, 1]
    if len(diff) == 0:
        return {"mean": float("nan"), "se": float("nan"), "wins": 0.0, "losses": 0.0, "pairs": 0.0}
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"mean": float(diff.mean()), "se": se, "wins": float((diff > 0).sum()), "losses": float((diff < 0).sum()),
            "pairs": float(len(diff))}  # fmt: skip
