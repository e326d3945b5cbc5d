"""Held-out evaluation of MemFlow-Tiny per memory mode, scored by the story world's oracle.

usage: python scripts/eval_toy.py [--narratives 50] [--modes none,nam,nam_sma,full] [--frames 36] [--json] [--roundtrip]
                                  [--split test|validation] [--stories narratives|returns] [--gap 9]
                                  [--config_path configs/toy/interactive_inference.yaml] [key=value ...]

Narratives come from test-split seeds (``split_seeds("test", N)``, disjoint from every training seed);
``--split validation`` draws them from the validation split instead, for choosing settings without
looking at the test narratives.
Each is generated with the shipped model through the inference engine: ``StreamingGenerator`` chunk by
chunk, the prompt switched (with the KV re-cache) at every segment start, each chunk decoded by the
VAE's streaming decoder; all modes get the same noise. Prints one markdown table (or JSON): per mode the
oracle's means and the generation speed (DiT only; the decode is the same for every mode) relative to
``none`` measured in the same run. A ``ground_truth`` row scores the world's own videos and, with
``--roundtrip``, a ``vae_roundtrip`` row their VAE encode-decode (what a perfect generator could reach).
``identity by chance`` is the identity a row's returning subjects score against the earlier subjects of
the row's other stories (``tiny.oracle.chance_identity``): the floor a generator reaches with no memory of
the story at hand, higher the more alike it draws subjects and the more reliably it draws one at all. The
``above chance`` column compares identity minus that floor with ``none``'s, story by story, with those two
confounds taken out. What remains is memory only where a story's prompts cannot draw the subject alike
twice: with ``--prompts joined`` one text conditions the sighting and the return, so compare ``--gap``
values with and without the subject in the bank ("subject in bank") before reading it as memory.
For the modes with a memory bank, ``bank_recall`` says whether memory even held the returning subject:
the share of layers whose bank, at the return, holds a latent frame showing it in the true video.

``--stories returns`` scores return stories instead (``tiny.world.return_story_from_seed``, ``--frames``
21 and ``--gap`` 9 unless given): a subject named by none of its attributes, a cut away for ``--gap``
latent frames, its return where it was last seen, generated from the story's one joined prompt as the
teacher and stage 1 see it. That is the task distillation trains memory on, so it tells a generator that
never learnt to read its memory from one that learnt it but fails on the longer narratives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from memflow.config import MEMORY_MODES, StreamConfig
from pipeline.plan import plan_run
from pipeline.runner import Components, build_components
from pipeline.streaming import StreamingGenerator
from tiny.oracle import Oracle, add_chance, aggregate, paired_difference
from tiny.vae_train import roundtrip_frames
from tiny.world import (
    Narrative,
    from_model_pixels,
    joined_prompt,
    narrative_from_seed,
    pixel_frame,
    return_story_from_seed,
    split_seeds,
)
from utils.config import ScriptParser, load_config, parse_cli
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
METRICS = ("identity_consistency", "identity_chance", "background_consistency", "adherence", "duplicate_rate",
           "smoothness")
STORIES = ("narratives", "returns")
DEFAULT_FRAMES = {"narratives": 36, "returns": 21}
# how a story's prompts reach the generator by default: a narrative's one at a time, switched at each segment
# (the interactive use), a return story's joined into one (as its training clip has them)
PROMPTINGS = ("switched", "joined")
DEFAULT_PROMPTING = {"narratives": "switched", "returns": "joined"}
# the segment field listing the subjects whose return bank_recall checks: a return story's gap is shorter than
# the narratives' MEMORY_GAP, so its returning subject is not a memory subject
TESTED = {"narratives": "memory_subjects", "returns": "returning_subjects"}


@dataclasses.dataclass
class Rendered:
    """A generated narrative as uint8 frames [T, 64, 64, 3], its generation and decode seconds, and its
    :func:`bank_recall` (NaN without a bank)."""

    frames: np.ndarray
    generate_s: float
    decode_s: float
    bank_recall: float = math.nan


def bank_recall(narrative: Narrative, trace: dict, tested: str = "memory_subjects") -> float:
    """Share of layers whose bank, at the first chunk of a memory subject's return, holds a latent frame in
    which the true video shows that subject; averaged over the narrative's memory tests (NaN without any).
    ``tested`` names the segment field listing them (see ``TESTED``)."""
    banks = {chunk["start_frame"]: chunk["bank"] for chunk in trace["chunks"]}
    shares = []
    for segment in narrative.segments:
        for sid in getattr(segment, tested):
            shown = {f for f in range(segment.start)
                     if narrative.visible[pixel_frame(f) : pixel_frame(f + 1), sid].any()}  # fmt: skip
            shares.append(np.mean([any(f in shown for f in layer) for layer in banks[segment.start]]))
    return float(np.mean(shares)) if shares else math.nan


class NarrativeRenderer:
    """Generates narratives with one memory mode: the inference chunk loop plus per-chunk streaming decode."""

    def __init__(self, components: Components, stream: StreamConfig, latent_size: tuple[int, int],
                 tested: str = "memory_subjects"):  # fmt: skip
        self.components = components
        self.generator = StreamingGenerator(components.dit, stream, trace=stream.uses_bank)
        self.latent_size = latent_size
        self.tested = tested

    @torch.no_grad()
    def render(self, narrative: Narrative, prompts: dict[int, torch.Tensor], seed: int) -> Rendered:
        """``prompts``: the prompt embedding [L, D] that takes over at each start frame (0 first)."""
        gen, (lh, lw) = self.generator, self.latent_size
        noise_gen = torch.Generator().manual_seed(seed)
        decoder = self.components.vae.streaming_decoder()
        channels = self.components.dit.config.in_dim
        pixels, generate_s, decode_s = [], 0.0, 0.0
        for first in range(0, narrative.num_latent_frames, gen.chunk):
            t0 = time.perf_counter()
            if first == 0:
                gen.start(prompts[0][None], num_frames=narrative.num_latent_frames, latent_height=lh,
                          latent_width=lw)  # fmt: skip
            elif first in prompts:
                gen.switch_prompt(prompts[first][None])
            noise = torch.randn((1, gen.chunk, channels, lh, lw), generator=noise_gen)
            x0 = gen.denoise_chunk(noise, generator=noise_gen)
            gen.commit_chunk(x0, generator=noise_gen)
            t1 = time.perf_counter()
            pixels.append(decoder.decode(x0)[0].float().numpy())
            decode_s += time.perf_counter() - t1
            generate_s += t1 - t0
        recall = bank_recall(narrative, gen.memory_trace(), self.tested) if gen.trace else math.nan
        return Rendered(from_model_pixels(np.concatenate(pixels)), generate_s, decode_s, recall)


def load_stories(kind: str, seeds: Sequence[int], frames: int, gap: int) -> list[Narrative]:
    """The held-out narratives, or return stories (see the module docstring), of ``seeds``."""
    try:
        if kind == "returns":
            return [return_story_from_seed(seed, frames, gap) for seed in seeds]
        return [narrative_from_seed(seed, frames) for seed in seeds]
    except ValueError as err:
        extra = f" --gap {gap}" if kind == "returns" else ""
        raise ConfigError(f"--frames {frames}{extra}: {err}") from None


def prompt_schedule(story: Narrative, prompting: str) -> dict[int, str]:
    """The prompt that takes over at each start frame: ``switched``, each segment's own from its first frame;
    ``joined``, all of them as one prompt throughout."""
    if prompting == "joined":
        return {0: joined_prompt(story)}
    return {segment.start: segment.prompt for segment in story.segments}


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MEMORY_MODES]
    if not modes or unknown:
        raise ConfigError(f"--modes {text!r}: give a comma-separated subset of {', '.join(MEMORY_MODES)}")
    return list(dict.fromkeys(modes))


def summarise(scores: dict[str, list[dict]], timings: dict[str, list[float]], pixel_frames: int) -> dict:
    """Per row: oracle means (NaN-aware), test counts, generation FPS and its ratio to ``none``."""
    rows = {}
    for mode, values in scores.items():
        row = aggregate(values)
        if mode in timings:
            row["generate_fps"] = pixel_frames * len(timings[mode]) / sum(timings[mode])
        rows[mode] = row
    base = rows.get("none", {}).get("generate_fps")
    for row in rows.values():
        if base and "generate_fps" in row:
            row["fps_vs_none"] = row["generate_fps"] / base
    for mode, row in rows.items():
        if mode in timings and mode != "none" and "none" in scores:
            row["identity_vs_none"] = paired_difference(scores[mode], scores["none"], "identity_consistency")
            row["above_chance_vs_none"] = paired_difference(scores[mode], scores["none"], "identity_above_chance")
    return rows


def markdown(rows: dict[str, dict]) -> str:
    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    def paired(value: dict | None) -> str:
        if not value or math.isnan(value["mean"]):
            return "-"
        return f"{value['mean']:+.3f} ± {value['se']:.3f} ({value['wins']:.0f}:{value['losses']:.0f})"

    head = ("| mode | identity consistency | identity by chance | background consistency | adherence "
            "| duplicate rate | smoothness | generation FPS | FPS vs none | identity - none ± SE (wins:losses) "
            "| above chance - none ± SE (wins:losses) | subject in bank |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for mode, row in rows.items():
        lines.append("| " + " | ".join([mode, *(cell(row.get(k)) for k in METRICS), cell(row.get("generate_fps"), 1),
                                        cell(row.get("fps_vs_none"), 2), paired(row.get("identity_vs_none")),
                                        paired(row.get("above_chance_vs_none")), cell(row.get("bank_recall"), 2)])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def evaluate(
    cfg_path: str,
    overrides: Sequence[str],
    count: int,
    modes: list[str],
    frames: int,
    roundtrip: bool = False,
    split: str = "test",
    stories: str = "narratives",
    gap: int = 9,
    prompting: str | None = None,
) -> dict:
    """Generate and score ``count`` held-out narratives (or return stories) in every mode (modes interleaved per
    story). ``prompting`` (see ``PROMPTINGS``) defaults to the kind of story's ``DEFAULT_PROMPTING``."""
    prompting = prompting or DEFAULT_PROMPTING[stories]
    seeds = split_seeds(split, count)
    narratives = load_stories(stories, seeds, frames, gap)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(cfg_path, [*overrides, f"output_folder={scratch}", "save_trace=false"])
        plan = plan_run(cfg)
    components = build_components(plan)
    latent_size = (plan.latent_height, plan.latent_width)
    renderers = {m: NarrativeRenderer(components, dataclasses.replace(plan.stream, memory=m), latent_size,
                                      TESTED[stories]) for m in modes}  # fmt: skip
    oracle = Oracle()
    references = ["ground_truth", "vae_roundtrip"] if roundtrip else ["ground_truth"]
    scores: dict[str, list[dict]] = {**{r: [] for r in references}, **{m: [] for m in modes}}
    pairs: dict[str, list] = {row: [] for row in scores}
    timings: dict[str, list[float]] = {m: [] for m in modes}

    def judge(row: str, narrative: Narrative, frames: np.ndarray, **extra: float) -> None:
        report = oracle.evaluate(narrative, frames)
        scores[row].append({**report["metrics"], **extra})
        pairs[row].append(report["identity_pairs"])

    for index, (seed, narrative) in enumerate(zip(seeds, narratives, strict=True)):
        schedule = prompt_schedule(narrative, prompting)
        texts = list(dict.fromkeys(schedule.values()))
        with torch.no_grad():
            embeddings = dict(zip(texts, components.text_encoder.encode(texts), strict=True))
        prompts = {first: embeddings[text] for first, text in schedule.items()}
        judge("ground_truth", narrative, narrative.frames)
        if roundtrip:
            judge("vae_roundtrip", narrative, roundtrip_frames(components.vae, narrative.frames))
        if index == 0:  # warm-up, untimed: the first calls of a process allocate and pick kernels
            for mode in modes:
                renderers[mode].render(narrative, prompts, int(seed))
        # the order rotates so that slow drifts of a shared CPU hit every mode alike
        for mode in modes[index % len(modes) :] + modes[: index % len(modes)]:
            rendered = renderers[mode].render(narrative, prompts, int(seed))
            judge(mode, narrative, rendered.frames, bank_recall=rendered.bank_recall)
            timings[mode].append(rendered.generate_s)
    for row, values in scores.items():
        add_chance(values, pairs[row])
    rows = summarise(scores, timings, int(narratives[0].frames.shape[0]))
    return {"narratives": count, "split": split, "stories": stories, "prompting": prompting,
            "gap": gap if stories == "returns" else None,
            "latent_frames": frames, "seeds": [seeds[0], seeds[-1]], "config": str(cfg_path),
            "overrides": list(overrides), "modes": rows}  # fmt: skip


def json_safe(value: object) -> object:
    """NaN (a measure with no test in these narratives) -> null, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    parser = ScriptParser(prog="eval_toy.py")
    parser.add_argument("--narratives", type=int, default=50)
    parser.add_argument("--modes", default="none,nam,nam_sma,full")
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames per story (whole chunks; default 36 for narratives, 21 for returns)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--roundtrip", action="store_true", help="add a row scoring VAE encode-decode of the truth")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="held-out narratives to score: test (reported) or validation (for choosing settings)")
    parser.add_argument("--stories", choices=STORIES, default="narratives",
                        help="narratives (the table) or return stories (the task distillation trains memory on)")
    parser.add_argument("--gap", type=int, default=None,
                        help="latent frames a return story's subject is away (default 9; return stories only)")
    parser.add_argument("--prompts", choices=PROMPTINGS, default=None,
                        help="each segment's prompt switched in at its start (narratives' default) or all joined "
                             "into one (return stories' default)")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    if args.narratives < 1:
        raise ConfigError(f"--narratives {args.narratives}: give at least 1")
    if args.gap is not None and args.stories != "returns":
        raise ConfigError(f"--gap {args.gap}: only return stories have a set cut; add --stories returns or drop --gap")
    gap = 9 if args.gap is None else args.gap
    modes = parse_modes(args.modes)
    config_path, _, overrides = parse_cli(rest, str(DEFAULT_CONFIG), prog="eval_toy.py")
    torch.set_num_threads(args.threads)
    frames = DEFAULT_FRAMES[args.stories] if args.frames is None else args.frames
    result = evaluate(config_path, overrides, args.narratives, modes, frames, args.roundtrip, args.split,
                      args.stories, gap, args.prompts)  # fmt: skip
    if args.json:
        print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    else:
        kind = "narratives" if args.stories == "narratives" else f"return stories (gap {gap})"
        kind += f", {result['prompting']} prompts"
        print(f"{args.narratives} held-out {kind} ({args.split} seeds {result['seeds'][0]}..{result['seeds'][1]}), "
              f"{frames} latent frames each\n")  # fmt: skip
        print(markdown(result["modes"]))
    return 0

