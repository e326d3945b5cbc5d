"""A procedural, seeded story world of shapes and scenes in which memory can be measured exactly.

Everything is 64x64 RGB at 16 fps. A video of ``n`` latent frames has ``1 + 4 (n - 1)`` pixel frames
(latent frame 0 is pixel frame 0; latent frame ``k >= 1`` covers pixel frames ``4k-3 .. 4k``).
Frames are ``uint8`` arrays laid out ``[T, 64, 64, 3]``; :func:`to_model_pixels` turns them into the
project's VAE layout ``[T, 3, H, W]`` float in ``[-1, 1]``.

A subject's identity is its colour and shape; a scene is a static background. Subjects are large
(half extent ``HALF_EXTENT`` = 16 px, i.e. 4x4 latent cells at the VAE's 8x stride) and the four shapes
differ in where their mass sits (disc, horizontal bar, vertical tower, ring), so that a change of
identity moves the latents far more than a small displacement (``tiny.vae_train.attribute_contrast``).
Subjects that large do not fit two to a frame, so a scene holds one subject at a time and narratives
bring new subjects in sequence. Subjects follow smooth motions (eased positions as continuous functions
of time). Three sampled units:

- :class:`Clip` - one prompt, one scene, 0-1 subject, one action (teacher / VAE training); or,
  from :func:`sample_return_clip`, one prompt over a subject named by none of its attributes, a cut away
  and its return (teacher training: a returning subject's identity is fixed only by earlier frames);
- :class:`Narrative` with two segments - :func:`sample_switch_clip` (prompt-switch training);
- :class:`Narrative` with 4-6 segments - :func:`sample_narrative`, the evaluation unit. Every narrative
  contains a subject that is introduced after the first chunk, disappears for at least 12 latent
  frames and is then referred to WITHOUT its attributes, so only memory can restore its identity;
  plans also exercise returning backgrounds and a new subject that must not duplicate an old one.

A returning subject (in narratives and return clips alike) comes back where it was last seen: a return at a
random place made its position appear in the noisy latents as early as its colour, which left a teacher
nothing to gain from its earlier frames (docs/memflow_tiny_log.md, ``sighting_reliance``).

All randomness comes from one ``np.random.Generator``; seeds of the train / validation / test splits
are disjoint (:func:`split_seeds`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

SIZE = 64
FPS = 16
CHUNK_FRAMES = 3
MIN_VISIBLE_AREA = 20  # pixels of coverage >= 0.5 for a subject to count as visible in a frame
MAX_SPEED = 3.5  # pixels per frame, the fastest any subject moves (a centred subject leaves in 2 chunks)
MIN_BOUNCE = 5.0  # px: the lowest bounce that reads as one
MIN_TRAVEL = 8.0  # px: the shortest move that reads as one
MEMORY_GAP = 12  # latent frames a subject or scene must be absent to leave the local window

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 30),
    "green": (30, 215, 60),
    "blue": (35, 75, 235),
    "purple": (150, 55, 215),
}
SHAPES = ("circle", "bar", "tower", "ring")
HALF_EXTENT = 16.0  # pixels: every subject's half width or half height, whichever is larger
BAR_THICKNESS = 0.45  # a bar's (tower's) half height (half width) as a share of its half extent
RING_MIDDLE = 0.725  # a ring's band runs from 0.45 to 1.0 of its half extent

# top colour, bottom colour of each scene's vertical gradient
SCENE_GRADIENTS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "meadow": ((150, 205, 110), (85, 155, 65)),
    "desert": ((240, 215, 160), (205, 165, 105)),
    "ocean": ((140, 195, 235), (55, 115, 185)),
    "snow": ((215, 225, 240), (248, 250, 252)),
    "street": ((170, 170, 175), (125, 125, 130)),
    "dusk": ((205, 185, 235), (160, 140, 205)),
}
SCENES = tuple(SCENE_GRADIENTS)
EDGES = ("left", "right", "top", "bottom")

SPLITS: dict[str, range] = {
    "train": range(0, 900_000),
    "validation": range(900_000, 1_000_000),
    "test": range(1_000_000, 2_000_000),
}
# Distillation prompts use training seeds from this offset on, apart from the clips the VAE and teacher see first.
PROMPT_SEED_OFFSET = 500_000


def pixel_frame(latent_frame: int) -> int:
    """First pixel frame of a latent frame (exclusive end of the previous one)."""
    return max(0, 4 * latent_frame - 3)


def num_pixel_frames(num_latent_frames: int) -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames: ``1 + 4 (n - 1)``."""
    return pixel_frame(num_latent_frames)


def to_model_pixels(frames: np.ndarray) -> np.ndarray:
    """``uint8 [T, H, W, 3]`` -> ``float32 [T, 3, H, W]`` in ``[-1, 1]`` (the VAE's pixel layout)."""
    return (frames.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


def from_model_pixels(pixels: np.ndarray) -> np.ndarray:
    """``[T, 3, H, W]`` in ``[-1, 1]`` -> ``uint8 [T, H, W, 3]``, clipping out-of-range values."""
    return np.clip((np.asarray(pixels, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(
        0, 2, 3, 1
    )


def split_seeds(split: str, count: int, offset: int = 0) -> range:
    """``count`` seeds of a split; the splits' ranges are disjoint, so test narratives are never trained on."""
    full = SPLITS[split]
    if offset < 0 or count < 0 or offset + count > len(full):
        raise ValueError(f"{split} has {len(full)} seeds; asked for {count} from offset {offset}")
    return full[offset : offset + count]


def split_of(seed: int) -> str:
    """Name of the split a seed belongs to."""
    for name, seeds in SPLITS.items():
        if seed in seeds:
            return name
    raise ValueError(f"seed {seed} is outside every split")


# ----------------------------------------------------------------------------------------------
# Identity, motion and rendering


@dataclass(frozen=True)
class Subject:
    """What a subject looks like: its identity, a colour and a shape."""

    shape: str
    colour: str

    def attribute(self, name: str) -> str:
        return getattr(self, name)


ATTRIBUTES = ("colour", "shape")


def _ease(u: np.ndarray, span: float) -> np.ndarray:
    """Smoothstep over the first ``span`` of the segment, then hold: zero velocity at both ends."""
    v = np.clip(u / span, 0.0, 1.0)
    return v * v * (3.0 - 2.0 * v)


@dataclass(frozen=True)
class Motion:
    """A smooth path from (x0, y0) to (x1, y1), optionally with bounces, over one segment."""

    action: str
    x0: float
    y0: float
    x1: float
    y1: float
    span: float = 1.0  # fraction of the segment the eased travel takes
    bounce_height: float = 0.0
    bounces: int = 0
    edge: str = ""  # for enter / leave

    def trajectory(self, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre x and centre y for each frame (u runs from 0 to 1 inclusive)."""
        u = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
        e = _ease(u, self.span)
        x = self.x0 + (self.x1 - self.x0) * e
        y = self.y0 + (self.y1 - self.y0) * e - self.bounce_height * np.abs(np.sin(np.pi * self.bounces * u))
        return x, y

    def end(self) -> tuple[float, float]:
        return self.x1, self.y1


@dataclass(frozen=True)
class Actor:
    """A subject (with its narrative-wide id) performing one motion in a shot."""

    subject_id: int
    subject: Subject
    motion: Motion


@dataclass(frozen=True)
class Shot:
    """What one segment or clip shows: a scene and the actors in it (drawn in order)."""

    scene: str
    actors: tuple[Actor, ...] = ()


def _box(px: np.ndarray, py: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    dx = np.abs(px) - bx
    dy = np.abs(py) - by
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return outside + np.minimum(np.maximum(dx, dy), 0.0)


def shape_distance(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a shape at most ``2 HALF_EXTENT`` across, centred on (0, 0)."""
    r = HALF_EXTENT
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "bar":
        return _box(px, py, r, BAR_THICKNESS * r)
    if shape == "tower":
        return _box(px, py, BAR_THICKNESS * r, r)
    if shape == "ring":
        return np.abs(np.hypot(px, py) - RING_MIDDLE * r) - (1.0 - RING_MIDDLE) * r
    raise ValueError(f"unknown shape {shape!r}")


_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


@functools.cache
def scene_image(scene: str) -> np.ndarray:
    """The static float32 ``[64, 64, 3]`` background of a scene: a vertical gradient plus a faint texture."""
    top, bottom = (np.asarray(c, dtype=np.float32) for c in SCENE_GRADIENTS[scene])
    t = (_GRID_Y / SIZE)[..., None]
    image = top * (1.0 - t) + bottom * t
    x, y = _GRID_X, _GRID_Y
    texture_rng = np.random.default_rng(SCENES.index(scene) + 7)
    if scene == "meadow":
        texture = 6.0 * np.sin(2.3 * x + 1.7 * np.sin(0.9 * y)) * np.cos(0.6 * y)
    elif scene == "desert":
        texture = 7.0 * np.sin(0.35 * y + 1.5 * np.sin(0.09 * x))
    elif scene == "ocean":
        texture = 6.0 * np.sin(0.55 * x + 0.8 * y) * (0.5 + 0.5 * np.sin(0.2 * y))
    elif scene == "snow":
        texture = 8.0 * (texture_rng.random((SIZE, SIZE)) > 0.94) - 3.0 * np.sin(0.25 * x + 0.4 * y)
    elif scene == "street":
        rows = (np.floor(y) % 8 == 0).astype(np.float32)
        joints = (np.floor(x + 6.0 * (np.floor(y / 8) % 2)) % 12 == 0).astype(np.float32)
        texture = -10.0 * np.maximum(rows, joints)
    elif scene == "dusk":
        texture = 10.0 * (texture_rng.random((SIZE, SIZE)) > 0.97) + 4.0 * np.sin(0.15 * x)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    image = np.clip(image + texture[..., None], 0.0, 255.0)
    image.setflags(write=False)
    return image


def coverage(actor: Actor, num_frames: int) -> np.ndarray:
    """Anti-aliased coverage ``float32 [num_frames, 64, 64]`` (0..1) of an actor's subject."""
    x, y = (a.astype(np.float32)[:, None, None] for a in actor.motion.trajectory(num_frames))
    return np.clip(0.5 - shape_distance(actor.subject.shape, _GRID_X[None] - x, _GRID_Y[None] - y), 0.0, 1.0)


def render(shot: Shot, num_frames: int) -> np.ndarray:
    """Pixels of a shot: ``uint8 [num_frames, 64, 64, 3]``, actors alpha-composited over the scene."""
    image = np.broadcast_to(scene_image(shot.scene), (num_frames, SIZE, SIZE, 3)).astype(np.float32)
    for actor in shot.actors:
        alpha = coverage(actor, num_frames)[..., None]
        image = image * (1.0 - alpha) + np.asarray(COLOURS[actor.subject.colour], dtype=np.float32) * alpha
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def visibility(shot: Shot, num_frames: int) -> np.ndarray:
    """``bool [num_frames, n_actors]``: whether each actor shows at least ``MIN_VISIBLE_AREA`` pixels."""
    areas = [(coverage(actor, num_frames) >= 0.5).sum(axis=(1, 2)) for actor in shot.actors]
    if not areas:
        return np.zeros((num_frames, 0), dtype=bool)
    return np.stack(areas, axis=1) >= MIN_VISIBLE_AREA


# ----------------------------------------------------------------------------------------------
# Motions a subject can perform from a given state


@dataclass(frozen=True)
class Pose:
    """Where a subject is at a segment boundary."""

    x: float
    y: float


# the centre range that keeps a subject, plus a pixel of margin, inside the frame
LOW, HIGH = HALF_EXTENT + 1.0, SIZE - HALF_EXTENT - 1.0


def _steps(num_frames: int) -> int:
    """Frame-to-frame steps in a segment: its frames sample the eased path at both ends."""
    return max(1, num_frames - 1)


def _reach(num_frames: int) -> float:
    """The farthest the smoothstep (peak speed 1.5 x mean) travels in a segment without exceeding ``MAX_SPEED``."""
    return MAX_SPEED * _steps(num_frames) / 1.5


def _travel(rng: np.random.Generator, room: float, num_frames: int) -> float:
    return float(rng.uniform(MIN_TRAVEL, min(room, _reach(num_frames))))


def feasible_actions(pose: Pose, num_frames: int) -> list[str]:
    """In-frame actions a subject at ``pose`` can perform within ``num_frames``."""
    rooms = {"left": pose.x - LOW, "right": HIGH - pose.x, "up": pose.y - LOW, "down": HIGH - pose.y}
    actions = ["still", *(name for name, room in rooms.items() if min(room, _reach(num_frames)) >= MIN_TRAVEL)]
    if min(pose.y - LOW, MAX_SPEED * _steps(num_frames) / np.pi) >= MIN_BOUNCE:
        actions.append("bounce")
    return actions


def in_frame_motion(rng: np.random.Generator, action: str, pose: Pose, num_frames: int) -> Motion:
    """A motion that keeps the subject fully inside the frame, never faster than ``MAX_SPEED``."""
    x1, y1 = pose.x, pose.y
    height, bounces = 0.0, 0
    if action == "left":
        x1 = pose.x - _travel(rng, pose.x - LOW, num_frames)
    elif action == "right":
        x1 = pose.x + _travel(rng, HIGH - pose.x, num_frames)
    elif action == "up":
        y1 = pose.y - _travel(rng, pose.y - LOW, num_frames)
    elif action == "down":
        y1 = pose.y + _travel(rng, HIGH - pose.y, num_frames)
    elif action == "bounce":
        height = float(rng.uniform(MIN_BOUNCE, min(14.0, pose.y - LOW, MAX_SPEED * _steps(num_frames) / np.pi)))
        bounces = max(1, min(num_frames // 12, int(MAX_SPEED * _steps(num_frames) / (np.pi * height))))
    elif action != "still":
        raise ValueError(f"unknown action {action!r}")
    return Motion(action, pose.x, pose.y, x1, y1, 1.0, height, bounces)


def _outside(edge: str, x: float, y: float) -> tuple[float, float]:
    """The point just outside ``edge`` level with (x, y)."""
    beyond = HALF_EXTENT + 1.0
    return {"left": (-beyond, y), "right": (SIZE + beyond, y), "top": (x, -beyond), "bottom": (x, SIZE + beyond)}[edge]


def _enter_depth(num_frames: int) -> float:
    """How far past the edge an entering subject's centre may settle (the eased travel peaks at 1.5 x mean)."""
    return 0.8 * _reach(num_frames) - HALF_EXTENT - 1.0


def can_enter(num_frames: int) -> bool:
    """Whether a subject can come fully into view within ``num_frames``."""
    return _enter_depth(num_frames) >= LOW


def enter_motion(rng: np.random.Generator, edge: str, num_frames: int) -> Motion:
    """Come in from just outside ``edge`` and settle fully inside within 80 % of the segment."""
    if not can_enter(num_frames):
        raise ValueError(f"{num_frames} frames are too few to enter")
    along = float(rng.uniform(LOW, HIGH))
    inward = float(rng.uniform(LOW, min(_enter_depth(num_frames), HIGH)))
    x1, y1 = {"left": (inward, along), "right": (SIZE - inward, along), "top": (along, inward),
              "bottom": (along, SIZE - inward)}[edge]
    x0, y0 = _outside(edge, x1, y1)
    return Motion("enter", x0, y0, x1, y1, 0.8, edge=edge)


def leave_motion(pose: Pose, num_frames: int) -> Motion:
    """Leave through the nearest edge, as early in the segment as ``MAX_SPEED`` allows."""
    distances = {"left": pose.x, "right": SIZE - pose.x, "top": pose.y, "bottom": SIZE - pose.y}
    edge = min(distances, key=distances.get)
    x1, y1 = _outside(edge, pose.x, pose.y)
    span = max(0.5, float(np.hypot(x1 - pose.x, y1 - pose.y)) / _reach(num_frames))
    if span > 1.0:
        raise ValueError(f"{num_frames} frames are too few to leave from {pose}")
    return Motion("leave", pose.x, pose.y, x1, y1, span, edge=edge)


def random_pose(rng: np.random.Generator) -> Pose:
    return Pose(float(rng.uniform(LOW, HIGH)), float(rng.uniform(LOW, HIGH)))


# ----------------------------------------------------------------------------------------------
# Words


COLOUR_WORDS = {name: (name,) for name in COLOURS}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"),
    "bar": ("bar", "plank", "flat bar"),
    "tower": ("tower", "pillar", "column"),
    "ring": ("ring", "hoop", "donut"),
}
SCENE_WORDS = {
    "meadow": ("a green meadow", "a grassy meadow", "a field of green grass"),
    "desert": ("a sandy desert", "a dry desert", "the desert sands"),
    "ocean": ("a blue ocean", "the open sea", "a deep blue sea"),
    "snow": ("a snowy field", "a field of fresh snow", "a snow-covered plain"),
    "street": ("a grey city street", "a quiet grey street", "a paved city street"),
    "dusk": ("a lavender dusk sky", "a violet evening sky", "a pale purple twilight sky"),
}
ACTION_WORDS = {
    "still": ("stays still", "rests in place", "sits motionless", "waits quietly"),
    "left": ("drifts to the left", "slides toward the left", "glides leftward", "moves to the left"),
    "right": ("drifts to the right", "slides toward the right", "glides rightward", "moves to the right"),
    "up": ("rises", "floats upward", "drifts up", "moves upward"),
    "down": ("sinks", "drifts downward", "slides down", "moves down"),
    "bounce": ("bounces", "hops up and down", "bounces playfully", "keeps bouncing"),
    "enter": ("enters from the {edge}", "slides in from the {edge}", "comes in from the {edge} edge"),
    "leave": ("leaves the frame to the {edge}", "exits on the {edge}", "moves out of view to the {edge}"),
}
ADVERBS = ("slowly", "gently", "smoothly", "steadily")
UNNAMED = ("a shape", "a creature", "something", "a figure")  # a subject named by none of its attributes


class Phrases:
    """Seeded choice of words and sentence templates."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: tuple[str, ...] | list[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def scene(self, scene: str) -> str:
        return self.pick(SCENE_WORDS[scene])

    def action(self, motion: Motion) -> str:
        words = self.pick(ACTION_WORDS[motion.action]).format(edge=motion.edge)
        if motion.action in ("left", "right", "up", "down", "enter", "leave") and self.rng.random() < 0.4:
            words = f"{self.pick(ADVERBS)} {words}"
        return words

    def subject(self, subject: Subject, stated: tuple[str, ...], article: str) -> str:
        """E.g. "a red ring"; the colour appears only if ``stated``, the shape always."""
        words = [self.pick(COLOUR_WORDS[subject.colour])] if "colour" in stated else []
        words.append(self.pick(SHAPE_WORDS[subject.shape]))
        phrase = " ".join(words)
        if article == "a":
            article = "an" if phrase[0] in "aeiou" else "a"
        return f"{article} {phrase}"

    def stated_attributes(self, full: bool) -> tuple[str, ...]:
        """Which attributes a prompt names: both when introducing (``full``), else the shape and maybe the colour."""
        return ATTRIBUTES if full or self.rng.random() < 0.5 else ("shape",)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------------------------
# Clips for training


@dataclass(frozen=True)
class Clip:
    """A single-prompt training clip: ``frames`` is ``uint8 [1 + 4 (n - 1), 64, 64, 3]``, rendered from ``shots``."""

    text: str
    frames: np.ndarray
    shots: tuple[Shot, ...]


def random_subject(rng: np.random.Generator, avoid: tuple[Subject, ...] = ()) -> Subject:
    """A subject whose colour and shape both differ from every subject in ``avoid``."""
    colours = [c for c in COLOURS if all(c != s.colour for s in avoid)]
    shapes = [s for s in SHAPES if all(s != other.shape for other in avoid)]
    return Subject(shape=shapes[int(rng.integers(len(shapes)))], colour=colours[int(rng.integers(len(colours)))])


def sample_clip(rng: np.random.Generator, num_latent_frames: int) -> Clip:
    """One scene with no subject or one subject performing one action."""
    phrases = Phrases(rng)
    num_frames = num_pixel_frames(num_latent_frames)
    scene = SCENES[int(rng.integers(len(SCENES)))]
    where = phrases.scene(scene)
    actors: tuple[Actor, ...] = ()
    if rng.random() < 0.15:
        text = phrases.pick((f"An empty view of {where}.", f"{_sentence(where)}, calm and empty."))
    else:
        subject = random_subject(rng)
        pose = random_pose(rng)
        motion = in_frame_motion(rng, phrases.pick(feasible_actions(pose, num_frames)), pose, num_frames)
        actors = (Actor(0, subject, motion),)
        clause = f"{phrases.subject(subject, ATTRIBUTES, 'a')} {phrases.action(motion)}"
        text = f"In {where}, {clause}." if rng.random() < 0.5 else f"{_sentence(clause)} in {where}."
    shot = Shot(scene, actors)
    return Clip(text, render(shot, num_frames), (shot,))


# ----------------------------------------------------------------------------------------------
# Narratives: segments, plans and their simulation


@dataclass(frozen=True)
class SegmentInfo:
    """One prompt of a narrative and what the oracle should find in it.

    ``subjects`` maps the id of every subject expected in view to its true appearance at the segment's
    start; ``stated`` lists, per subject id, the attributes the prompt names. ``returning_subjects`` are
    subjects back after an absence, ``memory_subjects`` those whose identity only memory can restore
    (absent from the first chunk and the last ``MEMORY_GAP`` latent frames, and not restated); the
    ``*_background`` flags say the same for the scene.
    """

    start: int
    end: int
    prompt: str
    kind: str
    scene: str
    subjects: dict[int, Subject]
    stated: dict[int, tuple[str, ...]]
    stated_background: bool
    returning_subjects: tuple[int, ...] = ()
    memory_subjects: tuple[int, ...] = ()
    returning_background: bool = False
    memory_background: bool = False

    @property
    def pixel_start(self) -> int:
        return pixel_frame(self.start)

    @property
    def pixel_end(self) -> int:
        return pixel_frame(self.end)


@dataclass(frozen=True)
class Narrative:
    """A multi-prompt story: segments on chunk boundaries, its ground-truth video and visibility.

    ``frames`` is ``uint8 [1 + 4 (n - 1), 64, 64, 3]``; ``visible[t, i]`` says whether subject ``i``
    (an index into ``subjects``, which hold each subject's appearance when first introduced) shows at
    least ``MIN_VISIBLE_AREA`` pixels in pixel frame ``t``. ``shots`` are the exact scenes and motions of the
    segments, so variants of the story can be re-rendered.
    """

    plan: str
    num_latent_frames: int
    segments: tuple[SegmentInfo, ...]
    subjects: tuple[Subject, ...]
    frames: np.ndarray
    visible: np.ndarray
    shots: tuple[Shot, ...]
    chunk_frames: int = CHUNK_FRAMES
    seed: int | None = None

    @property
    def schedule(self) -> list[tuple[int, str]]:
        """``[(start_latent_frame, prompt), ...]``, the generator's input."""
        return [(s.start, s.prompt) for s in self.segments]

    def to_json(self) -> dict:
        """Everything except the pixels, as plain JSON types."""
        return {
            "seed": self.seed,
            "plan": self.plan,
            "num_latent_frames": self.num_latent_frames,
            "num_pixel_frames": int(self.frames.shape[0]),
            "chunk_frames": self.chunk_frames,
            "fps": FPS,
            "subjects": [vars(s) for s in self.subjects],
            "segments": [
                {
                    "start": s.start,
                    "end": s.end,
                    "prompt": s.prompt,
                    "kind": s.kind,
                    "scene": s.scene,
                    "subjects": {str(i): vars(sub) for i, sub in s.subjects.items()},
                    "stated": {str(i): list(a) for i, a in s.stated.items()},
                    "stated_background": s.stated_background,
                    "returning_subjects": list(s.returning_subjects),
                    "memory_subjects": list(s.memory_subjects),
                    "returning_background": s.returning_background,
                    "memory_background": s.memory_background,
                }
                for s in self.segments
            ],
        }


@dataclass(frozen=True)
class Beat:
    """One planned segment: what happens (``kind``), its minimum and maximum length in chunks."""

    kind: str
    min_chunks: int
    max_chunks: int = 6


# Plans: every one introduces X after the first chunk and brings it back >= 4 chunks later, unnamed.
#  return  - X appears, the scene cuts away for >= 4 chunks, X returns; maybe a return to the first scene.
#  revisit - X appears in a second scene, a third scene with Y, then back to X's scene where X returns.
#  replace - X leaves, a different Y must appear without X duplicating, the scene cuts, X returns.
PLANS: dict[str, tuple[tuple[Beat, bool], ...]] = {  # (beat, optional)
    "return": (
        (Beat("establish", 1, 2), False),
        (Beat("introduce", 2), False),
        (Beat("continue", 1), True),
        (Beat("cut", 4, 8), False),
        (Beat("return", 2), False),
        (Beat("tail", 1), True),
    ),
    "revisit": (
        (Beat("establish", 1, 2), False),
        (Beat("cut_introduce", 2), False),
        (Beat("cut_new", 2), False),
        (Beat("continue", 2), False),
        (Beat("revisit_return", 2), False),
        (Beat("continue", 1), True),
    ),
    "replace": (
        (Beat("establish", 1, 2), False),
        (Beat("introduce", 2), False),
        (Beat("leave", 2, 3), False),
        (Beat("new", 2), False),
        (Beat("cut", 2), False),
        (Beat("return", 2), False),
    ),
}


def _min_chunks(beats: tuple[tuple[Beat, bool], ...]) -> int:
    """Chunks a plan needs with every optional beat left out."""
    return sum(b.min_chunks for b, opt in beats if not opt)


def min_narrative_latent_frames(chunk_frames: int = CHUNK_FRAMES) -> int:
    """The shortest narrative any plan fits, in latent frames."""
    return chunk_frames * min(_min_chunks(beats) for beats in PLANS.values())


def plan_beats(rng: np.random.Generator, num_chunks: int) -> tuple[str, list[Beat], list[int]]:
    """Pick a plan that fits, its optional beats, and each beat's length in chunks (summing to ``num_chunks``)."""
    fitting = [name for name, beats in PLANS.items() if _min_chunks(beats) <= num_chunks]
    if not fitting:
        raise ValueError(f"{num_chunks} chunks are too few for any narrative plan")
    name = fitting[int(rng.integers(len(fitting)))]
    budget = num_chunks - _min_chunks(PLANS[name])
    beats = []
    for beat, optional in PLANS[name]:
        if optional:
            if beat.min_chunks > budget or rng.random() >= 0.6:
                continue
            budget -= beat.min_chunks
        beats.append(beat)
    lengths = [b.min_chunks for b in beats]
    for _ in range(budget):
        open_beats = [i for i, b in enumerate(beats) if lengths[i] < b.max_chunks]
        if not open_beats:
            raise ValueError(f"plan {name} cannot stretch to {num_chunks} chunks")
        lengths[open_beats[int(rng.integers(len(open_beats)))]] += 1
    return name, beats, lengths


@dataclass
class _World:
    """Mutable state while a narrative is simulated segment by segment."""

    rng: np.random.Generator
    phrases: Phrases
    subjects: list[Subject] = field(default_factory=list)
    present: dict[int, Pose] = field(default_factory=dict)
    scene: str = ""
    scenes_used: list[str] = field(default_factory=list)
    last_seen: dict[int, int] = field(default_factory=dict)  # subject id -> end latent frame of last sight
    last_pose: dict[int, Pose] = field(default_factory=dict)  # subject id -> where it was last seen
    scene_last_seen: dict[str, int] = field(default_factory=dict)
    sink_subjects: set[int] = field(default_factory=set)
    sink_scene: str = ""

    def new_scene(self) -> str:
        options = [s for s in SCENES if s not in self.scenes_used]
        scene = options[int(self.rng.integers(len(options)))]
        self.scenes_used.append(scene)
        return scene

    def new_subject(self) -> int:
        subject = random_subject(self.rng, tuple(self.subjects))
        self.subjects.append(subject)
        return len(self.subjects) - 1


class NarrativeBuilder:
    """Simulates a plan beat by beat: motions, prompts and the oracle's expectations per segment."""

    def __init__(self, rng: np.random.Generator, chunk_frames: int = CHUNK_FRAMES):
        self.world = _World(rng, Phrases(rng))
        self.chunk_frames = chunk_frames
        self.shots: list[tuple[Shot, int]] = []
        self.segments: list[SegmentInfo] = []

    # -- helpers ------------------------------------------------------------------------------
    def _in_frame(self, sid: int, num_frames: int) -> Motion:
        w = self.world
        pose = w.present[sid]
        return in_frame_motion(w.rng, w.phrases.pick(feasible_actions(pose, num_frames)), pose, num_frames)

    def _enter(self, num_frames: int) -> Motion:
        return enter_motion(self.world.rng, self.world.phrases.pick(EDGES), num_frames)

    def _back_in_place(self, sid: int, num_frames: int) -> Motion:
        """A returning subject's motion from where it was last seen."""
        self.world.present[sid] = self.world.last_pose[sid]
        return self._in_frame(sid, num_frames)

    def _describe(self, sid: int, full: bool) -> tuple[str, tuple[str, ...]]:
        w = self.world
        stated = w.phrases.stated_attributes(full)
        return w.phrases.subject(w.subjects[sid], stated, "a" if full else "the"), stated

    # -- beats --------------------------------------------------------------------------------
    def beat(self, kind: str, start: int, end: int) -> None:
        """Simulate one beat over latent frames [start, end)."""
        w, p = self.world, self.world.phrases
        num_frames = pixel_frame(end) - pixel_frame(start)
        motions: dict[int, Motion] = {}
        stated: dict[int, tuple[str, ...]] = {}
        stated_background = False
        returning: list[int] = []
        revisiting = False
        previous_scene = w.scene
        if kind == "establish":
            w.scene = w.new_scene()
            where = p.scene(w.scene)
            stated_background = True
            prompt = p.pick((f"{_sentence(where)} stretches out, calm and empty.", f"A quiet view of {where}.",
                             f"The camera shows {where} with nothing in it.",
                             f"An empty stretch of {where} under soft light."))
        elif kind in ("introduce", "present", "glimpse", "new", "cut_introduce", "cut_new"):
            if kind.startswith("cut") or not w.scene:
                w.scene = w.new_scene()
                stated_background = True
            sid = w.new_subject()
            if kind not in ("glimpse", "present") and w.rng.random() < 0.5 and can_enter(num_frames):
                motions[sid] = self._enter(num_frames)
            else:
                w.present[sid] = random_pose(w.rng)
                motions[sid] = self._in_frame(sid, num_frames)
            if kind == "glimpse":
                who, stated[sid] = p.pick(UNNAMED), ()
            else:
                who, stated[sid] = self._describe(sid, True)
            does = p.action(motions[sid])
            if kind in ("introduce", "present", "glimpse"):
                if stated_background or w.rng.random() < 0.5:
                    stated_background = True
                    prompt = p.pick((f"In {p.scene(w.scene)}, {who} {does}.", f"{_sentence(who)} {does} in "
                                     f"{p.scene(w.scene)}."))
                else:
                    prompt = p.pick((f"{_sentence(who)} {does}.", f"Suddenly, {who} {does}.", f"Now {who} {does}."))
            elif kind == "new":
                prompt = p.pick((f"A different shape now arrives: {who} {does}.", f"Then a new one appears, {who} "
                                 f"that {does}.", f"Something else comes along: {who} {does}."))
            else:
                where = p.scene(w.scene)
                prompt = p.pick((f"The scene changes to {where}, where {who} {does}.", f"Cut to {where}: {who} {does}.",
                                 f"Now, in {where}, a different shape appears: {who} that {does}."))
        elif kind in ("continue", "leave"):
            (sid,) = w.present
            motions[sid] = leave_motion(w.present[sid], num_frames) if kind == "leave" else self._in_frame(
                sid, num_frames)
            who, stated[sid] = self._describe(sid, False)
            does = p.action(motions[sid])
            prompt = p.pick((f"{_sentence(who)} now {does}.", f"Next, {who} {does}.", f"Then {who} {does}.",
                             f"After that, {who} {does}."))
        elif kind == "cut":
            w.scene = w.new_scene()
            where = p.scene(w.scene)
            stated_background = True
            prompt = p.pick((f"The scene changes to {where}, where nothing moves.", f"Cut to {where}; it is empty "
                             f"and calm.", f"Now we see {where}, with no one around.",
                             f"The view switches to an empty stretch of {where}."))
        elif kind == "reappear":  # X shows again where it was last seen: a one-chunk return, too short to enter
            sid = 0
            returning.append(sid)
            motions[sid] = self._back_in_place(sid, num_frames)
            does = p.action(motions[sid])
            again = p.pick((f"the same creature is back and {does}", f"the shape from before reappears and {does}",
                            f"our old friend is back; it {does}"))
            revisiting = bool(len(w.present) > 1 or w.rng.random() < 0.5)
            if revisiting:
                w.scene = w.scenes_used[-2]
                prompt = f"Back where it was first seen, {again}."
            else:
                prompt = f"{_sentence(again)}."
        elif kind in ("return", "revisit_return"):  # X, the first subject, comes back where it was last seen
            sid = 0
            returning.append(sid)
            motions[sid] = self._back_in_place(sid, num_frames)
            does = p.action(motions[sid])
            if kind == "revisit_return":
                revisiting = True
                w.scene = w.scenes_used[-2]
                stated_background = bool(w.rng.random() < 0.5)
                if stated_background:
                    where = p.scene(w.scene)
                    prompt = p.pick((f"Back in {where} again, the same creature is where it was and {does}.",
                                     f"We return to {where}, and the shape from before, in its old spot, {does}."))
                else:
                    prompt = p.pick((f"Back where the shape was first seen, it is there again and {does}.",
                                     f"The story returns to the earlier place, where our old friend is back and "
                                     f"{does}."))
            else:
                prompt = p.pick((f"The same creature is back in its old spot and {does}.",
                                 f"The shape we saw earlier returns to where it was; it {does}.",
                                 f"Our old friend from before reappears in the same place and {does}.",
                                 f"The first shape comes back right where it was, and {does}.",
                                 f"Look, the one from earlier is back in its place; it {does}."))
        elif kind == "relocate":
            (sid,) = w.present
            w.scene = w.new_scene()
            stated_background = True
            motions[sid] = self._in_frame(sid, num_frames)
            who, stated[sid] = self._describe(sid, False)
            prompt = f"{_sentence(who)} is now in {p.scene(w.scene)}, where it {p.action(motions[sid])}."
        elif kind == "tail":
            (sid,) = w.present
            revisiting = True
            w.scene = w.scenes_used[0]
            motions[sid] = self._in_frame(sid, num_frames)
            does = p.action(motions[sid])
            stated_background = bool(w.rng.random() < 0.5)
            if stated_background:
                prompt = f"Back in {p.scene(w.scene)} again, the shape {does}."
            else:
                prompt = p.pick((f"Back where it all began, the shape {does}.",
                                 f"The story returns to the very first place, where the shape {does}."))
        else:
            raise ValueError(f"unknown beat {kind!r}")
        self._record(kind, start, end, prompt, motions, stated, stated_background, returning, revisiting,
                     previous_scene)

    def _record(self, kind: str, start: int, end: int, prompt: str, motions: dict[int, Motion],
                stated: dict[int, tuple[str, ...]], stated_background: bool, returning: list[int], revisiting: bool,
                previous_scene: str) -> None:
        w = self.world
        if kind in ("cut", "cut_introduce", "cut_new", "revisit_return", "reappear"):
            w.present = {sid: pose for sid, pose in w.present.items() if sid in motions}
        actors = tuple(Actor(sid, w.subjects[sid], m) for sid, m in motions.items())
        expected = {sid: w.subjects[sid] for sid in motions}
        memory = tuple(sid for sid in returning if sid not in stated and sid not in w.sink_subjects
                       and start - w.last_seen[sid] >= MEMORY_GAP)
        scene_gap = start - w.scene_last_seen.get(w.scene, start)
        memory_background = (revisiting and not stated_background and w.scene != w.sink_scene
                             and scene_gap >= MEMORY_GAP)
        self.segments.append(SegmentInfo(
            start, end, prompt, kind, w.scene, expected, stated, stated_background, tuple(returning), memory,
            revisiting and w.scene != previous_scene, memory_background))
        self.shots.append((Shot(w.scene, actors), pixel_frame(end) - pixel_frame(start)))
        for sid, motion in motions.items():
            if motion.action == "leave":
                w.present.pop(sid, None)
            else:
                w.present[sid] = w.last_pose[sid] = Pose(*motion.end())
            w.last_seen[sid] = end
            if start == 0:
                w.sink_subjects.add(sid)
        w.scene_last_seen[w.scene] = end
        if start == 0:
            w.sink_scene = w.scene

    def build(self, plan: str, num_latent_frames: int, seed: int | None = None) -> Narrative:
        frames = np.concatenate([render(shot, n) for shot, n in self.shots])
        visible = np.zeros((frames.shape[0], len(self.world.subjects)), dtype=bool)
        for segment, (shot, n) in zip(self.segments, self.shots, strict=True):
            ids = [a.subject_id for a in shot.actors]
            visible[segment.pixel_start : segment.pixel_end, ids] = visibility(shot, n)
        return Narrative(plan, num_latent_frames, tuple(self.segments), tuple(self.world.subjects), frames, visible,
                         tuple(shot for shot, _ in self.shots), self.chunk_frames, seed)


def _check_length(num_latent_frames: int, chunk_frames: int) -> int:
    if num_latent_frames % chunk_frames:
        raise ValueError(f"{num_latent_frames} latent frames are not a whole number of {chunk_frames}-frame chunks")
    return num_latent_frames // chunk_frames


def sample_narrative(
    rng: np.random.Generator, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES, seed: int | None = None
) -> Narrative:
    """A 4-6 prompt story with a memory test (see :data:`PLANS`); needs at least 8 chunks."""
    num_chunks = _check_length(num_latent_frames, chunk_frames)
    plan, beats, lengths = plan_beats(rng, num_chunks)
    builder = NarrativeBuilder(rng, chunk_frames)
    start = 0
    for beat, length in zip(beats, lengths, strict=True):
        builder.beat(beat.kind, start, start + length * chunk_frames)
        start += length * chunk_frames
    return builder.build(plan, num_latent_frames, seed)


SWITCHES = ("continue", "leave", "cut", "cut_new", "relocate")


def sample_switch_clip(rng: np.random.Generator, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES) -> Narrative:
    """Two prompts with a switch on a chunk boundary; the second continues the first's world state.

    The subject introduced by the first prompt then performs a new action, leaves, is cut away from,
    is replaced by a new subject in a new scene, or stays while the scene changes ("relocate").
    """
    num_chunks = _check_length(num_latent_frames, chunk_frames)
    if num_chunks < 4:
        raise ValueError("a switch clip needs at least 4 chunks")
    switch = int(rng.integers(2, num_chunks - 1)) * chunk_frames
    builder = NarrativeBuilder(rng, chunk_frames)
    builder.beat("introduce", 0, switch)
    second = SWITCHES[int(rng.integers(len(SWITCHES)))]
    builder.beat(second, switch, num_latent_frames)
    return builder.build(f"switch_{second}", num_latent_frames)


def min_return_clip_latent_frames(gap: int, chunk_frames: int = CHUNK_FRAMES) -> int:
    """The shortest return clip with a ``gap``: an opening chunk, a sighting, the cut, the return."""
    return chunk_frames * (-(-gap // chunk_frames) + 3)


def joined_prompt(story: Narrative) -> str:
    """A story's prompts as the one prompt of its training clip (what the teacher and stage 1 read)."""
    return " ".join(s.prompt for s in story.segments)


def sample_return_clip(
    rng: np.random.Generator, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES, gap: int = 0
) -> Clip:
    """The story of :func:`sample_return_story` as one training clip: its prompts joined into one."""
    story = sample_return_story(rng, num_latent_frames, chunk_frames, gap)
    return Clip(joined_prompt(story), story.frames, story.shots)


def sample_return_story(
    rng: np.random.Generator, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES, gap: int = 0
) -> Narrative:
    """A subject named by none of its attributes, a cut away from it, its return: three prompts (four with a
    ``gap``), which a return clip joins into one and the oracle scores as a narrative.

    Nothing in the text fixes the returning subject's colour or shape, only its earlier
    frames do: they are meant to teach that a subject referred back to comes back unchanged, the
    in-context persistence a memory bank serves at inference (``python -m experiments.probe_teacher`` checks whether a
    teacher learnt it). The cut shows an empty scene, or a different subject in a new scene followed by a
    return to the first scene. The subject stays in frame (``glimpse``, ``reappear``): one chunk is too
    short to enter.

    ``gap`` > 0 makes the return a memory test like a narrative's: the clip opens with one empty chunk
    (the frame sink never shows the subject), the subject is seen up to the cut, the cut lasts ``gap``
    latent frames rounded up to whole chunks (set it to the local window's recent frames, so the subject
    has left the window when it returns) and the return is the last chunk.
    """
    num_chunks = _check_length(num_latent_frames, chunk_frames)
    builder = NarrativeBuilder(rng, chunk_frames)
    if gap > 0:
        away_chunks = -(-gap // chunk_frames)
        if num_latent_frames < min_return_clip_latent_frames(gap, chunk_frames):
            raise ValueError(f"a return clip with a {gap}-frame gap needs at least {away_chunks + 3} chunks")
        second = (num_chunks - 1) * chunk_frames
        first = second - away_chunks * chunk_frames
        builder.beat("establish", 0, chunk_frames)
        builder.beat("glimpse", chunk_frames, first)
    else:
        if num_chunks < 3:
            raise ValueError("a return clip needs at least 3 chunks")
        first, second = sorted(int(c) * chunk_frames for c in rng.choice(np.arange(1, num_chunks), 2, replace=False))
        builder.beat("glimpse", 0, first)
    away = "cut" if rng.random() < 0.6 else "cut_new"
    builder.beat(away, first, second)
    builder.beat("reappear", second, num_latent_frames)
    return builder.build(f"return_clip_{away}", num_latent_frames)


def sample_named_clip(rng: np.random.Generator, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES) -> Narrative:
    """One prompt that names a subject's colour and shape in a scene, the subject in view throughout: a subject clip
    as the teacher trains on (:func:`sample_clip`), as a one-segment narrative so the oracle scores its adherence
    and duplicates (a subject drawn before it would have entered counts as one too many)."""
    _check_length(num_latent_frames, chunk_frames)
    builder = NarrativeBuilder(rng, chunk_frames)
    builder.beat("present", 0, num_latent_frames)
    return builder.build("named_clip", num_latent_frames)


def narrative_from_seed(seed: int, num_latent_frames: int, chunk_frames: int = CHUNK_FRAMES) -> Narrative:
    """The narrative of a seed (its split follows from :func:`split_of`)."""
    return sample_narrative(np.random.default_rng([seed, 1]), num_latent_frames, chunk_frames, seed)


def clip_from_seed(seed: int, num_latent_frames: int) -> Clip:
    """The training clip of a seed."""
    return sample_clip(np.random.default_rng([seed, 2]), num_latent_frames)


def return_clip_from_seed(seed: int, num_latent_frames: int, gap: int = 0) -> Clip:
    """The return clip of a seed (:func:`sample_return_clip`)."""
    return sample_return_clip(np.random.default_rng([seed, 4]), num_latent_frames, gap=gap)


def return_story_from_seed(seed: int, num_latent_frames: int, gap: int = 0) -> Narrative:
    """The story behind :func:`return_clip_from_seed` of the same seed, as a narrative for the oracle."""
    return sample_return_story(np.random.default_rng([seed, 4]), num_latent_frames, gap=gap)


def named_clip_from_seed(seed: int, num_latent_frames: int) -> Narrative:
    """The named-subject clip of a seed (:func:`sample_named_clip`)."""
    return sample_named_clip(np.random.default_rng([seed, 6]), num_latent_frames)


def training_clip(seed: int, num_latent_frames: int, return_fraction: float = 0.0, return_gap: int = 0) -> Clip:
    """A seed's teacher / distillation clip: its return clip with probability ``return_fraction``, else its clip."""
    if return_fraction > 0 and np.random.default_rng([seed, 5]).random() < return_fraction:
        return return_clip_from_seed(seed, num_latent_frames, return_gap)
    return clip_from_seed(seed, num_latent_frames)
