"""Frame and text features for evaluation: the VBench input pipeline and the two feature models.

Inputs follow VBench's own transforms, written out with ``torch`` so no torchvision is needed:

* DINO (subject consistency): the shorter side resized to 224 (bilinear, no antialiasing, the
  longer side ``int(224 * long / short)``), no crop, values / 255, ImageNet mean and std; a ViT
  interpolates its position embeddings to the resulting grid. The feature is the final CLS token.
* CLIP (background consistency, text alignment): the shorter side resized to the model's input
  size (224 for ViT-B/32; bicubic, no antialiasing), centre-cropped to a square, values / 255,
  CLIP's mean and std. The feature is CLIP's projected image embedding.

As torchvision does for uint8 frames, the resized frames are rounded and clamped to 0..255 before
scaling. Any object with these methods can stand in for a model (:class:`ImageEncoder`,
:class:`TextImageEncoder`), which is how the tests inject models whose outputs they control.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from utils.errors import MemFlowError

DEFAULT_DINO = "facebook/dino-vitb16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DINO_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_TYPES = ("vit", "dinov2")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


class ImageEncoder(Protocol):
    """Maps uint8 frames ``[N, 3, H, W]`` to one feature vector each, ``[N, D]``."""

    name: str

    def image_features(self, frames: torch.Tensor) -> torch.Tensor: ...


class TextImageEncoder(ImageEncoder, Protocol):
    """An image encoder with a text tower in the same space (CLIP): texts -> ``[N, D]``."""

    def text_features(self, texts: Sequence[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# VBench's input transforms


def resize_short_side(frames: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float ``[N, 3, h, w]`` with ``min(h, w) = size``, rounded to 0..255."""
    height, width = frames.shape[-2:]
    out = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    resized = F.interpolate(frames.float(), size=out, mode=mode, align_corners=False, antialias=False)
    return resized.clamp(0, 255).round()


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` square (offsets rounded as torchvision does)."""
    height, width = frames.shape[-2:]
    top, left = round((height - size) / 2), round((width - size) / 2)
    return frames[..., top : top + size, left : left + size]


def _normalise(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames / 255.0 - mean_t) / std_t


def dino_input(frames: torch.Tensor, size: int = DINO_SIZE) -> torch.Tensor:
    """VBench's subject-consistency input: shorter side to ``size`` (bilinear), ImageNet normalisation."""
    return _normalise(resize_short_side(frames, size, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)


def clip_input(frames: torch.Tensor, size: int) -> torch.Tensor:
    """VBench's CLIP input: shorter side to ``size`` (bicubic), centre crop, CLIP normalisation."""
    return _normalise(center_crop(resize_short_side(frames, size, "bicubic"), size), CLIP_MEAN, CLIP_STD)


def prompt_windows(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """``text`` split at sentence ends into windows of at most ``max_tokens`` tokens each.

    CLIP reads 77 tokens; MemFlow's narrative prompts are longer and often open with the same
    subject description, so truncating them would leave the segments' prompts nearly identical. A
    prompt that fits is one window (then this is plain CLIP); a single sentence longer than a
    window stays whole and is truncated by the tokenizer.
    """
    if count_tokens(text) <= max_tokens:
        return [text]
    windows: list[str] = []
    current, used = [], 0
    for sentence in _SENTENCE_END.split(text.strip()):
        tokens = count_tokens(sentence)
        if current and used + tokens > max_tokens:
            windows.append(" ".join(current))
            current, used = [], 0
        current.append(sentence)
        used += tokens
    windows.append(" ".join(current))
    return windows


# --------------------------------------------------------------------------------------------
# Hugging Face models


def _pooled(output: object) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


class DinoEncoder:
    """Subject features: a DINO ViT (``ViTModel`` or ``Dinov2Model``), CLS token of the last layer."""

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device, size: int = DINO_SIZE) -> None:
        self.model = model.eval().to(device)
        self.name = name
        self.device = device
        self.size = size
        self._kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = dino_input(frames.to(self.device), self.size)
        return self.model(pixel_values=pixels, **self._kwargs).last_hidden_state[:, 0].float().cpu()


class ClipEncoder:
    """Background and text features: a ``CLIPModel`` with its tokenizer, projected embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, name: str, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.size = model.config.vision_config.image_size
        self.max_tokens = model.config.text_config.max_position_embeddings - 2  # start and end tokens

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = clip_input(frames.to(self.device), self.size)
        return _pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """One feature per text: the mean of its windows' unit features (:func:`prompt_windows`)."""
        windows = [prompt_windows(text, self._count, self.max_tokens) for text in texts]
        flat = [w for group in windows for w in group]
        tokens = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_tokens + 2,
                                return_tensors="pt").to(self.device)  # fmt: skip
        features = F.normalize(_pooled(self.model.get_text_features(**tokens)).float().cpu(), dim=-1)
        return torch.stack([part.mean(0) for part in features.split([len(g) for g in windows])])


def _load_error(flag: str, name: str, what: str, err: BaseException) -> MemFlowError:
    detail = " ".join(str(err).split())[:300] or type(err).__name__
    return MemFlowError(
        f"{flag} {name}: cannot load the {what} ({detail}); pass a folder written by save_pretrained, or put the "
        f"model in the local Hugging Face cache first (hf download {name})"
    )


def load_dino(name: str, device: torch.device) -> DinoEncoder:
    """A DINO ViT by hub name (from the local Hugging Face cache only) or folder; MemFlowError otherwise."""
    from transformers import AutoConfig, Dinov2Model, ViTModel

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        if config.model_type not in DINO_TYPES:
            raise ValueError(f"it is a {config.model_type!r} model, not a DINO ViT ({' or '.join(DINO_TYPES)})")
        if config.model_type == "vit":
            model = ViTModel.from_pretrained(name, local_files_only=True, add_pooling_layer=False)
        else:
            model = Dinov2Model.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _load_error("--dino", name, "DINO model", err) from None
    return DinoEncoder(model, name, device)


def load_clip(name: str, device: torch.device) -> ClipEncoder:
    """A CLIP model and its tokenizer by hub name (local cache only) or folder; MemFlowError otherwise."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _load_error("--clip", name, "CLIP model and tokenizer", err) from None
    return ClipEncoder(model, tokenizer, name, device)
