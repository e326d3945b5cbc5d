"""Inference product: scripts end to end on the tiny configs, determinism, sharding, every bad input."""

import json
import os
import re
import subprocess

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import inference
from pipeline.plan import missing_run_weights, plan_run, plan_stems, stream_config, video_seed
from pipeline.runner import VideoRunner, build_components, load_plan_generator
from utils.config import load_config, run_cli
from utils.errors import ConfigError, WeightsError

from ..conftest import ROOT
from ..weights_synthetic import write_checkpoints, write_wan_folder

TINY = ROOT / "configs" / "tiny" / "inference.yaml"
TINY_INTERACTIVE = ROOT / "configs" / "tiny" / "interactive_inference.yaml"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _pixel_frames(latent_frames: int, chunk: int = 3) -> int:
    """VAE output length: the first chunk decodes to 1 + 4(n - 1) frames, later chunks to 4n."""
    return 1 + 4 * (chunk - 1) + 4 * (latent_frames - chunk)


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# End to end through the shell entry points


def test_single_prompt_script_writes_video_sidecar_and_trace(tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text("A lighthouse on a cliff at night, waves crashing below.\n")
    out = tmp_path / "videos"
    result = subprocess.run(
        ["bash", str(ROOT / "inference.sh"), "--config_path", str(TINY), f"data_path={prompts}",
         f"output_folder={out}", "num_output_frames=6"],
        cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    stem = "0000-a-lighthouse-on-a-cliff-at-night-waves-crashing-below"
    assert _outputs(out) == [f"{stem}.json", f"{stem}.memory.png", f"{stem}.mp4"]
    frames = iio.imread(out / f"{stem}.mp4")
    assert frames.shape == (_pixel_frames(6), 32, 32, 3)
    sidecar = json.loads((out / f"{stem}.json").read_text())
    assert sidecar["pixel_frames"] == _pixel_frames(6)
    assert sidecar["config"]["model"] == "tiny" and sidecar["config"]["num_output_frames"] == 6
    assert [c["pixel_frames"] for c in sidecar["timings"]["chunks"]] == [9, 12]
    assert len(sidecar["memory_trace"]["chunks"]) == 2
    final = result.stdout.strip().splitlines()[-1]
    assert f"{stem}.mp4" in final and "FPS" in final and "peak memory" in final
    assert "chunk 2/2" in result.stderr and "frames" in result.stderr


def test_interactive_script_switches_prompts(tmp_path):
    out = tmp_path / "videos"
    result = subprocess.run(
        ["bash", str(ROOT / "interactive_inference.sh"), "--config_path", str(TINY_INTERACTIVE),
         f"output_folder={out}", f"data_path={ROOT / 'configs' / 'tiny' / 'interactive_prompts.jsonl'}"],
        cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (video,) = [p for p in out.iterdir() if p.suffix == ".mp4"]
    assert iio.imread(video).shape[0] == _pixel_frames(18)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["switch_frames"] == [6, 12]
    assert [s["start_frame"] for s in sidecar["prompts"]["segments"]] == [0, 6, 12]
    assert [c["switch"] for c in sidecar["memory_trace"]["chunks"]] == [False, False, True, False, True, False]
    assert video.with_suffix(".memory.png").is_file()


def test_two_ranks_split_prompts_without_duplicates(tmp_path):
    out = tmp_path / "videos"
    result = subprocess.run(
        ["bash", str(ROOT / "inference.sh"), "--config_path", str(TINY), f"output_folder={out}",
         "num_output_frames=3", "save_trace=false"],
        cwd=ROOT, capture_output=True, text=True, env={**_env(), "NPROC": "2"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sidecars = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted(s["sample_index"] for s in sidecars) == [0, 1, 2]
    assert {s["sample_index"]: s["rank"] for s in sidecars} == {0: 0, 1: 1, 2: 0}
    texts = [s["prompts"]["segments"][0]["prompts"][0]["text"] for s in sidecars]
    assert sorted(texts) == sorted((ROOT / "configs" / "tiny" / "prompts.txt").read_text().splitlines())
    assert len(list(out.glob("*.mp4"))) == 3


def test_bad_input_under_torchrun_is_one_line_per_rank_and_exit_2(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "train_long.sh"), "--config_path", str(tmp_path / "missing.yaml")],
        cwd=ROOT, capture_output=True, text=True, env={**_env(), "NPROC": "2"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: config file") for line in lines), result.stderr


# --------------------------------------------------------------------------------------------
# In process: determinism, timeline transitions, planning


def _run(cfg, job=0, spy=None):
    plan = plan_run(cfg)
    runner = VideoRunner(plan, build_components(plan))
    if spy is not None:
        spy(runner.generator)
    return plan, runner.run(plan.jobs[job])


def test_sidecar_is_kept_current_while_the_video_is_written(tmp_path):
    cfg = load_config(TINY, [f"output_folder={tmp_path}", "num_output_frames=9"])
    plan = plan_run(cfg)
    runner = VideoRunner(plan, build_components(plan))
    seen = []

    def read_sidecar(report):
        (path,) = tmp_path.glob("*.json")
        sidecar = json.loads(path.read_text())
        seen.append((sidecar["complete"], len(sidecar["timings"]["chunks"]), sidecar["pixel_frames"]))

    result = runner.run(plan.jobs[0], on_chunk=read_sidecar)
    assert seen == [(False, 1, 9), (False, 2, 21), (False, 3, 33)]
    final = json.loads(result.sidecar.read_text())
    assert final["complete"] and final["pixel_frames"] == 33 and final["memory_trace"] is not None


def test_a_run_killed_in_its_first_chunk_leaves_a_sidecar_and_no_empty_video(tmp_path, monkeypatch):
    plan = plan_run(load_config(TINY, [f"output_folder={tmp_path / 'out'}", "num_output_frames=9"]))
    runner = VideoRunner(plan, build_components(plan))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.generator, "denoise_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(plan.jobs[0])
    (sidecar,) = (tmp_path / "out").iterdir()
    state = json.loads(sidecar.read_text())
    assert sidecar.suffix == ".json" and not state["complete"] and state["pixel_frames"] == 0


def test_a_plan_creates_no_output_folder_until_its_first_video(tmp_path):
    plan = plan_run(load_config(TINY, [f"output_folder={tmp_path / 'a' / 'out'}", "num_output_frames=3"]))
    assert list(tmp_path.iterdir()) == []
    VideoRunner(plan, build_components(plan)).run(plan.jobs[0])
    assert sorted(p.suffix for p in (tmp_path / "a" / "out").iterdir()) == [".json", ".mp4", ".png"]


def test_same_seed_same_latents_and_video(tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = load_config(TINY, [f"output_folder={tmp_path / name}", "num_output_frames=6", "save_latents=true",
                                 "save_trace=false"])  # fmt: skip
        _, result = _run(cfg, job=1)
        results.append((load_file(result.latents)["latents"], iio.imread(result.video)))
    (lat_a, vid_a), (lat_b, vid_b) = results
    assert lat_a.shape == (6, 16, 4, 4)
    assert torch.equal(lat_a, lat_b)
    assert np.array_equal(vid_a, vid_b)
    cfg = load_config(TINY, [f"output_folder={tmp_path / 'c'}", "num_output_frames=6", "save_latents=true",
                             "save_trace=false", "seed=1"])  # fmt: skip
    _, other = _run(cfg, job=1)
    assert not torch.equal(load_file(other.latents)["latents"], lat_a)


def test_timeline_settings_and_transitions(tmp_path):
    timeline = tmp_path / "session.json"
    timeline.write_text(json.dumps({
        "prompts": [
            {"startTime": 0, "endTime": 1.5, "prompts": [{"text": "a calm sea", "weight": 1.0}]},
            {"startTime": 1.5, "endTime": 3, "transitionSteps": 1, "temporalInterpolationMethod": "slerp",
             "prompts": [{"text": "a stormy sea", "weight": 2.0}, {"text": "lightning", "weight": 1.0}]},
        ],
        "settings": {"resolution": {"height": 48, "width": 32}, "seed": 7, "denoisingSteps": [1000, 500]},
    }))  # fmt: skip
    cfg = load_config(TINY, [f"output_folder={tmp_path / 'out'}", f"data_path={timeline}", "num_output_frames=12"])
    calls = []

    def spy(gen):
        for name in ("switch_prompt", "set_prompt"):
            original = getattr(gen, name)

            def record(prompt, *args, _name=name, _original=original, **kwargs):
                calls.append((_name, gen.frame))
                return _original(prompt, *args, **kwargs)

            setattr(gen, name, record)

    plan, result = _run(cfg, spy=spy)
    assert (plan.height, plan.width, plan.config.seed) == (48, 32, 7)
    assert plan.stream.denoising_step_list == (1000.0, 500.0)
    # 1.5 s = 6 latent frames: chunk 2 switches to the halfway slerp, chunk 3 settles on the blend.
    assert [c for c in calls if c[0] == "switch_prompt"] == [("switch_prompt", 6)]
    assert ("set_prompt", 9) in calls
    assert iio.imread(result.video).shape == (_pixel_frames(12), 48, 32, 3)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["prompts"]["segments"][1]["transition_chunks"] == 1


def test_plan_shards_samples_round_robin(tmp_path):
    cfg = load_config(TINY, [f"output_folder={tmp_path}", "num_samples=2"])
    plans = [plan_run(cfg, rank=r, world_size=2) for r in range(2)]
    indices = [[j.index for j in p.jobs] for p in plans]
    assert indices == [[0, 2, 4], [1, 3, 5]]
    stems = [j.stem for p in plans for j in p.jobs]
    assert len(set(stems)) == 6 and all("_s" in s for s in stems)
    seeds = {j.seed for p in plans for j in p.jobs}
    assert len(seeds) == 6 and video_seed(0, 3) == video_seed(0, 3) != video_seed(1, 3)


def test_plan_stems_unique_without_index():
    stems = plan_stems(["a cat", "a dog", "a cat"], 1, save_with_index=False)
    assert stems == ["a-cat_p0", "a-dog", "a-cat_p2"]
    assert plan_stems(["a cat"], 2, save_with_index=True) == ["0000-a-cat_s0", "0000-a-cat_s1"]


def test_stream_config_maps_release_keys():
    cfg = load_config(ROOT / "configs" / "interactive_inference.yaml")
    stream = stream_config(cfg)
    assert (stream.memory, stream.bank_record, stream.local_attn_size, stream.sink_size) == ("nam", "first", 12, 3)
    assert stream.denoising_step_list == (1000.0, 750.0, 500.0, 250.0)
    assert stream_config(load_config(ROOT / "configs" / "inference.yaml")).bank_record == "latest"
    sma = stream_config(load_config(TINY, ["model_kwargs.SMA=true", "model_kwargs.memory=nam_sma"]))
    assert sma.memory == "nam_sma"
    with pytest.raises(ConfigError, match=r"^model_kwargs\.sink_size: "):
        stream_config(load_config(TINY, ["model_kwargs.sink_size=12"]))


def test_missing_weights_lists_every_file(tmp_path):
    cfg = load_config(ROOT / "configs" / "inference.yaml", [f"weights_dir={tmp_path / 'wan'}",
                      f"generator_ckpt={tmp_path / 'base.pt'}", f"lora_ckpt={tmp_path / 'lora.pt'}"])  # fmt: skip
    names = [p.name for p, _ in missing_run_weights(cfg)]
    assert names == ["models_t5_umt5-xxl-enc-bf16.pth", "umt5-xxl", "Wan2.1_VAE.pth", "base.pt", "lora.pt"]
    (tmp_path / "wan" / "transformer").mkdir(parents=True)
    names = [str(p.relative_to(tmp_path)) for p, _ in missing_run_weights(load_config(
        ROOT / "configs" / "inference.yaml", [f"weights_dir={tmp_path / 'wan'}", "generator_ckpt=null",
                                              "lora_ckpt=null"]))]  # fmt: skip
    assert names == ["wan/transformer/diffusion_pytorch_model.safetensors", "wan/text_encoder/config.json",
                     "wan/tokenizer", "wan/vae/config.json", "wan/vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(WeightsError, match=re.escape("huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers")):
        plan_run(load_config(ROOT / "configs" / "inference.yaml", [f"weights_dir={tmp_path / 'wan'}",
                                                                   f"output_folder={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()
    vae_only = tmp_path / "toy" / "vae"  # a trained VAE beside a generator_ckpt: no transformer folder needed
    vae_only.mkdir(parents=True)
    (vae_only / "config.json").write_text("{}")
    toy = [f"weights_dir={tmp_path / 'toy'}", f"generator_ckpt={tmp_path / 'base.pt'}", "lora_ckpt=null",
           "text_encoder=minilm"]
    names = [str(p.relative_to(tmp_path)) for p, _ in missing_run_weights(load_config(
        ROOT / "configs" / "inference.yaml", toy))]  # fmt: skip
    assert names == ["toy/vae/diffusion_pytorch_model.safetensors", "base.pt"]


def test_published_layout_loads_base_and_lora_merged_or_not(tmp_path):
    """base.pt + lora.pt onto a Wan folder: merging the LoRA changes nothing but speed."""
    wan, ckpt = tmp_path / "wan", tmp_path / "ckpt"
    dit, _, _ = write_wan_folder(wan)
    write_checkpoints(ckpt, dit, rank=4)
    common = [f"weights_dir={wan}", f"generator_ckpt={ckpt / 'base.pt'}", f"lora_ckpt={ckpt / 'lora.pt'}",
              "text_encoder=tiny", "model_overrides.text_dim=32", "adapter.rank=4", "adapter.alpha=4",
              f"output_folder={tmp_path / 'out'}"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 3, 16, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    t = torch.full((1,), 500.0)
    outputs = []
    for merge in ("true", "false"):
        plan = plan_run(load_config(TINY, [*common, f"merge_lora={merge}"]))
        with pytest.raises(ConfigError, match="the VAE has 4 latent channels but the DiT 16"):
            build_components(plan)  # the golden tiny VAE has 4 channels: refused, not misdecoded
        with torch.no_grad():
            outputs.append(load_plan_generator(plan)(x, t, text))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(outputs[0], dit.eval()(x, t, text), atol=1e-4)  # the LoRA was applied


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def _bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


BAD_INPUTS = {
    "resolution": (["height=40"], r"height=40 must be a multiple of 16"),
    "frames": (["num_output_frames=10"], r"num_output_frames=10 must be a multiple of 3"),
    "unsorted switches": (["switch_frame_indices=[12,6]"], r"switch_frame_indices=\[12, 6\] must increase"),
    "switch out of range": (["switch_frame_indices=[6,30]"], r"30 is outside \(0, 18\)"),
    "switch count": (["switch_frame_indices=[6]"], r"has 1 entries but 3 prompts need 2"),
    "unknown key": (["model_kwargs.bank_sise=4"], r"did you mean 'model_kwargs.bank_size'"),
    "sma contradiction": (["model_kwargs.SMA=true"], r"model_kwargs.SMA=true contradicts model_kwargs.memory=nam"),
    "malformed jsonl": (
        ["data_path={jsonl}"], r"bad\.jsonl:2:\d+: malformed JSON",
    ),
    "empty prompt": (["data_path={empty}"], r'empty\.jsonl:1: "prompts"\[1\] is empty'),
    "bad timeline": (["data_path={timeline}"], r"prompts\[0\]\.prompts\[0\]\.text: must be a string"),
    "missing weights": (
        ["generator_ckpt={missing}"], r"missing weights: .*nothing\.pt.*huggingface-cli download KlingTeam/MemFlow",
    ),
    "output not writable": (["output_folder={blocker}/videos"], r"output folder .* is not writable"),
    "seed of 2^64": (["seed=18446744073709551616"], r"seed must be <= 18446744073709551615"),
    "timeline time 1e308": (["data_path={huge}"], r"prompts\[0\]\.endTime: 1e\+308 s is outside \[0, 86400\]"),
    "overlapping timeline": (["data_path={overlap}"], r"prompts\[1\]\.startTime: 1 s is before the previous segment"),
    "pickle with code": (["generator_ckpt={evil}"], r"evil\.pth holds Python objects beyond tensors .* not be loaded"),
    "lfs pointer weights": (["generator_ckpt={pointer}"], r"pointer\.pt is a Git LFS pointer"),
    "base.pt as lora": (["generator_ckpt=null", "lora_ckpt={base}"], r"base\.pt is a generator checkpoint .*_ckpt"),
}


class _Payload:
    """Unpickling this would run a command: what a malicious checkpoint holds."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _evil_pickle(path):
    torch.save({"generator": _Payload()}, path)
    return path


def _generator_checkpoint(path):
    torch.save({"generator": {"blocks.0.self_attn.q.weight": torch.zeros(1)}}, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    files = {
        "jsonl": _bad(tmp_path, "bad.jsonl", '{"prompts": ["a", "b", "c"]}\n{"prompts": ["a", \n'),
        "empty": _bad(tmp_path, "empty.jsonl", '{"prompts": ["a", "", "c"]}\n'),
        "timeline": _bad(tmp_path, "t.json", json.dumps({"prompts": [{"startTime": 0, "prompts": [{"text": 5}]}]})),
        "missing": tmp_path / "nothing.pt",
        "blocker": _bad(tmp_path, "blocker", "a file where a folder is expected"),
        "huge": _bad(tmp_path, "huge.json", json.dumps({"prompts": [{"startTime": 0, "endTime": 1e308,
                                                                       "prompts": [{"text": "a"}]}]})),
        "overlap": _bad(tmp_path, "overlap.json", json.dumps({"prompts": [
            {"startTime": 0, "endTime": 3, "prompts": [{"text": "a"}]},
            {"startTime": 1, "endTime": 6, "prompts": [{"text": "b"}]}]})),
        "evil": _evil_pickle(tmp_path / "evil.pth"),
        "pointer": _bad(tmp_path, "pointer.pt", "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"),
        "base": _generator_checkpoint(tmp_path / "base.pt"),
    }
    overrides, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    default_out = [] if case == "output not writable" else [f"output_folder={out}"]
    argv = ["--config_path", str(TINY_INTERACTIVE), *default_out, *(o.format(**files) for o in overrides)]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference, argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.search(message, errors[0]), errors[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_real_config_without_weights_fails_before_writing(tmp_path, monkeypatch, capsys):
    """The shipped config in a fresh checkout: a one-line error naming the files, exit code 2. scripts/inference.py's
    command line in this process, from the repository root (the scripts themselves run above)."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference, [f"output_folder={tmp_path / 'out'}", "weights_dir=" + str(tmp_path / "wan"),
                            "generator_ckpt=" + str(tmp_path / "base.pt"), "lora_ckpt=" + str(tmp_path / "lora.pt")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert "Wan2.1_VAE.pth" in errors[0] and "base.pt" in errors[0] and "huggingface-cli download" in errors[0]
    assert not (tmp_path / "out").exists()
