"""Does MemFlow-Tiny's teacher bring a returning subject back unchanged? DMD distils the generator towards
the teacher's score, so if the teacher does not, no training of ours can reward the generator for reading
its memory.

usage: python scripts/probe_teacher.py [--clips 48] [--frames 21] [--gap 9] [--split validation|test] [--json]
                                       [--reliance_only] [--threads 1]
                                       [--steps 16] [--guidance 3.0] [--negative_prompt ""]
                                       [--config_path configs/toy/interactive_inference.yaml] [key=value ...]

Each held-out seed gives a return story (``utils.world.return_story_from_seed``): a subject named by none
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
in place reveals by itself; the ``_recoloured`` rows keep place, shape and pattern and change only the
colour of the sighting (:func:`recoloured_sighting`), so they measure whether the teacher takes the
subject's look from it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memflow.dit import WanDiT, build_dit  # noqa: E402
from memflow.errors import ConfigError  # noqa: E402
from memflow.scheduler import FlowMatchScheduler  # noqa: E402
from memflow.text import TextEncoder  # noqa: E402
from memflow.vae import WanVAE  # noqa: E402
from memflow.weights import load_dit  # noqa: E402
from pipeline.inference import build_text_encoder, build_vae, materialize, plan_run  # noqa: E402
from trainer.ode_init import generate_ode_pairs  # noqa: E402
from trainer.teacher_train import latent_subject_mask  # noqa: E402
from trainer.vae_train import roundtrip_frames, subject_mask  # noqa: E402
from utils.config import ScriptParser, load_config, parse_cli, run_cli  # noqa: E402
from utils.oracle import PRESENT, Oracle, paired_difference  # noqa: E402
from utils.world import (  # noqa: E402
    Narrative,
    from_model_pixels,
    joined_prompt,
    min_return_clip_latent_frames,
    pixel_frame,
    return_story_from_seed,
    split_seeds,
    to_model_pixels,
)

DEFAULT_CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SAMPLER_CONFIG = ROOT / "configs" / "toy" / "ode_init.yaml"
BATCH = 8
RELIANCE_SIGMAS = (0.5, 0.7, 0.85, 0.95)  # noise levels of the return at which sighting_reliance is measured


def load_teacher(cfg) -> WanDiT:
    """The bidirectional teacher of a release folder (``weights_dir``), else random weights (seed)."""
    overrides = dict(cfg.model_overrides)
    if cfg.weights_dir is None:
        return materialize(lambda: build_dit(cfg.model, causal=False, **overrides), torch.device("cpu"),
                           torch.float32, int(cfg.seed) + 2)  # fmt: skip
    return load_dit(Path(cfg.weights_dir), cfg.model, causal=False, **overrides)


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


def clip_scores(oracle: Oracle, story: Narrative, frames: np.ndarray) -> dict[str, float]:
    """The returning subject's identity consistency, and whether it is drawn at all (oracle presence) at its
    first sighting and at its return."""
    result = oracle.evaluate(story, frames)
    index, sid = returning_subject(story)
    sighting = next(i for i, s in enumerate(story.segments) if sid in s.subjects)
    seen = [result["segments"][i]["subjects"][str(sid)]["presence"] >= PRESENT for i in (sighting, index)]
    return {"identity_consistency": result["metrics"]["identity_consistency"],
            "sighting_presence": float(seen[0]), "return_presence": float(seen[1])}  # fmt: skip


def per_clip(oracle: Oracle, stories: list[Narrative], videos: list[np.ndarray]) -> list[dict[str, float]]:
    return [clip_scores(oracle, s, v) for s, v in zip(stories, videos, strict=True)]


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
    of its sighting: the same place, shape and pattern in another colour."""
    frames = sorted({p for f in sighting_frames(story) for p in range(pixel_frame(f), pixel_frame(f + 1))})
    part = video[frames]
    mask = subject_mask(part.transpose(0, 1)[None])[0].transpose(0, 1)
    out = video.clone()
    out[frames] = torch.where(mask, part.roll(1, dims=1), part)
    return out


@torch.no_grad()
def sighting_reliance(teacher: WanDiT, text: TextEncoder, vae: WanVAE, stories: list[Narrative], shift: float,
                      seed: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Error at the returning subject's latent cells without its sighting, or with it recoloured (``_recoloured``),
    over the error with it (see the module docstring), per context noise (``joint``, ``clean_context``) and
    noise level of the return."""
    scheduler = FlowMatchScheduler(shift=shift)
    video = torch.from_numpy(np.stack([to_model_pixels(s.frames) for s in stories]))
    latents = torch.cat([vae.encode(video[i : i + BATCH]) for i in range(0, len(stories), BATCH)])
    cells = latent_subject_mask(video, (latents.shape[1], *latents.shape[3:])).float()
    back = torch.tensor([s.segments[returning_subject(s)[0]].start for s in stories])
    frames = torch.arange(latents.shape[1])
    cells = cells * (frames[None] >= back[:, None])[:, :, None, None]
    ablated = torch.stack([without_sighting(x, s) for x, s in zip(latents, stories, strict=True)])
    recoloured_video = torch.stack([recoloured_sighting(v, s) for v, s in zip(video, stories, strict=True)])
    encoded = torch.cat([vae.encode(recoloured_video[i : i + BATCH]) for i in range(0, len(stories), BATCH)])
    recoloured = latents.clone()
    for i, story in enumerate(stories):  # only the sighting's latents: the causal encoder carries colour onwards
        seen = sighting_frames(story)
        recoloured[i, seen] = encoded[i, seen]
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


def probe(cfg_path: str, overrides: list[str], clips: int, frames: int, gap: int, split: str, sampler: dict,
          reliance_only: bool = False) -> dict:  # fmt: skip
    try:
        stories = [return_story_from_seed(seed, frames, gap) for seed in split_seeds(split, clips)]
    except ValueError as err:
        raise ConfigError(f"--frames {frames} --gap {gap}: {err} (at least "
                          f"{min_return_clip_latent_frames(gap)} frames for this gap)") from None  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(cfg_path, [*overrides, f"output_folder={scratch}", "save_trace=false"])
        plan = plan_run(cfg)
    text, vae = build_text_encoder(plan), build_vae(plan)
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
    reliance = sighting_reliance(teacher, text, vae, stories, sampler["shift"], int(cfg.seed)) if gap > 0 else None
    return {"clips": clips, "split": split, "latent_frames": frames, "gap": gap, "sampler": sampler,
            "config": str(cfg_path), "overrides": overrides, "rows": rows,
            "teacher_vs_spliced": copied, "sighting_reliance": reliance}  # fmt: skip


def main(argv: list[str]) -> int:
    defaults = load_config(SAMPLER_CONFIG)
    parser = ScriptParser(prog="probe_teacher.py")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--frames", type=int, default=21, help="latent frames per clip (the teacher's clip length)")
    parser.add_argument("--gap", type=int, default=9, help="latent frames the subject is away (0: no opening chunk)")
    parser.add_argument("--split", choices=("test", "validation"), default="validation")
    parser.add_argument("--steps", type=int, default=int(defaults.ode_steps))
    parser.add_argument("--guidance", type=float, default=float(defaults.guidance_scale))
    parser.add_argument("--negative_prompt", default=str(defaults.negative_prompt))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reliance_only", action="store_true",
                        help="only sighting_reliance (seconds), not the sampled rows (minutes)")
    args, rest = parser.parse_known_args(argv)
    if args.clips < 2:
        raise ConfigError(f"--clips {args.clips}: give at least 2 (the chance row splices one clip into another)")
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: the sampler needs at least 1 step")
    if args.reliance_only and args.gap < 1:
        raise ConfigError(f"--reliance_only --gap {args.gap}: sighting_reliance needs a gap (its empty opening chunk "
                          "stands in for the sighting); give --gap 9")  # fmt: skip
    config_path, _, overrides = parse_cli(rest, str(DEFAULT_CONFIG), prog="probe_teacher.py")
    torch.set_num_threads(args.threads)
    sampler = {"steps": args.steps, "guidance": args.guidance, "negative_prompt": args.negative_prompt,
               "shift": float(defaults.timestep_shift)}  # fmt: skip
    result = probe(config_path, overrides, args.clips, args.frames, args.gap, args.split, sampler, args.reliance_only)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.clips} {args.split} return clips of {args.frames} latent frames, gap {args.gap}\n")
    if result["rows"] is not None:
        print("| row | identity consistency | subject drawn at sighting | at return |\n|---|---|---|---|")
        for name, row in result["rows"].items():
            print(f"| {name} | {row['identity_consistency']:.3f} | {row['sighting_presence']:.2f} "
                  f"| {row['return_presence']:.2f} |")  # fmt: skip
        c = result["teacher_vs_spliced"]
        print(f"\nteacher - spliced: {c['mean']:+.3f} ± {c['se']:.3f} ({c['wins']:.0f}:{c['losses']:.0f})")
    if result["sighting_reliance"] is not None:
        print("sighting reliance (error without the sighting, or recoloured, / with it) at return noise "
              + " ".join(f"{s:g}" for s in RELIANCE_SIGMAS))  # fmt: skip
        for mode, levels in result["sighting_reliance"].items():
            print(f"  {mode}: " + " ".join(f"{v:.3f}" for v in levels.values()))
    return 0


if __name__ == "__main__":
    run_cli(main)
