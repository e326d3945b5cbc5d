"""Model loading in one place: the generator, the text encoder and the VAE of a run.

Each loader takes the presets and paths a config names, never the config itself, so inference,
training and the tools share them. With weights it builds on the meta device and assigns the
published tensors (:mod:`memflow.weights`); without, it makes a seeded random model (tests, speed
measurements, tiny runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from utils.errors import ConfigError, WeightsError

from .dit import WanDiT, build_dit
from .text import WAN_T5_FILE, WAN_TOKENIZER_DIR, TextEncoder
from .vae import WAN_VAE_FILE, WanVAE, vae_config
from .weights import DOWNLOAD_HINTS, WAN_DIT_FILE, WAN_DIT_INDEX, load_dit

log = logging.getLogger(__name__)


# -- what is on disk ----------------------------------------------------------------------------------
def weights_layout(folder: Path) -> str:
    """``diffusers`` for a Diffusers pipeline folder (also one holding only ``vae/``, its DiT given by
    ``generator_ckpt``), else ``original`` (the Wan2.1 release layout)."""
    diffusers = ("model_index.json", "transformer", "vae/config.json")
    return "diffusers" if any((folder / name).exists() for name in diffusers) else "original"


def _dit_present(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (WAN_DIT_INDEX, WAN_DIT_FILE))


def _missing_in_folder(folder: Path, model: str, text_encoder: str, need_dit: bool) -> list[tuple[Path, str]]:
    """The Wan2.1 files of ``folder`` (either layout) that are absent, each with its download command."""
    if weights_layout(folder) == "diffusers":
        hint = DOWNLOAD_HINTS["diffusers"]
        dit = [folder / "transformer" / WAN_DIT_FILE] if need_dit and not _dit_present(folder / "transformer") else []
        text = [folder / "text_encoder" / "config.json", folder / "tokenizer"]
        vae = [folder / "vae" / "config.json", folder / "vae" / "diffusion_pytorch_model.safetensors"]
    else:
        hint = DOWNLOAD_HINTS.get(model, DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
        dit = [folder / WAN_DIT_FILE] if need_dit and not _dit_present(folder) else []
        text = [folder / WAN_T5_FILE, folder / WAN_TOKENIZER_DIR]
        vae = [folder / WAN_VAE_FILE]
    wanted = dit + (text if text_encoder != "minilm" else []) + vae
    return [(path, hint) for path in wanted if not path.exists()]


def missing_weights(
    model: str,
    weights_dir: str | None,
    *,
    text_encoder: str,
    generator_ckpt: str | None = None,
    checkpoints: Sequence[str | None] = (),
) -> list[tuple[Path, str]]:
    """Every weight file or folder a run needs that is absent, each with its download command.

    ``weights_dir`` holds the Wan2.1 DiT (unless ``generator_ckpt`` replaces it), text encoder and VAE;
    ``checkpoints`` are further MemFlow release files (``lora.pt``).
    """
    missing = []
    if weights_dir is not None:
        missing += _missing_in_folder(Path(weights_dir), model, text_encoder, need_dit=generator_ckpt is None)
    if generator_ckpt is not None and not Path(generator_ckpt).is_file():
        missing.append((Path(generator_ckpt), checkpoint_hint(generator_ckpt)))
    for path in checkpoints:
        if path is not None and not Path(path).is_file():
            missing.append((Path(path), DOWNLOAD_HINTS["memflow"]))
    return missing


def checkpoint_hint(path: str | Path) -> str:
    """How to download a generator checkpoint the configs name: Self-Forcing's ODE initialisation,
    LongLive's stage-1 generator, else the MemFlow release."""
    name = Path(path).name
    return DOWNLOAD_HINTS["ode_init" if name == "ode_init.pt" else "longlive" if "longlive" in name else "memflow"]


def missing_dit(path: str | Path, preset: str) -> list[tuple[Path, str]]:
    """A DiT weights file or Wan2.1 folder (either layout) that is absent, with its download command."""
    path = Path(path)
    if path.is_file() or _dit_present(path) or _dit_present(path / "transformer"):
        return []
    is_file = path.suffix in (".safetensors", ".pt", ".pth", ".json")  # Wan folder names hold dots too
    return [(path if is_file else path / WAN_DIT_FILE, DOWNLOAD_HINTS.get(preset, DOWNLOAD_HINTS["diffusers"]))]


def check_weights(missing: Sequence[tuple[Path, str]]) -> None:
    """One WeightsError listing every missing file and the commands that download them."""
    if missing:
        files = ", ".join(str(path) for path, _ in missing)
        commands = " && ".join(dict.fromkeys(hint for _, hint in missing))
        raise WeightsError(
            f"missing weights: {files}; download them with: {commands} "
            "(or point weights_dir / generator_ckpt / lora_ckpt at your copies)"
        )


# -- random weights -----------------------------------------------------------------------------------
@torch.no_grad()
def random_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Cheap seeded init: biases 0, 1-D weights and gains 1, others N(0, 1/fan_in).

    Good enough for random-weight runs (tests, speed measurements); meant for modules
    materialised from the meta device with ``to_empty``.
    """
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            param.zero_()
        elif leaf == "gamma" or param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
    return module


def materialize(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build a module on the meta device, allocate it on ``device`` and fill it by :func:`random_init`."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    random_init(module, torch.Generator(device=device).manual_seed(seed))
    if dtype != torch.float32:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def random_vae(preset: str, channels: int, device: torch.device, dtype: torch.dtype, seed: int) -> WanVAE:
    """A random-weight Wan VAE of ``preset`` with ``channels`` latent channels (neutral latent stats)."""
    config = vae_config(preset)
    if config["z_dim"] != channels:
        config = vae_config(preset, z_dim=channels, latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
    return WanVAE(materialize(lambda: AutoencoderKLWan(**config), device, dtype, seed))


# -- the models of a run -------------------------------------------------------------------------------
def load_generator(
    preset: str,
    overrides: dict,
    *,
    checkpoint: str | None,
    weights_dir: str | None,
    entry: str = "generator",
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> WanDiT:
    """The generator DiT: ``checkpoint`` (``base.pt`` or a DiT file, its ``entry``), else the Wan2.1 DiT of
    ``weights_dir``, else random weights from ``seed``."""
    if checkpoint is not None:
        return load_dit(Path(checkpoint), preset, entry=entry, dtype=dtype, device=device, **overrides)
    if weights_dir is not None:
        return load_dit(Path(weights_dir), preset, dtype=dtype, device=device, **overrides)
    log.warning("generator_ckpt and weights_dir are null: the DiT has random weights (seed %d)", seed)
    return materialize(lambda: build_dit(preset, **overrides), device, dtype, seed)


def load_text_encoder(
    name: str,
    weights_dir: str | None,
    *,
    text_len: int,
    text_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool = False,
) -> TextEncoder:
    """The encoder ``name`` (``minilm``, or the UMT5 of ``weights_dir`` in ``dtype``), its width checked
    against the DiT's ``text_dim``."""
    kwargs = dict(text_len=text_len, device=device, offload_after_encode=offload)
    if name == "minilm":
        encoder = TextEncoder.from_minilm(**kwargs)
    elif weights_dir is None:
        raise ConfigError(f"text_encoder={name} loads from weights_dir, which is null; set weights_dir")
    elif weights_layout(Path(weights_dir)) == "diffusers":
        encoder = TextEncoder.from_diffusers(Path(weights_dir), dtype=dtype, **kwargs)
    else:
        encoder = TextEncoder.from_wan(Path(weights_dir), name, dtype=dtype, **kwargs)
    if encoder.dim != text_dim:
        raise ConfigError(
            f"text_encoder={name} gives {encoder.dim}-dim embeddings but the DiT takes "
            f"text_dim={text_dim}; set model_overrides.text_dim={encoder.dim} or use the matching encoder"
        )
    return encoder


def load_vae(
    preset: str, weights_dir: str | None, *, channels: int, device: torch.device, dtype: torch.dtype, seed: int
) -> WanVAE:
    """The VAE of ``weights_dir`` (random from ``seed`` without one), its latent channels checked against the
    DiT's ``channels``."""
    if weights_dir is None:
        log.warning("weights_dir is null: the VAE has random weights (seed %d)", seed)
        return random_vae(preset, channels, device, dtype, seed)
    folder = Path(weights_dir)
    if weights_layout(folder) == "diffusers":
        vae = WanVAE.from_diffusers(folder, dtype=dtype, device=device)
    else:
        vae = WanVAE.from_wan(folder, preset, dtype=dtype, device=device)
    if vae.model.config.z_dim != channels:
        raise ConfigError(
            f"the VAE has {vae.model.config.z_dim} latent channels but the DiT {channels}; use a matching vae"
        )
    return vae
