import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from memflow.dit import build_dit
from trainer.networks import shard_model
from utils.distributed import (
    any_rank,
    broadcast_object,
    full_state_dict,
    gather_floats,
    init_distributed,
    is_main_process,
    load_full_state_dict,
    process_group,
)
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Each rank builds the same tiny DiT and feeds it the same data, sharded and unsharded; every
# comparison is asserted in the workers, and each rank that gets through writes a marker.
_WORKER = """
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from memflow.dit import build_dit
from trainer.ema import EMA
from trainer.networks import shard_model
from utils.distributed import (any_rank, barrier, broadcast_object, full_state_dict, gather_floats,
                               init_distributed, is_main_process, load_full_state_dict)

env = init_distributed()
assert env.world_size == 2 and dist.get_backend() == "gloo"
assert is_main_process() == (env.rank == 0)
out_dir = Path(sys.argv[1])


def fresh():
    torch.manual_seed(0)
    return build_dit("tiny")


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 4, 4, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 5, 32, generator=g)


def close(a, b):
    assert (a - b).abs().max().item() < 1e-5, (a - b).abs().max().item()


ref = fresh()
for sharding, group in (("full", None), ("hybrid", 1)):
    model = shard_model(fresh(), mixed_precision=True, sharding=sharding, cpu=True, shard_group_size=group)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():
        close(model(*batch(1)), ref(*batch(1)))

model = shard_model(fresh(), mixed_precision=True, sharding="full", cpu=True)
model.gradient_checkpointing = True
ema, ref_ema = EMA(model, decay=0.5, start_step=0), EMA(ref, decay=0.5, start_step=0)
opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01) for m in (model, ref)]
for net, opt in zip((model, ref), opts):
    x, t, c = batch(2)
    net(x, t, c).square().mean().backward()
    opt.step()
ema.update(0)
ref_ema.update(0)

full = full_state_dict(model)
ema_full = ema.state_dict()
if env.rank == 0:
    assert full.keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        close(full[name], value)
    for name, value in ref_ema.state_dict().items():
        close(ema_full[name], value)
else:
    assert full == {}

restored = shard_model(build_dit("tiny"), mixed_precision=False, cpu=True)
load_full_state_dict(restored, full)
with torch.no_grad():
    close(restored(*batch(3)), ref(*batch(3)))
ema.load_state_dict(ref_ema.state_dict())
close(ema.state_dict()["blocks.0.self_attn.q.weight"], ref_ema.state_dict()["blocks.0.self_attn.q.weight"])

assert any_rank(env.rank, env.device) == 1
assert broadcast_object(f"rank {env.rank}") == "rank 0"
assert gather_floats([env.rank + 0.1, 2.0], env.device) == [[0.1, 2.0], [1.1, 2.0]]
barrier()
dist.destroy_process_group()
(out_dir / f"rank{env.rank}.ok").write_text("ok")
# Skip interpreter finalisation: gloo worker threads still referenced by the FSDP device meshes
# are otherwise torn down after Python itself and can abort the process (torch 2.13 on CPU).
os._exit(0)
"""


def test_fsdp_matches_unsharded_model_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)
    def launch() -> subprocess.CompletedProcess:
        command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
        return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)

    result = launch()
    if result.returncode != 0 and "Signal 11 (SIGSEGV)" in result.stderr:
        # gloo on torch 2.13's CPU build segfaulted a rank in one of five runs here (2026-12-08), inside a
        # collective, never in our code: one relaunch; a failed comparison raises AssertionError and fails at once
        result = launch()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def test_single_process_fallback(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)
    assert is_main_process()
    assert any_rank(3, env.device) == 3 and broadcast_object("x") == "x"
    assert gather_floats([0.5], env.device) == [[0.5]]
    model = build_dit("tiny")
    assert shard_model(model, mixed_precision=True, cpu=True) is model
    state = full_state_dict(model)
    copy = build_dit("tiny")
    load_full_state_dict(copy, state)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=False))


def test_a_lone_process_gets_a_group_of_its_own_for_the_block():
    assert not torch.distributed.is_initialized()
    with process_group(torch.device("cpu")):
        assert torch.distributed.get_world_size() == 1
        model = shard_model(build_dit("tiny"), mixed_precision=False, cpu=True)
        assert all(isinstance(p, DTensor) for p in model.parameters())
    assert not torch.distributed.is_initialized()


def test_bad_settings_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="sharding='zero3'"):
        shard_model(build_dit("tiny"), mixed_precision=False, sharding="zero3", cpu=True)
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK='zero'"):
        init_distributed()
