"""Self-Forcing rollouts on the streaming generator (tiny random model, CPU)."""

import io

import pytest
import torch

from memflow import StreamConfig, build_dit
from pipeline.streaming import StreamingGenerator
from trainer.rollout import (
    ChunkNoise,
    StreamingRollout,
    StreamingSettings,
    derive_seed,
    self_forcing_rollout,
    shared_randint,
)
from utils.errors import ConfigError

H = W = 4
CHUNK = 3
CONFIG = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return build_dit("tiny")


def _prompt(seed, batch=1):
    return torch.randn(batch, 5, 32, generator=torch.Generator().manual_seed(seed))


def _noise(seeds):
    return ChunkNoise(seeds, (CHUNK, 16, H, W), device="cpu", dtype=torch.float32)


class _Calls:
    """Records, for every DiT forward, whether autograd was on and the first sample's first timestep."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls.append((torch.is_grad_enabled(), float(args[1].reshape(-1)[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _param_grads(dit, output):
    params = [p for p in dit.parameters() if p.requires_grad]
    grads = torch.autograd.grad(output, params, allow_unused=True, retain_graph=True)
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def test_full_rollout_equals_inference_generation(dit):
    """Exiting at the last step without gradient is exactly the inference chunk loop."""
    gen = StreamingGenerator(dit, CONFIG)
    noise, prompt = _noise([7]), _prompt(0)
    with torch.no_grad():
        result = self_forcing_rollout(gen, prompt, noise, num_frames=9, latent_height=H, latent_width=W,
                                      exit_step=len(gen.timesteps) - 1, grad_frames=0)
        initial = torch.cat([noise.draw(c, 0) for c in range(3)], dim=1)
        reference = StreamingGenerator(dit, CONFIG).generate(initial, [prompt], renoise=noise.renoise)
    torch.testing.assert_close(result.x0, reference, atol=0, rtol=0)


def test_gradient_only_at_the_exit_step_of_chunks_in_the_window(dit):
    gen = StreamingGenerator(dit, CONFIG)
    exit_step = 2
    with _Calls(dit) as spy:
        result = self_forcing_rollout(gen, _prompt(0), _noise([1]), num_frames=9, latent_height=H,
                                      latent_width=W, exit_step=exit_step, grad_frames=3)
    exit_t = float(gen.timesteps[exit_step])
    grad_calls = [t for enabled, t in spy.calls if enabled]
    assert grad_calls == [exit_t]  # one call with autograd: the exit step of the last chunk
    # per chunk: exit_step + 1 denoising passes and one commit, all of them accounted for
    assert len(spy.calls) == 3 * (exit_step + 2)
    assert result.x0.shape == (1, 9, 16, H, W) and result.x0.requires_grad
    assert _param_grads(dit, result.x0[:, :6].sum()) == 0.0
    assert _param_grads(dit, result.x0[:, 6:].sum()) > 0.0


def test_noise_of_a_sample_does_not_depend_on_its_batch():
    together = _noise([3, 4]).draw(5, 2)
    alone = _noise([4]).draw(5, 2)
    torch.testing.assert_close(together[1:], alone, atol=0, rtol=0)
    assert not torch.equal(_noise([4]).draw(5, 1), alone)
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    draws = {shared_randint(0, 3, 0, i) for i in range(40)}
    assert draws == {0, 1, 2, 3}


SETTINGS = StreamingSettings(chunk=CHUNK, min_new_frames=4, max_new_frames=6, window=6, max_length=18,
                             switch_choices=(6, 12))


def _streaming(dit):
    return StreamingRollout(StreamingGenerator(dit, CONFIG, trace=True), SETTINGS, H, W)


def test_streaming_rollout_switches_with_recache_windows_and_restarts(dit):
    rollout = _streaming(dit)
    assert rollout.finished
    first, second = _prompt(0), _prompt(1)
    rollout.begin(first, second, 6, _noise([9]), rollout_index=0)
    switches = []
    original = rollout.gen.switch_prompt
    rollout.gen.switch_prompt = lambda p: (switches.append((rollout.gen.frame, p)), original(p))
    out = rollout.step(6, exit_step=1, grad=True)
    assert (out.start_frame, out.new_frames, out.grad_frames) == (0, 6, 6) and out.prompt is first
    assert not switches
    out = rollout.step(3, exit_step=0, grad=True)
    assert len(switches) == 1 and switches[0][0] == 6 and switches[0][1] is second
    assert any(call.kind == "recache" for call in rollout.gen.context.traces)
    assert out.prompt is second  # the window's last chunk is after the switch
    assert (out.start_frame, out.new_frames, out.grad_frames, out.x0.shape[1]) == (3, 3, 3, 6)
    assert _param_grads(dit, out.x0[:, :3].sum()) == 0.0  # frames of the earlier call are detached
    assert _param_grads(dit, out.x0[:, 3:].sum()) > 0.0
    out = rollout.step(6, exit_step=3, grad=False)
    assert not out.x0.requires_grad and out.grad_frames == 0
    out = rollout.step(6, exit_step=3, grad=False)
    assert out.new_frames == 3 and rollout.frame == 18 and rollout.finished  # capped at max_length
    with pytest.raises(ValueError, match="finished"):
        rollout.step(3, exit_step=0, grad=False)
    rollout.begin(second, first, 12, _noise([10]), rollout_index=1)
    assert rollout.frame == 0 and not rollout.finished and not rollout.switched


def test_streaming_state_round_trip_continues_bit_for_bit(dit):
    config = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1, memory="nam_sma",
                          top_k=2, reference=False)
    original = StreamingRollout(StreamingGenerator(dit, config), SETTINGS, H, W)
    original.begin(_prompt(0), _prompt(1), 6, _noise([5]), rollout_index=3)
    with torch.no_grad():
        original.step(6, exit_step=3, grad=False)
        original.step(3, exit_step=3, grad=False)
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        expected = original.step(6, exit_step=3, grad=False)
        restored = StreamingRollout(StreamingGenerator(dit, config), SETTINGS, H, W)
        restored.load_state_dict(state)
        assert restored.rollout_index == 3 and restored.frame == 9 and restored.switched
        got = restored.step(6, exit_step=3, grad=False)
    torch.testing.assert_close(got.x0, expected.x0, atol=0, rtol=0)
    assert got.start_frame == expected.start_frame


def test_streaming_settings_reject_bad_lengths():
    with pytest.raises(ConfigError, match="slice_last_frames=5"):
        StreamingSettings(chunk=3, min_new_frames=4, max_new_frames=6, window=5, max_length=18, switch_choices=(6,))
    with pytest.raises(ConfigError, match="switch_choices"):
        StreamingSettings(chunk=3, min_new_frames=4, max_new_frames=6, window=6, max_length=18, switch_choices=(7,))
    with pytest.raises(ConfigError, match="no whole number"):
        StreamingSettings(chunk=3, min_new_frames=4, max_new_frames=5, window=6, max_length=18, switch_choices=(6,))
    assert SETTINGS.new_chunk_range == (2, 2)
