"""scripts/benchmark.py on the tiny preset: JSON with every mode, variant and sweep point, median and spread."""

import json
import os
import subprocess
import sys

from memflow.config import StreamConfig, dit_config
from memflow.context import CallPlan
from pipeline.benchmark import main
from pipeline.speed import call_flops

from ..conftest import ROOT, refusal

PYTHON = ROOT / ".venv" / "bin" / "python"
MODES = ("none", "nam", "nam_sma")


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYTHON if PYTHON.exists() else sys.executable), str(ROOT / "scripts" / "benchmark.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_tiny_benchmark_json_has_every_mode_variant_and_sweep_point():
    result = _benchmark("--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "48", "--chunks", "2",
                        "--warmup", "0", "--repeats", "2", "--compile", "--compile-backend", "aot_eager",
                        "--sweep", "3", "6", "--sweep-modes", "nam", "full", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["preset"], report["device"], report["height"], report["width"]) == ("tiny", "cpu", 32, 48)
    assert report["tokens_per_frame"] == (32 // 16) * (48 // 16) and report["repeats"] == 2
    assert report["matmul_peak_flops"] > 0
    rows = {(e["mode"], e["variant"]) for e in report["table"]}
    assert rows == {(mode, variant) for mode in MODES for variant in ("eager", "compiled")}
    for entry in report["table"]:
        for key in ("fps", "fps_no_decode", "fps_transformer", "first_chunk_s", "steady_chunk_s", "utilisation"):
            figure = entry[key]
            assert 0 < figure["min"] <= figure["median"] <= figure["max"], key
        # the transformer is part of the chunk loop, the chunk loop part of chunk + decode
        assert entry["fps_transformer"]["median"] > entry["fps_no_decode"]["median"] > entry["fps"]["median"]
        assert entry["flops_per_chunk"]["min"] > 0
    assert set(report["ratio_to_none"]["eager"]) == {f"{mode}@3" for mode in MODES}
    assert report["ratio_to_none"]["eager"]["none@3"] == 1.0
    assert set(report["compiled_speedup"]) == {f"{mode}@3" for mode in MODES}
    sweep = {(e["mode"], e["bank_size"], e["variant"]) for e in report["sweep"]}
    assert sweep == {(m, b, v) for m in ("nam", "full") for b in (3, 6) for v in ("eager", "compiled")}
    assert all("fps" not in e for e in report["sweep"]), "the sweep never decodes"
    flops = {(e["mode"], e["bank_size"]): e["flops_per_chunk"]["median"] for e in report["sweep"]}
    assert flops["nam", 6] > flops["nam", 3] and flops["full", 6] > flops["full", 3], "more memory, more FLOPs"


def test_flops_of_a_call_count_the_attended_keys():
    dit, stream = dit_config("tiny"), StreamConfig(memory="nam_sma", top_k=2)
    plan = CallPlan(start=9, num_frames=3, kind="denoise", recompute=False, runs=(), bank_len=3, sink_len=3,
                    window_len=9, record=False)  # fmt: skip
    dense = call_flops(dit, StreamConfig(memory="nam"), plan, frame_tokens=4)
    routed = call_flops(dit, stream, plan, frame_tokens=4)
    # 3 query frames of 4 tokens, 2 x 2 FLOPs per query-key pair and channel, per layer: 6 - 2 memory frames fewer
    assert dense - routed == dit.num_layers * 4 * (3 * 4) * dit.dim * (4 * 4)


def test_benchmark_rejects_bad_resolution_in_one_line(capsys):
    assert refusal(main, ["--preset", "tiny", "--height", "40", "--json"], capsys) == (
        "error: --height 40 must be a positive multiple of 16 (VAE stride x DiT patch)"
    )
