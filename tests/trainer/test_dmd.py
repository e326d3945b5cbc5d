import pytest
import torch

from memflow.dit import build_dit
from memflow.scheduler import FlowMatchScheduler
from trainer.dmd import DMDObjective, ScoreTimestepSampler, classifier_free_guidance, dmd_loss
from utils.errors import ConfigError


def _latents(b=2, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, f, 16, 4, 4, generator=g)


def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_dit("tiny").eval()


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

