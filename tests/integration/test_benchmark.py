"""scripts/benchmark.py on the tiny preset: valid JSON with every memory mode and its ratio to none."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.benchmark import main
from utils.config import run_cli

from ..conftest import ROOT

PYTHON = ROOT / ".venv" / "bin" / "python"
MODES = ("none", "nam", "nam_sma")


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYTHON if PYTHON.exists() else sys.executable), str(ROOT / "scripts" / "benchmark.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_tiny_benchmark_prints_json_for_every_mode():
    result = _benchmark("--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "48", "--chunks", "2",
                        "--warmup", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["preset"], report["device"], report["height"], report["width"]) == ("tiny", "cpu", 32, 48)
    assert report["tokens_per_frame"] == (32 // 16) * (48 // 16)
    assert set(report["modes"]) == set(MODES) == set(report["ratio_to_none"])
    for mode in MODES:
        figures = report["modes"][mode]
        # 2 chunks of 3 latent frames: 1 + 4 * 2 pixel frames, then 4 * 3.
        assert figures["pixel_frames"] == 9 + 12
        assert figures["fps_no_decode"] > figures["fps"] > 0
        assert figures["first_chunk_s"] > 0 and figures["steady_chunk_s"] > figures["steady_chunk_no_decode_s"] > 0
        assert figures["peak_memory_bytes"] > 0 and figures["peak_memory_kind"] == "cpu_max_rss"
        ratio = report["ratio_to_none"][mode]["fps"]
        assert abs(ratio - figures["fps"] / report["modes"]["none"]["fps"]) < 1e-9
    assert report["ratio_to_none"]["none"]["fps"] == 1.0


def test_benchmark_rejects_bad_resolution_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--preset", "tiny", "--height", "40", "--json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --height 40 must be a positive multiple of 16 (VAE stride x DiT patch)"
    ]
