"""Training entry point: ODE initialisation, stage 1 (Self-Forcing init) and stage 2 (streaming long tuning).

usage: python scripts/train.py [--stage {ode_init,init,long}] [--config_path PATH] [--logdir DIR] [--resume]
                               [--allow_changed KEY[,KEY...]] [key=value ...]

The stage comes from --stage or the config's ``stage`` key (default config per stage:
configs/ode_init.yaml, configs/train_init.yaml, configs/train_long.yaml). Multi-GPU:
``torchrun --nproc_per_node 8 scripts/train.py ...`` (what ``NPROC=8 bash train_init.sh`` runs).
The logdir defaults to logs/<config file name> (logs/train_init for configs/train_init.yaml). A logdir
holding this run's checkpoints is resumed automatically, on any number of processes with the same global
batch; another run's is refused, naming the keys that differ (``--allow_changed`` accepts them), and so is
a logdir another live run holds. SIGTERM or SIGUSR1 stops the run after its current step with a checkpoint
and exit code 75 (rerun the same command to continue); see docs/clusters.md.
"""

from trainer.cli import train
from utils.config import run_cli

if __name__ == "__main__":
    run_cli(train)
