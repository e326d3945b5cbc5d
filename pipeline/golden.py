"""Runners for the golden cases of the released code (``../shared/golden``).

Each runner loads the case's inputs, runs our implementation in a given dtype on a given device and
returns named max-absolute errors against the float32 reference; streaming cases also compare, call by call, what
every block attended to (visible bank frames, number of key frames, SMA selections) with the
reference trace. In a lower precision SMA's selections are not compared: frames whose relevance
differs by less than the rounding may swap (they are near-ties, so the outputs stay within the bound).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from memflow import StreamConfig, build_dit
from memflow.context import CallTrace
from memflow.scheduler import FlowMatchScheduler
from memflow.text import TextEncoder, umt5_config_from_wan
from memflow.vae import WanVAE, vae_config_from_wan
from memflow.weights import read_safetensors
from pipeline.streaming import StreamingGenerator

Runner = Callable[[Path, torch.dtype, torch.device], dict[str, float]]
CPU = torch.device("cpu")
CALL_KIND = {"context": "commit", "recache": "recache"}


def load_cases(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "cases.json").read_text())["cases"]


def _tiny_dit(golden_dir: Path, case: dict, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    cfg = case.get("dit_config") or case["config"]
    dit = build_dit("tiny", dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], num_heads=cfg["num_heads"],
                    num_layers=cfg["num_layers"], text_dim=cfg["text_dim"], text_len=cfg["text_len"],
                    freq_dim=cfg["freq_dim"], eps=cfg["eps"], patch_size=cfg["patch_size"])
    dit.load_state_dict(load_file(golden_dir / case["weights"]))
    return dit.to(device, dtype).eval()


def run_dit_forward(
    golden_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device = CPU
) -> dict[str, float]:
    case = load_cases(golden_dir)["dit_forward"]
    g = load_file(golden_dir / case["file"], device=str(device))
    dit = _tiny_dit(golden_dir, case, dtype, device)
    with torch.no_grad():
        out = dit(g["x"].transpose(1, 2), g["t"], g["context"])
    return {"output": _max_error(out.transpose(1, 2), g["output"])}


def run_flow_scheduler(golden_dir: Path) -> dict[str, float]:
    """The noise schedule (float32 in every run, whatever the model dtype)."""
    case = load_cases(golden_dir)["flow_scheduler"]
    g = load_file(golden_dir / "flow_scheduler.safetensors")
    cfg = case["config"]
    sched = FlowMatchScheduler(shift=cfg["shift"], num_train_timesteps=cfg["num_train_timesteps"])
    errors = {name: (getattr(sched, name) - g[name]).abs().max().item()
              for name in ("timesteps", "sigmas", "linear_timesteps_weights")}
    warped = sched.warp(cfg["denoising_step_list"])
    errors["warped_denoising_step_list"] = (warped - g["warped_denoising_step_list"]).abs().max().item()
    return errors


def stream_config_for(case: dict) -> StreamConfig:
    """Our settings for a streaming case (the causal release pipeline records every chunk)."""
    sc = case["stream_config"]
    return StreamConfig(
        num_frame_per_block=sc["num_frame_per_block"],
        local_attn_size=sc["local_attn_size"],
        sink_size=sc["sink_size"],
        memory="nam_sma" if sc["SMA"] else "nam",
        bank_size=sc["bank_size"],
        record_interval=sc["record_interval"],
        bank_record="first" if "switch_frame_indices" in sc else "latest",
        top_k=sc["top_k_SMA"],
        reference=True,
        denoising_step_list=sc["denoising_step_list"],
        warp_denoising_step=sc["warp_denoising_step"],
        timestep_shift=sc["timestep_shift"],
        context_noise=sc["context_noise"],
        global_sink=sc["global_sink"],
    )


def trace_mismatches(ours: list[CallTrace], reference: list[dict], top_k: int, *, sma: bool = True) -> list[str]:
    """Differences between our per-call trace and the reference's, as readable lines (``sma=False``: all but
    SMA's selections)."""
    problems = []
    if len(ours) != len(reference):
        return [f"{len(ours)} model calls, reference made {len(reference)}"]
    for i, (mine, ref) in enumerate(zip(ours, reference, strict=True)):
        where = f"call {i} ({ref['call']} at frame {ref['start_frame']})"
        kind = CALL_KIND.get(ref["call"], "denoise")
        if (mine.start, mine.num_frames, mine.kind) != (ref["start_frame"], ref["num_frames"], kind):
            problems.append(f"{where}: we ran {mine.kind} at {mine.start}+{mine.num_frames}")
            continue
        bank = mine.bank[:, 0].tolist() if mine.bank is not None else [[] for _ in ref["bank_frames_visible_per_block"]]
        if bank != ref["bank_frames_visible_per_block"]:
            problems.append(f"{where}: bank {bank} != {ref['bank_frames_visible_per_block']}")
        memory = len(mine.sink) + len(bank[0])
        attended = (min(top_k, memory) if mine.sma else memory) + len(mine.window)
        if any(n != attended for n in ref["attn_key_frames_per_block"]):
            problems.append(f"{where}: {attended} key frames != {ref['attn_key_frames_per_block']}")
        if sma and ref["sma_selected_frames_per_block"] is not None:
            for layer, heads in enumerate(ref["sma_selected_frames_per_block"]):
                memory_ids = mine.sink + ref["bank_frames_visible_per_block"][layer]
                expected = [Counter(memory_ids[j] for j in sel) for sel in heads]
                got = [Counter(sel) for sel in mine.sma[layer][0].tolist()]
                if got != expected:
                    problems.append(f"{where}: SMA block {layer} chose {got} != {expected}")
    return problems


def run_streaming(
    golden_dir: Path, name: str, dtype: torch.dtype = torch.float32, device: torch.device = CPU
) -> dict[str, float]:
    case = load_cases(golden_dir)[name]
    g = load_file(golden_dir / case["file"], device=str(device))
    config = stream_config_for(case)
    sc = case["stream_config"]
    if "switch_frame_indices" in sc:
        prompts = [g[f"prompt_embeds_{i}"] for i in range(sc["num_prompts"])]
        switches = sc["switch_frame_indices"]
    else:
        prompts, switches = [g["prompt_embeds"]], []
    generator = StreamingGenerator(_tiny_dit(golden_dir, case, dtype, device), config, trace=True)
    renoise = g["renoise"]
    steps: list[torch.Tensor] = []
    with torch.no_grad():
        out = generator.generate(g["noise"], prompts, switches, renoise=lambda c, i: renoise[c, i],
                                 on_step=lambda step, x0: steps.append(x0))
    x0_steps = torch.stack(steps).unflatten(0, (-1, len(generator.timesteps)))
    errors = {
        "output": _max_error(out, g["output"]),
        "dbg_x0_steps": _max_error(x0_steps, g["dbg_x0_steps"]),
    }
    problems = trace_mismatches(generator.context.traces, case["trace"]["calls"], config.top_k,
                                sma=dtype == torch.float32)  # fmt: skip
    if problems:
        raise GoldenMismatch(f"{len(problems)} call(s) differ from the reference trace; first: {problems[0]}")
    return errors


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def run_vae_roundtrip(
    golden_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device = CPU
) -> dict[str, float]:
    """Encode, whole decode and per-chunk cached decode of the tiny VAE against the reference."""
    case = load_cases(golden_dir)["vae_roundtrip"]
    data = load_file(golden_dir / case["file"], device=str(device))
    weights = read_safetensors(golden_dir / case["weights"])
    vae = WanVAE.from_original_state_dict(weights, "tiny", dtype=dtype, device=device,
                                          **vae_config_from_wan(case["config"]))  # fmt: skip
    video = data["video"].transpose(1, 2)  # stored (B, C, T, H, W); our API takes (B, T, C, H, W)
    latent = vae.encode(video)
    decoder = vae.streaming_decoder()
    chunks = [decoder.decode(data["latent"][:, a:b]) for a, b in case["config"]["cached_decode_chunks_latent_frames"]]
    return {
        "latent": _max_error(latent, data["latent"]),
        "decoded": _max_error(vae.decode(data["latent"]), data["decoded"]),
        "decoded_cached_chunks": _max_error(torch.cat(chunks, dim=1), data["decoded_cached_chunks"]),
    }


@torch.no_grad()
def run_t5_encoder(
    golden_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device = CPU
) -> dict[str, float]:
    """Raw and padding-zeroed outputs of the tiny umT5 encoder against the reference."""
    case = load_cases(golden_dir)["t5_encoder"]
    data = load_file(golden_dir / case["file"], device=str(device))
    weights = read_safetensors(golden_dir / case["weights"])
    config = umt5_config_from_wan(case["config"])
    encoder = TextEncoder.from_original_state_dict(weights, config, tokenizer=None, text_len=data["ids"].shape[1],
                                                   dtype=dtype, device=device)  # fmt: skip
    return {
        "output": _max_error(encoder.hidden_states(data["ids"], data["mask"]), data["output"]),
        "prompt_embeds": _max_error(encoder.encode_ids(data["ids"], data["mask"]), data["prompt_embeds"]),
        "output_long": _max_error(encoder.hidden_states(data["ids_long"], data["mask_long"]), data["output_long"]),
    }


class GoldenMismatch(Exception):
    """Our run made a different decision from the reference (not a numeric tolerance issue)."""


def streaming_runner(name: str) -> Runner:
    return lambda golden_dir, dtype, device: run_streaming(golden_dir, name, dtype, device)


def runners() -> dict[str, Runner]:
    """Every case we know how to run, by its name in ``cases.json``."""
    table: dict[str, Runner] = {"dit_forward": run_dit_forward,
                                "flow_scheduler": lambda golden_dir, *_: run_flow_scheduler(golden_dir)}  # fmt: skip
    for name in ("causal_streaming_bank", "causal_streaming_bank_long", "causal_streaming_sma",
                 "causal_streaming_sma_long", "interactive_switch", "interactive_switch_long"):
        table[name] = streaming_runner(name)
    table["vae_roundtrip"] = run_vae_roundtrip
    table["t5_encoder"] = run_t5_encoder
    return table


def check_cases(
    golden_dir: Path, atol: float, dtype: torch.dtype = torch.float32, device: torch.device = CPU,
    names: Sequence[str] | None = None,
) -> tuple[list[str], int]:
    """Run every case of ``cases.json`` (or those ``names``) in ``dtype`` on ``device``: one line per case with its
    largest absolute error, and how many failed (an error above ``atol``, a differing decision, or no runner)."""
    table = runners()
    lines, failed = [], 0
    cases = [name for name in load_cases(golden_dir) if names is None or name in names]
    for name in cases:
        if name not in table:
            lines.append(f"FAIL {name:28s} no runner for this case")
            failed += 1
            continue
        try:
            errors = table[name](golden_dir, dtype, device)
        except GoldenMismatch as err:
            lines.append(f"FAIL {name:28s} {err}")
            failed += 1
            continue
        worst = max(errors.values())
        ok = worst <= atol
        failed += not ok
        detail = "  ".join(f"{k}={v:.2e}" for k, v in errors.items())
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name:28s} max_abs_err={worst:.2e}  ({detail})")
    lines.append(f"{len(cases) - failed} passed, {failed} failed")
    return lines, failed
