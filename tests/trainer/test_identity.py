import pytest

from trainer.identity import check_allowed, identity_changes, run_identity
from utils.errors import ConfigError

CONFIG = {"stage": "init", "lr": 1e-4, "max_iters": 4, "data_path": "a.txt", "batch_size": 1,
          "model_kwargs": {"memory": "nam", "bank_size": 2}, "adapter": None, "device": "cpu"}  # fmt: skip


def test_identity_is_every_key_that_changes_the_losses_and_the_prompts_by_content():
    saved = run_identity(CONFIG, {"data_path": ["a cat", "a dog"]})
    assert "max_iters" not in saved and "device" not in saved and saved["model_kwargs.memory"] == "nam"
    moved = run_identity({**CONFIG, "data_path": "b.txt", "max_iters": 40, "device": "cuda"},
                         {"data_path": ["a cat", "a dog"]})  # fmt: skip
    assert identity_changes(saved, moved) == []
    changed = run_identity({**CONFIG, "lr": 0.5, "model_kwargs": {"memory": "none", "bank_size": 2}},
                           {"data_path": ["a cow"]})  # fmt: skip
    changes = identity_changes(saved, changed)
    assert [c.split(" ")[0] for c in changes] == ["data_path", "lr", "model_kwargs.memory"]
    assert changes[0].startswith("data_path (other prompts: saved sha256:")
    assert changes[1] == "lr (saved 0.0001, now 0.5)"
    assert identity_changes(saved, changed, allowed=["lr", "model_kwargs", "data_path"]) == []


def test_allowed_keys_are_known_and_not_ones_the_checkpoint_is_shaped_by():
    assert check_allowed(CONFIG, ["lr", "model_kwargs.memory", "model_kwargs"]) == ("lr", "model_kwargs.memory",
                                                                                    "model_kwargs")  # fmt: skip
    with pytest.raises(ConfigError, match=r"--allow_changed lrr: not a config key \(did you mean lr\?\)"):
        check_allowed(CONFIG, ["lrr"])
    with pytest.raises(ConfigError, match="--allow_changed batch_size: the checkpoint's tensors and rollouts depend"):
        check_allowed(CONFIG, ["batch_size"])
