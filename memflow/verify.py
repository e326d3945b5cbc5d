"""Check downloaded weights against the layouts our modules load, reading only headers and keys.

A Wan2.1 folder in the original layout (diffusion_pytorch_model.safetensors,
models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/) or its Diffusers twin
(transformer/, text_encoder/, tokenizer/, vae/), and the MemFlow folder with base.pt and lora.pt.
The expected names and shapes come from building our modules on the meta device, so nothing is
loaded into memory: safetensors headers are parsed and .pth files memory-mapped.
:class:`Verifier` records one line per file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import UMT5EncoderModel

from utils.errors import ConfigError, MemFlowError, WeightsError

from .dit import build_dit
from .text import WAN_T5_FILE, WAN_TOKENIZER_DIR, load_tokenizer, tie_embedding, umt5_config, wan_t5_key
from .vae import WAN_VAE_FILE, meta_vae, vae_config, wan_vae_key_map
from .weights import (
    DOWNLOAD_HINTS,
    GENERATOR_ENTRIES,
    LORA_ENTRIES,
    WAN_DIT_FILE,
    WAN_DIT_INDEX,
    compare_layout,
    expected_lora_layout,
    module_layout,
    read_lora_state_dict,
    read_torch_file,
    rename,
    require_file,
    safetensors_header,
    select_entry,
    shard_files,
    to_original_dit,
)

Shapes = dict[str, tuple[int, ...]]

# Text encoder and VAE that go with each DiT preset.
COMPANIONS = {
    "wan2.1-t2v-1.3b": ("umt5-xxl", "wan2.1"),
    "wan2.1-t2v-14b": ("umt5-xxl", "wan2.1"),
    "tiny": ("tiny", "tiny"),
}


class Layouts:
    """Expected names -> shapes of each module, built lazily on the meta device."""

    def __init__(self, preset: str, lora_rank: int):
        if preset not in COMPANIONS:
            raise ConfigError(f"--preset {preset!r}: choose one of {sorted(COMPANIONS)}")
        self.preset, self.lora_rank = preset, lora_rank
        self.text_preset, self.vae_preset = COMPANIONS[preset]
        self._cache: dict[str, Shapes] = {}

    def _get(self, name: str, build: Callable[[], Shapes]) -> Shapes:
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def _meta_dit(self):
        with torch.device("meta"):
            return build_dit(self.preset)

    def dit(self) -> Shapes:
        return self._get("dit", lambda: module_layout(self._meta_dit()))

    def lora(self) -> Shapes:
        return self._get("lora", lambda: expected_lora_layout(self._meta_dit(), self.lora_rank))

    def text(self) -> Shapes:
        def build() -> Shapes:
            with torch.device("meta"):
                return module_layout(UMT5EncoderModel(umt5_config(self.text_preset)))

        return self._get("text", build)

    def vae(self) -> Shapes:
        return self._get("vae", lambda: module_layout(meta_vae(vae_config(self.vae_preset))))

    def vae_key_map(self) -> Callable[[str], str]:
        config = vae_config(self.vae_preset)
        return wan_vae_key_map(config["num_res_blocks"], len(config["dim_mult"]))


def shapes_of(tensors: Mapping) -> Shapes:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def safetensors_shapes(file: Path) -> Shapes:
    """Names -> shapes of a safetensors file or of every shard named by an index json."""
    files = shard_files(file) if file.name.endswith(".index.json") else [file]
    out: Shapes = {}
    for shard in files:
        out.update({k: shape for k, (shape, _) in safetensors_header(shard).items()})
    return out


def torch_file_shapes(file: Path, entry: str | None = None, choices: tuple[str, ...] = ()) -> Shapes:
    state = read_torch_file(file)
    if entry is not None:
        state = select_entry(state, entry, file, choices)
    elif not isinstance(state, Mapping):
        raise WeightsError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return shapes_of(state)


def first_existing(folder: Path, names: tuple[str, ...], what: str, hint: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return require_file(folder / names[-1], what, hint)


def match(found: Shapes, expected: Shapes, what: str) -> str:
    report = compare_layout(found, expected)
    if not report.ok:
        raise WeightsError(f"wrong layout for the {what}: {report.summary()}")
    return f"{len(found)} tensors"


class Verifier:
    """Runs one check per file and records a line for each."""

    def __init__(self, layouts: Layouts):
        self.layouts = layouts
        self.lines: list[str] = []
        self.failures = 0

    def check(self, label: Path | str, run: Callable[[], str]) -> None:
        try:
            detail = run()
        except MemFlowError as err:
            self.failures += 1
            self.lines.append(f"FAIL  {label}: {' '.join(str(err).split())}")
        else:
            self.lines.append(f"OK    {label} ({detail})")

    # -- the Wan folder ---------------------------------------------------------------------
    def wan_folder(self, folder: Path) -> None:
        if (folder / "transformer").is_dir():
            self.diffusers_folder(folder)
            return
        hint = DOWNLOAD_HINTS.get(self.layouts.preset, DOWNLOAD_HINTS["wan2.1-t2v-1.3b"])
        self.check(folder / WAN_DIT_FILE, lambda: self._dit(folder, (WAN_DIT_INDEX, WAN_DIT_FILE), hint))
        t5 = folder / WAN_T5_FILE
        self.check(t5, lambda: self._wan_text(t5, hint))
        tokenizer = folder / WAN_TOKENIZER_DIR
        self.check(tokenizer, lambda: self._tokenizer(tokenizer))
        vae = folder / WAN_VAE_FILE
        self.check(vae, lambda: self._wan_vae(vae, hint))

    def _dit(self, folder: Path, names: tuple[str, ...], hint: str) -> str:
        file = first_existing(folder, names, "DiT weights", hint)
        return match(to_original_dit(safetensors_shapes(file)), self.layouts.dit(), "DiT")

    def _wan_text(self, file: Path, hint: str) -> str:
        require_file(file, "UMT5 text encoder weights", hint)
        return match(rename(torch_file_shapes(file), wan_t5_key), self.layouts.text(), "UMT5 text encoder")

    def _wan_vae(self, file: Path, hint: str) -> str:
        require_file(file, "Wan2.1 VAE weights", hint)
        return match(rename(torch_file_shapes(file), self.layouts.vae_key_map()), self.layouts.vae(), "VAE")

    def _tokenizer(self, folder: Path) -> str:
        tokenizer = load_tokenizer(folder)
        return f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"

    def diffusers_folder(self, folder: Path) -> None:
        hint = DOWNLOAD_HINTS["diffusers"]
        transformer = folder / "transformer"
        self.check(transformer / WAN_DIT_FILE, lambda: self._dit(transformer, (WAN_DIT_INDEX, WAN_DIT_FILE), hint))
        text = folder / "text_encoder"
        self.check(text / "model.safetensors", lambda: self._diffusers_text(text, hint))
        self.check(folder / "tokenizer", lambda: self._tokenizer(folder / "tokenizer"))
        vae = folder / "vae" / WAN_DIT_FILE
        self.check(vae, lambda: self._diffusers_vae(vae, hint))

    def _diffusers_text(self, folder: Path, hint: str) -> str:
        names = ("model.safetensors.index.json", "model.safetensors")
        file = first_existing(folder, names, "text encoder weights", hint)
        return match(tie_embedding(safetensors_shapes(file)), self.layouts.text(), "UMT5 text encoder")

    def _diffusers_vae(self, file: Path, hint: str) -> str:
        require_file(file, "Diffusers VAE weights", hint)
        return match(safetensors_shapes(file), self.layouts.vae(), "VAE")

    # -- MemFlow checkpoints ----------------------------------------------------------------
    def checkpoints(self, folder: Path) -> None:
        base, lora = folder / "base.pt", folder / "lora.pt"
        self.check(base, lambda: self._base(base))
        self.check(lora, lambda: self._lora(lora))

    def _base(self, file: Path) -> str:
        require_file(file, "MemFlow base checkpoint", DOWNLOAD_HINTS["memflow"])
        state = read_torch_file(file)
        entries = [e for e in GENERATOR_ENTRIES if isinstance(state, Mapping) and e in state] or ["generator"]
        for entry in entries:
            found = to_original_dit(shapes_of(select_entry(state, entry, file, GENERATOR_ENTRIES)))
            match(found, self.layouts.dit(), f"DiT in entry {entry!r}")
        return f"entries {entries}, {len(self.layouts.dit())} tensors each"

    def _lora(self, file: Path) -> str:
        require_file(file, "MemFlow LoRA checkpoint", DOWNLOAD_HINTS["memflow"])
        state = read_torch_file(file)
        entries = [e for e in LORA_ENTRIES if isinstance(state, Mapping) and e in state] or ["generator_lora"]
        for entry in entries:
            found = shapes_of(read_lora_state_dict(state, entry))
            match(found, self.layouts.lora(), f"rank-{self.layouts.lora_rank} LoRA in entry {entry!r}")
        return f"entries {entries}, rank {self.layouts.lora_rank}"
