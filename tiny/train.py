"""MemFlow-Tiny stages that are not distillation: prompts, VAE, teacher, and the final packaging.

usage: python scripts/train_toy.py prompts [--count N] [--config_path configs/toy/teacher.yaml] [key=value ...]
       python scripts/train_toy.py vae     [--config_path configs/toy/vae.yaml] [key=value ...]
       python scripts/train_toy.py teacher [--config_path configs/toy/teacher.yaml] [key=value ...]
       python scripts/train_toy.py package --release DIR --stage1 DIR --stage2 DIR --out DIR --command STR

``scripts/train_toy.sh`` runs them in order around the distillation stages of ``scripts/train.py``.
Each stage writes its result atomically, so a finished stage is recognised by its output file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from memflow.text import TextEncoder
from memflow.vae import WanVAE
from memflow.weights import apply_lora, load_dit
from tiny.teacher_train import (
    WEIGHTS_FILE,
    TeacherSettings,
    TeacherTrainer,
    build_latent_cache,
    check_latent_cache,
    load_latent_cache,
    read_teacher,
)
from tiny.vae_train import (
    VAESettings,
    VAETrainer,
    attribute_contrast,
    colour_probe,
    reconstruction_error,
    roundtrip_report,
)
from tiny.world import (
    CHUNK_FRAMES,
    PROMPT_SEED_OFFSET,
    min_narrative_latent_frames,
    min_return_clip_latent_frames,
    sample_switch_clip,
    split_seeds,
    training_clip,
)
from trainer.state import saved_config
from utils.atomic import atomic_path
from utils.config import ScriptParser, load_config, parse_cli, to_container
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class MetricsFile:
    """Appends one JSON line per logged step and prints a short progress line."""

    def __init__(self, path: Path, stage: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a")
        self.stage = stage
        self.start = time.perf_counter()

    def write(self, step: int, total: int, values: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.start
        self.handle.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 2), **values}) + "\n")
        self.handle.flush()
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(f"[{self.stage}] step {step}/{total} {shown} ({elapsed:.0f} s)", flush=True)


def return_fraction(cfg: DictConfig) -> float:
    """The teacher config's ``return_fraction``, checked to be a share."""
    value = float(cfg.return_fraction)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"return_fraction={value}: give a share of clips between 0 and 1")
    return value


def return_gap(cfg: DictConfig) -> int:
    """The teacher config's ``return_gap``, checked to fit its return clips."""
    gap, frames = int(cfg.return_gap), int(cfg.clip_latent_frames)
    if gap < 0 or (gap > 0 and frames < min_return_clip_latent_frames(gap)):
        longest = frames - 3 * CHUNK_FRAMES
        raise ConfigError(f"return_gap={gap}: give 0, or at most {longest} for {frames}-frame clips (an empty "
                          f"opening chunk, a sighting and a return take the rest); raise clip_latent_frames")
    return gap


def write_prompts(
    folder: Path, count: int, latent_frames: int, return_fraction: float, return_gap: int = 0
) -> list[Path]:
    """Training prompts into ``folder``: clip prompts (stage 1, ODE init; the teacher's mix of clips and return
    clips) and switch pairs (stage 2), training seeds only."""
    seeds = split_seeds("train", count, offset=PROMPT_SEED_OFFSET)
    single = [training_clip(seed, latent_frames, return_fraction, return_gap).text for seed in seeds]
    pairs = [sample_switch_clip(np.random.default_rng([seed, 3]), 12).segments for seed in seeds]
    files = {
        "train.txt": single,
        "switch_first.txt": [segments[0].prompt for segments in pairs],
        "switch_second.txt": [segments[1].prompt for segments in pairs],
    }
    written = []
    for name, lines in files.items():
        with atomic_path(folder / name) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        written.append(folder / name)
    return written


def make_prompts(argv: list[str]) -> int:
    """``prompts [--count N] [--config_path teacher.yaml] [key=value ...]``: the teacher config (with overrides)
    says which mix of clips to draw prompts from and ``prompts_dir`` where to write them."""
    parser = ScriptParser(prog="train_toy.py prompts")
    parser.add_argument("--count", type=int, default=2000, help="prompts per file")
    args, rest = parser.parse_known_args(argv)
    if args.count < 1:
        raise ConfigError(f"--count {args.count}: give a positive number of prompts, e.g. --count 2000")
    config_path, _, overrides = parse_cli(rest, str(ROOT / "configs/toy/teacher.yaml"), prog="train_toy.py prompts")
    cfg = load_config(config_path, overrides)
    for path in write_prompts(Path(cfg.prompts_dir), args.count, int(cfg.clip_latent_frames), return_fraction(cfg),
                              return_gap(cfg)):  # fmt: skip
        print(f"prompts: wrote {path}")
    return 0


def train_vae(argv: list[str]) -> int:
    config_path, _, overrides = parse_cli(argv, str(ROOT / "configs/toy/vae.yaml"), prog="train_toy.py vae")
    cfg = load_config(config_path, overrides)
    out = Path(cfg.output)
    if (out / "config.json").is_file():
        print(f"vae: {out} exists, stage already done")
        return 0
    settings = VAESettings(**to_container(cfg.settings))
    count = int(cfg.get("validation_narratives") or 0)
    narrative_frames = int(cfg.get("validation_narrative_frames") or 0)
    shortest = min_narrative_latent_frames()
    if count < 0 or (count and narrative_frames < shortest):
        raise ConfigError(f"validation_narratives={count}, validation_narrative_frames={narrative_frames}: give a "
                          f"count >= 0 (0 skips the round trip) and at least {shortest} latent frames")  # fmt: skip
    torch.set_num_threads(int(cfg.threads))
    trainer = VAETrainer(settings)
    if cfg.init_from is not None:
        trainer.load_weights(Path(cfg.init_from))
    metrics = MetricsFile(Path(cfg.metrics), "vae")
    total = settings.steps
    window: list[dict[str, float]] = []
    for step in range(1, total + 1):
        window.append(trainer.step())
        if step % int(cfg.log_every) == 0 or step == total:
            metrics.write(step, total, {k: float(np.mean([v[k] for v in window])) for k in window[0]})
            window = []
    _, std = trainer.fit_normalisation()
    trainer.save(out)
    vae = WanVAE.from_diffusers(out)
    frames = int(cfg.validation_latent_frames)
    recon = reconstruction_error(vae, split_seeds("validation", 8), frames)
    probe = colour_probe(vae, split_seeds("validation", 300))
    contrast = attribute_contrast(vae)
    errors = recon.per_frame
    half = len(errors) // 2
    summary = {"val_abs_error_255": float(np.mean(errors)), "val_first_half": float(np.mean(errors[:half])),
               "val_second_half": float(np.mean(errors[half:])), "val_subjects": recon.subjects,
               "val_background": recon.background, "val_colour_probe": probe.accuracy,
               "val_colour_chance": probe.chance, "latent_std_mean": float(np.mean(std)),
               **{f"val_contrast_{change}": value for change, value in contrast.items()}}  # fmt: skip
    if count > 0:
        roundtrip = roundtrip_report(vae, split_seeds("validation", count), narrative_frames)
        summary.update({f"val_roundtrip_{k}": v for k, v in roundtrip.items() if not k.endswith("_tests")})
        print("vae: round trip of {narratives:.0f} validation narratives: identity {identity_consistency:.3f} "
              "({identity_above_chance:.3f} above chance), background {background_consistency:.3f}, adherence "
              "{adherence:.3f}, duplicates {duplicate_rate:.3f}, smoothness {smoothness:.3f}".format(**roundtrip))
    metrics.write(total, total, summary)
    print(f"vae: wrote {out} (validation error over {frames} latent frames {summary['val_abs_error_255']:.2f}/255: "
          f"first half {summary['val_first_half']:.2f}, second half {summary['val_second_half']:.2f}; "
          f"subjects {recon.subjects:.2f}, background {recon.background:.2f}; subject colour read from the latents "
          f"{probe.accuracy:.2f}, chance {probe.chance:.2f}; latent contrast of a subject's shape "
          f"{contrast['shape']:.2f}, colour {contrast['colour']:.2f}, 1-pixel move {contrast['moved_1px']:.2f})")
    return 0


def train_teacher(argv: list[str]) -> int:
    """The bidirectional teacher by flow matching on a latent cache of training clips
    (``configs/toy/teacher.yaml`` with the overrides given)."""
    stage = "teacher"
    config_path, _, overrides = parse_cli(argv, str(ROOT / "configs/toy/teacher.yaml"), prog="train_toy.py teacher")
    cfg = load_config(config_path, overrides)
    fraction, gap = return_fraction(cfg), return_gap(cfg)
    out = Path(cfg.output)
    if (out / WEIGHTS_FILE).is_file():
        print(f"{stage}: {out / WEIGHTS_FILE} exists, stage already done")
        return 0
    snapshot_every = int(cfg.snapshot_every)
    if snapshot_every < 0:
        raise ConfigError(f"snapshot_every={snapshot_every}: must be >= 0 (0 = no snapshots)")
    torch.set_num_threads(int(cfg.threads))
    overrides_dit = to_container(cfg.model_overrides)
    settings = TeacherSettings(preset=str(cfg.model), overrides=overrides_dit, **to_container(cfg.settings))
    init_from = None if cfg.init_from is None else Path(cfg.init_from)
    init_state = None if init_from is None else read_teacher(init_from, settings)  # before minutes of encoding
    cache_path = Path(cfg.cache_path)
    seeds = split_seeds("train", int(cfg.num_clips))
    if not cache_path.is_file():
        vae_dir = Path(cfg.vae_dir)
        if not (vae_dir / "config.json").is_file():
            raise ConfigError(f"vae_dir={vae_dir} holds no trained VAE; run the vae stage first")
        start = time.perf_counter()
        encoder = TextEncoder.from_minilm(text_len=int(overrides_dit["text_len"]))
        build_latent_cache(WanVAE.from_diffusers(vae_dir), encoder, seeds, int(cfg.clip_latent_frames),
                           str(cfg.uncond_prompt), cache_path, fraction, gap)  # fmt: skip
        print(f"{stage}: encoded {len(seeds)} clips into {cache_path} in {time.perf_counter() - start:.0f} s")
    cache = load_latent_cache(cache_path)
    check_latent_cache(cache, cache_path, seeds, int(cfg.clip_latent_frames), int(overrides_dit["text_len"]),
                       fraction, gap, str(cfg.uncond_prompt))  # fmt: skip
    trainer = TeacherTrainer(settings, cache)
    if init_from is not None:
        trainer.load_weights(init_from, init_state)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"{stage}: {params / 1e6:.2f} M parameters, {len(trainer.latents)} cached clips")
    metrics = MetricsFile(Path(cfg.metrics), stage)
    window: list[float] = []
    for step in range(1, settings.steps + 1):
        window.append(trainer.step())
        if step % int(cfg.log_every) == 0 or step == settings.steps:
            metrics.write(step, settings.steps, {"loss": float(np.mean(window))})
            window = []
        if snapshot_every and step % snapshot_every == 0 and step < settings.steps:
            print(f"{stage}: wrote {trainer.save(out.with_name(f'{out.name}-step{step}'))}")
    print(f"{stage}: wrote {trainer.save(out)}")
    return 0


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def package(argv: list[str]) -> int:
    """Merge stage 1's generator with stage 2's LoRA and copy the release (safetensors + note) to ``--out``."""
    parser = ScriptParser(prog="train_toy.py package")
    for name in ("--release", "--stage1", "--stage2", "--out", "--command", "--timings"):
        parser.add_argument(name, required=name != "--timings")
    args = parser.parse_args(argv)
    release, stage1, stage2, out = Path(args.release), Path(args.stage1), Path(args.stage2), Path(args.out)
    for path in (release / "vae" / "config.json", release / "transformer" / WEIGHTS_FILE, stage1 / "base.pt",
                 stage2 / "lora.pt"):  # fmt: skip
        if not path.is_file():
            raise ConfigError(f"package: {path} is missing; run the earlier stages first")
    run = saved_config(stage2)  # the layout stage 2 trained, whatever the toy configs say now
    if run is None:
        raise ConfigError(f"package: {stage2} holds no checkpoint to read the run's model and adapter from; "
                          "give the logdir of stage 2 (train.py --stage long)")
    model, overrides, adapter = str(run["model"]), dict(run["model_overrides"]), run["adapter"]
    generator = load_dit(stage1 / "base.pt", model, **overrides)
    generator = apply_lora(generator, stage2 / "lora.pt", int(adapter["rank"]), float(adapter["alpha"]), merge=True)
    state = {k: v.detach().float().contiguous() for k, v in generator.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "generator.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"model": model, "overrides": json.dumps(overrides)})
    for part in ("vae/config.json", f"vae/{WEIGHTS_FILE}", f"transformer/{WEIGHTS_FILE}"):
        (out / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(release / part, out / part)
    stages = json.loads(Path(args.timings).read_text()) if args.timings else {}
    note = {"command": args.command, "git_commit": git_commit(),
            "stage_seconds": {name: stage["seconds"] for name, stage in stages.items()},
            "stage_commits": {name: stage["commit"] for name, stage in stages.items()},
            "files": {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
                      and p.name != "RELEASE.json"}}  # fmt: skip
    with atomic_path(out / "RELEASE.json") as tmp:
        tmp.write_text(json.dumps(note, indent=2) + "\n")
    print(f"package: wrote {out} ({sum(note['files'].values()) / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str]) -> int:
    commands = {"prompts": make_prompts, "vae": train_vae, "teacher": train_teacher, "package": package}
    if not argv or argv[0] not in commands:
        raise ConfigError(f"usage: train_toy.py {{{','.join(commands)}}} [...]")
    return commands[argv[0]](argv[1:])

