"""UMT5 text encoder and Wan VAE: key maps on the published manifests, golden cases, loaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from memflow.text import TextEncoder, umt5_config, wan_t5_key
from memflow.vae import WanVAE, meta_vae, vae_config, vae_config_from_wan, wan_vae_key_map
from memflow.weights import compare_layout, module_layout, rename
from pipeline.golden import run_t5_encoder, run_vae_roundtrip
from utils.errors import WeightsError

from ..weights_synthetic import tiny_tokenizer, wan_t5_state, wan_vae_name, write_wan_folder

TOL = 1e-4


def manifest(manifests_dir: Path, name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifests_dir / f"{name}.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _) in tensors.items()}


# -- manifests ------------------------------------------------------------------------------------
def test_wan_t5_manifest_maps_onto_transformers_manifest(manifests_dir):
    wan = manifest(manifests_dir, "wan2.1__models_t5_umt5-xxl-enc-bf16")
    hf = manifest(manifests_dir, "transformers__UMT5EncoderModel__umt5-xxl")
    assert compare_layout(rename(wan, wan_t5_key), hf).ok
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config("umt5-xxl"))
    assert compare_layout(hf, module_layout(model)).ok


def test_wan_vae_manifest_maps_onto_diffusers_manifest(manifests_dir):
    wan = manifest(manifests_dir, "wan2.1__Wan2.1_VAE")
    diffusers = manifest(manifests_dir, "diffusers__AutoencoderKLWan__default_config")
    config = vae_config("wan2.1")
    assert compare_layout(rename(wan, wan_vae_key_map(config["num_res_blocks"], len(config["dim_mult"]))), diffusers).ok
    assert compare_layout(diffusers, module_layout(meta_vae(config))).ok


def test_tiny_vae_layout_with_one_res_block_maps(golden_dir):
    case = json.loads((golden_dir / "cases.json").read_text())["cases"]["vae_roundtrip"]
    original = {k: tuple(v) for k, v in case["weight_keys_and_shapes"].items()}
    config = vae_config_from_wan(case["config"])
    assert config["num_res_blocks"] == 1
    assert compare_layout(rename(original, wan_vae_key_map(1, 4)), module_layout(meta_vae(config))).ok


@pytest.mark.parametrize("num_res_blocks", [1, 2, 3])
def test_vae_key_map_inverts_independent_renaming(num_res_blocks):
    layout = module_layout(meta_vae(vae_config("tiny", num_res_blocks=num_res_blocks)))
    original = {wan_vae_name(k, num_res_blocks): v for k, v in layout.items()}
    assert len(original) == len(layout)
    assert compare_layout(rename(original, wan_vae_key_map(num_res_blocks, 4)), layout).ok


def test_vae_key_map_rejects_an_index_past_the_layout():
    with pytest.raises(WeightsError, match="does not fit 1 residual blocks"):
        wan_vae_key_map(1, 4)("decoder.upsamples.11.residual.0.gamma")


# -- golden ---------------------------------------------------------------------------------------
def test_golden_vae_roundtrip(golden_dir):
    errors = run_vae_roundtrip(golden_dir)
    assert set(errors) == {"latent", "decoded", "decoded_cached_chunks"}
    assert max(errors.values()) <= TOL, errors


def test_golden_t5_encoder(golden_dir):
    errors = run_t5_encoder(golden_dir)
    assert set(errors) == {"output", "prompt_embeds", "output_long"}
    assert max(errors.values()) <= TOL, errors


# -- VAE ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    return folder, *write_wan_folder(folder)


def test_vae_from_wan_and_from_diffusers_agree(wan_folder, tmp_path):
    folder, _, _, vae_module = wan_folder
    vae_module.save_pretrained(tmp_path / "vae")
    from_wan = WanVAE.from_wan(folder, "tiny")
    from_diffusers = WanVAE.from_diffusers(tmp_path)
    latents = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = from_wan.decode(latents)
    assert pixels.shape == (1, 9, 3, 32, 32)
    assert pixels.abs().max() <= 1.0
    assert torch.equal(pixels, from_diffusers.decode(latents))


def test_streaming_decode_equals_whole_decode(wan_folder):
    vae = WanVAE.from_wan(wan_folder[0], "tiny")
    latents = torch.randn(1, 5, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(latents)
    decoder = vae.streaming_decoder()
    for _ in range(2):  # the second pass checks that reset() starts a fresh video
        decoder.reset()
        chunks = [decoder.decode(latents[:, a:b]) for a, b in [(0, 2), (2, 3), (3, 5)]]
        assert [c.shape[1] for c in chunks] == [5, 4, 8]
        assert torch.allclose(torch.cat(chunks, dim=1), whole, rtol=0, atol=1e-6)


def test_vae_normalisation_uses_published_statistics():
    vae = WanVAE(meta_vae(vae_config("wan2.1")))
    mu = torch.zeros(1, 1, 16, 1, 1)
    mean = torch.tensor(vae_config("wan2.1")["latents_mean"]).view(1, 1, -1, 1, 1)
    std = torch.tensor(vae_config("wan2.1")["latents_std"]).view(1, 1, -1, 1, 1)
    assert torch.allclose(vae.normalize(mu), -mean / std)
    assert torch.allclose(vae.denormalize(vae.normalize(mu)), mu, atol=1e-6)


def test_encode_then_latent_layout(wan_folder):
    vae = WanVAE.from_wan(wan_folder[0], "tiny")
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    assert vae.encode(video).shape == (2, 2, 4, 2, 2)


def test_missing_vae_file_names_the_download(tmp_path):
    with pytest.raises(WeightsError, match=r"Wan2\.1_VAE\.pth; download it with: huggingface-cli download"):
        WanVAE.from_wan(tmp_path, "tiny")


# -- text encoder ---------------------------------------------------------------------------------
def test_text_encoder_from_wan_encodes_and_zeroes_padding(wan_folder, caplog):
    folder, _, t5, _ = wan_folder
    encoder = TextEncoder.from_wan(folder, "tiny", dtype=torch.float32, text_len=8, offload_after_encode=True)
    with caplog.at_level(logging.WARNING, logger="memflow.text"):
        out = encoder.encode(["w5  w17 w42", " ".join(f"w{i}" for i in range(3, 15))])
    assert out.shape == (2, 8, encoder.dim)
    assert (out[0, 4:] == 0).all() and (out[0, :4] != 0).any(dim=-1).all()
    assert "prompt 1 has 13 tokens; truncated to the first 8" in caplog.text
    ids = torch.tensor([[5, 17, 42, 1, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        reference = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out[:1, :4], reference[:, :4], rtol=0, atol=1e-6)
    assert next(encoder.model.parameters()).device.type == "cpu"


def test_text_encoder_from_diffusers_matches_from_wan(wan_folder, tmp_path):
    folder, _, t5, _ = wan_folder
    (tmp_path / "text_encoder").mkdir()
    t5.config.to_json_file(tmp_path / "text_encoder" / "config.json")
    save_file({"shared.weight": t5.shared.weight.detach().clone(), **{
        k: v for k, v in t5.state_dict().items() if k not in ("shared.weight", "encoder.embed_tokens.weight")
    }}, str(tmp_path / "text_encoder" / "model.safetensors"))  # fmt: skip
    tiny_tokenizer(t5.config.vocab_size).save_pretrained(tmp_path / "tokenizer")
    prompts = ["w3 w4 w5", "w9"]
    a = TextEncoder.from_wan(folder, "tiny", dtype=torch.float32, text_len=6).encode(prompts)
    b = TextEncoder.from_diffusers(tmp_path, dtype=torch.float32, text_len=6)
    assert b.model.encoder.embed_tokens.weight is b.model.shared.weight
    assert torch.equal(a, b.encode(prompts))


def test_wan_t5_state_round_trips_through_the_key_map():
    torch.manual_seed(0)
    model = UMT5EncoderModel(umt5_config("tiny"))
    renamed = rename(wan_t5_state(model), wan_t5_key)
    assert compare_layout({k: tuple(v.shape) for k, v in renamed.items()}, module_layout(model)).ok
    assert all(torch.equal(renamed[k], v) for k, v in model.state_dict().items())


def test_missing_tokenizer_names_the_folder(tmp_path):
    torch.save({}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(WeightsError, match=r"tokenizer folder not found: expected .*google/umt5-xxl"):
        TextEncoder.from_wan(tmp_path, "tiny")


def test_minilm_is_a_second_constructor():
    encoder = TextEncoder.from_minilm(text_len=16)
    out = encoder.encode(["a cat sits on a mat"])
    assert out.shape == (1, 16, encoder.dim) and encoder.dim == 384
    real = int((out[0].abs().sum(-1) > 0).sum())
    assert 3 <= real < 16 and (out[0, real:] == 0).all()
