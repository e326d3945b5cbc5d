"""The release's training configs (``train_init.yaml``, ``train_long.yaml``, ``default_config.yaml``) and its
``train.py`` flags, read here unchanged.

Keys that only switch between variants this codebase does not have are accepted when they hold the release's
value (named once in a warning) and refused otherwise; placeholder wandb credentials count as unset; the
release's ``vis_video_lengths`` sets the sample video length. The flags ``--wandb-save-dir``,
``--disable-wandb`` and ``--no_visualize`` become overrides, ``--no-auto-resume`` refuses a logdir that would
be continued, and ``--no-one-logger`` / ``--no_save`` are accepted with no effect.
"""

from __future__ import annotations

import logging
import re

from pipeline.compat import RELEASE_INERT, adapt_release
from utils.config import Compat

log = logging.getLogger(__name__)

# Release keys accepted with no effect here, and the value under which that holds (... for any value).
TRAIN_INERT = {
    **RELEASE_INERT,
    "generator_fsdp_wrap_strategy": ..., "real_score_fsdp_wrap_strategy": ...,
    "fake_score_fsdp_wrap_strategy": ..., "text_encoder_fsdp_wrap_strategy": ...,  # every block is an FSDP unit
    "ts_schedule": False, "num_train_timestep": 1000, "denoising_loss_type": "flow", "distribution_loss": ...,
    "trainer": "score_distillation", "load_raw_video": False, "vis_ema": False, "val_batch_size": ...,
    "val_data_path": ..., "val_switch_prompt_path": ..., "train_first_chunk": True, "last_step_only": False,
    "switch_mode": "random_choice", "independent_first_frame": False, "same_step_across_blocks": True,
    "discriminator_lr_multiplier": 1.0, "i2v": False, "gc_interval": ..., "causal": True, "ckpt_step": ...,
    "prompt_name": ..., "prompt_path": ..., "eval_first_n": ..., "num_samples": ..., "num_frames": ...,
    "adapter.apply_to_critic": True,
}  # fmt: skip
WANDB_KEYS = ("wandb_key", "wandb_entity", "wandb_project")
PLACEHOLDER = re.compile(r"^YOUR_[A-Z_]+$")
# train.py flag -> the overrides it stands for (None: accepted, no effect here)
FLAGS = {"--disable-wandb": ["wandb_key=null", "wandb_entity=null", "wandb_project=null"],
         "--no_visualize": ["vis_interval=0"], "--no-one-logger": None, "--no_save": None}  # fmt: skip


def adapt_release_training(values: dict) -> dict:
    """A release training layer in our spellings (see the module docstring)."""
    values = adapt_release(values)
    placeholders = [key for key in WANDB_KEYS if isinstance(values.get(key), str) and PLACEHOLDER.match(values[key])]
    if placeholders:
        log.warning("%s: the release's placeholders (YOUR_...), treated as unset: wandb is off",
                    ", ".join(f"{key}={values[key]}" for key in placeholders))  # fmt: skip
        values.update(dict.fromkeys(placeholders))
    lengths = values.pop("vis_video_lengths", None)
    if isinstance(lengths, list) and lengths:
        values["vis_num_frames"] = lengths[0]
        if len(lengths) > 1:
            log.warning("vis_video_lengths=%s: one sample video per step here, %s latent frames long", lengths,
                        lengths[0])  # fmt: skip
    return values


# stage 2's keys in the release's stage-1 file, where they do nothing
STAGE2_ONLY = {"slice_last_frames": ...}


def release_training(stage: str) -> Compat:
    """How a release training config loads for ``stage``."""
    inert = TRAIN_INERT if stage == "long" else {**TRAIN_INERT, **STAGE2_ONLY}
    return Compat(inert=inert, adapt=adapt_release_training)


def release_flags(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Take the release's ``train.py`` flags out of argv: (the rest, the overrides they stand for, whether
    ``--no-auto-resume`` was given)."""
    rest, overrides, inert, no_auto_resume = [], [], [], False
    args = iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name == "--wandb-save-dir":
            overrides.append(f"wandb_dir={value or next(args, '')}")
        elif arg == "--no-auto-resume":
            no_auto_resume = True
        elif arg in FLAGS:
            overrides += FLAGS[arg] or []
            inert += [] if FLAGS[arg] else [arg]
        else:
            rest.append(arg)
    if inert:
        log.warning("train.py flags accepted for compatibility, no effect here: %s", ", ".join(inert))
    return rest, overrides, no_auto_resume
