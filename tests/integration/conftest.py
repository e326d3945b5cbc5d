"""Uninterrupted tiny training runs that several tests compare against bit for bit: each is trained once."""

from pathlib import Path

import pytest
import torch

from .test_train import train


def _straight(tmp_path_factory, name: str, stage: str, *overrides: str) -> Path:
    """``train(stage, ...)`` into a fresh folder on one intra-op thread (what the comparing tests run on)."""
    logdir = tmp_path_factory.mktemp(name) / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(stage, logdir, *overrides)
    finally:
        torch.set_num_threads(threads)
    return logdir


@pytest.fixture(scope="session")
def ode_init_run(tmp_path_factory) -> Path:
    """The tiny ODE initialisation: its ODE pairs, metrics and base.pt."""
    return _straight(tmp_path_factory, "ode_init", "ode_init")


@pytest.fixture(scope="session")
def stage1_straight(tmp_path_factory) -> Path:
    """Stage 1's 4 steps with a checkpoint after each (the last 2 kept) and the sample video of step 4."""
    return _straight(tmp_path_factory, "stage1", "init", "save_interval=1")


@pytest.fixture(scope="session")
def stage2_straight(tmp_path_factory) -> Path:
    """Stage 2's 6 steps, checkpoints at 3 and 6, no sample video."""
    return _straight(tmp_path_factory, "stage2", "long", "vis_interval=0", "max_iters=6", "save_interval=3")
