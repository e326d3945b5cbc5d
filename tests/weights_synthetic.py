"""Tiny synthetic copies of the published weight folders, for loader and verify_weights tests.

The original-layout names are produced by inverting our converters independently (flat VAE
index = stage * (num_res_blocks + 2) + j), so a wrong converter cannot agree with itself here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from memflow.dit import build_dit
from memflow.text import WAN_T5_FILE, WAN_TOKENIZER_DIR, umt5_config
from memflow.vae import WAN_VAE_FILE, vae_config
from memflow.weights import WAN_DIT_FILE, expected_lora_layout

_HF_TO_WAN_T5 = [
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        r"blocks.\1.pos_embedding.embedding.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
    (r"^shared\.", "token_embedding."),
]


def wan_t5_state(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """A transformers UMT5 encoder's weights under Wan's T5Encoder names."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        for pattern, repl in _HF_TO_WAN_T5:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    return out


def wan_vae_name(key: str, num_res_blocks: int) -> str:
    """AutoencoderKLWan name -> original WanVAE_ name."""
    per_stage = num_res_blocks + 2

    def up(m: re.Match) -> str:
        stage, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        index = stage * per_stage + (j if kind == "resnets" else num_res_blocks + 1)
        return f"decoder.upsamples.{index}."

    for pattern, repl in [  # inside residual blocks first: "<index>.conv1." is never conv_in / quant_conv
        (r"\.(\d+)\.conv1\.", r".\1.residual.2."),
        (r"\.(\d+)\.conv2\.", r".\1.residual.6."),
        (r"\.(\d+)\.norm1\.gamma$", r".\1.residual.0.gamma"),
        (r"\.(\d+)\.norm2\.gamma$", r".\1.residual.3.gamma"),
        (r"\.(\d+)\.conv_shortcut\.", r".\1.shortcut."),
    ]:
        key = re.sub(pattern, repl, key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.", up, key)
    for pattern, repl in [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ]:
        key = re.sub(pattern, repl, key)
    return key


def wan_vae_state(model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    r = model.config.num_res_blocks
    return {wan_vae_name(k, r): v.clone() for k, v in model.state_dict().items()}


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over words w3..w{vocab_size-1} that appends </s>, like umT5's."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_models(seed: int = 0) -> tuple[torch.nn.Module, UMT5EncoderModel, AutoencoderKLWan]:
    torch.manual_seed(seed)
    return build_dit("tiny"), UMT5EncoderModel(umt5_config("tiny")).eval(), AutoencoderKLWan(**vae_config("tiny"))


def write_wan_folder(folder: Path, seed: int = 0) -> tuple[torch.nn.Module, UMT5EncoderModel, AutoencoderKLWan]:
    """The original Wan2.1 layout at tiny size; returns the modules whose weights were written."""
    dit, t5, vae = tiny_models(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / WAN_DIT_FILE))
    torch.save(wan_t5_state(t5), folder / WAN_T5_FILE)
    torch.save(wan_vae_state(vae), folder / WAN_VAE_FILE)
    tiny_tokenizer(t5.config.vocab_size).save_pretrained(folder / WAN_TOKENIZER_DIR)
    return dit, t5, vae


def lora_state(model: torch.nn.Module, rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA state dict in the published format (peft names, ``base_model.model.`` prefix)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=g) for k, shape in expected_lora_layout(model, rank).items()}


def write_checkpoints(folder: Path, dit: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """``base.pt`` (generator + generator_ema, ``model.`` prefix) and ``lora.pt`` (generator + critic)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = {"model." + k: v for k, v in dit.state_dict().items()}
    torch.save({"generator": generator, "generator_ema": dict(generator)}, folder / "base.pt")
    lora = lora_state(dit, rank)
    torch.save({"generator_lora": lora, "critic_lora": lora_state(dit, rank, seed=2)}, folder / "lora.pt")
    return lora
