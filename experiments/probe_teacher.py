"""Does MemFlow-Tiny's teacher bring a returning subject back unchanged? DMD distils the generator towards
the teacher's score, so if the teacher does not, no training of ours can reward the generator for reading
its memory.

usage: python -m experiments.probe_teacher [--stories returns|named] [--clips 48] [--frames 21] [--gap 9]
                                           [--split validation|test] [--json]
                                           [--reliance_only] [--threads 1] [--sheet PNG]
                                           [--steps 16] [--guidance 3.0] [--negative_prompt ""]
                                           [--forced_past | --own_past [--memory full] [--prompts joined|switched]
                                            [--reference N]]
                                           [--config_path configs/toy/interactive_inference.yaml] [key=value ...]

Each held-out seed gives a return story (``tiny.world.return_story_from_seed``): a subject named by none
of its attributes, a cut away, its return, told in one prompt as the teacher's return clips are. The
teacher (``weights_dir``/transformer, the bidirectional DiT the distillation stages use as real score)
samples the whole clip with the ODE initialisation's guided Euler sampler (``--steps``, ``--guidance``
and ``--negative_prompt`` default to configs/toy/ode_init.yaml), the VAE decodes it and the oracle scores
the returning subject's identity against its own sighting. Rows:

- ``teacher``: the teacher's clips;
- ``teacher_spliced``: each clip with its return taken from the next clip's sample - a subject drawn
  without this clip's sighting, i.e. chance for this teacher (the paired difference to ``teacher`` is
  what the teacher copies);
- ``vae_roundtrip``: the true clips encoded and decoded, the ceiling any sample can reach.

For each row ``sighting_presence`` / ``return_presence`` give how often the subject is drawn at all (the
oracle's presence test) at its sighting and at its return: a subject never drawn cannot be copied.

``sighting_reliance`` (with a ``--gap``) asks the same question of the teacher's score rather than its
samples, and with far less noise: the flow-matching error at the returning subject's latent cells when the
sighting's latent frames are replaced by the empty opening chunk's, over the error with the true clip, at a
few noise levels of the return. ``joint`` noises the whole clip alike (as DMD noises a generated window);
``clean_context`` leaves everything before the return clean (as the causal generator has it). 1.0 means
the teacher ignores the sighting. Removing the sighting also removes where the subject was, which a return
in place reveals by itself; the ``_recoloured`` rows keep place and shape and change only the
colour of the sighting (:func:`recoloured_sighting`), so they measure whether the teacher takes the
subject's look from it.

``--stories named`` asks the first question alone (MemFlow-Tiny's teacher gate): does the teacher draw the subject a
prompt names? Its samples of named-subject clips (one subject, colour and shape stated, 9 latent frames as the
teacher trains on) against their VAE round trip, by adherence and duplicate rate (:func:`probe_named`).

``--forced_past`` asks a causal generator (``generator_ckpt``, a distilled one) instead, sampled with its
few-step list: its return sampled after the TRUE past, with the sighting as it was, removed or recoloured
(:func:`forced_past`). ``--own_past`` asks it from its own past: each story generated whole under ``none`` and
under ``--memory``, does the return repeat the colour the generator gave the sighting (:func:`own_past`)?
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memflow.config import MEMORY_MODES
from memflow.dit import WanDiT, build_dit
from memflow.loading import load_generator, load_text_encoder, load_vae, materialize
from memflow.scheduler import FlowMatchScheduler
from memflow.text import TextEncoder
from memflow.vae import WanVAE
from memflow.weights import load_dit
from pipeline.plan import RunPlan, plan_run
from pipeline.streaming import StreamingGenerator
from tiny.oracle import PRESENT, Oracle, add_chance, paired_difference
from tiny.teacher_train import latent_subject_mask, subject_coverage
from tiny.vae_train import nearest_colours, roundtrip_frames, subject_mask
from tiny.world import (
    COLOURS,
    Narrative,
    from_model_pixels,
    joined_prompt,
    min_return_clip_latent_frames,
    named_clip_from_seed,
    pixel_frame,
    return_story_from_seed,
    split_seeds,
    to_model_pixels,
)
from trainer.ode_init import generate_ode_pairs
from utils.config import ScriptParser, load_config, parse_cli, run_cli
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SAMPLER_CONFIG = ROOT / "configs" / "toy" / "ode_init.yaml"
BATCH = 8
SHEET_STORIES = 8  # stories on --sheet
DRAWN = 0.5  # subject coverage of a latent cell at which own_past counts a subject as drawn there
RELIANCE_SIGMAS = (0.5, 0.7, 0.85, 0.95)  # noise levels of the return at which sighting_reliance is measured


def load_run(cfg_path: str, overrides: list[str]) -> tuple[RunPlan, TextEncoder, WanVAE]:
    """The inference config's plan (made in a scratch output folder, so the probe writes nothing), its text encoder
    and its VAE."""
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_run(load_config(cfg_path, [*overrides, f"output_folder={scratch}", "save_trace=false"]))
    cfg = plan.config
    text = load_text_encoder(cfg.text_encoder, cfg.weights_dir, text_len=plan.dit.text_len,
                             text_dim=plan.dit.text_dim, device=plan.device, dtype=plan.dtype)  # fmt: skip
    vae = load_vae(cfg.vae, cfg.weights_dir, channels=plan.dit.out_dim, device=plan.device, dtype=plan.dtype,
                   seed=cfg.seed)  # fmt: skip
    return plan, text, vae


def load_teacher(cfg) -> WanDiT:
    """The bidirectional teacher of a release folder (``weights_dir``), else random weights (seed)."""
    overrides = dict(cfg.model_overrides)
    if cfg.weights_dir is None:
        return materialize(lambda: build_dit(cfg.model, **overrides), torch.device("cpu"),
                           torch.float32, int(cfg.seed) + 2)  # fmt: skip
    return load_dit(Path(cfg.weights_dir), cfg.model, **overrides)


@torch.no_grad()
def sample_clips(teacher: WanDiT, text: TextEncoder, vae: WanVAE, stories: list[Narrative],
                 latent_size: tuple[int, int], sampler: dict, seed: int) -> list[np.ndarray]:  # fmt: skip
    """The teacher's guided ODE sample of every story's clip (``sampler``: steps, guidance, negative_prompt,
    shift), decoded to uint8 frames; batch ``k`` draws its noise from ``seed + k``."""
    scheduler = FlowMatchScheduler(shift=sampler["shift"])
    uncond = text.encode([sampler["negative_prompt"]])
    videos = []
    for k, first in enumerate(range(0, len(stories), BATCH)):
        group = stories[first : first + BATCH]
        cond = text.encode([joined_prompt(s) for s in group])
        shape = (len(group), group[0].num_latent_frames, teacher.config.in_dim, *latent_size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + k))
        x0, _ = generate_ode_pairs(teacher, scheduler, noise, cond, uncond.expand(len(group), -1, -1),
                                   sampler["steps"], sampler["guidance"], ())  # fmt: skip
        videos += [from_model_pixels(v.float().numpy()) for v in vae.decode(x0[:, -1])]
    return videos


def splice(videos: list[np.ndarray], stories: list[Narrative]) -> list[np.ndarray]:
    """Each video up to its return followed by the next video's return (chance: a subject drawn blind)."""
    out = []
    for i, (video, story) in enumerate(zip(videos, stories, strict=True)):
        cut = story.segments[-1].pixel_start
        other = videos[(i + 1) % len(videos)]
        out.append(np.concatenate([video[:cut], other[cut:]]))
    return out


def returning_subject(story: Narrative) -> tuple[int, int]:
    """(segment index of the return, the returning subject's id)."""
    (index,) = [i for i, s in enumerate(story.segments) if s.returning_subjects]
    (sid,) = story.segments[index].returning_subjects
    return index, sid


def clip_scores(story: Narrative, result: dict) -> dict[str, float]:
    """From the oracle's ``result`` for a clip: the returning subject's identity consistency, whether it is drawn at
    all (oracle presence) at its first sighting and at its return, and how well the clip draws what its prompts
    state (adherence) without extra subjects (duplicate rate)."""
    index, sid = returning_subject(story)
    sighting = next(i for i, s in enumerate(story.segments) if sid in s.subjects)
    seen = [result["segments"][i]["subjects"][str(sid)]["presence"] >= PRESENT for i in (sighting, index)]
    metrics = result["metrics"]
    return {"identity_consistency": metrics["identity_consistency"], "sighting_presence": float(seen[0]),
            "return_presence": float(seen[1]), "adherence": metrics["adherence"],
            "duplicate_rate": metrics["duplicate_rate"]}  # fmt: skip


def per_clip(oracle: Oracle, stories: list[Narrative], videos: list[np.ndarray]) -> list[dict[str, float]]:
    """:func:`clip_scores` of each clip, with its identity by chance (``tiny.oracle.chance_identity``: its return
    against the other clips' sightings) and identity above that."""
    results = [oracle.evaluate(s, v) for s, v in zip(stories, videos, strict=True)]
    scores = [clip_scores(s, r) for s, r in zip(stories, results, strict=True)]
    add_chance(scores, [r["identity_pairs"] for r in results])
    return scores


def named_scores(result: dict) -> dict[str, float]:
    """From the oracle's ``result`` for a named-subject clip: whether its subject is drawn at all, how well the clip
    draws the stated colour and shape (adherence) and its duplicate-subject rate."""
    metrics = result["metrics"]
    return {"presence": float(result["segments"][0]["subjects"]["0"]["presence"] >= PRESENT),
            "adherence": metrics["adherence"], "duplicate_rate": metrics["duplicate_rate"]}  # fmt: skip


def mean_row(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def score(oracle: Oracle, stories: list[Narrative], videos: list[np.ndarray]) -> dict[str, float]:
    """Each measure of :func:`clip_scores` averaged over the clips."""
    return mean_row(per_clip(oracle, stories, videos))


def sighting_frames(story: Narrative) -> list[int]:
    """Latent frames that show the returning subject before its return."""
    index, sid = returning_subject(story)
    return [f for s in story.segments[:index] if sid in s.subjects for f in range(s.start, s.end)]


def without_sighting(latents: torch.Tensor, story: Narrative) -> torch.Tensor:
    """A gapped return clip's latents ``[F, C, h, w]`` with every latent frame that shows the subject before its
    return replaced by the empty opening chunk's (its frames after the first, which alone encodes one pixel frame)."""
    empty = list(range(1, story.segments[0].end))
    seen = sighting_frames(story)
    out = latents.clone()
    for k, frame in enumerate(seen):
        out[frame] = latents[empty[k % len(empty)]]
    return out


def recoloured_sighting(video: torch.Tensor, story: Narrative) -> torch.Tensor:
    """A clip's pixels ``[T, 3, H, W]`` with the colour channels of every subject pixel rolled in the pixel frames
    of its sighting: the same place and shape in another colour."""
    frames = sorted({p for f in sighting_frames(story) for p in range(pixel_frame(f), pixel_frame(f + 1))})
    part = video[frames]
    mask = subject_mask(part.transpose(0, 1)[None])[0].transpose(0, 1)
    out = video.clone()
    out[frames] = torch.where(mask, part.roll(1, dims=1), part)
    return out


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a VAE's encode or decode) over ``x`` in batches of ``BATCH`` clips, concatenated."""
    return torch.cat([fn(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def recoloured_latents(vae: WanVAE, video: torch.Tensor, latents: torch.Tensor,
                       stories: list[Narrative]) -> torch.Tensor:  # fmt: skip
    """``latents`` of the clips ``video`` with the latent frames of each sighting taken from the clip encoded with
    :func:`recoloured_sighting`: only those, as the causal encoder would carry the colour onwards."""
    recoloured_video = torch.stack([recoloured_sighting(v, s) for v, s in zip(video, stories, strict=True)])
    encoded = in_batches(vae.encode, recoloured_video)
    recoloured = latents.clone()
    for i, story in enumerate(stories):
        seen = sighting_frames(story)
        recoloured[i, seen] = encoded[i, seen]
    return recoloured


@torch.no_grad()
def sighting_reliance(teacher: WanDiT, text: TextEncoder, vae: WanVAE, stories: list[Narrative], shift: float,
                      seed: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Error at the returning subject's latent cells without its sighting, or with it recoloured (``_recoloured``),
    over the error with it (see the module docstring), per context noise (``joint``, ``clean_context``) and
    noise level of the return."""
    scheduler = FlowMatchScheduler(shift=shift)
    video = torch.from_numpy(np.stack([to_model_pixels(s.frames) for s in stories]))
    latents = in_batches(vae.encode, video)
    cells = latent_subject_mask(video, (latents.shape[1], *latents.shape[3:])).float()
    back = torch.tensor([s.segments[returning_subject(s)[0]].start for s in stories])
    frames = torch.arange(latents.shape[1])
    cells = cells * (frames[None] >= back[:, None])[:, :, None, None]
    ablated = torch.stack([without_sighting(x, s) for x, s in zip(latents, stories, strict=True)])
    recoloured = recoloured_latents(vae, video, latents, stories)
    context = text.encode([joined_prompt(s) for s in stories])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    target = scheduler.training_target(latents, noise)
    out: dict[str, dict[str, float]] = {}
    for mode in ("joint", "clean_context"):
        removed, recolour = out.setdefault(mode, {}), out.setdefault(f"{mode}_recoloured", {})
        for sigma in RELIANCE_SIGMAS:
            t = scheduler.timesteps[(scheduler.sigmas - sigma).abs().argmin()].expand(latents.shape[:2]).clone()
            if mode == "clean_context":
                t[frames[None] < back[:, None]] = scheduler.timesteps[-1]
            errors = []
            for x0 in (latents, ablated, recoloured):
                xt = scheduler.add_noise(x0, noise, t)
                flow = torch.cat([teacher(xt[i : i + BATCH], t[i : i + BATCH], context[i : i + BATCH])
                                  for i in range(0, len(stories), BATCH)])  # fmt: skip
                errors.append(float(((flow - target).pow(2) * cells[:, :, None]).sum()))
            removed[f"{sigma:g}"] = errors[1] / errors[0]
            recolour[f"{sigma:g}"] = errors[2] / errors[0]
    return out


def return_features(latents: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Per clip, what the colour probe reads: the latent [C] averaged over the cells ``coverage`` [B, F, h, w] (the
    true clip's :func:`tiny.teacher_train.subject_coverage`, 0 outside the frames probed), each weighted by its
    coverage squared, so that cells mostly covered by the subject outweigh those mostly background."""
    weight = coverage[:, :, None].float().pow(2)
    return (latents.float() * weight).sum((1, 3, 4)) / weight.sum((1, 3, 4)).clamp_min(1e-6)


def encode_stories(vae: WanVAE, stories: list[Narrative]) -> tuple[torch.Tensor, ...]:
    """(pixels, latents, subject coverage [B, F, h, w], the returning subject's colour index) of each story."""
    video = torch.from_numpy(np.stack([to_model_pixels(s.frames) for s in stories]))
    latents = in_batches(vae.encode, video)
    coverage = subject_coverage(video, (latents.shape[1], *latents.shape[3:]))
    labels = torch.tensor([list(COLOURS).index(s.subjects[returning_subject(s)[1]].colour) for s in stories])
    return video, latents, coverage, labels


def only_frames(coverage: torch.Tensor, frames: Iterable[int]) -> torch.Tensor:
    """``coverage`` [B, F, h, w] with every latent frame but ``frames`` zeroed."""
    keep = torch.zeros(coverage.shape[1], dtype=torch.bool)
    keep[list(frames)] = True
    return coverage * keep[None, :, None, None]


def story_prompts(text: TextEncoder, stories: list[Narrative], prompting: str) -> list[tuple[int, torch.Tensor]]:
    """(start frame, prompt embeddings [B, T, D]) for a batch of stories that share their segment starts: one
    joined prompt from frame 0, or each segment's own switched in at its start."""
    if prompting == "joined":
        return [(0, text.encode([joined_prompt(s) for s in stories]))]
    starts = [segment.start for segment in stories[0].segments]
    return [(start, text.encode([s.segments[k].prompt for s in stories])) for k, start in enumerate(starts)]


@torch.no_grad()
def sample_return(gen: StreamingGenerator, past: torch.Tensor, prompts: list[tuple[int, torch.Tensor]], back: int,
                  noise: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """``past`` [B, F, C, h, w] up to latent frame ``back`` committed chunk by chunk as if generated, the rest
    sampled from ``noise`` with the generator's few-step list. Returns the latents and every sampler step's x0
    prediction of the first sampled chunk."""
    b, f, _, h, w = past.shape
    schedule = dict(prompts)
    gen.start(schedule[0], num_frames=f, latent_height=h, latent_width=w, batch_size=b)
    out, steps = past.clone(), []
    for start in range(0, f, gen.chunk):
        if start > 0 and start in schedule:
            gen.switch_prompt(schedule[start])
        chunk = slice(start, start + gen.chunk)
        if start >= back:
            record = (lambda step, x0: steps.append(x0)) if start == back else None
            out[:, chunk] = gen.denoise_chunk(noise[:, chunk], on_step=record)
        gen.commit_chunk(out[:, chunk])
    return out, steps


@torch.no_grad()
def forced_past(gen: StreamingGenerator, text: TextEncoder, vae: WanVAE, stories: list[Narrative],
                reference: list[Narrative], prompting: str, seed: int) -> dict:  # fmt: skip
    """Does the generator draw the returning subject like its sighting when everything before the return is the
    TRUE clip? Per variant of that past (``true``; ``removed`` and ``recoloured`` as in :func:`sighting_reliance`)
    the return is sampled with the same noise, placed after the true past, decoded and scored by the oracle
    against the true sighting (identity, by chance, above chance), and its latents are read by a colour probe
    (:func:`tiny.vae_train.nearest_colours` on :func:`return_features`, referenced on the true returns of
    ``reference``), also at every sampler step of the first returning chunk (``colour_by_step``).
    ``vae_roundtrip`` is the true clip: the ceiling. A sample that copies scores as ``true`` above
    ``removed``."""
    backs = {s.segments[returning_subject(s)[0]].start for s in stories}
    if len(backs) != 1:
        raise ValueError(f"the stories return at different frames {sorted(backs)}; give them one length and gap")
    back = backs.pop()
    colour_names = list(COLOURS)
    _, ref_latents, ref_coverage, ref_labels = encode_stories(vae, reference)
    ref_features = return_features(ref_latents, only_frames(ref_coverage, range(back, ref_coverage.shape[1])))
    video, latents, coverage, labels = encode_stories(vae, stories)
    coverage = only_frames(coverage, range(back, coverage.shape[1]))

    first = coverage.clone()
    first[:, back + gen.chunk :] = 0

    def colour(sampled: torch.Tensor, where: torch.Tensor = coverage) -> float:
        guess = nearest_colours(ref_features, ref_labels, return_features(sampled, where))
        return float((guess == labels).float().mean())

    recoloured = recoloured_latents(vae, video, latents, stories)
    pasts = {"true": latents, "removed": torch.stack([without_sighting(x, s) for x, s in zip(latents, stories,
                                                                                               strict=True)]),
             "recoloured": recoloured}  # fmt: skip
    oracle = Oracle()

    def decode(x: torch.Tensor) -> list[np.ndarray]:
        decoded = in_batches(vae.decode, x)
        return [from_model_pixels(v.float().numpy()) for v in decoded]

    scores = {"vae_roundtrip": per_clip(oracle, stories, decode(latents))}
    rows = {"vae_roundtrip": {**mean_row(scores["vae_roundtrip"]), "colour": colour(latents)}}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    for name, past in pasts.items():
        sampled, steps = [], []
        for i in range(0, len(stories), BATCH):
            batch = slice(i, i + BATCH)
            out, x0s = sample_return(gen, past[batch], story_prompts(text, stories[batch], prompting), back,
                                     noise[batch])  # fmt: skip
            sampled.append(out)
            steps.append(x0s)
        sampled = torch.cat(sampled)
        sampled[:, :back] = latents[:, :back]  # scored against the true sighting, whatever the past it was given
        scores[name] = per_clip(oracle, stories, decode(sampled))
        by_step = [torch.cat([batch_steps[k] for batch_steps in steps]) for k in range(len(steps[0]))]
        probed = latents.clone()
        colours = []
        for x0 in by_step:
            probed[:, back : back + gen.chunk] = x0
            colours.append(colour(probed, first))
        rows[name] = {**mean_row(scores[name]), "colour": colour(sampled), "colour_by_step": colours}
    chance_colour = float((labels == torch.bincount(ref_labels, minlength=len(colour_names)).argmax()).float().mean())
    return {"back": back, "rows": rows, "colour_commonest": chance_colour,
            "true_vs_removed": paired_difference(scores["true"], scores["removed"], "identity_above_chance")}


@torch.no_grad()
def own_past(gens: dict[str, StreamingGenerator], text: TextEncoder, vae: WanVAE, stories: list[Narrative],
             reference: list[Narrative], prompting: str, seed: int) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Does the return take the look the generator itself gave the sighting? Nothing in a return story's text fixes
    the subject's colour, so from its own past only memory can make the return repeat it. Each story is generated
    whole with the same noise under every memory in ``gens`` (``none`` first), and the colour probe of
    :func:`forced_past` reads the generated sighting and the generated return on the cells where the decoded
    sample shows a subject (``sighting_drawn``, ``return_drawn``: how often some cell is mostly covered; the
    generator places an unnamed subject where it likes, so the true clip's cells may show only background).
    ``follows``: the share of stories whose return reads as their own sighting; ``follows_chance``: as the
    previous story's sighting (a generator that draws every subject alike follows by chance). The paired
    difference of ``follows`` to ``none`` is what the memory adds. The oracle's rows (identity, adherence,
    duplicates, as :func:`per_clip`) say whether the samples draw a story at all. Returns the report and each
    memory's decoded videos."""
    sightings = {tuple(sighting_frames(s)) for s in stories + reference}
    backs = {s.segments[returning_subject(s)[0]].start for s in stories + reference}
    if len(sightings) != 1 or len(backs) != 1:
        raise ValueError("the stories are seen and return at different frames; give them one length and gap")
    sighting, back = sightings.pop(), backs.pop()
    _, ref_latents, ref_coverage, ref_labels = encode_stories(vae, reference)
    _, latents, coverage, labels = encode_stories(vae, stories)
    parts = {"sighting": sighting, "return": range(back, latents.shape[1])}
    refs = {part: return_features(ref_latents, only_frames(ref_coverage, frames)) for part, frames in parts.items()}

    def colours(x: torch.Tensor, part: str, where: torch.Tensor = coverage) -> torch.Tensor:
        return nearest_colours(refs[part], ref_labels, return_features(x, only_frames(where, parts[part])))

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    rows, follows, videos, oracle = {}, {}, {}, Oracle()
    for memory, gen in gens.items():
        sampled = torch.cat([sample_return(gen, latents[i : i + BATCH], story_prompts(text, stories[i : i + BATCH],
                                                                                        prompting),
                                           0, noise[i : i + BATCH])[0]
                             for i in range(0, len(stories), BATCH)])  # fmt: skip
        decoded = in_batches(vae.decode, sampled)
        videos[memory] = [from_model_pixels(v.float().numpy()) for v in decoded]
        drawn = subject_coverage(decoded, (latents.shape[1], *latents.shape[3:]))
        seen, back_colour = colours(sampled, "sighting", drawn), colours(sampled, "return", drawn)
        shown = {part: (only_frames(drawn, frames) >= DRAWN).flatten(1).any(1) for part, frames in parts.items()}
        follows[memory] = [{"follows": float(a == b)} for a, b in zip(seen, back_colour, strict=True)]
        rows[memory] = {**mean_row(per_clip(oracle, stories, videos[memory])),
                        "sighting_true_colour": float((seen == labels).float().mean()),
                        "return_true_colour": float((back_colour == labels).float().mean()),
                        "follows": float((seen == back_colour).float().mean()),
                        "follows_chance": float((seen.roll(1) == back_colour).float().mean()),
                        "sighting_drawn": float(shown["sighting"].float().mean()),
                        "return_drawn": float(shown["return"].float().mean())}  # fmt: skip
    truth = {part: float((colours(latents, part) == labels).float().mean()) for part in parts}
    versus = {m: paired_difference(follows[m], follows["none"], "follows") for m in gens if m != "none"}
    report = {"sighting": list(sighting), "back": back, "true_clip_colour": truth, "rows": rows,
              "follows_vs_none": versus}  # fmt: skip
    return report, videos


def story_sheet(stories: list[Narrative], videos: dict[str, list[np.ndarray]], chunk: int) -> np.ndarray:
    """``uint8 [H, W, 3]``: for each of the first ``SHEET_STORIES`` stories a row of its true frames over a row of
    each of its samples (``videos``: per sampler or memory, one video per story), showing the last latent frame
    of every chunk."""
    frames = [pixel_frame(f) for f in range(chunk - 1, stories[0].num_latent_frames, chunk)]
    rows = [np.concatenate([video[p] for p in frames], 1)
            for i, story in enumerate(stories[:SHEET_STORIES])
            for video in (story.frames, *(v[i] for v in videos.values()))]  # fmt: skip
    return np.concatenate(rows, 0)


def probe_named(cfg_path: str, overrides: list[str], clips: int, frames: int, split: str, sampler: dict,
                sheet: str | None = None) -> dict:  # fmt: skip
    """Does the teacher draw what a prompt names? Its samples of ``clips`` named-subject clips
    (``tiny.world.named_clip_from_seed``: one subject, its colour and shape stated, as the teacher trains on)
    against their VAE round trip, the ceiling."""
    stories = [named_clip_from_seed(seed, frames) for seed in split_seeds(split, clips)]
    plan, text, vae = load_run(cfg_path, overrides)
    teacher = load_teacher(plan.config).eval().requires_grad_(False)
    videos = sample_clips(teacher, text, vae, stories, (plan.latent_height, plan.latent_width), sampler,
                          int(plan.config.seed))  # fmt: skip
    oracle = Oracle()
    roundtrip = [roundtrip_frames(vae, s.frames) for s in stories]
    rows = {name: mean_row([named_scores(oracle.evaluate(s, v)) for s, v in zip(stories, vids, strict=True)])
            for name, vids in (("teacher", videos), ("vae_roundtrip", roundtrip))}  # fmt: skip
    if sheet:
        Image.fromarray(story_sheet(stories, {"teacher": videos}, plan.stream.num_frame_per_block)).save(sheet)
    ceiling = rows["vae_roundtrip"]["adherence"]
    return {"clips": clips, "split": split, "latent_frames": frames, "stories": "named", "config": str(cfg_path),
            "overrides": overrides, "sampler": sampler, "rows": rows,
            "adherence_vs_roundtrip": rows["teacher"]["adherence"] / ceiling if ceiling else None}  # fmt: skip


def probe(cfg_path: str, overrides: list[str], clips: int, frames: int, gap: int, split: str, sampler: dict,
          reliance_only: bool = False, forced: dict | None = None, sheet: str | None = None) -> dict:  # fmt: skip
    """The teacher's rows and ``sighting_reliance``, or with ``forced`` (memory, prompts, reference and ``own``)
    the generator's :func:`forced_past` rows, or with ``own`` true its :func:`own_past` rows
    against memory ``none``. ``sheet``: a PNG path for :func:`story_sheet` of the teacher's or own-past samples."""
    reference = forced["reference"] if forced else 0
    try:
        stories = [return_story_from_seed(seed, frames, gap) for seed in split_seeds(split, clips + reference)]
    except ValueError as err:
        raise ConfigError(f"--frames {frames} --gap {gap}: {err} (at least "
                          f"{min_return_clip_latent_frames(gap)} frames for this gap)") from None  # fmt: skip
    plan, text, vae = load_run(cfg_path, overrides)
    cfg = plan.config
    common = {"clips": clips, "split": split, "latent_frames": frames, "gap": gap, "config": str(cfg_path),
              "overrides": overrides}  # fmt: skip
    if forced:
        steps = list(plan.stream.denoising_step_list)
        dit = load_generator(cfg.model, dict(cfg.model_overrides), checkpoint=cfg.generator_ckpt,
                             weights_dir=cfg.weights_dir, device=plan.device, dtype=plan.dtype,
                             seed=cfg.seed).eval()  # fmt: skip
        if forced["own"]:
            gens = {m: StreamingGenerator(dit, dataclasses.replace(plan.stream, memory=m))
                    for m in ("none", forced["memory"])}  # fmt: skip
            result, videos = own_past(gens, text, vae, stories[:clips], stories[clips:], forced["prompts"],
                                      int(cfg.seed))  # fmt: skip
            if sheet:
                Image.fromarray(story_sheet(stories[:clips], videos, plan.stream.num_frame_per_block)).save(sheet)
            return {**common, "own_past": {**forced, "steps": steps, **result}}
        gen = StreamingGenerator(dit, dataclasses.replace(plan.stream, memory=forced["memory"]))
        result = forced_past(gen, text, vae, stories[:clips], stories[clips:], forced["prompts"], int(cfg.seed))
        return {**common, "forced_past": {**forced, "steps": steps, **result}}
    teacher = load_teacher(cfg).eval().requires_grad_(False)
    rows = copied = None
    if not reliance_only:
        videos = sample_clips(teacher, text, vae, stories, (plan.latent_height, plan.latent_width), sampler,
                              int(cfg.seed))  # fmt: skip
        oracle = Oracle()
        roundtrip = [roundtrip_frames(vae, s.frames) for s in stories]
        scores = {"teacher": per_clip(oracle, stories, videos),
                  "teacher_spliced": per_clip(oracle, stories, splice(videos, stories)),
                  "vae_roundtrip": per_clip(oracle, stories, roundtrip)}  # fmt: skip
        rows = {k: mean_row(v) for k, v in scores.items()}
        copied = paired_difference(scores["teacher"], scores["teacher_spliced"], "identity_consistency")
        if sheet:
            Image.fromarray(story_sheet(stories, {"teacher": videos}, plan.stream.num_frame_per_block)).save(sheet)
    reliance = sighting_reliance(teacher, text, vae, stories, sampler["shift"], int(cfg.seed)) if gap > 0 else None
    return {**common, "sampler": sampler, "rows": rows, "teacher_vs_spliced": copied, "sighting_reliance": reliance}


def main(argv: list[str]) -> int:
    defaults = load_config(SAMPLER_CONFIG)
    parser = ScriptParser(prog="probe_teacher.py")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--stories", choices=("returns", "named"), default="returns",
                        help="return stories, or named-subject clips (does the teacher draw what a prompt names?)")
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames per clip (default 21 for returns, 9 - the teacher's clip - for named)")
    parser.add_argument("--gap", type=int, default=None,
                        help="returns: latent frames the subject is away (default 9; 0: no opening chunk)")
    parser.add_argument("--split", choices=("test", "validation"), default="validation")
    parser.add_argument("--steps", type=int, default=int(defaults.ode_steps))
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance of the teacher (default {float(defaults.guidance_scale):g})")
    parser.add_argument("--negative_prompt", default=str(defaults.negative_prompt))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reliance_only", action="store_true",
                        help="only sighting_reliance (seconds), not the sampled rows (minutes)")
    parser.add_argument("--forced_past", action="store_true",
                        help="probe the causal generator (generator_ckpt) instead: its return given the true past")
    parser.add_argument("--own_past", action="store_true",
                        help="probe the causal generator from its own past: does its return repeat its own sighting "
                             "with --memory more often than with none")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="full",
                        help="--forced_past, --own_past: the memory mode")
    parser.add_argument("--prompts", choices=("joined", "switched"), default="joined",
                        help="--forced_past, --own_past: one joined prompt, or each segment's own switched in")
    parser.add_argument("--sheet", default=None,
                        help=f"a new PNG of the first {SHEET_STORIES} stories, each true over its samples (the "
                             "teacher's, or --own_past's)")
    parser.add_argument("--reference", type=int, default=None,
                        help="--forced_past, --own_past: return clips the colour probe is referenced on "
                             "(default 2 x --clips)")
    args, rest = parser.parse_known_args(argv)
    named = args.stories == "named"
    if named:
        extra = [flag for flag, on in (("--gap", args.gap is not None), ("--reliance_only", args.reliance_only),
                                       ("--forced_past", args.forced_past), ("--own_past", args.own_past)) if on]
        if extra:
            raise ConfigError(f"--stories named with {' '.join(extra)}: those probe return stories; drop them")
    args.frames = (9 if named else 21) if args.frames is None else args.frames
    args.gap = 9 if args.gap is None else args.gap
    if args.clips < 2:
        raise ConfigError(f"--clips {args.clips}: give at least 2 (the chance row splices one clip into another)")
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: the sampler needs at least 1 step")
    if args.reliance_only and args.gap < 1:
        raise ConfigError(f"--reliance_only --gap {args.gap}: sighting_reliance needs a gap (its empty opening chunk "
                          "stands in for the sighting); give --gap 9")  # fmt: skip
    forced = None
    if args.forced_past and args.own_past:
        raise ConfigError("--forced_past and --own_past: give one (the true past, or the generator's own)")
    if args.own_past and args.memory == "none":
        raise ConfigError("--own_past --memory none: it compares a memory with none; give --memory nam")
    if args.forced_past or args.own_past:
        flag = "--forced_past" if args.forced_past else "--own_past"
        if args.gap < 1 or args.reliance_only:
            raise ConfigError(f"{flag} with --gap {args.gap}{' --reliance_only' * args.reliance_only}: "
                              "it needs a gap (a sighting the local window has lost) and samples; give --gap 9 "
                              "without --reliance_only")  # fmt: skip
        reference = 2 * args.clips if args.reference is None else args.reference
        if reference < 3 * len(COLOURS):
            raise ConfigError(f"--reference {reference}: the colour probe needs at least {3 * len(COLOURS)} "
                              "reference clips")  # fmt: skip
        if args.guidance is not None:
            raise ConfigError(f"{flag} --guidance {args.guidance:g}: the generator's few-step list is not guided; "
                              "drop --guidance")  # fmt: skip
        forced = {"memory": args.memory, "prompts": args.prompts, "reference": reference, "own": args.own_past}
    if args.sheet is not None:
        if args.forced_past or args.reliance_only:
            raise ConfigError(f"--sheet with {'--forced_past' if args.forced_past else '--reliance_only'}: the sheet "
                              "shows the teacher's samples or --own_past's; drop --sheet")  # fmt: skip
        if Path(args.sheet).exists() or not Path(args.sheet).parent.is_dir():
            raise ConfigError(f"--sheet {args.sheet}: give a new file in an existing folder (this one "
                              f"{'exists' if Path(args.sheet).exists() else 'has no folder'})")  # fmt: skip
    config_path, _, overrides = parse_cli(rest, str(DEFAULT_CONFIG), prog="probe_teacher.py")
    torch.set_num_threads(args.threads)
    teacher_guidance = float(defaults.guidance_scale) if args.guidance is None else args.guidance
    sampler = {"steps": args.steps, "guidance": teacher_guidance, "negative_prompt": args.negative_prompt,
               "shift": float(defaults.timestep_shift)}  # fmt: skip
    if named:
        result = probe_named(config_path, overrides, args.clips, args.frames, args.split, sampler, args.sheet)
    else:
        result = probe(config_path, overrides, args.clips, args.frames, args.gap, args.split, sampler,
                       args.reliance_only, forced, args.sheet)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if named:
        print(f"{args.clips} {args.split} named-subject clips of {args.frames} latent frames\n")
        print_table(["row", "subject drawn", "adherence", "duplicates"],
                    [[name, f"{row['presence']:.2f}", f"{row['adherence']:.3f}", f"{row['duplicate_rate']:.3f}"]
                     for name, row in result["rows"].items()])  # fmt: skip
        ratio = result["adherence_vs_roundtrip"]
        print(f"\nteacher adherence / round trip's: {'-' if ratio is None else f'{ratio:.2f}'}")
        return 0
    print(f"{args.clips} {args.split} return clips of {args.frames} latent frames, gap {args.gap}\n")
    if forced:
        if forced["own"]:
            print_own_past(result["own_past"])
        else:
            print_forced_past(result["forced_past"])
        return 0
    if result["rows"] is not None:
        print_table(["row", "identity consistency", "subject drawn at sighting", "at return", "adherence",
                     "duplicates"],
                    [[name, f"{row['identity_consistency']:.3f}", f"{row['sighting_presence']:.2f}",
                      f"{row['return_presence']:.2f}", f"{row['adherence']:.2f}", f"{row['duplicate_rate']:.2f}"]
                     for name, row in result["rows"].items()])  # fmt: skip
        print(f"\nteacher - spliced: {paired(result['teacher_vs_spliced'])}")
    if result["sighting_reliance"] is not None:
        print("sighting reliance (error without the sighting, or recoloured, / with it) at return noise "
              + " ".join(f"{s:g}" for s in RELIANCE_SIGMAS))  # fmt: skip
        for mode, levels in result["sighting_reliance"].items():
            print(f"  {mode}: " + " ".join(f"{v:.3f}" for v in levels.values()))
    return 0


def print_forced_past(result: dict) -> None:
    print(f"the return (from latent frame {result['back']}) sampled after the true past; memory {result['memory']}, "
          f"{result['prompts']} prompts, steps {result['steps']}\n")
    print_table(["past", "identity", "by chance", "above chance", "colour probe", "colour probe by sampler step"],
                [[name, f"{row['identity_consistency']:.3f}", f"{row['identity_chance']:.3f}",
                  f"{row['identity_above_chance']:+.3f}", f"{row['colour']:.2f}",
                  " ".join(f"{v:.2f}" for v in row.get("colour_by_step", [])) or "-"]
                 for name, row in result["rows"].items()])  # fmt: skip
    print(f"\nabove chance, true - removed: {paired(result['true_vs_removed'])}; "
          f"colour probe answering the commonest colour: {result['colour_commonest']:.2f}")


def print_own_past(result: dict) -> None:
    print(f"whole stories from noise; sighting latent frames {result['sighting'][0]}-{result['sighting'][-1]}, return "
          f"from {result['back']}; {result['prompts']} prompts, steps {result['steps']}\n")
    print_table(["memory", "identity", "by chance", "adherence", "duplicates", "drawn: sighting", "return",
                 "sighting: true colour", "return: true colour", "return follows its sighting", "by chance"],
                [[name, *(f"{row[key]:.2f}" for key in ("identity_consistency", "identity_chance", "adherence",
                                                          "duplicate_rate", "sighting_drawn", "return_drawn",
                                                          "sighting_true_colour", "return_true_colour", "follows",
                                                          "follows_chance"))]
                 for name, row in result["rows"].items()])  # fmt: skip
    for name, c in result["follows_vs_none"].items():
        truth = result["true_clip_colour"]
        print(f"\nfollows, {name} - none: {paired(c)}; the true clips read {truth['sighting']:.2f} (sighting) and "
              f"{truth['return']:.2f} (return)")


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A markdown table."""
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def paired(c: dict) -> str:
    """A :func:`tiny.oracle.paired_difference` as mean ± SE (wins:losses)."""
    return f"{c['mean']:+.3f} ± {c['se']:.3f} ({c['wins']:.0f}:{c['losses']:.0f})"


if __name__ == "__main__":
    run_cli(main)
