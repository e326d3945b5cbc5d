"""The training command line; ``scripts/train.py`` (and the ``train_*.sh`` wrappers) call :func:`train`."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from utils.config import load_config, parse_cli, to_container
from utils.distributed import barrier, init_distributed, process_group, setup_logging
from utils.errors import ConfigError
from utils.signals import PREEMPTED, Preempted, StopRequest

from .compat import release_flags, release_training
from .distill import DistillTrainer, run_loop
from .identity import check_allowed
from .logdir import hold_logdir
from .networks import build_networks, build_text_encoder
from .ode_train import ODETrainer
from .plan import STAGES, TrainPlan, plan_training
from .state import TrainState

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ode_init": "ode_init.yaml", "init": "train_init.yaml", "long": "train_long.yaml"}


def _take_option(argv: list[str], name: str) -> tuple[list[str], list[str]]:
    """Take every ``--name X`` / ``--name=X`` out of argv: (values, the rest)."""
    rest, values = [], []
    args = iter(argv)
    for arg in args:
        if arg == name:
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"{name} needs a value")
            values.append(value)
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return values, rest


def _stage(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--stage X`` out of argv."""
    try:
        values, rest = _take_option(argv, "--stage")
    except ConfigError:
        raise ConfigError(f"--stage needs a value: one of {', '.join(STAGES)}") from None
    stage = values[-1] if values else None
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage {stage}: choose one of {', '.join(STAGES)}")
    return stage, rest


def configured_stage(config_path: str) -> str:
    """The ``stage`` a config file names (a release file names none: stage 1), for its defaults."""
    stage = load_config(config_path).get("stage", "init")
    return stage if stage in STAGES else "init"


def _trainer(plan: TrainPlan) -> DistillTrainer | ODETrainer:
    """The stage's trainer on freshly built networks (the ODE stage writes its missing trajectory pairs first)."""
    nets = build_networks(plan, with_scores=plan.stage != "ode_init")
    encoder = build_text_encoder(plan)
    if plan.stage != "ode_init":
        return DistillTrainer(plan, nets, encoder)
    trainer = ODETrainer(plan, nets, encoder)
    written = trainer.generate_pairs()
    logging.getLogger("train").info("ODE pairs: %d shard(s) written by this rank", written)
    return trainer


def train(argv: list[str]) -> int:
    """``scripts/train.py``: plan, hold the logdir, build the networks, then the stage's loop with a progress bar.

    ``--allow_changed KEY[,KEY...]`` resumes a logdir whose run had other values of those keys. Exit code
    :data:`~utils.signals.PREEMPTED` (75) after a stop signal: a checkpoint was written, rerun to continue.
    """
    stage, argv = _stage(argv)
    allowed, argv = _take_option(argv, "--allow_changed")
    argv, flag_overrides, no_auto_resume = release_flags(argv)
    config_path, options, overrides = parse_cli(argv, str(ROOT / "configs" / CONFIGS[stage or "init"]),
                                                prog="train.py")  # fmt: skip
    defaults_stage = stage or configured_stage(config_path)
    default = ROOT / "configs" / CONFIGS[defaults_stage]
    logdir = options["logdir"] or str(ROOT / "logs" / Path(config_path).stem)
    cfg = load_config(config_path, [*flag_overrides, *overrides], defaults_path=default,
                      compat=release_training(defaults_stage))  # fmt: skip
    allow = check_allowed(to_container(cfg), [key for value in allowed for key in value.split(",") if key])
    env = init_distributed()
    setup_logging(env)
    plan = plan_training(cfg, logdir, stage=stage, rank=env.rank, world_size=env.world_size,
                         local_rank=env.local_rank)  # fmt: skip
    with process_group(plan.device), StopRequest() as stop, hold_logdir(plan):
        found = TrainState(plan).find(options["resume"], allow)  # another run's logdir is refused before models load
        if found is not None and no_auto_resume:
            raise ConfigError(f"--no-auto-resume: {plan.logdir} holds this run's checkpoint {found.path.name}, which "
                              "would be continued; choose a new --logdir, or drop --no-auto-resume to continue it")
        logging.getLogger("train").info(
            "stage %s: %d process(es) x batch %d x %d accumulation step(s) = %d samples per step, %d iterations, %s",
            plan.stage, plan.world_size, plan.batch_size, plan.accumulation,
            plan.world_size * plan.batch_size * plan.accumulation, cfg.max_iters, plan.device,
        )  # fmt: skip
        trainer = _trainer(plan)
        with tqdm(total=int(cfg.max_iters), desc=f"train {plan.stage}", unit="it", file=sys.stderr,
                  disable=not env.is_main, dynamic_ncols=True) as bar:  # fmt: skip

            def progress(step: int, values: dict) -> None:
                bar.n = step
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
                bar.refresh()

            try:
                run_loop(trainer, options["resume"], progress, allow_changed=allow, stop=stop)
            except Preempted as stopped:
                if env.is_main:
                    saved = stopped.checkpoint or trainer.state.manager.latest()
                    where = f"{saved} holds the run" if saved else "nothing was saved yet"
                    print(f"stopped by {signal.Signals(stopped.signum).name} at step {stopped.step}: {where}; rerun "
                          f"the same command to continue (exit code {PREEMPTED})", file=sys.stderr, flush=True)
                return PREEMPTED
    barrier()
    if env.is_main:
        export = "lora.pt" if plan.adapter is not None else "base.pt"
        print(f"{plan.logdir / export}  (checkpoints and metrics.jsonl in {plan.logdir})", flush=True)
    return 0
