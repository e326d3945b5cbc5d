"""The release's training configs, unchanged, through the training command line and its train.py flags.

The fixtures in tests/fixtures/release/ are shaped like the release's configs (KlingTeam/MemFlow at
7ed5147); everything tiny about a run is given on the command line.
"""

import json
import logging

import pytest

from trainer.cli import train
from utils.config import run_cli

from ..conftest import ROOT

RELEASE = ROOT / "tests" / "fixtures" / "release"
TINY = ["model=tiny", "model_overrides.text_dim=384", "model_overrides.text_len=64", "real_name=tiny",
        "fake_name=tiny", "text_encoder=minilm", "vae=tiny", "weights_dir=null", "real_weights_dir=null",
        "fake_weights_dir=null", "generator_ckpt=null", "height=64", "width=64", "total_batch_size=1",
        "max_iters=2", "log_iters=1", "device=cpu", "model_kwargs.local_attn_size=6"]  # fmt: skip
PROMPTS = ["A paper boat drifts down a gutter after rain.", "A hot-air balloon rises over green hills."]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the ``error:`` lines of one in-process training run."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, argv)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def prompt_files(folder):
    (folder / "prompts").mkdir()
    (folder / "prompts" / "vidprom_filtered_extended.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "prompts" / "vidprom_filtered_extended_switch.txt").write_text("\n".join(reversed(PROMPTS)) + "\n")


def test_release_stage1_config_trains_at_tiny_size_with_its_train_py_flags(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, errors = run(["--stage", "init", "--config_path", str(RELEASE / "train_init.yaml"), "--logdir", "logs",
                            "--wandb-save-dir", "wandb", "--no-one-logger", *TINY, "num_training_frames=9",
                            "min_num_training_frames=9", "image_or_video_shape=[1,9,16,8,8]"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert "wandb_key=YOUR_WANDB_KEY, wandb_entity=YOUR_WANDB_ENTITY, wandb_project=YOUR_WANDB_PROJECT" in caplog.text
    assert "no effect here: --no-one-logger" in caplog.text
    inert = next(r.message for r in caplog.records if r.message.startswith("accepted for compatibility, no effect"))
    for key in ("generator_fsdp_wrap_strategy", "ts_schedule", "trainer", "vis_ema", "val_data_path",
                "slice_last_frames"):
        assert key in inert  # fmt: skip


def test_release_stage2_config_streams_and_exports_its_lora(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    code, errors = run(["--stage", "long", "--config_path", str(RELEASE / "train_long.yaml"), "--logdir", "logs",
                        *TINY, "slice_last_frames=6", "streaming_chunk_size=6", "streaming_min_new_frame=3",
                        "streaming_max_length=12", "switch_choices=[6]", "image_or_video_shape=[1,12,16,8,8]",
                        "adapter.rank=4", "adapter.alpha=4"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    assert (tmp_path / "logs" / "lora.pt").is_file()


@pytest.mark.parametrize("stage, config", [("init", "train_init.yaml"), ("long", "train_long.yaml")])
def test_unchanged_release_training_config_lists_every_missing_weight_at_once(stage, config, tmp_path, monkeypatch,
                                                                              capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    code, errors = run(["--stage", stage, "--config_path", str(RELEASE / config), "--logdir", "logs"], capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: missing weights: ")
    generator = "checkpoints/ode_init.pt" if stage == "init" else "checkpoints/base.pt"
    for needed in (generator, "wan_models/Wan2.1-T2V-14B/diffusion_pytorch_model", "Wan2.1_VAE.pth",
                   "download Wan-AI/Wan2.1-T2V-14B", "download Wan-AI/Wan2.1-T2V-1.3B"):
        assert needed in errors[0]  # fmt: skip
    assert ("gdhe17/Self-Forcing" if stage == "init" else "KlingTeam/MemFlow") in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]


def test_release_default_config_loads_under_the_training_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    code, errors = run(["--config_path", str(RELEASE / "default_config.yaml"), "--logdir", "logs", *TINY,
                        "data_path=prompts/vidprom_filtered_extended.txt", "num_training_frames=9",
                        "image_or_video_shape=[1,9,16,8,8]", "max_iters=1"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])


def test_no_auto_resume_refuses_a_logdir_it_would_continue_and_lfs_prompts_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    common = ["--stage", "init", "--config_path", str(RELEASE / "train_init.yaml"), "--logdir", "logs", *TINY,
              "num_training_frames=9", "min_num_training_frames=9", "image_or_video_shape=[1,9,16,8,8]"]  # fmt: skip
    assert run([*common, "max_iters=1"], capsys) == (0, [])
    code, errors = run([*common, "--no-auto-resume"], capsys)
    assert code == 2 and "--no-auto-resume: " in errors[0] and "checkpoint_000001" in errors[0]
    (tmp_path / "prompts" / "vidprom_filtered_extended.txt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "1" * 64 + "\nsize 145875068\n"
    )
    code, errors = run([*common, "--logdir", "other"], capsys)
    assert code == 2 and "is a Git LFS pointer" in errors[0] and not (tmp_path / "other").exists()
