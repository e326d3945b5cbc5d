"""scripts/gpu_check.py --smoke: the GPU check's steps at tiny size on the CPU, one JSON with every step."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from trainer.gpu_check import main
from utils.config import run_cli

from ..conftest import GOLDEN, ROOT


def test_smoke_check_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == ["golden", "benchmark", "training", "low_memory"]
    assert steps["golden"]["status"] == ("ok" if GOLDEN.exists() else "skipped")
    assert all(steps[name]["status"] == "ok" for name in ("benchmark", "training", "low_memory"))
    assert report["environment"]["torch"] and report["total_s"] > 0
    table = steps["benchmark"]["result"]["table"]
    assert {(e["mode"], e["variant"]) for e in table} == {(m, v) for m in ("none", "nam", "nam_sma")
                                                          for v in ("eager", "compiled")}  # fmt: skip
    training = steps["training"]["result"]
    assert training["generator_class"].startswith("FSDP"), "the generator was not sharded"
    first, second = training["iterations"]
    assert "generator_loss" in first and "generator_loss" not in second  # dfake_gen_update_ratio 2
    assert all(math.isfinite(v) for it in (first, second) for v in it.values())
    assert set(steps["low_memory"]["result"]) == {"low_memory_false", "low_memory_true"}


def test_the_full_check_needs_a_gpu(tmp_path, monkeypatch, capsys):
    """The script's command line in this process (it runs as a script above), on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what CUDA_VISIBLE_DEVICES="" gives
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no CUDA device is available")
    assert not (tmp_path / "x").exists()
