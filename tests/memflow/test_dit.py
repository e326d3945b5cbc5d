"""DiT layout against the published manifests, and shapes derived from config."""

import json

import pytest
import torch

from memflow import StreamConfig, build_dit, dit_config


def _manifest(manifests_dir, name):
    return {k: v[0] for k, v in json.loads((manifests_dir / name).read_text())["tensors"].items()}


@pytest.mark.parametrize(
    ("preset", "manifest", "prefix"),
    [
        ("wan2.1-t2v-1.3b", "wan2.1_t2v_1.3b__diffusion_pytorch_model.json", ""),
        ("wan2.1-t2v-14b", "wan2.1_t2v_14b__diffusion_pytorch_model.json", ""),
        ("wan2.1-t2v-1.3b", "memflow_generator_base_pt__generator.json", "model."),
    ],
)
def test_state_dict_equals_manifest(manifests_dir, preset, manifest, prefix):
    with torch.device("meta"):
        model = build_dit(preset)
    ours = {prefix + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == _manifest(manifests_dir, manifest)
    assert all(p.is_meta for p in model.parameters())


def test_sizes_follow_config():
    cfg = dit_config("wan2.1-t2v-1.3b")
    assert cfg.tokens_per_frame(60, 104) == 30 * 52
    assert cfg.tokens_per_frame(36, 64) == 18 * 32
    assert cfg.rope_bands == (44, 42, 42)
    assert dit_config("tiny").rope_bands == (24, 20, 20)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        cfg.tokens_per_frame(61, 104)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("wan3")


def test_non_square_latents_and_per_frame_timesteps():
    torch.manual_seed(0)
    model = build_dit("tiny").eval()
    x = torch.randn(2, 3, 16, 6, 10)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([[500.0] * 3, [100.0, 200.0, 300.0]]), ctx)
        same = model(x[:1], torch.tensor([500.0]), ctx[:1])
    assert out.shape == x.shape
    torch.testing.assert_close(out[:1], same, atol=1e-5, rtol=1e-5)


def test_stream_config_validation():
    with pytest.raises(ValueError, match="memory='dense'"):
        StreamConfig(memory="dense")
    with pytest.raises(ValueError, match="sink_size"):
        StreamConfig(sink_size=12, local_attn_size=12)
    with pytest.raises(ValueError, match="bank_size"):
        StreamConfig(memory="nam", bank_size=0)
    with pytest.raises(ValueError, match="unknown streaming setting"):
        StreamConfig.from_dict({"bank_sze": 3})
    assert StreamConfig(memory="none", bank_size=0).window_size == 9
