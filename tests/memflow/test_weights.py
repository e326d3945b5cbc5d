"""DiT loading (original, sharded, Diffusers, base.pt), LoRA via peft, and the layout errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from memflow.dit import build_dit
from memflow.weights import (
    WAN_DIT_FILE,
    apply_lora,
    attach_lora,
    compare_layout,
    diffusers_dit_key,
    expected_lora_layout,
    load_dit,
    module_layout,
    read_dit_state_dict,
    safetensors_header,
    strip_wrapper_key,
    to_original_dit,
)
from utils.errors import WeightsError

from ..weights_synthetic import lora_state


def manifest(manifests_dir: Path, name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifests_dir / f"{name}.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _) in tensors.items()}


def meta_dit(preset: str = "wan2.1-t2v-1.3b"):
    with torch.device("meta"):
        return build_dit(preset)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_dit("tiny").eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 2, 16, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 7, 32, generator=g)


def same_output(a, b, inputs, atol: float = 0.0) -> bool:
    with torch.no_grad():
        return torch.allclose(a(*inputs), b(*inputs), rtol=0, atol=atol)


# -- manifests: names and shapes of the published files ------------------------------------------
def test_diffusers_dit_manifest_maps_onto_original_manifest(manifests_dir):
    diffusers = manifest(manifests_dir, "diffusers__WanTransformer3DModel__wan2.1_t2v_1.3b")
    original = manifest(manifests_dir, "wan2.1_t2v_1.3b__diffusion_pytorch_model")
    renamed = {diffusers_dit_key(k): v for k, v in diffusers.items()}
    assert len(renamed) == len(diffusers)
    assert compare_layout(renamed, original).ok
    assert compare_layout(to_original_dit(diffusers), original).ok


@pytest.mark.parametrize(
    ("preset", "name"),
    [
        ("wan2.1-t2v-1.3b", "wan2.1_t2v_1.3b__diffusion_pytorch_model"),
        ("wan2.1-t2v-14b", "wan2.1_t2v_14b__diffusion_pytorch_model"),
    ],
)
def test_meta_dit_matches_original_manifest(manifests_dir, preset, name):
    assert compare_layout(manifest(manifests_dir, name), module_layout(meta_dit(preset))).ok


def test_base_pt_manifest_maps_onto_meta_dit(manifests_dir):
    base = manifest(manifests_dir, "memflow_generator_base_pt__generator")
    assert all(k.startswith("model.") for k in base)
    assert compare_layout(to_original_dit(base), module_layout(meta_dit())).ok


def test_lora_manifest_matches_peft_names_on_meta_1_3b(manifests_dir):
    published = manifest(manifests_dir, "memflow_lora_pt__generator_lora")
    model = meta_dit()
    assert compare_layout(published, expected_lora_layout(model, 256)).ok
    with torch.device("meta"):
        peft_model = attach_lora(model, rank=256, alpha=256)
    peft_names = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    assert compare_layout(published, peft_names).ok


def test_wrapper_prefixes_are_stripped():
    key = "model._fsdp_wrapped_module.blocks.3._checkpoint_wrapped_module._orig_mod.self_attn.q.weight"
    assert strip_wrapper_key(key) == "blocks.3.self_attn.q.weight"


# -- loading real files (tiny) ------------------------------------------------------------------
def test_single_file_load_is_exact_and_converts_dtype(tmp_path, tiny, inputs):
    save_file(tiny.state_dict(), str(tmp_path / WAN_DIT_FILE))
    loaded = load_dit(tmp_path, "tiny")
    assert not any(p.is_meta for p in loaded.parameters())
    assert same_output(loaded, tiny, inputs)
    half = load_dit(tmp_path / WAN_DIT_FILE, "tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_sharded_index_load(tmp_path, tiny, inputs):
    state = tiny.state_dict()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_output(load_dit(tmp_path, "tiny"), tiny, inputs)


def test_base_pt_generator_and_ema_round_trip(tmp_path, tiny, inputs):
    ema = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    wrap = "model._fsdp_wrapped_module."
    torch.save(
        {
            "generator": {"model." + k: v for k, v in tiny.state_dict().items()},
            "generator_ema": {wrap + k: v for k, v in ema.state_dict().items()},
        },
        tmp_path / "base.pt",
    )
    assert same_output(load_dit(tmp_path / "base.pt", "tiny"), tiny, inputs)
    assert same_output(load_dit(tmp_path / "base.pt", "tiny", entry="generator_ema"), ema, inputs)
    with pytest.raises(WeightsError, match="no 'critic' entry"):
        load_dit(tmp_path / "base.pt", "tiny", entry="critic")


def test_diffusers_transformer_folder_gives_the_same_model(tmp_path, inputs):
    """A diffusers WanTransformer3DModel and our DiT loaded from its folder compute the same flow."""
    torch.manual_seed(3)
    cfg = build_dit("tiny").config
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
    ).eval()  # fmt: skip
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    ours = load_dit(tmp_path, "tiny")
    x, t, context = inputs
    padded = torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
    with torch.no_grad():
        expected = ref(x.transpose(1, 2), t, padded, return_dict=False)[0].transpose(1, 2)
        assert torch.allclose(ours(x, t, context), expected, rtol=0, atol=1e-4)


# -- errors ---------------------------------------------------------------------------------------
def test_missing_file_names_the_download_command(tmp_path):
    with pytest.raises(WeightsError, match=r"DiT weights not found: expected .*huggingface-cli download Wan-AI"):
        load_dit(tmp_path, "tiny")


def test_wrong_layout_lists_missing_and_unexpected_keys(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state["blocks.0.self_attn.qq.weight"] = state.pop("blocks.0.self_attn.q.weight")
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing key.*self_attn\.q\.weight.*1 unexpected key.*qq"):
        load_dit(tmp_path / "w.safetensors", "tiny")


def test_shape_mismatch_is_reported(tmp_path, tiny):
    save_file(tiny.state_dict(), str(tmp_path / "w.safetensors"))
    expected = r"shape mismatch.*text_embedding\.0\.weight file \(128, 32\) vs model \(128, 64\)"
    with pytest.raises(WeightsError, match=expected):
        load_dit(tmp_path / "w.safetensors", "tiny", text_dim=64)


def test_truncated_safetensors_is_reported(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    save_file(tiny.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated file"):
        safetensors_header(path)
    with pytest.raises(WeightsError, match="truncated file"):
        read_dit_state_dict(path)


def test_corrupt_pt_is_reported(tmp_path):
    path = tmp_path / "base.pt"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(WeightsError, match="not a readable PyTorch weights file"):
        load_dit(path, "tiny")


# -- LoRA -----------------------------------------------------------------------------------------
def test_published_lora_loads_changes_output_and_merges_exactly(tmp_path, tiny, inputs):
    lora = lora_state(tiny, rank=4)
    torch.save({"generator_lora": lora, "critic_lora": lora_state(tiny, rank=4, seed=5)}, tmp_path / "lora.pt")
    unmerged = apply_lora(copy.deepcopy(tiny), tmp_path / "lora.pt", rank=4, alpha=8)
    merged = apply_lora(copy.deepcopy(tiny), tmp_path / "lora.pt", rank=4, alpha=8, merge=True)
    assert type(unmerged) is type(tiny) and type(merged) is type(tiny)
    assert not same_output(unmerged, tiny, inputs, atol=1e-3)
    assert same_output(merged, unmerged, inputs, atol=1e-5)
    critic = apply_lora(copy.deepcopy(tiny), tmp_path / "lora.pt", rank=4, alpha=8, entry="critic_lora")
    assert not same_output(critic, unmerged, inputs, atol=1e-3)


def test_lora_weights_land_exactly_and_bare_dicts_work(tiny):
    lora = lora_state(tiny, rank=4)
    bare = {k.removeprefix("base_model.model."): v for k, v in lora.items()}
    model = apply_lora(copy.deepcopy(tiny), bare, rank=4, alpha=4)
    a = model.get_submodule("blocks.1.ffn.2").lora_A["default"].weight
    assert torch.equal(a, lora["base_model.model.blocks.1.ffn.2.lora_A.weight"])


def test_lora_from_safetensors_equals_lora_from_pt(tmp_path, tiny, inputs):
    lora = lora_state(tiny, rank=4)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp_path / "adapter_model.safetensors"))
    from_pt = apply_lora(copy.deepcopy(tiny), tmp_path / "lora.pt", rank=4, alpha=8, merge=True)
    from_st = apply_lora(copy.deepcopy(tiny), tmp_path / "adapter_model.safetensors", rank=4, alpha=8, merge=True)
    assert same_output(from_st, from_pt, inputs, atol=0.0)
    assert not same_output(from_st, tiny, inputs, atol=1e-3)


def test_lora_rank_mismatch_is_reported(tiny):
    with pytest.raises(WeightsError, match=r"file rank \[4\], configured rank 8"):
        apply_lora(copy.deepcopy(tiny), lora_state(tiny, rank=4), rank=8, alpha=8)
