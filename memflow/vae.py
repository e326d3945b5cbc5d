"""Wan2.1 causal 3-D VAE: diffusers' ``AutoencoderKLWan`` behind a [B, F, C, H, W] latent API.

Weights come from the original ``Wan2.1_VAE.pth`` (renamed by ``wan_vae_key_map``) or from a
Diffusers ``vae/`` folder. Latents at our API are normalised with the published per-channel
mean / std: ``latent = (mu - mean) / std``. ``StreamingDecoder`` decodes each newly finished chunk
of latent frames while carrying the decoder's causal convolution cache, so per-chunk decodes
concatenate to exactly the whole-video decode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from utils.errors import ConfigError, WeightsError

from .weights import DOWNLOAD_HINTS, assign_exact, read_safetensors, read_torch_file, rename, require_file

WAN_VAE_FILE = "Wan2.1_VAE.pth"

WAN21_LATENT_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENT_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# AutoencoderKLWan keyword arguments; "tiny" is the golden-case model.
VAE_PRESETS: dict[str, dict] = {
    "wan2.1": dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
        latents_mean=WAN21_LATENT_MEAN, latents_std=WAN21_LATENT_STD,
    ),
    "tiny": dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ),
}  # fmt: skip


def vae_config(preset: str = "wan2.1", **overrides) -> dict:
    """AutoencoderKLWan arguments of a preset, optionally with some replaced."""
    if preset not in VAE_PRESETS:
        raise ConfigError(f"unknown VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    config = {**VAE_PRESETS[preset], **overrides}
    if config.get("attn_scales"):
        raise ConfigError("vae attn_scales must be empty: Wan2.1's VAE has attention only in its middle blocks")
    return config


def vae_config_from_wan(config: dict) -> dict:
    """AutoencoderKLWan arguments from the reference ``WanVAE_`` names (dim, z_dim, latent_mean ...)."""
    names = {"dim": "base_dim", "latent_mean": "latents_mean", "latent_std": "latents_std"}
    keep = {"dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout",
            "latent_mean", "latent_std"}  # fmt: skip
    return {names.get(k, k): v for k, v in config.items() if k in keep}


# -- key mapping: original WanVAE_ -> diffusers AutoencoderKLWan ---------------------------------
_RESNET_PARTS = [
    (re.compile(r"\.residual\.0\.gamma$"), ".norm1.gamma"),
    (re.compile(r"\.residual\.2\."), ".conv1."),
    (re.compile(r"\.residual\.3\.gamma$"), ".norm2.gamma"),
    (re.compile(r"\.residual\.6\."), ".conv2."),
    (re.compile(r"\.shortcut\."), ".conv_shortcut."),
]
_FIXED = [
    (re.compile(r"^conv1\."), "quant_conv."),
    (re.compile(r"^conv2\."), "post_quant_conv."),
    (re.compile(r"^(encoder|decoder)\.conv1\."), r"\1.conv_in."),
    (re.compile(r"^(encoder|decoder)\.head\.0\."), r"\1.norm_out."),
    (re.compile(r"^(encoder|decoder)\.head\.2\."), r"\1.conv_out."),
    (re.compile(r"^(encoder|decoder)\.middle\.0\."), r"\1.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.middle\.1\."), r"\1.mid_block.attentions.0."),
    (re.compile(r"^(encoder|decoder)\.middle\.2\."), r"\1.mid_block.resnets.1."),
    (re.compile(r"^encoder\.downsamples\."), "encoder.down_blocks."),
]
_UPSAMPLE = re.compile(r"^decoder\.upsamples\.(\d+)\.")


def wan_vae_key_map(num_res_blocks: int, num_stages: int) -> Callable[[str], str]:
    """Original ``WanVAE_`` name -> ``AutoencoderKLWan`` name, for any number of residual blocks.

    The encoder keeps its flat index. The decoder's flat ``upsamples.N`` is regrouped: each of the
    ``num_stages`` stages holds ``num_res_blocks + 1`` resnets, followed by one upsampler in every
    stage but the last.
    """
    resnets = num_res_blocks + 1

    def up_block(match: re.Match) -> str:
        index = int(match.group(1))
        stage = min(index // (resnets + 1), num_stages - 1)
        j = index - stage * (resnets + 1)
        if j > resnets or (j == resnets and stage == num_stages - 1):
            raise WeightsError(f"VAE key {match.group(0)!r} does not fit {num_res_blocks} residual blocks per stage")
        inner = f"resnets.{j}." if j < resnets else "upsamplers.0."
        return f"decoder.up_blocks.{stage}.{inner}"

    def key_map(key: str) -> str:
        for pattern, repl in _FIXED:
            key = pattern.sub(repl, key)
        key = _UPSAMPLE.sub(up_block, key)
        for pattern, repl in _RESNET_PARTS:
            key = pattern.sub(repl, key)
        return key

    return key_map


def meta_vae(config: dict) -> AutoencoderKLWan:
    """An AutoencoderKLWan on the meta device (no memory), for loading or layout checks."""
    with torch.device("meta"):
        return AutoencoderKLWan(**config)


def conv_cache(module: torch.nn.Module) -> list:
    """An empty causal feature cache for an ``AutoencoderKLWan`` encoder or decoder (one slot per causal conv)."""
    return [None] * sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class StreamingDecoder:
    """Decodes latent chunks as they finish, carrying the causal temporal cache between calls.

    The decoder runs one latent frame at a time (as the whole-video decode does) with a feature
    cache kept across ``decode`` calls; ``reset`` starts a new video.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self._cache = conv_cache(self.vae.model.decoder)
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, f, C, h, w] -> pixels [B, T, 3, H, W] in [-1, 1]."""
        model = self.vae.model
        z = model.post_quant_conv(self.vae.denormalize(self.vae.to_model(latents)).transpose(1, 2))
        frames = []
        for i in range(z.shape[2]):
            frames.append(
                model.decoder(z[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=self._first)
            )
            self._first = False
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0).transpose(1, 2)


class WanVAE:
    """Wan2.1 VAE on latents [B, F, C, H, W] and pixels [B, T, 3, H, W] in [-1, 1]."""

    def __init__(self, model: AutoencoderKLWan):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, 1, -1, 1, 1)
        mean = torch.tensor(self.model.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.model.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the VAE's device and in its parameter dtype."""
        return x.to(device=self.device, dtype=next(self.model.parameters()).dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [B, T, 3, H, W] (T = 1 + 4k) -> normalised latent means [B, F, C, h, w]."""
        mu = self.model.encode(self.to_model(video).transpose(1, 2)).latent_dist.mode()
        return self.normalize(mu.transpose(1, 2))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole-video decode: normalised latents [B, F, C, h, w] -> pixels [B, T, 3, H, W]."""
        z = self.denormalize(self.to_model(latents)).transpose(1, 2)
        return self.model.decode(z).sample.transpose(1, 2)

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh per-chunk decoder for one video."""
        return StreamingDecoder(self)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_wan(
        cls,
        path: Path,
        preset: str = "wan2.1",
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        **overrides,
    ) -> WanVAE:
        """From the original ``Wan2.1_VAE.pth`` (or a folder holding it)."""
        path = Path(path)
        file = path / WAN_VAE_FILE if path.is_dir() else path
        require_file(file, "Wan2.1 VAE weights", DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
        state = file_state_dict(file)
        return cls.from_original_state_dict(state, preset, source=str(file), dtype=dtype, device=device, **overrides)

    @classmethod
    def from_original_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        preset: str = "wan2.1",
        *,
        source: str = "<VAE state dict>",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        **overrides,
    ) -> WanVAE:
        """From a state dict in the original ``WanVAE_`` names."""
        config = vae_config(preset, **overrides)
        model = meta_vae(config)
        key_map = wan_vae_key_map(config["num_res_blocks"], len(config["dim_mult"]))
        assign_exact(model, rename(state, key_map), source, dtype)
        return cls(model.to(device))

    @classmethod
    def from_diffusers(
        cls, folder: Path, *, dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
    ) -> WanVAE:
        """From a Diffusers ``vae/`` folder (or its parent): config.json + safetensors."""
        folder = Path(folder)
        folder = folder / "vae" if (folder / "vae").is_dir() else folder
        config_file = require_file(folder / "config.json", "Diffusers VAE config", DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
        weights = require_file(folder / "diffusion_pytorch_model.safetensors", "Diffusers VAE weights")
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        try:
            model = meta_vae(config)
        except TypeError as err:
            raise WeightsError(f"{config_file}: not an AutoencoderKLWan config ({err})") from err
        assign_exact(model, read_safetensors(weights), str(weights), dtype)
        return cls(model.to(device))


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a VAE weights file (.pth memory-mapped, or .safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a VAE state dict")
    return state
