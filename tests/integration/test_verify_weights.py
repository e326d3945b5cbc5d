"""scripts/verify_weights.py on synthetic tiny folders: all good, a missing file, a truncated file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memflow.weights import WAN_DIT_FILE
from pipeline.cli import verify_weights

from ..weights_synthetic import tiny_tokenizer, write_checkpoints, write_wan_folder

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "verify_weights.py"
RANK = 4


@pytest.fixture
def folders(tmp_path):
    wan, ckpt = tmp_path / "Wan2.1-T2V-1.3B", tmp_path / "checkpoints"
    dit, t5, vae = write_wan_folder(wan)
    write_checkpoints(ckpt, dit, RANK)
    return wan, ckpt, (dit, t5, vae)


def run(args: list[str], capsys) -> tuple[int, list[str]]:
    code = verify_weights([*args, "--preset", "tiny", "--lora-rank", str(RANK)])
    return code, capsys.readouterr().out.splitlines()


def test_good_folders_pass(folders, capsys):
    wan, ckpt, _ = folders
    code, lines = run([str(wan), "--checkpoints", str(ckpt)], capsys)
    assert code == 0, lines
    assert sum(line.startswith("OK ") for line in lines) == 6
    assert lines[-1] == "all 6 checks passed"


def test_diffusers_layout_passes(folders, tmp_path, capsys):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    _, _, (dit, t5, vae) = folders
    root = tmp_path / "diffusers"
    cfg = dit.config
    WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).save_pretrained(root / "transformer")  # fmt: skip
    (root / "text_encoder").mkdir(parents=True)
    t5_state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_state, str(root / "text_encoder" / "model.safetensors"))
    tiny_tokenizer(t5.config.vocab_size).save_pretrained(root / "tokenizer")
    vae.save_pretrained(root / "vae")
    code, lines = run([str(root)], capsys)
    assert code == 0, lines
    assert len(lines) == 5


def test_missing_file_fails_with_one_line(folders, capsys):
    wan, _, _ = folders
    (wan / "Wan2.1_VAE.pth").unlink()
    code, lines = run([str(wan)], capsys)
    assert code == 2
    fail = [line for line in lines if line.startswith("FAIL")]
    assert len(fail) == 1
    assert "Wan2.1 VAE weights not found: expected" in fail[0]
    assert "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B" in fail[0]
    assert lines[-1] == "1 of 4 checks failed"


def test_truncated_safetensors_fails(folders, capsys):
    wan, _, _ = folders
    path = wan / WAN_DIT_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    code, lines = run([str(wan)], capsys)
    assert code == 2
    assert [line for line in lines if line.startswith("FAIL")] == [
        next(line for line in lines if "truncated file" in line and str(path) in line)
    ]


def test_wrong_lora_rank_and_layout_fail(folders, capsys):
    _, ckpt, _ = folders
    state = torch.load(ckpt / "base.pt", weights_only=True)
    del state["generator_ema"]["model.head.modulation"]
    torch.save(state, ckpt / "base.pt")
    code = verify_weights(["--checkpoints", str(ckpt), "--preset", "tiny", "--lora-rank", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 2
    assert "entry 'generator_ema'" in lines[0] and "head.modulation" in lines[0]
    assert "rank-8 LoRA" in lines[1] and "shape mismatch" in lines[1]


def test_cli_exit_code_and_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nowhere"), "--preset", "tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: folder not found: {tmp_path / 'nowhere'}"]
