"""Training prompts: one per line in a text file, dealt to micro-batches in a seeded order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.prompts import prompt_lines
from utils.config import require_existing_path
from utils.errors import ConfigError, MemFlowError

from .rollout import Purpose, derive_seed


def read_prompt_lines(cfg: DictConfig, key: str) -> list[str]:
    """Non-blank lines of the prompt file named by ``key`` (one prompt per line)."""
    path = require_existing_path(cfg, key)
    try:
        _, lines = prompt_lines(path, f"{key} prompt file")
    except MemFlowError as err:
        raise ConfigError(f"{key}: {err}") from None
    prompts = [line for _, line in lines]
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts; write one prompt per line")
    return prompts


class PromptData:
    """Prompts dealt in a seeded order, epoch after epoch.

    Draw ``d`` (one optimiser step's worth of prompts) gives global micro-batch ``g`` the
    ``batch_size`` prompts at positions ``(d * groups + g) * batch_size ...`` of the endless
    sequence of per-epoch permutations; each rank reads only its own micro-batches, and the data
    position of a run is just the number of draws made.
    """

    def __init__(self, prompts: Sequence[Any], switch_prompts: Sequence[Any] | None, batch_size: int, seed: int):
        self.prompts = list(prompts)
        self.switch_prompts = None if switch_prompts is None else list(switch_prompts)
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, Purpose.DATA, epoch))
            self._orders = {epoch: torch.randperm(len(self.prompts), generator=gen).tolist()}
        return self._orders[epoch][offset]

    def batch(self, draw: int, group: int, groups: int) -> tuple[list[Any], list[Any] | None]:
        """(prompts, switch prompts or None) of micro-batch ``group`` of ``draw``."""
        first = (draw * groups + group) * self.batch_size
        indices = [self._index(first + i) for i in range(self.batch_size)]
        switch = None if self.switch_prompts is None else [self.switch_prompts[i] for i in indices]
        return [self.prompts[i] for i in indices], switch

    def sample_ids(self, draw: int, group: int, groups: int) -> list[int]:
        """Global sample numbers of a micro-batch (keys of its noise)."""
        first = (draw * groups + group) * self.batch_size
        return list(range(first, first + self.batch_size))
