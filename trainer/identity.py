"""Which config keys define a training run, so that a logdir is continued only by the run that wrote it.

Every key that changes the losses or the data order belongs to the run's identity: the models and
their weights, the optimiser, DMD and streaming settings, the batch, the seed, the prompts. Only the
:data:`RESUMABLE` keys (how long to run, how often to log, save and sample, where to report, which
device, how the models are sharded or checkpointed) may change on resume. Prompt files count by
content (a digest of their prompts), not by path, so a moved file resumes. ``--allow_changed KEY``
accepts a deliberate change of an identity key (a lower ``lr``, weights moved to another folder),
except the :data:`FIXED` keys the checkpoint's tensors and rollouts are shaped by.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from utils.errors import ConfigError

RESUMABLE = frozenset({
    "max_iters", "log_iters", "save_interval", "vis_interval", "vis_num_frames", "vae", "max_checkpoints",
    "wandb_key", "wandb_entity", "wandb_project", "wandb_dir", "device", "gradient_checkpointing",
    "sharding_strategy",
})  # fmt: skip
FIXED = ("stage", "model", "model_overrides", "fake_name", "adapter", "num_frame_per_block", "batch_size",
         "total_batch_size")  # fmt: skip
PROMPT_FILES = ("data_path", "switch_prompt_path")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def prompts_digest(prompts: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def run_identity(config: Mapping[str, Any], prompts: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The identity of a run: every flattened config key outside :data:`RESUMABLE`; the prompt files of
    ``prompts`` (key -> prompts) by their content."""
    identity = {k: v for k, v in _flatten(config).items() if _top(k) not in RESUMABLE}
    for key, lines in (prompts or {}).items():
        identity[key] = prompts_digest(lines)
    return identity


def check_allowed(config: Mapping[str, Any], keys: Iterable[str]) -> tuple[str, ...]:
    """``--allow_changed`` keys, checked: each a key of the config that may change (before anything runs)."""
    known = set(_flatten(config)) | {k.rsplit(".", 1)[0] for k in _flatten(config) if "." in k}
    out = []
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--allow_changed {key}: not a config key{hint}")
        if _top(key) in FIXED:
            raise ConfigError(
                f"--allow_changed {key}: the checkpoint's tensors and rollouts depend on {_top(key)}, so it cannot "
                "change on resume; start a new --logdir"
            )
        out.append(key)
    return tuple(out)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = ()) -> list[str]:
    """``key (saved X, now Y)`` for every identity key that differs and is not ``allowed`` (or under one)."""
    allowed = tuple(allowed)
    changes = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "<absent>") == current.get(key, "<absent>"):
            continue
        if any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if key in PROMPT_FILES and str(old).startswith("sha256:"):
            changes.append(f"{key} (other prompts: saved {str(old)[:19]}, now {str(new)[:19]})")
        else:
            changes.append(f"{key} (saved {_show(old)}, now {_show(new)})")
    return changes
