"""The release's and Scope's own files, unchanged, through the inference command line.

The fixtures in tests/fixtures/ are shaped like the release's configs (KlingTeam/MemFlow at 7ed5147)
and Scope's MemFlow and LongLive timelines; everything tiny about a run is given on the command line.
"""

import json
import logging

import pytest

from pipeline.cli import inference
from utils.config import run_cli

from ..conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
RELEASE_INFERENCE = FIXTURES / "release" / "inference.yaml"
RELEASE_INTERACTIVE = FIXTURES / "release" / "interactive_inference.yaml"
TINY = ["model=tiny", "model_overrides.text_dim=384", "model_overrides.text_len=64", "text_encoder=minilm",
        "vae=tiny", "weights_dir=null", "generator_ckpt=null", "lora_ckpt=null", "height=32", "width=32",
        "device=cpu", "dtype=float32"]  # fmt: skip
PROMPTS = ["A tram crosses a bridge in the rain.", "A cat sleeps on a warm windowsill.", "Waves roll onto a beach."]


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the ``error:`` lines of one in-process inference run."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference, argv)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def sidecars(folder):
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def test_release_inference_config_runs_at_tiny_size_with_only_command_line_overrides(tmp_path, monkeypatch, capsys,
                                                                                      caplog):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "vidprom_filtered_extended.txt").write_text("\n".join(PROMPTS) + "\n")
    with caplog.at_level(logging.WARNING):
        code, errors = run(["--config_path", str(RELEASE_INFERENCE), *TINY, "num_output_frames=6", "inference_iter=1"],
                           capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    videos = sorted(p.name for p in (tmp_path / "videos" / "short").glob("*.mp4"))
    assert videos == ["0000-a-tram-crosses-a-bridge-in-the-rain.mp4", "0001-a-cat-sleeps-on-a-warm-windowsill.mp4"]
    assert "accepted for compatibility, no effect here: adapter.verbose" in caplog.text
    assert all(s["config"]["model"] == "tiny" and s["complete"] for s in sidecars(tmp_path / "videos" / "short"))


def test_release_interactive_config_switches_with_its_comma_string_and_release_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "interactive_example.jsonl").write_text(json.dumps({"prompts": PROMPTS}) + "\n")
    code, errors = run(["--interactive", "--config_path", str(RELEASE_INTERACTIVE), *TINY, "num_output_frames=9",
                        "switch_frame_indices=3,6", "output_names=release"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    folder = tmp_path / "videos" / "interactive"
    assert sorted(p.name for p in folder.glob("*.mp4")) == ["rank0-0-0_regular.mp4"]
    (sidecar,) = sidecars(folder)
    assert sidecar["switch_frames"] == [3, 6] and sidecar["seed"] == 1  # the release's interactive seed
    assert [c["segment"] for c in sidecar["conditioning"]] == [0, 1, 2]


@pytest.mark.parametrize("config", [RELEASE_INFERENCE, RELEASE_INTERACTIVE])
def test_unchanged_release_config_without_weights_is_the_one_missing_weights_line(config, tmp_path, monkeypatch,
                                                                                  capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "vidprom_filtered_extended.txt").write_text(PROMPTS[0] + "\n")
    (tmp_path / "prompts" / "interactive_example.jsonl").write_text(json.dumps({"prompts": PROMPTS * 2}) + "\n")
    interactive = ["--interactive"] if config == RELEASE_INTERACTIVE else []
    code, errors = run([*interactive, "--config_path", str(config)], capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: missing weights: wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")
    for needed in ("Wan2.1_VAE.pth", "checkpoints/base.pt", "checkpoints/lora.pt",
                   "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B", "huggingface-cli download KlingTeam/MemFlow"):
        assert needed in errors[0]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]


def test_a_git_lfs_pointer_prompt_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "vidprom_filtered_extended.txt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 145875068\n"
    )
    code, errors = run(["--config_path", str(RELEASE_INFERENCE), *TINY], capsys)
    assert code == 2 and len(errors) == 1 and "is a Git LFS pointer" in errors[0] and "git lfs pull" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]


def test_scope_memflow_timeline_sets_the_length_and_the_command_line_beats_its_settings(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code, errors = run(["--interactive", "--config_path", str(ROOT / "configs/tiny/interactive_inference.yaml"),
                            f"data_path={FIXTURES / 'scope' / 'timeline-memflow.json'}", "height=32", "width=32",
                            f"output_folder={out}"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    (sidecar,) = sidecars(out)
    assert sidecar["latent_frames"] == 45 and sidecar["config"]["num_output_frames"] == 45  # endTime 11.167 s
    assert sidecar["resolution"] == {"height": 32, "width": 32} and sidecar["seed"] == 42
    assert "height=32 from the command line (the timeline asks for 480)" in caplog.text
    assert "seed=42 from the timeline" in caplog.text
    assert "settings not supported here, ignored: kvCacheAttentionBias=0.3" in caplog.text
    assert [c["prompts"][0]["weight"] for c in sidecar["conditioning"]] == [100.0] * 15


def test_scope_timeline_of_another_pipeline_is_named_and_its_blends_and_transitions_recorded(tmp_path, capsys,
                                                                                            caplog):  # fmt: skip
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code, errors = run(["--interactive", "--config_path", str(ROOT / "configs/tiny/interactive_inference.yaml"),
                            f"data_path={FIXTURES / 'scope' / 'timeline-longlive.json'}", "height=32", "width=32",
                            "num_output_frames=24", f"output_folder={out}"], capsys)  # fmt: skip
    assert (code, errors) == (0, [])
    assert "made for Scope's 'longlive' pipeline" in caplog.text
    assert "noiseScale=0.7, noiseController=True" in caplog.text
    (sidecar,) = sidecars(out)
    assert sidecar["latent_frames"] == 24 and sidecar["config"]["denoising_step_list"] == [1000.0, 750.0]
    first, switch, second, third = sidecar["conditioning"][:1] + sidecar["conditioning"][3:6]
    assert [p["weight"] for p in first["prompts"]] == [60.0, 40.0]
    assert switch["switch"] and [round(c["transition"], 4) for c in (switch, second, third)] == [0.3333, 0.6667, 1.0]
    assert switch["from_segment"] == 0 and third["from_segment"] is None
