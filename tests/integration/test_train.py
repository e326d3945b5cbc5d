"""Training end to end on tiny random models (CPU): ODE init, stages 1 and 2, resume, kill, errors, earlier formats."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memflow.dit import build_dit
from memflow.weights import load_dit
from pipeline.cli import inference as inference_cli
from pipeline.streaming import StreamingGenerator
from trainer.cli import train as train_cli
from trainer.distill import DistillTrainer, run_loop
from trainer.networks import build_networks, build_text_encoder
from trainer.plan import plan_training
from trainer.rollout import StreamingRollout
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import load_config
from utils.errors import ConfigError, MemFlowError, WeightsError

from ..conftest import ROOT, refusal

TINY = ROOT / "configs" / "tiny"
PYTHON = Path(sys.executable)


pytestmark = pytest.mark.usefixtures("one_thread")


def train(stage: str, logdir: Path, *overrides: str, config: str | None = None) -> list[dict]:
    """Run scripts/train.py in this process; returns metrics.jsonl."""
    name = "ode_init" if stage == "ode_init" else f"train_{stage}"
    argv = ["--stage", stage, "--config_path", config or str(TINY / f"{name}.yaml"), "--logdir", str(logdir),
            *overrides]
    assert train_cli(argv) == 0
    return metrics(logdir)


def metrics(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "NNODES", "NODE_RANK",
                    "SHUTDOWN_TIMEOUT")  # fmt: skip


def _env(**extra: str) -> dict:
    """This process's environment for a child run, without any launch or SLURM settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _random_tiny():
    """The random generator the tiny configs start from (the same seeded init as tiny inference)."""
    from memflow.loading import materialize

    return materialize(lambda: build_dit("tiny", text_dim=384, text_len=64), torch.device("cpu"), torch.float32, 0)


def _assert_finite(rows: list[dict]) -> None:
    assert rows and all(torch.isfinite(torch.tensor(v)) for row in rows for v in row.values())


def test_ode_init_trains_the_generator_and_exports_base_pt(ode_init_run):
    rows = metrics(ode_init_run)
    _assert_finite(rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("ode_loss" in r for r in rows)
    assert len(list((ode_init_run / "ode_pairs").glob("ode_pairs_*.safetensors"))) == 4
    trained = load_dit(ode_init_run / "base.pt", "tiny", text_dim=384, text_len=64)
    before = _random_tiny().state_dict()
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert "blocks.0.self_attn.q.weight" in changed


# Stage 1 killed with SIGKILL while every rank writes its shards of the checkpoint of step 3.
_KILLED = """
import os, signal, sys, torch
import torch.distributed.checkpoint.filesystem as filesystem
torch.set_num_threads(int(os.environ["TORCH_THREADS"]))  # the test's own, so losses compare bit for bit
real_write = filesystem._write_item
def write_item(transforms, stream, *args, **kwargs):
    if ".checkpoint_000003.tmp" in str(getattr(stream, "name", "")):
        stream.write(b"half a shard")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(transforms, stream, *args, **kwargs)
filesystem._write_item = write_item
script = sys.argv[1]
sys.argv = sys.argv[1:]
exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__", "__file__": script})
"""


def read_checkpoint(folder: Path) -> dict:
    """A checkpoint folder's tensors (torch.distributed.checkpoint shards) as one nested dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    single = folder.parent / f"{folder.name}.single.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, single)
    state = torch.load(single, weights_only=False)
    single.unlink()
    return state


def test_stage1_trains_and_resumes_exactly_after_a_kill_mid_save(stage1_straight, tmp_path):
    straight = metrics(stage1_straight)  # train("init", ..., "save_interval=1"), shared with test_cluster
    _assert_finite(straight)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert [("generator_loss" in r) for r in straight] == [True, False, True, False]  # dfake_gen_update_ratio 2
    assert (stage1_straight / "samples" / "step_000004" / "sample.mp4").stat().st_size > 0
    trained = load_dit(stage1_straight / "base.pt", "tiny", text_dim=384, text_len=64)
    before = _random_tiny().state_dict()
    assert not torch.equal(trained.state_dict()["blocks.1.ffn.0.weight"], before["blocks.1.ffn.0.weight"])

    run = tmp_path / "killed"
    driver = tmp_path / "killed.py"
    driver.write_text(_KILLED)
    args = [str(ROOT / "scripts" / "train.py"), "--stage", "init", "--config_path", str(TINY / "train_init.yaml"),
            "--logdir", str(run), "save_interval=1", "vis_interval=0"]
    env = {**_env(), "TORCH_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([str(PYTHON), str(driver), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (run / "checkpoint_000003").exists()
    assert (run / ".checkpoint_000003.tmp" / "__0_0.distcp").read_bytes().endswith(b"half a shard")
    assert load_checkpoint(run / "checkpoint_000002" / "meta.pt")["step"] == 2
    (run / ".base.pt.x1y2.tmp").write_bytes(b"an export killed mid-write")  # what earlier versions left too
    resumed = train("init", run, "save_interval=1", "vis_interval=0")
    assert resumed == straight  # identical losses for every step, the resumed steps 3 and 4 included
    final = read_checkpoint(run / "checkpoint_000004")
    reference = read_checkpoint(stage1_straight / "checkpoint_000004")
    for entry in ("generator", "critic"):
        for part in ("model", "optim"):
            assert _tensors(final[entry][part]) == _tensors(reference[entry][part])
    assert _tensors(final["generator_ema"]) == _tensors(reference["generator_ema"])
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000003", "checkpoint_000004"]
    assert not list(run.rglob("*.tmp"))  # the killed save's and export's leftovers were removed on start


def _tensors(tree: object, prefix: str = "") -> dict[str, bytes]:
    """Every tensor of a nested state dict by path, as raw bytes (bit-for-bit comparison)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}{key}.").items()}
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.reshape(-1).view(torch.uint8).numpy().tobytes() + str(tree.shape).encode()}
    return {}


def _stage2(logdir: Path, *overrides: str) -> DistillTrainer:
    cfg = load_config(TINY / "train_long.yaml", ["vis_interval=0", *overrides])
    plan = plan_training(cfg, logdir, stage="long")
    logdir.mkdir(parents=True)
    return DistillTrainer(plan, build_networks(plan), build_text_encoder(plan))


def test_stage2_lora_only_switches_with_recache_and_restarts(tmp_path, monkeypatch):
    switches, begins = [], []
    original_switch, original_begin = StreamingGenerator.switch_prompt, StreamingRollout.begin

    def spy_switch(self, prompt):
        switches.append(self.frame)
        return original_switch(self, prompt)

    def spy_begin(self, *args, **kwargs):
        begins.append(self.frame)
        return original_begin(self, *args, **kwargs)

    monkeypatch.setattr(StreamingGenerator, "switch_prompt", spy_switch)
    monkeypatch.setattr(StreamingRollout, "begin", spy_begin)
    trainer = _stage2(tmp_path / "run", "streaming_min_new_frame=6", "streaming_max_length=18",
                      "switch_choices=[6,9,12]", "max_iters=6")
    generator, critic = trainer.nets.generator, trainer.nets.critic
    frozen = {name: p.detach().clone() for name, p in generator.named_parameters() if not p.requires_grad}
    frozen_critic = {name: p.detach().clone() for name, p in critic.named_parameters() if not p.requires_grad}
    lora = {name: p.detach().clone() for name, p in generator.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in name for name in lora)
    rows = run_loop(trainer, False, None)
    _assert_finite(rows)
    assert all(torch.equal(p, frozen[name]) for name, p in generator.named_parameters() if name in frozen)
    assert all(torch.equal(p, frozen_critic[name]) for name, p in critic.named_parameters() if name in frozen_critic)
    assert any(not torch.equal(p, lora[name]) for name, p in generator.named_parameters() if name in lora)
    # 6 new frames per iteration, 18 per rollout: both accumulation slots begin at iterations 1 and 4 and
    # switch once in each rollout, at the same drawn frame
    assert begins == [0, 0, 18, 18]
    assert len(switches) == 4 and switches[0] == switches[1] and switches[2] == switches[3]
    assert set(switches) <= {6, 9, 12}
    saved = load_checkpoint(tmp_path / "run" / "lora.pt")
    assert saved.keys() == {"generator_lora", "critic_lora"}
    assert all(k.startswith("base_model.model.blocks.") for k in saved["generator_lora"])


def test_stage2_resume_is_exact_and_lora_changes_inference(stage2_straight, tmp_path):
    straight = metrics(stage2_straight)  # train("long", ..., "vis_interval=0", "max_iters=6", "save_interval=3")
    _assert_finite(straight)
    first = train("long", tmp_path / "split", "vis_interval=0", "max_iters=3", "save_interval=3")
    resumed = train("long", tmp_path / "split", "vis_interval=0", "max_iters=6", "save_interval=3", "--resume")
    assert first == resumed[:3] and resumed == straight
    a = load_checkpoint(stage2_straight / "lora.pt")["generator_lora"]
    b = load_checkpoint(tmp_path / "split" / "lora.pt")["generator_lora"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A golden retriever runs along a windy beach at sunset.\n")

    def infer(folder: str, *extra: str) -> torch.Tensor:
        """inference.sh's command line in this process (the scripts themselves: tests/integration/test_inference)."""
        out = tmp_path / folder
        assert inference_cli(["--config_path", str(TINY / "inference.yaml"), "height=64", "width=64",
                              "num_output_frames=6", "save_latents=true", "save_trace=false", f"data_path={prompt}",
                              f"output_folder={out}", *extra]) == 0  # fmt: skip
        (latents,) = out.glob("*.latents.safetensors")
        return load_file(latents)["latents"]

    lora_ckpt = stage2_straight / "lora.pt"
    plain = infer("plain")
    tuned = infer("tuned", f"lora_ckpt={lora_ckpt}", "adapter.rank=4", "adapter.alpha=4")
    assert plain.shape == tuned.shape and (plain - tuned).abs().max() > 1e-4


def _expect(tmp_path, error, match, *overrides, stage="init", config=None):
    logdir = tmp_path / "never"
    with pytest.raises(error, match=match):
        train(stage, logdir, *overrides, config=config)
    assert not logdir.exists()  # refused before anything was loaded or written


def test_bad_inputs_fail_before_any_work(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _expect(tmp_path, ConfigError, "data_path: file .* does not exist", f"data_path={tmp_path / 'nope.txt'}")
    _expect(tmp_path, ConfigError, "holds no prompts", f"data_path={empty}")
    _expect(tmp_path, ConfigError, "num_training_frames=8 must be a multiple of 3", "num_training_frames=8")
    _expect(tmp_path, ConfigError, r"total_batch_size=3 is not a multiple of batch_size x world size = 2 x 1",
            "batch_size=2", "total_batch_size=3")
    _expect(tmp_path, ConfigError, r"image_or_video_shape=\[1, 9, 16, 8, 8\] does not match", "height=32")
    one = tmp_path / "one.txt"
    one.write_text("A single switched prompt.\n")
    _expect(tmp_path, ConfigError, "switch_prompt_path has 1 prompts but data_path 8", f"switch_prompt_path={one}",
            stage="long")
    _expect(tmp_path, ConfigError, "--stage long but the config is for stage init", stage="long",
            config=str(TINY / "train_init.yaml"))
    _expect(tmp_path, ConfigError, "wandb is not installed", "wandb_project=memflow")
    _expect(tmp_path, ConfigError, "ode_steps: num_steps=6 puts no Euler step", "ode_steps=6", stage="ode_init")
    teacher = tmp_path / "teacher.safetensors"
    save_file(build_dit("tiny", text_dim=384, text_len=64, num_layers=1).state_dict(), teacher)
    _expect(tmp_path, WeightsError, "real_weights_dir: .* does not hold a tiny DiT", f"real_weights_dir={teacher}")
    plain = tmp_path / "no_overrides.yaml"
    plain.write_text((TINY / "train_init.yaml").read_text().replace("model_overrides: {text_dim: 384, text_len: 64}",
                                                                     "model_overrides: {}"))
    _expect(tmp_path, ConfigError, r"real_name=wan2.1-t2v-1.3b does not match the generator's layout \(text_dim: 4096 "
            "vs 32", "real_name=wan2.1-t2v-1.3b", config=str(plain))
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    for logdir in (file, file / "sub"):
        with pytest.raises(ConfigError, match=f"--logdir {logdir}: {file} is a file, not a folder; choose another"):
            train_cli(["--config_path", str(TINY / "train_init.yaml"), "--logdir", str(logdir)])
    assert file.read_text() == "not a folder"


def test_cli_errors_are_one_line_with_exit_2_and_other_runs_are_protected(tmp_path, capsys):
    """scripts/train.py's command line in this process (the script itself runs in the kill and cluster tests)."""
    argv = ["--config_path", str(TINY / "train_init.yaml"), "--logdir", str(tmp_path / "run"), "num_training_frames=10"]
    assert refusal(train_cli, argv, capsys) == (
        "error: num_training_frames=10 must be a multiple of 3 (whole 3-frame chunks (num_frame_per_block)); "
        "use e.g. 9 or 12"
    )
    run = tmp_path / "other"
    train("init", run, "max_iters=1", "vis_interval=0")
    with pytest.raises(MemFlowError, match="holds another run's checkpoints"):
        train("init", run, "max_iters=2", "vis_interval=0", "seed=1")
    with pytest.raises(ConfigError, match="belongs to a different run"):
        train("init", run, "max_iters=2", "vis_interval=0", "seed=1", "--resume")


def test_resume_names_every_changed_key_allows_named_ones_and_survives_a_partial_metrics_line(tmp_path):
    run = tmp_path / "run"
    first = train("init", run, "max_iters=1", "vis_interval=0")
    other = tmp_path / "other.txt"
    other.write_text("A lighthouse in a storm.\n")
    changed = ["lr=0.5", "lr_critic=0.5", f"data_path={other}", "model_kwargs.memory=none"]
    with pytest.raises(ConfigError) as refused:
        train("init", run, "--resume", "max_iters=2", "vis_interval=0", *changed)
    message = str(refused.value)
    assert message.startswith(f"--resume: {run / 'checkpoint_000001'} belongs to a different run: data_path (other "
                              "prompts: saved sha256:")  # fmt: skip
    named = ("; lr (saved 0.0001, now 0.5); lr_critic (saved 0.0001, now 0.5); model_kwargs.memory (saved 'nam', now "
             "'none'); use its config, --allow_changed data_path,lr,lr_critic,model_kwargs.memory to continue")
    assert named in message
    assert metrics(run) == first and sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000001"]
    with pytest.raises(ConfigError, match="--allow_changed batch_size: the checkpoint's tensors"):
        train("init", run, "--allow_changed", "batch_size", "batch_size=2", "total_batch_size=2")

    with (run / "metrics.jsonl").open("a") as partial:  # what a kill in the middle of a metrics write leaves
        partial.write('{"step": 2, "critic_lo')
    moved = tmp_path / "moved.txt"  # the same prompts in another file are the same run
    moved.write_text((ROOT / "prompts" / "train_example.txt").read_text())
    rows = train("init", run, "max_iters=2", "vis_interval=0", "lr=0.5", "--allow_changed", "lr", f"data_path={moved}")
    assert rows[:1] == first and [r["step"] for r in rows] == [1, 2]
    groups = read_checkpoint(run / "checkpoint_000002")["generator"]["optim"]["param_groups"]
    assert [group["lr"] for group in groups] == [0.5]  # the allowed change took effect over the saved lr


def _to_single_file(folder: Path) -> None:
    """Rewrite a checkpoint folder in the single-file layout of earlier versions (main file + per-rank file)."""
    state, meta = read_checkpoint(folder), load_checkpoint(folder / "meta.pt")
    step = meta["step"]
    main = {"format": "memflow-train-1", "step": step, "stage": meta["stage"], "world_size": 1,
            "identity": {k: meta["config"][k] for k in ("stage", "model", "seed", "batch_size")},
            "config": meta["config"], "generator_ema": state["generator_ema"]}  # fmt: skip
    for name in ("generator", "critic"):
        main[name], main[f"{name}_optimizer"] = state[name]["model"], state[name]["optim"]
    save_checkpoint(main, folder.with_suffix(".pt"))
    rollouts = [load_checkpoint(folder / f"source_{g:04d}.pt") for g in range(meta["groups"])]
    save_checkpoint({"rng": {}, "source": {**meta["source"], "rollouts": rollouts}},
                    folder.parent / f"rank_{step:06d}_000.pt")  # fmt: skip
    shutil.rmtree(folder)


def test_checkpoints_of_the_earlier_single_file_layout_still_resume_exactly(stage2_straight, tmp_path):
    straight = metrics(stage2_straight)[:3]  # the uninterrupted run's first 3 steps
    run = tmp_path / "old"
    train("long", run, "vis_interval=0", "max_iters=1", "save_interval=1")
    _to_single_file(run / "checkpoint_000001")
    resumed = train("long", run, "vis_interval=0", "max_iters=3", "save_interval=1", "max_checkpoints=1")
    assert resumed == straight
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name or p.name.startswith("rank_")) == [
        "checkpoint_000003"]  # rotation removed the old file and its per-rank companion


def test_package_merges_the_lora_into_the_layout_stage2_trained_and_needs_its_checkpoint(ode_init_run, tmp_path,
                                                                                          capsys):
    """``train_toy.py package`` reads the model and adapter from stage 2's own checkpoint, not from the toy configs
    (whose layout, 128 wide, differs from the tiny configs' here), and refuses a stage-2 folder without one."""
    from memflow.weights import apply_lora

    base = ode_init_run / "base.pt"
    train("long", tmp_path / "long", "vis_interval=0", "max_iters=2", "save_interval=2", f"generator_ckpt={base}")
    release = tmp_path / "release"
    for part in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "transformer/diffusion_pytorch_model.safetensors"):  # fmt: skip
        (release / part).parent.mkdir(parents=True, exist_ok=True)
        (release / part).write_text("{}")

    def package(stage2: Path, out: Path) -> subprocess.CompletedProcess:
        command = [str(PYTHON), str(ROOT / "scripts" / "train_toy.py"), "package", "--release", str(release),
                   "--stage1", str(ode_init_run), "--stage2", str(stage2), "--out", str(out), "--command", "test"]
        return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)

    proc = package(tmp_path / "long", tmp_path / "pkg")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = load_config(TINY / "train_long.yaml")
    expected = load_dit(base, "tiny", text_dim=384, text_len=64)
    expected = apply_lora(expected, tmp_path / "long" / "lora.pt", int(cfg.adapter.rank), float(cfg.adapter.alpha),
                          merge=True)  # fmt: skip
    packed = load_file(tmp_path / "pkg" / "generator.safetensors")
    assert packed.keys() == expected.state_dict().keys()
    assert all(torch.equal(packed[k], v.float()) for k, v in expected.state_dict().items())

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "lora.pt").write_bytes((tmp_path / "long" / "lora.pt").read_bytes())
    from tiny.train import main as train_toy  # the refusal through the same command line, in this process

    argv = ["package", "--release", str(release), "--stage1", str(ode_init_run), "--stage2", str(bare),
            "--out", str(tmp_path / "pkg2"), "--command", "test"]  # fmt: skip
    assert "holds no checkpoint" in refusal(train_toy, argv, capsys)
    assert not (tmp_path / "pkg2").exists()
