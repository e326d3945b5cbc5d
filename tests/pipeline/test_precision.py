"""bfloat16 on the CPU: the streaming loop in every memory mode (a prompt switch and its re-cache included) and
LoRA loading and merging, each against float32 within a stated bound.

The bounds are about 3x the errors measured on the tiny preset (2026-12, this CPU): a bf16 video differs from the
float32 one by a relative L2 error of at most 0.004 and by at most 0.033 in any latent (values up to 5.6).
"""

import dataclasses
import json

import pytest
import torch

from memflow import StreamConfig, build_dit
from memflow.loading import materialize
from memflow.weights import apply_lora, expected_lora_layout
from pipeline.plan import plan_run, resolve_dtype
from pipeline.runner import VideoRunner, build_components
from pipeline.streaming import StreamingGenerator
from utils.config import load_config

from ..conftest import ROOT

H, W, FRAMES = 8, 8, 24
REL_L2, MAX_ABS = 0.015, 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dits():
    """The same seeded random tiny DiT in float32 and in bfloat16."""
    full = materialize(lambda: build_dit("tiny"), torch.device("cpu"), torch.float32, 0)
    return full, materialize(lambda: build_dit("tiny"), torch.device("cpu"), torch.bfloat16, 0)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, FRAMES, 16, H, W, generator=g)
    return noise, [torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)]


def _video(dit, config, **kwargs):
    noise, prompts = _inputs()
    gen = StreamingGenerator(dit, config, **kwargs)
    with torch.no_grad():
        out = gen.generate(noise, prompts, [15], generator=torch.Generator().manual_seed(1))
    return out, gen


def _assert_close_to_float32(low, full):
    assert low.dtype == torch.float32, "the sampler state is float32 whatever the model dtype"
    error = (low - full).abs()
    assert 0 < error.max() <= MAX_ABS
    assert (low - full).norm() / full.norm() <= REL_L2


def test_an_explicit_dtype_is_used_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) == torch.float32


def test_interactive_inference_with_dtype_bfloat16_runs_in_bfloat16(tmp_path):
    """What a user asking for ``dtype=bfloat16`` on the CPU gets: every model and the cache in bf16, switches too."""
    cfg = load_config(ROOT / "configs" / "tiny" / "interactive_inference.yaml",
                      ["dtype=bfloat16", f"output_folder={tmp_path}"])  # fmt: skip
    plan = plan_run(cfg)
    components = build_components(plan)
    runner = VideoRunner(plan, components)
    result = runner.run(plan.jobs[0])
    assert {p.dtype for p in components.dit.parameters()} == {torch.bfloat16}
    assert runner.generator.context.k.dtype == torch.bfloat16
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["dtype"] == "bfloat16" and sidecar["complete"] and len(sidecar["switch_frames"]) == 2
    assert result.pixel_frames > 0 and result.video.stat().st_size > 0


@pytest.mark.parametrize(("memory", "reference"), [("none", True), ("nam", True), ("nam_sma", True),
                                                   ("nam_sma", False), ("full", True)])
def test_streaming_in_bfloat16_matches_float32(dits, memory, reference):
    config = StreamConfig(memory=memory, local_attn_size=9, bank_size=2, record_interval=1, top_k=2,
                          reference=reference)
    full, _ = _video(dits[0], config)
    low, gen = _video(dits[1], config, trace=True)
    assert gen.context.k.dtype == torch.bfloat16
    assert any(call.kind == "recache" for call in gen.context.traces)
    _assert_close_to_float32(low, full)


def test_streaming_in_bfloat16_without_global_sink(dits):
    config = StreamConfig(memory="nam", local_attn_size=9, bank_size=2, record_interval=1, global_sink=False)
    _assert_close_to_float32(_video(dits[1], config)[0], _video(dits[0], config)[0])


def _lora(model, rank=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=g).to(torch.bfloat16)  # lora.pt is stored in bf16
            for name, shape in expected_lora_layout(model, rank).items()}


@pytest.mark.parametrize("merge", [False, True])
def test_lora_loads_and_merges_in_bfloat16(merge):
    state = _lora(build_dit("tiny"))
    full, low = (apply_lora(materialize(lambda: build_dit("tiny"), torch.device("cpu"), dtype, 0), state, 4, 4,
                            merge=merge) for dtype in (torch.float32, torch.bfloat16))  # fmt: skip
    assert next(low.parameters()).dtype == torch.bfloat16
    assert any(".lora_" in name for name, _ in low.named_parameters()) != merge
    config = dataclasses.replace(StreamConfig(), local_attn_size=9, bank_size=2, record_interval=1)
    plain = _video(materialize(lambda: build_dit("tiny"), torch.device("cpu"), torch.float32, 0), config)[0]
    tuned = _video(full, config)[0]
    assert (tuned - plain).abs().max() > 10 * MAX_ABS, "the LoRA changes the video far beyond the bf16 error"
    _assert_close_to_float32(_video(low, config)[0], tuned)
