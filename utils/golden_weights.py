"""Golden cases for the weight-backed library classes: the VAE round trip and the umT5 encoder.

Both load the tiny reference weights, which are stored in the ORIGINAL key layout, through the
same converters users' real files go through, and return name -> max abs error against the
reference outputs. ``scripts/check_golden.py`` and the tests call these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from memflow.text import TextEncoder, umt5_config_from_wan
from memflow.vae import WanVAE, vae_config_from_wan
from memflow.weights import read_safetensors


def _case(golden_dir: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    case = json.loads((Path(golden_dir) / "cases.json").read_text())["cases"][name]
    return case, load_file(str(Path(golden_dir) / case["file"]))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def run_vae_roundtrip(golden_dir: Path) -> dict[str, float]:
    """Encode, whole decode and per-chunk cached decode of the tiny VAE against the reference."""
    case, data = _case(golden_dir, "vae_roundtrip")
    weights = read_safetensors(Path(golden_dir) / case["weights"])
    vae = WanVAE.from_original_state_dict(weights, "tiny", **vae_config_from_wan(case["config"]))
    video = data["video"].transpose(1, 2)  # stored (B, C, T, H, W); our API takes (B, T, C, H, W)
    latent = vae.encode(video)
    decoder = vae.streaming_decoder()
    chunks = [decoder.decode(data["latent"][:, a:b]) for a, b in case["config"]["cached_decode_chunks_latent_frames"]]
    return {
        "latent": _err(latent, data["latent"]),
        "decoded": _err(vae.decode(data["latent"]), data["decoded"]),
        "decoded_cached_chunks": _err(torch.cat(chunks, dim=1), data["decoded_cached_chunks"]),
    }


@torch.no_grad()
def run_t5_encoder(golden_dir: Path) -> dict[str, float]:
    """Raw and padding-zeroed outputs of the tiny umT5 encoder against the reference."""
    case, data = _case(golden_dir, "t5_encoder")
    weights = read_safetensors(Path(golden_dir) / case["weights"])
    config = umt5_config_from_wan(case["config"])
    encoder = TextEncoder.from_original_state_dict(weights, config, tokenizer=None, text_len=data["ids"].shape[1])
    return {
        "output": _err(encoder.hidden_states(data["ids"], data["mask"]), data["output"]),
        "prompt_embeds": _err(encoder.encode_ids(data["ids"], data["mask"]), data["prompt_embeds"]),
        "output_long": _err(encoder.hidden_states(data["ids_long"], data["mask_long"]), data["output_long"]),
    }
