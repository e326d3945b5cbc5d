"""Load published weights into our modules exactly: file readers, layout checks, DiT and LoRA.

Every loader builds its module on the ``meta`` device and assigns the file's tensors into it
(``load_state_dict(assign=True)``), so the weights exist once in memory: safetensors are read
tensor by tensor and ``.pth`` / ``.pt`` files are memory-mapped (``torch.load(mmap=True,
weights_only=True)``). Before anything is assigned, the file's names and shapes are compared with
the module's, and any difference becomes a one-line ``WeightsError`` that names the file.

Layouts handled here for the DiT: the original Wan2.1 checkpoint (single or sharded
safetensors), the Diffusers ``transformer/`` folder, and the MemFlow / LongLive ``base.pt``
(``model.``-prefixed, possibly with FSDP wrapper names). ``lora.pt`` is applied with peft.
The text encoder and VAE layouts live beside their modules (``memflow.text``, ``memflow.vae``).
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from utils.errors import WeightsError
from utils.lfs import check_not_lfs_pointer

from .dit import WanDiT, build_dit

Shape = tuple[int, ...]

WAN_DIT_FILE = "diffusion_pytorch_model.safetensors"
WAN_DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
GENERATOR_ENTRIES = ("generator", "generator_ema")
LORA_ENTRIES = ("generator_lora", "critic_lora")

DOWNLOAD_HINTS = {
    "wan2.1-t2v-1.3b": "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B",
    "wan2.1-t2v-14b": "huggingface-cli download Wan-AI/Wan2.1-T2V-14B --local-dir wan_models/Wan2.1-T2V-14B",
    "diffusers": (
        "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir wan_models/Wan2.1-T2V-1.3B-Diffusers"
    ),
    "memflow": "huggingface-cli download KlingTeam/MemFlow --local-dir checkpoints",
    "ode_init": "huggingface-cli download gdhe17/Self-Forcing checkpoints/ode_init.pt --local-dir .",
    "longlive": "huggingface-cli download Efficient-Large-Model/LongLive-1.3B models/longlive_base.pt --local-dir .",
}

# Names that FSDP, torch.compile and activation checkpointing insert into parameter paths.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


# -- reading files ----------------------------------------------------------------------------
def require_file(path: Path, what: str, hint: str | None = None) -> Path:
    """``path`` if it is a file, else a WeightsError naming it (and how to get it); a Git LFS pointer is refused."""
    path = Path(path)
    if not path.is_file():
        fix = f"; download it with: {hint}" if hint else ""
        raise WeightsError(f"{what} not found: expected {path}{fix}")
    check_not_lfs_pointer(path, what)
    return path


def safetensors_header(path: Path) -> dict[str, tuple[Shape, str]]:
    """Names -> (shape, dtype) from a safetensors header, without reading any tensor data.

    Also checks that the file is as long as its header says, which catches truncated downloads.
    """
    path = Path(path)
    check_not_lfs_pointer(path, "safetensors file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file ({size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise WeightsError(f"{path}: truncated or corrupt safetensors header; download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsError(f"{path}: corrupt safetensors header ({err}); download it again") from err
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise WeightsError(
            f"{path}: truncated file ({size} bytes, its header needs {8 + header_len + data_end}); "
            "download it again"
        )
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items()}


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read one at a time and cast to ``dtype``."""
    path = Path(path)
    safetensors_header(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensors[name] = _cast(f.get_tensor(name), dtype)
    except SafetensorError as err:
        raise WeightsError(f"{path}: unreadable safetensors file ({err}); download it again") from err
    return tensors


def shard_files(index_path: Path) -> list[Path]:
    """The shard files named by a ``*.safetensors.index.json`` (each checked to exist)."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"{index_path}: not a safetensors index (no 'weight_map'); download it again") from err
    shards = sorted(set(weight_map.values()))
    return [require_file(index_path.parent / name, f"shard listed in {index_path.name}") for name in shards]


def read_torch_file(path: Path) -> dict:
    """A ``.pth`` / ``.pt`` file read with ``weights_only=True``, so no pickled code ever runs.

    Zip-format files (``torch.save``'s default) are memory-mapped; a legacy (non-zip) pickle is read
    into memory. A file holding objects beyond tensors and plain containers is refused, not loaded.
    """
    path = Path(path)
    check_not_lfs_pointer(path, "PyTorch weights file")
    with path.open("rb") as handle:
        legacy = handle.read(1) == b"\x80"  # a pickle's PROTO opcode; zip files start with PK
    try:
        return torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{path} holds Python objects beyond tensors (pickled classes or code) and will not be loaded; "
            "use a checkpoint of tensors only (torch.save of a state dict)"
        ) from None
    except Exception as err:  # a damaged file fails deep inside torch's readers in many ways
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "a legacy (non-zip) PyTorch file that cannot be read" if legacy else "truncated or corrupt"
        raise WeightsError(
            f"{path}: not a readable PyTorch weights file, {kind} ({first_line}); download it again"
        ) from None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# -- layouts ------------------------------------------------------------------------------------
@dataclass
class LayoutReport:
    """How a file's names/shapes differ from a module's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        """One line: the first few problems of each kind."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s) e.g. {self.missing[:limit]}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) e.g. {self.unexpected[:limit]}")
        if self.mismatched:
            shown = ", ".join(f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {shown}")
        return "; ".join(parts) if parts else "layout matches"


def compare_layout(found: Mapping[str, Shape], expected: Mapping[str, Shape]) -> LayoutReport:
    """Compare names -> shapes of a (renamed) file with those of a module."""
    return LayoutReport(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        mismatched=[
            (k, tuple(found[k]), tuple(expected[k]))
            for k in sorted(set(found) & set(expected))
            if tuple(found[k]) != tuple(expected[k])
        ],
    )


def module_layout(module: nn.Module) -> dict[str, Shape]:
    """Names -> shapes of a module's state dict (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def rename(items: Mapping[str, object], key_map: Callable[[str], str | Iterable[str]]) -> dict[str, object]:
    """Apply a key mapping to a dict of tensors or shapes; a key may map to several (tied) names."""
    out = {}
    for key, value in items.items():
        new = key_map(key)
        for name in [new] if isinstance(new, str) else new:
            if name in out:
                raise WeightsError(f"two checkpoint entries map onto {name!r} (second: {key!r}); the file is malformed")
            out[name] = value
    return out


def assign_exact(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Assign ``state_dict`` into a (meta-built) module after checking names and shapes exactly."""
    report = compare_layout({k: tuple(v.shape) for k, v in state_dict.items()}, module_layout(module))
    if not report.ok:
        raise WeightsError(f"{source}: wrong layout for {type(module).__name__}: {report.summary()}")
    module.load_state_dict({k: _cast(v, dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return module


# -- DiT ----------------------------------------------------------------------------------------
_DIFFUSERS_DIT_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^scale_shift_table$", "head.modulation"),
        (r"^proj_out\.", "head.head."),
        (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"^condition_embedder\.time_proj\.", "time_projection.1."),
        (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
        (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
        (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
        (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
        (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
        (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    ]
]
_DIFFUSERS_ATTN_RULES = [
    (re.compile(r"\.(self_attn|cross_attn)\.to_out\.0\."), r".\1.o."),
    (re.compile(r"\.(self_attn|cross_attn)\.to_([qkv])\."), r".\1.\2."),
]


def diffusers_dit_key(key: str) -> str:
    """Diffusers ``WanTransformer3DModel`` name -> original Wan2.1 name (unknown names unchanged)."""
    for pattern, repl in _DIFFUSERS_DIT_RULES + _DIFFUSERS_ATTN_RULES:
        key = pattern.sub(repl, key)
    return key


def _strip_wrappers(key: str) -> str:
    """Drop the FSDP / compile / checkpoint wrapper parts of a parameter name."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key


def strip_wrapper_key(key: str) -> str:
    """Drop wrapper parts and one leading ``model.`` (the release's ``base.pt`` prefix) from a name."""
    return _strip_wrappers(key).removeprefix("model.")


def is_diffusers_dit(keys: Iterable[str]) -> bool:
    return any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in keys)


def original_dit_key_map(keys: Iterable[str]) -> Callable[[str], str]:
    """The renaming that brings any supported DiT layout to the original Wan2.1 names."""
    keys = [strip_wrapper_key(k) for k in keys]
    if is_diffusers_dit(keys):
        return lambda k: diffusers_dit_key(strip_wrapper_key(k))
    return strip_wrapper_key


def to_original_dit(items: Mapping[str, object]) -> dict[str, object]:
    """Rename a DiT state dict (or names -> shapes) of any supported layout to the original names."""
    return rename(items, original_dit_key_map(items.keys()))


def select_entry(checkpoint: Mapping, entry: str, path: Path, choices: Iterable[str]) -> Mapping:
    """One named entry of a training checkpoint (``generator``, ``generator_lora`` ...).

    A bare state dict (all values tensors) is returned as is.
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a dict of tensors")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    if entry not in checkpoint:
        kinds = (("generator", GENERATOR_ENTRIES, "generator_ckpt"), ("LoRA", LORA_ENTRIES, "lora_ckpt"))
        for kind, entries, key in kinds:
            if entry in (*GENERATOR_ENTRIES, *LORA_ENTRIES) and entry not in entries and any(
                e in checkpoint for e in entries
            ):
                raise WeightsError(
                    f"{path} is a {kind} checkpoint (entries {[e for e in entries if e in checkpoint]}), not the "
                    f"{entry!r} wanted here; give it as {key}"
                )
        present = [k for k in checkpoint if k in set(choices)] or sorted(map(str, checkpoint))[:8]
        raise WeightsError(f"{path}: no {entry!r} entry (found {present}); choose one of those")
    value = checkpoint[entry]
    if not isinstance(value, Mapping):
        raise WeightsError(f"{path}: entry {entry!r} is not a state dict")
    return value


def dit_weights_file(path: Path, preset: str = "wan2.1-t2v-1.3b") -> Path:
    """Resolve a DiT location: a file, an original Wan folder, or a Diffusers root / ``transformer/``."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "transformer"):
        for name in (WAN_DIT_INDEX, WAN_DIT_FILE):
            if (folder / name).is_file():
                return folder / name
    hint = DOWNLOAD_HINTS.get(preset, DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
    return require_file(path / WAN_DIT_FILE, "DiT weights", hint)


def read_dit_state_dict(
    path: Path, entry: str = "generator", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A DiT state dict in original Wan2.1 names from any supported file or folder.

    ``entry`` picks ``generator`` or ``generator_ema`` from a ``base.pt``.
    """
    file = dit_weights_file(path)
    if file.name.endswith(".index.json"):
        raw = {}
        for shard in shard_files(file):
            raw.update(read_safetensors(shard, dtype))
    elif file.suffix == ".safetensors":
        raw = read_safetensors(file, dtype)
    else:
        state = select_entry(read_torch_file(file), entry, file, GENERATOR_ENTRIES)
        raw = {k: _cast(v, dtype) for k, v in state.items()}
    return to_original_dit(raw)


def load_dit(
    path: Path,
    preset: str = "wan2.1-t2v-1.3b",
    *,
    entry: str = "generator",
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    **overrides,
) -> WanDiT:
    """Build ``preset`` on the meta device and assign the weights found at ``path`` into it."""
    with torch.device("meta"):
        model = build_dit(preset, **overrides)
    file = dit_weights_file(path, preset)
    assign_exact(model, read_dit_state_dict(file, entry, dtype), str(file))
    return model.to(device)


# -- LoRA ---------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."


def lora_target_modules(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the transformer blocks (attention q/k/v/o and the FFN)."""
    return [name for name, mod in model.named_modules() if name.startswith("blocks.") and isinstance(mod, nn.Linear)]


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    """The release's adapter layout: LoRA of ``rank`` / ``alpha`` on every linear layer of the blocks."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model))


def attach_lora(model: WanDiT, rank: int, alpha: float, dropout: float = 0.0) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (peft) whose weights stay on the meta device until assigned.

    For loading a saved adapter (``load_lora_weights``); training attaches initialised ones with
    :func:`lora_config` and ``get_peft_model``.
    """
    return get_peft_model(model, lora_config(model, rank, alpha, dropout), low_cpu_mem_usage=True)


def read_lora_state_dict(source: Path | Mapping, entry: str = "generator_lora") -> dict[str, torch.Tensor]:
    """LoRA tensors in peft's saved names (``base_model.model.blocks.N...lora_A.weight``).

    ``source`` is a training checkpoint (``.pt``/``.pth``, ``entry`` picks the network), a bare
    state dict in a ``.safetensors`` file (peft's ``adapter_model.safetensors`` too), or a mapping.
    """
    path = Path("<in-memory LoRA>") if isinstance(source, Mapping) else Path(source)
    if not isinstance(source, Mapping):
        require_file(path, "LoRA checkpoint", DOWNLOAD_HINTS["memflow"])
        source = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    state = select_entry(source, entry, path, LORA_ENTRIES)
    out = {}
    for key, value in state.items():
        name = _strip_wrappers(key)
        out[name if name.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + name] = value
    return out


def expected_lora_layout(model: WanDiT, rank: int) -> dict[str, Shape]:
    """Saved LoRA names -> shapes for ``model`` at ``rank`` (A: [rank, in], B: [out, rank])."""
    out = {}
    for name in lora_target_modules(model):
        layer = model.get_submodule(name)
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (rank, layer.in_features)
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (layer.out_features, rank)
    return out


def load_lora_weights(peft_model: PeftModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Assign a saved LoRA state dict into ``peft_model`` after an exact name/shape check."""
    base = peft_model.get_base_model()
    rank = peft_model.peft_config["default"].r
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    report = compare_layout({k: tuple(v.shape) for k, v in state_dict.items()}, expected)
    if not report.ok:
        found = {v.shape[0] for k, v in state_dict.items() if k.endswith("lora_A.weight")}
        hint = f" (file rank {sorted(found)}, configured rank {rank})" if found and found != {rank} else ""
        raise WeightsError(f"{source}: wrong LoRA layout{hint}: {report.summary()}")
    dtype = next(p.dtype for p in base.parameters() if p.device.type != "meta")
    device = next(p.device for p in base.parameters() if p.device.type != "meta")
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    result = set_peft_model_state_dict(peft_model, tensors, low_cpu_mem_usage=True)
    if result.unexpected_keys:
        raise WeightsError(f"{source}: LoRA keys not used by peft: {result.unexpected_keys[:3]}")


def apply_lora(
    model: WanDiT,
    source: Path | Mapping,
    rank: int,
    alpha: float,
    *,
    entry: str = "generator_lora",
    merge: bool = False,
) -> WanDiT:
    """Load a MemFlow ``lora.pt`` (or its dict) onto ``model``; returns the same DiT class.

    ``merge=True`` folds the adapters into the base weights (faster inference, same outputs);
    otherwise the peft LoRA layers stay inside the model's blocks.
    """
    source_name = "<in-memory LoRA>" if isinstance(source, Mapping) else str(source)
    peft_model = attach_lora(model, rank, alpha)
    load_lora_weights(peft_model, read_lora_state_dict(source, entry), source_name)
    return peft_model.merge_and_unload() if merge else peft_model.get_base_model()
