"""The training command line; ``scripts/train.py`` (and the ``train_*.sh`` wrappers) call :func:`train`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from utils.config import load_config, parse_cli
from utils.distributed import barrier, init_distributed, setup_logging
from utils.errors import ConfigError

from .distill import DistillTrainer, run_loop
from .networks import build_networks, build_text_encoder
from .ode_train import ODETrainer
from .plan import STAGES, plan_training

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ode_init": "ode_init.yaml", "init": "train_init.yaml", "long": "train_long.yaml"}


def _stage(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--stage X`` / ``--stage=X`` out of argv."""
    rest, stage = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--stage":
            stage = next(args, None)
            if stage is None:
                raise ConfigError(f"--stage needs a value: one of {', '.join(STAGES)}")
        elif arg.startswith("--stage="):
            stage = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage {stage}: choose one of {', '.join(STAGES)}")
    return stage, rest


def train(argv: list[str]) -> int:
    """``scripts/train.py``: plan, build the networks, then the stage's loop with a progress bar."""
    stage, argv = _stage(argv)
    default = ROOT / "configs" / CONFIGS[stage or "init"]
    config_path, options, overrides = parse_cli(argv, str(default), prog="train.py")
    logdir = options["logdir"] or str(ROOT / "logs" / Path(config_path).stem)
    cfg = load_config(config_path, overrides)
    env = init_distributed()
    setup_logging(env)
    plan = plan_training(cfg, logdir, stage=stage, rank=env.rank, world_size=env.world_size,
                         local_rank=env.local_rank)  # fmt: skip
    logging.getLogger("train").info(
        "stage %s: %d process(es) x batch %d x %d accumulation step(s) = %d samples per step, %d iterations, %s",
        plan.stage, plan.world_size, plan.batch_size, plan.accumulation,
        plan.world_size * plan.batch_size * plan.accumulation, cfg.max_iters, plan.device,
    )  # fmt: skip
    plan.logdir.mkdir(parents=True, exist_ok=True)
    nets = build_networks(plan, with_scores=plan.stage != "ode_init")
    encoder = build_text_encoder(plan)
    if plan.stage == "ode_init":
        trainer = ODETrainer(plan, nets, encoder)
        written = trainer.generate_pairs()
        logging.getLogger("train").info("ODE pairs: %d shard(s) written by this rank", written)
    else:
        trainer = DistillTrainer(plan, nets, encoder)
    with tqdm(total=int(cfg.max_iters), desc=f"train {plan.stage}", unit="it", file=sys.stderr,
              disable=not env.is_main, dynamic_ncols=True) as bar:  # fmt: skip

        def progress(step: int, values: dict) -> None:
            bar.n = step
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            bar.refresh()

        run_loop(trainer, options["resume"], progress)
    barrier()
    if env.is_main:
        export = "lora.pt" if plan.adapter is not None else "base.pt"
        print(f"{plan.logdir / export}  (checkpoints and metrics.jsonl in {plan.logdir})", flush=True)
    return 0
