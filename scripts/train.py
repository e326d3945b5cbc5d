"""Training entry point: ODE initialisation, stage 1 (Self-Forcing init) and stage 2 (streaming long tuning).

usage: python scripts/train.py [--stage {ode_init,init,long}] [--config_path PATH] [--logdir DIR] [--resume]
                               [key=value ...]

The stage comes from --stage or the config's ``stage`` key (default config per stage:
configs/ode_init.yaml, configs/train_init.yaml, configs/train_long.yaml). Multi-GPU:
``torchrun --nproc_per_node 8 scripts/train.py ...`` (what ``NPROC=8 bash train_init.sh`` runs).
The logdir defaults to logs/<config file name> (logs/train_init for configs/train_init.yaml). A logdir
holding this run's checkpoints is resumed automatically; another run's is refused.
"""

from trainer.cli import train
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(train)
