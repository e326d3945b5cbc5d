import pytest
import torch

from memflow.attention import block_causal_mask
from memflow.config import dit_config
from memflow.dit import build_dit
from memflow.scheduler import FlowMatchScheduler
from trainer.ode_init import ODEPairDataset, generate_ode_pairs, ode_regression_loss, save_ode_shard
from utils.errors import ConfigError

SCHED = FlowMatchScheduler(shift=5.0)


def _noise(b=2, f=6, seed=0):
    return torch.randn(b, f, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_straight_line_teacher_trajectory_is_exact():
    noise, target = _noise(seed=0), _noise(seed=1)

    def teacher(xt, t, context):  # the exact flow of the straight path from target to noise
        return noise - target

    cond = torch.zeros(2, 5, 32)
    trajectory, timesteps = generate_ode_pairs(teacher, SCHED, noise, cond, cond, 48, 3.0)
    assert trajectory.shape == (2, 5, 6, 16, 4, 4)
    assert torch.allclose(timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    assert torch.allclose(timesteps, SCHED.warp([1000, 750, 500, 250]))
    assert torch.allclose(trajectory[:, -1], target, atol=1e-5)
    for k, t in enumerate(timesteps):
        sigma = t.item() / 1000
        assert torch.allclose(trajectory[:, k], (1 - sigma) * target + sigma * noise, atol=1e-5)


def test_teacher_guidance_is_cond_plus_scale_times_difference():
    noise = _noise(b=1, f=3)

    def teacher(xt, t, context):  # a constant flow equal to the context's first entry
        return torch.full_like(xt, context[0, 0, 0].item())

    cond, uncond = torch.full((1, 5, 32), 2.0), torch.full((1, 5, 32), 0.5)
    trajectory, _ = generate_ode_pairs(teacher, SCHED, noise, cond, uncond, 8, 3.0)
    guided = 2.0 + 3.0 * (2.0 - 0.5)
    assert torch.allclose(trajectory[:, -1], noise - guided, atol=1e-5)
    assert torch.equal(trajectory[:, 0], noise)


def test_tiny_teacher_pairs_and_step_validation():
    torch.manual_seed(0)
    teacher = build_dit("tiny").eval()
    cond, uncond = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    trajectory, timesteps = generate_ode_pairs(teacher, SCHED, _noise(), cond, uncond, 8, 3.0)
    assert trajectory.shape == (2, 5, 6, 16, 4, 4) and timesteps.shape == (4,)
    assert torch.isfinite(trajectory).all()
    with pytest.raises(ConfigError, match="num_steps=6"):
        generate_ode_pairs(teacher, SCHED, _noise(), cond, uncond, 6, 3.0)


class _RecordingStudent:
    """Predicts zero flow (so x0 = x_t) and records what it was given."""

    config = dit_config("tiny")

    def __call__(self, xt, t, context, mask=None):
        self.xt, self.t, self.mask = xt, t, mask
        return torch.zeros_like(xt)


def test_regression_draws_one_step_per_chunk_under_a_block_causal_mask():
    trajectory = torch.randn(3, 5, 6, 16, 4, 4)
    timesteps = SCHED.warp([1000, 750, 500, 250])
    student = _RecordingStudent()
    loss = ode_regression_loss(
        student, SCHED, trajectory, timesteps, torch.randn(3, 5, 32), 3, generator=torch.Generator().manual_seed(0)
    )
    assert student.t.shape == (3, 6)
    assert torch.equal(student.mask, block_causal_mask(6, 4, 3))
    for b in range(3):
        for chunk in (slice(0, 3), slice(3, 6)):
            assert (student.t[b, chunk] == student.t[b, chunk][0]).all()
        for f in range(6):
            step = (timesteps == student.t[b, f]).nonzero().item()
            assert torch.equal(student.xt[b, f], trajectory[b, step, f])
    assert loss.item() == pytest.approx(torch.mean((student.xt - trajectory[:, -1]) ** 2).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="chunk_frames=4"):
        ode_regression_loss(student, SCHED, trajectory, timesteps, torch.randn(3, 5, 32), 4)


def test_regression_loss_decreases_on_tiny():
    torch.manual_seed(0)
    teacher = build_dit("tiny").eval()
    cond, uncond = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    trajectory, timesteps = generate_ode_pairs(teacher, SCHED, _noise(), cond, uncond, 8, 3.0)
    student = build_dit("tiny")
    student.load_state_dict(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01)
    losses = []
    for _ in range(8):
        loss = ode_regression_loss(
            student, SCHED, trajectory, timesteps, cond, 3, generator=torch.Generator().manual_seed(1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_shards_round_trip_through_the_dataset(tmp_path):
    a, b = torch.randn(2, 5, 3, 16, 4, 4), torch.randn(1, 5, 3, 16, 4, 4)
    timesteps = SCHED.warp([1000, 750, 500, 250])
    save_ode_shard(tmp_path / "ode_pairs_00000.safetensors", a, timesteps, ["a cat", "a dog"])
    save_ode_shard(tmp_path / "ode_pairs_00001.safetensors", b, timesteps, ["a fox"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ode_pairs_00000.safetensors", "ode_pairs_00001.safetensors"]
    data = ODEPairDataset(tmp_path)
    assert len(data) == 3
    item = data[2]
    assert item["prompt"] == "a fox"
    assert torch.equal(item["trajectory"], b[0]) and torch.equal(item["timesteps"], timesteps)
    assert torch.equal(data[1]["trajectory"], a[1]) and data[1]["prompt"] == "a dog"
    with pytest.raises(ValueError, match="prompts"):
        save_ode_shard(tmp_path / "ode_pairs_00002.safetensors", a, timesteps, ["only one"])


def test_dataset_rejects_an_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no ode_pairs_"):
        ODEPairDataset(tmp_path)
