"""Files made for the MemFlow release and for Scope, read here unchanged.

The release's YAML spells some values its own way (switch frames as a comma string, the DiT as
``model_name``), names keys that do nothing here, limits runs with ``inference_iter`` and names its
videos ``rank<r>-<index>-<sample>_<kind>.mp4``; a Scope timeline states its own length and settings,
which the command line overrules. See README, "Coming from the release or Scope".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

from omegaconf import DictConfig, OmegaConf

from memflow.config import PRESETS
from utils.config import Compat, get_field
from utils.errors import ConfigError

from .schedule import PromptSchedule
from .timeline import PIPELINE_ID, Timeline

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("prompt", "release")
# Release keys accepted with no effect here, and the value under which that holds (... for any value).
RELEASE_INERT = {"adapter.verbose": ..., "model_name": ...}


def frame_list(text: str, key: str) -> list[int]:
    """The release's comma-separated latent frames (``"40, 80, 120"``) as a list."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"{key}={text!r}: write comma-separated latent frames like '40, 80' or a list [40, 80]"
        ) from None


def adapt_release(values: dict) -> dict:
    """A release config layer in our spellings: switch frames as a comma string, ``model_name`` naming the
    DiT (``Wan2.1-T2V-1.3B``: the preset ``model``; a name that is no preset stays and has no effect)."""
    switches = values.get("switch_frame_indices")
    if isinstance(switches, str):
        values["switch_frame_indices"] = frame_list(switches, "switch_frame_indices")
    name = values.get("model_name")
    if isinstance(name, str) and name.lower() in PRESETS:
        preset = name.lower()
        if values.get("model", preset) != preset:
            raise ConfigError(f"model_name={name} and model={values['model']} name different DiTs; give one of them")
        values.pop("model_name")
        values["model"] = preset
    return values


RELEASE = Compat(inert=RELEASE_INERT, adapt=adapt_release)


def model_type(cfg: DictConfig) -> str:
    """The release's name for the weights a run uses: ``lora``, ``ema`` or ``regular``."""
    if cfg.lora_ckpt is not None:
        return "lora"
    return "ema" if cfg.use_ema else "regular"


def release_stems(
    first_prompts: Sequence[str], num_samples: int, save_with_index: bool, world_size: int, kind: str
) -> list[str]:
    """The release's file names, ``rank{r}-{prompt index}-{sample}_{kind}`` (or the prompt's first 100
    characters for the index), where rank r makes video g as g % world_size."""
    stems = []
    for i, prompt in enumerate(first_prompts):
        name = str(i) if save_with_index else prompt[:100].replace("/", "_")
        for sample in range(num_samples):
            stems.append(f"rank{len(stems) % world_size}-{name}-{sample}_{kind}")
    return stems


def first_iterations(schedules: list[PromptSchedule], inference_iter: int, world_size: int) -> list[PromptSchedule]:
    """The release's ``inference_iter``: -1 for every prompt, else each rank stops after its prompt number
    ``inference_iter`` (counted from 0), i.e. the first ``(inference_iter + 1) x world_size`` prompts."""
    if inference_iter < 0:
        return schedules
    kept = schedules[: (inference_iter + 1) * world_size]
    log.info("inference_iter=%d: %d of %d prompts (%d per rank, as the release counts)", inference_iter,
             len(kept), len(schedules), inference_iter + 1)  # fmt: skip
    return kept


def timeline_config(cfg: DictConfig, timeline: Timeline, command_line: frozenset[str], path: str) -> DictConfig:
    """``cfg`` with the timeline's length and settings, the command line overruling them: command line >
    timeline > config file. Says where each value came from, and what the timeline asks that is not done."""
    if timeline.pipeline_id not in (None, PIPELINE_ID):
        log.warning("timeline %s was made for Scope's %r pipeline, not %r: its prompts are used as they are",
                    path, timeline.pipeline_id, PIPELINE_ID)  # fmt: skip
    if timeline.unsupported:
        shown = ", ".join(f"{key}={value!r}" for key, value in timeline.unsupported.items())
        log.warning("timeline %s: settings not supported here, ignored: %s", path, shown)
    asked = {"num_output_frames": timeline.schedule.num_frames, **timeline.settings}
    applied = {}
    for key, value in asked.items():
        if key in command_line:
            log.info("%s=%s from the command line (the timeline asks for %s)", key, get_field(cfg, key), value)
        else:
            log.info("%s=%s from the timeline %s (the config file has %s)", key, value, path, get_field(cfg, key))
            applied[key] = value
    return cast(DictConfig, OmegaConf.merge(cfg, applied))
