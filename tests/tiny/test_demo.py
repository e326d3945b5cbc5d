"""The shipped MemFlow-Tiny checkpoints and the embedded demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.plan import plan_run
from pipeline.runner import VideoRunner, build_components
from tiny import demo
from utils.config import load_config

from ..conftest import refusal, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "toy" / "interactive_inference.yaml"
SHIPPED = ROOT / "checkpoints" / "memflow-tiny"
RANDOM_WEIGHTS = ["weights_dir=null", "generator_ckpt=null"]


@pytest.mark.skipif(not (SHIPPED / "generator.safetensors").is_file(),
                    reason="checkpoints/memflow-tiny not produced yet (bash scripts/train_toy.sh)")  # fmt: skip
def test_shipped_checkpoints_generate_a_video(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompts": ["A red ring in a meadow.", "It moves to the left."]}) + "\n")
    overrides = [f"data_path={prompts}", "num_output_frames=6", "switch_frame_indices=[3]",
                 f"output_folder={tmp_path / 'out'}", "save_latents=true"]  # fmt: skip
    plan = plan_run(load_config(CONFIG, overrides))
    result = VideoRunner(plan, build_components(plan)).run(plan.jobs[0])
    assert result.video.stat().st_size > 0 and result.trace.is_file()
    assert result.pixel_frames == 1 + 4 * 5


def test_demo_runs_memory_off_and_on_and_writes_one_contact_sheet(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_script("scripts/demo.py", "--frames", "27", f"output_folder={out}", *RANDOM_WEIGHTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for mode in ("none", "nam"):
        names = sorted(p.name for p in (out / mode).iterdir())
        assert any(n.endswith(".mp4") for n in names) and any(n.endswith(".memory.png") for n in names)
        report = json.loads(next((out / mode).glob("*.oracle.json")).read_text())
        assert set(report["metrics"]) >= {"identity_consistency", "adherence", "duplicate_rate", "smoothness"}
        assert report["mode"] == mode and report["fps"] > 0 and report["narrative"]["seed"] == 1_000_000
        assert f"{mode}: oracle" in proc.stdout
    sheet = Image.open(out / "narrative-1000000.sheet.png")
    assert sheet.size == (demo.LABEL + demo.COLUMNS * (64 * demo.SCALE + 2 * demo.BORDER),
                          3 * (64 * demo.SCALE + 2 * demo.BORDER))  # truth, none, nam
    framed = np.asarray(sheet)[0, demo.LABEL:]
    assert (framed == demo.RETURN_COLOUR).all(-1).any()  # the return is marked
    assert (framed != demo.RETURN_COLOUR).any(-1).any()  # and only the return


def test_demo_refuses_unknown_modes_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--modes", "none,bank", f"output_folder={tmp_path / 'demo'}", *RANDOM_WEIGHTS]
    assert "--modes" in refusal(demo.main, args, capsys)
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_training_seed_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert "test seed" in refusal(demo.main, ["--seed", "5", f"output_folder={out}", *RANDOM_WEIGHTS], capsys)
    assert not out.exists()
