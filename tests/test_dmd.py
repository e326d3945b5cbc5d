import pytest
import torch

from memflow.dit import build_dit
from memflow.errors import ConfigError
from memflow.scheduler import FlowMatchScheduler
from trainer.dmd import DMDObjective, ScoreTimestepSampler, classifier_free_guidance, dmd_loss


def _latents(b=2, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, f, 16, 4, 4, generator=g)


def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_dit("tiny", causal=False).eval()


# -- dmd_loss ---------------------------------------------------------------------------------
def test_identical_scores_give_zero_loss_and_gradient():
    x0 = _latents().requires_grad_()
    real = _latents(seed=1)
    loss, log = dmd_loss(x0, real, real.clone())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x0.grad) == 0
    assert log["dmd_gradient_norm"].item() == 0.0


def test_constant_offset_gives_hand_computed_direction_scale_and_loss():
    x0 = _latents(b=2).double().requires_grad_()
    # mean |x0 - real| is 2.0 for sample 0 and 0.5 for sample 1
    real = torch.stack([x0[0].detach() - 2.0, x0[1].detach() + 0.5])
    fake = real + 0.1  # grad = 0.1 / normalizer = 0.05 and 0.2
    loss, log = dmd_loss(x0, real, fake)
    assert loss.dtype == torch.float64
    # 0.5 * mean(grad^2) with half the elements at 0.05 and half at 0.2
    assert loss.item() == pytest.approx(0.5 * (0.05**2 + 0.2**2) / 2, rel=1e-12)
    loss.backward()
    n = x0.numel()
    assert torch.allclose(x0.grad[0], torch.full_like(x0.grad[0], 0.05 / n))
    assert torch.allclose(x0.grad[1], torch.full_like(x0.grad[1], 0.2 / n))
    assert log["dmd_normalizer"].item() == pytest.approx((2.0 + 0.5) / 2)


def test_nan_gradient_entries_are_zeroed():
    x0 = _latents(b=1).requires_grad_()
    real = x0.detach() - 1.0
    fake = real + 0.5
    fake[0, 0, 0, 0, 0] = float("nan")
    loss, _ = dmd_loss(x0, real, fake)
    loss.backward()
    assert torch.isfinite(loss)
    assert x0.grad[0, 0, 0, 0, 0].item() == 0.0
    assert x0.grad[0, 1, 0, 0, 0].item() == pytest.approx(0.5 / x0.numel())


# -- timestep sampler -------------------------------------------------------------------------
def test_sampler_shape_range_and_shift():
    sampler = ScoreTimestepSampler(shift=5.0, min_score_timestep=20, max_score_timestep=980)
    g = torch.Generator().manual_seed(0)
    t = sampler(20000, generator=g).double()
    assert t.shape == (20000,)
    assert t.min().item() == 20.0 and t.max().item() == 980.0
    inner = t[(t > 20) & (t < 980)] / 1000
    u = inner / (5.0 - 4.0 * inner)  # inverse of the shift: draws sit on the integer grid
    assert torch.allclose(u * 1000, (u * 1000).round(), atol=1e-3)
    # P(t' >= 980) = P(u >= 0.98 / 1.08); the median of t' is shift(0.5) = 833.3
    assert (t == 980).double().mean().item() == pytest.approx(1 - 0.98 / 1.08, abs=0.01)
    assert t.median().item() == pytest.approx(1000 * 2.5 / 3, abs=5.0)
    assert sampler(4, 6).shape == (4, 6)


def test_sampler_rejects_bad_bounds():
    with pytest.raises(ConfigError, match="min_score_timestep"):
        ScoreTimestepSampler(min_score_timestep=980, max_score_timestep=20)
    with pytest.raises(ConfigError, match="timestep_shift"):
        ScoreTimestepSampler(shift=0.0)


# -- guidance ---------------------------------------------------------------------------------
def test_guidance_in_x0_and_flow_space_agree():
    sched = FlowMatchScheduler(shift=5.0)
    xt, flow_c, flow_u = _latents(seed=0), _latents(seed=1), _latents(seed=2)
    t = torch.tensor([937.5, 400.0])
    x0_c, x0_u = sched.flow_to_x0(flow_c, xt, t), sched.flow_to_x0(flow_u, xt, t)
    guided_x0 = classifier_free_guidance(x0_c, x0_u, 3.0)
    via_flow = sched.flow_to_x0(classifier_free_guidance(flow_c, flow_u, 3.0), xt, t)
    assert torch.allclose(guided_x0, via_flow, atol=1e-5)
    assert torch.allclose(classifier_free_guidance(x0_c, x0_u, 3.0), x0_u + 4.0 * (x0_c - x0_u), atol=1e-5)


# -- DMDObjective -----------------------------------------------------------------------------
def test_generator_loss_matches_manual_computation_and_reaches_only_x0():
    real, fake = _tiny(0), _tiny(1)
    sched, sampler = FlowMatchScheduler(), ScoreTimestepSampler()
    cond, uncond = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    objective = DMDObjective(real, fake, sched, sampler, guidance_scale=3.0, negative_context=uncond)
    x0 = _latents().requires_grad_()

    torch.manual_seed(7)
    loss, log = objective.generator_loss(x0, cond)
    loss.backward()
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])
    assert x0.grad is not None and torch.isfinite(x0.grad).all()

    torch.manual_seed(7)
    with torch.no_grad():
        t = sampler(2)
        xt = sched.add_noise(x0, torch.randn_like(x0), t)
        fake_x0 = sched.flow_to_x0(fake(xt, t, cond), xt, t)
        c = sched.flow_to_x0(real(xt, t, cond), xt, t)
        u = sched.flow_to_x0(real(xt, t, uncond.expand(2, -1, -1)), xt, t)
        expected, _ = dmd_loss(x0, c + 3.0 * (c - u), fake_x0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["dmd_timestep_mean"].item() == pytest.approx(t.mean().item())


def test_generator_loss_is_zero_when_critic_equals_unguided_teacher():
    model = _tiny(0)
    objective = DMDObjective(model, model, FlowMatchScheduler(), ScoreTimestepSampler(), guidance_scale=0.0)
    cond = torch.randn(2, 5, 32)
    loss, _ = objective.generator_loss(_latents(), cond, uncond=torch.randn(2, 5, 32))
    assert loss.item() == 0.0


def test_generator_loss_needs_an_unconditional_branch():
    model = _tiny(0)
    objective = DMDObjective(model, model, FlowMatchScheduler(), ScoreTimestepSampler())
    with pytest.raises(ValueError, match="negative_context"):
        objective.generator_loss(_latents(), torch.randn(2, 5, 32))


def test_per_frame_timesteps_and_weighted_critic_loss():
    sched, sampler = FlowMatchScheduler(), ScoreTimestepSampler()

    def zero_flow(xt, t, context):
        assert t.shape == (2, 3)
        return torch.zeros_like(xt)

    objective = DMDObjective(zero_flow, zero_flow, sched, sampler, per_frame_timesteps=True, weight_critic_loss=True)
    x0, cond = _latents(), torch.randn(2, 5, 32)
    torch.manual_seed(3)
    loss, _ = objective.critic_loss(x0, cond)
    torch.manual_seed(3)
    t = sampler(2, 3)
    noise = torch.randn_like(x0)
    idx = (sched.timesteps[None] - t.reshape(-1, 1)).abs().argmin(dim=1)
    weights = sched.linear_timesteps_weights[idx].reshape(2, 3)
    expected = ((noise - x0).pow(2).flatten(2).mean(2) * weights).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_critic_loss_decreases_on_a_fixed_batch():
    real, critic = _tiny(0), _tiny(1).train()
    objective = DMDObjective(real, critic, FlowMatchScheduler(), ScoreTimestepSampler())
    x0, cond = _latents(), torch.randn(2, 5, 32)
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same timesteps and noise every step
        loss, log = objective.critic_loss(x0, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert torch.isfinite(log["critic_loss"])
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in real.parameters())


def test_masked_dmd_loss_with_every_frame_scored_is_the_plain_loss():
    x0, real, fake = _latents().double(), _latents(seed=1).double(), _latents(seed=2).double()
    plain, _ = dmd_loss(x0, real, fake)
    masked, _ = dmd_loss(x0, real, fake, torch.ones(2, 3, dtype=torch.bool))
    assert masked.item() == pytest.approx(plain.item(), rel=1e-12)


def test_clean_context_keeps_whole_leading_chunks_clean_and_judges_only_the_rest():
    sched, chunk, frames = FlowMatchScheduler(), 3, 9
    calls = []

    def zero_flow(xt, t, context):
        calls.append((xt, t))
        return torch.zeros_like(xt)

    def unit_flow(xt, t, context):
        return torch.ones_like(xt)

    objective = DMDObjective(zero_flow, unit_flow, sched, ScoreTimestepSampler(), guidance_scale=0.0,
                             score_context="clean", chunk_frames=chunk)  # fmt: skip
    x0, cond = _latents(b=64, f=frames).requires_grad_(), torch.randn(64, 5, 32)
    loss, log = objective.generator_loss(x0, cond, uncond=cond)
    loss.backward()
    t = calls[0][1]
    clean = t == sched.timesteps[-1]
    starts = clean.sum(dim=1)
    assert set(starts.tolist()) == {chunk, 2 * chunk}  # one or two whole chunks, never none or all
    assert torch.equal(clean, torch.arange(frames)[None] < starts[:, None])
    assert (t[~clean] >= 20).all()
    assert (x0.grad[clean] == 0).all() and (x0.grad[~clean] != 0).all()
    assert log["dmd_timestep_mean"].item() == pytest.approx(t[~clean].mean().item())

    calls.clear()
    objective.fake_score = zero_flow
    critic, _ = objective.critic_loss(x0.detach(), cond)
    xt, t = calls[0]
    scored = t != sched.timesteps[-1]
    sigma = sched.sigma(t)[..., None, None, None]
    noise = (xt - (1 - sigma) * x0.detach()) / sigma
    per_frame = (noise - x0.detach()).pow(2).flatten(2).mean(2)
    assert critic.item() == pytest.approx(per_frame[scored].mean().item(), rel=1e-4)


def test_clean_context_needs_two_chunks():
    model = _tiny(0)
    objective = DMDObjective(model, model, FlowMatchScheduler(), ScoreTimestepSampler(), score_context="clean")
    with pytest.raises(ValueError, match="two 3-frame chunks"):
        objective.critic_loss(_latents(f=3), torch.randn(2, 5, 32))


def test_forced_context_noises_each_chunk_to_its_own_timestep_and_gives_the_scores_the_clean_sample(monkeypatch):
    calls = []

    def spy(model, x0, xt, t, context, chunk_frames):
        calls.append((model, x0, xt, t, chunk_frames))
        return torch.zeros_like(xt)

    monkeypatch.setattr("trainer.dmd.forced_flow", spy)
    objective = DMDObjective("real", "fake", FlowMatchScheduler(), ScoreTimestepSampler(), guidance_scale=0.0,
                             score_context="forced", chunk_frames=3)  # fmt: skip
    x0, cond = _latents(b=16, f=8), torch.randn(16, 5, 32)
    objective.critic_loss(x0.requires_grad_(), cond)
    model, sample, _, t, chunk = calls[0]
    assert model == "fake" and chunk == 3 and torch.equal(sample, x0) and not sample.requires_grad
    assert t.shape == (16, 8) and (t >= 20).all()
    assert torch.equal(t, t[:, ::3].repeat_interleave(3, dim=1)[:, :8])  # whole chunks share one, the last short
    assert not torch.equal(t[:, 0], t[:, 3])

    calls.clear()
    objective.generator_loss(x0, cond, uncond=cond)
    assert [c[0] for c in calls] == ["fake", "real", "real"]
    assert all(torch.equal(c[1], x0) for c in calls)


def test_forced_context_with_per_frame_timesteps_gives_every_frame_its_own(monkeypatch):
    calls = []

    def spy(model, x0, xt, t, context, chunk_frames):
        calls.append(t)
        return torch.zeros_like(xt)

    monkeypatch.setattr("trainer.dmd.forced_flow", spy)
    objective = DMDObjective("real", "fake", FlowMatchScheduler(), ScoreTimestepSampler(), guidance_scale=0.0,
                             per_frame_timesteps=True, score_context="forced", chunk_frames=3)  # fmt: skip
    objective.critic_loss(_latents(b=16, f=6), torch.randn(16, 5, 32))
    t = calls[0]
    assert t.shape == (16, 6)
    assert not torch.equal(t[:, 0], t[:, 1])  # frames of one chunk no longer share a timestep


def test_forced_scores_see_a_chunk_only_through_the_chunks_after_it():
    """Chunk c is scored from its own noisy frames and the clean chunks before it: the clean sample's last chunk
    changes no prediction, its first changes every prediction but its own."""
    model = _tiny(0)
    objective = DMDObjective(model, model, FlowMatchScheduler(), ScoreTimestepSampler(), guidance_scale=0.0,
                             score_context="forced", chunk_frames=3)  # fmt: skip
    x0, xt = _latents(f=9, seed=1), _latents(f=9, seed=2)
    t = torch.tensor([[900.0] * 3 + [500.0] * 3 + [100.0] * 3] * 2)
    cond, uncond = torch.randn(2, 5, 32), torch.zeros(2, 5, 32)
    with torch.no_grad():
        base = objective.real_x0(xt, t, cond, uncond, x0)
        last = x0.clone()
        last[:, 6:] = torch.randn_like(last[:, 6:])
        first = x0.clone()
        first[:, :3] = torch.randn_like(first[:, :3])
        assert torch.equal(objective.real_x0(xt, t, cond, uncond, last), base)
        moved = objective.real_x0(xt, t, cond, uncond, first)
    assert torch.equal(moved[:, :3], base[:, :3])
    assert (moved[:, 3:] - base[:, 3:]).abs().amax() > 1e-3

    loss, _ = objective.generator_loss(x0.requires_grad_(), cond, uncond)  # unguided, the critic is the teacher
    loss.backward()
    assert loss.item() == 0 and (x0.grad == 0).all()


def test_unknown_score_context_is_refused():
    with pytest.raises(ConfigError, match="score_context='noisy'"):
        DMDObjective(None, None, FlowMatchScheduler(), ScoreTimestepSampler(), score_context="noisy")
