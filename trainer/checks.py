"""The weight files a training run needs: all present (every missing one listed at once, with the commands that
download it) and of the right layout (safetensors headers against the model, read in seconds)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from memflow.dit import build_dit
from memflow.loading import check_weights, missing_dit, missing_weights
from memflow.weights import (
    compare_layout,
    dit_weights_file,
    module_layout,
    safetensors_header,
    shard_files,
    to_original_dit,
)
from utils.config import get_field
from utils.errors import ConfigError, WeightsError


def check_dit_weights(path: Path, preset: str, overrides: dict, key: str) -> None:
    """Names and shapes of a safetensors DiT (file, Wan folder or Diffusers folder) against ``preset``.

    Reads headers only, so a teacher of the wrong size fails in seconds, before any tensor is read;
    ``.pt`` checkpoints (``base.pt``) are checked exactly when loaded.
    """
    file = dit_weights_file(path, preset)
    if file.name.endswith(".index.json"):
        header = {}
        for shard in shard_files(file):
            header.update(safetensors_header(shard))
    elif file.suffix == ".safetensors":
        header = safetensors_header(file)
    else:
        return
    with torch.device("meta"):
        expected = module_layout(build_dit(preset, **overrides))
    report = compare_layout(to_original_dit({k: shape for k, (shape, _) in header.items()}), expected)
    if not report.ok:
        raise WeightsError(f"{key}: {file} does not hold a {preset} DiT: {report.summary()}")


def check_training_weights(cfg: DictConfig, presets: dict[str, str], overrides: dict) -> None:
    """Every configured weight file exists (one WeightsError lists all that do not) and has its model's layout."""
    models = {"generator_ckpt": cfg.model, **{f"{role}_weights_dir": p for role, p in presets.items()}}
    for key in (*models, "weights_dir"):
        value = get_field(cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{key} must be a path or null, got {value!r}")
    if cfg.text_encoder != "minilm" and cfg.weights_dir is None:
        raise ConfigError(f"text_encoder={cfg.text_encoder} loads from weights_dir, which is null; set weights_dir")
    missing = missing_weights(cfg.model, cfg.weights_dir, text_encoder=cfg.text_encoder,
                              generator_ckpt=cfg.generator_ckpt)  # fmt: skip
    for role, preset in presets.items():
        folder = cfg[f"{role}_weights_dir"]
        if folder is not None:
            missing += [entry for entry in missing_dit(folder, preset) if entry not in missing]
    check_weights(missing)
    for key, preset in models.items():
        if cfg[key] is not None:
            check_dit_weights(Path(cfg[key]), preset, overrides, key)
