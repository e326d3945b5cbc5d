"""Exactness invariants of the streaming engine (tiny random model, CPU)."""

import dataclasses
import math
from collections import Counter

import pytest
import torch

from memflow import StreamConfig, build_dit
from memflow.attention import attention, block_causal_mask, routed_attention, sliding_block_mask
from memflow.context import StreamingContext
from pipeline.streaming import StreamingGenerator

CHUNK, H, W = 3, 4, 6  # latent frames per chunk, latent height/width (2x3 tokens per frame)
TOKENS = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return build_dit("tiny").eval()


def _prompt(seed, rows=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, rows, 32, generator=g)


def _latents(frames, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, H, W, generator=g)


def _context(dit, config, frames, batch=1):
    cfg = dit.config
    return StreamingContext(config, num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                            frame_tokens=TOKENS, batch_size=batch, max_frames=frames, dtype=torch.float32,
                            device="cpu")


def _teacher_forced(dit, config, x, t, prompt, update_bank=False):
    """Commit every chunk of x (at per-frame timesteps t) through the cache; return outputs and context."""
    ctx = _context(dit, config, x.shape[1])
    ctx.set_text(dit.text_kv(prompt), None, switch=False)
    ctx.tracing = True
    outs = []
    for start in range(0, x.shape[1], CHUNK):
        if update_bank:
            ctx.update_bank()
        ctx.begin(start, CHUNK, "commit")
        sl = slice(start, start + CHUNK)
        outs.append(dit(x[:, sl], t[:, sl], text_kv=ctx.text_kv, start_frame=start, attention_context=ctx))
        ctx.end()
    return torch.cat(outs, 1), ctx


def _mask_from_traces(traces, frames):
    """The full-sequence additive mask equivalent to what each chunk attended to.

    A frame attended twice (e.g. a prototype that is also in the sink) weighs twice in the
    softmax, i.e. log(2) is added to its logits.
    """
    logits = torch.full((frames, frames), float("-inf"))
    for tr in traces:
        keys = Counter(tr.sink + tr.window)
        if tr.bank is not None:
            layers = {tuple(b) for b in tr.bank[:, 0].tolist()}
            assert len(layers) == 1, "bank differs across layers; no single mask is equivalent"
            keys.update(layers.pop())
        for frame, count in keys.items():
            logits[tr.start:tr.start + tr.num_frames, frame] = math.log(count)
    return logits.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)


@torch.no_grad()
def test_full_memory_equals_block_causal_forward(dit):
    x, prompt = _latents(12), _prompt(0)
    t = torch.rand(1, 12) * 1000
    streamed, _ = _teacher_forced(dit, StreamConfig(memory="full"), x, t, prompt)
    full = dit(x, t, prompt, mask=block_causal_mask(12, TOKENS, CHUNK))
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_sink_and_window_equal_sliding_mask_forward(dit):
    config = StreamConfig(memory="none", local_attn_size=9, sink_size=3, bank_size=0)
    x, prompt = _latents(18), _prompt(0)
    t = torch.rand(1, 18) * 1000
    streamed, _ = _teacher_forced(dit, config, x, t, prompt)
    mask = sliding_block_mask(18, TOKENS, CHUNK, sink_frames=3, window_frames=config.window_size)
    full = dit(x, t, prompt, mask=mask)
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("reference", [True, False])
@torch.no_grad()
def test_bank_equals_forward_with_the_traced_mask(dit, reference):
    """Sink + bank + window streaming equals one forward whose mask encodes the same frames.

    The bank does not overflow here (per-layer selection would need one mask per layer; the
    golden ``*_long`` cases cover compression).
    """
    config = StreamConfig(memory="nam", local_attn_size=6, sink_size=3, bank_size=3, record_interval=2,
                          bank_record="latest", reference=reference)
    x, prompt = _latents(15), _prompt(0)
    t = torch.rand(1, 15) * 1000
    streamed, ctx = _teacher_forced(dit, config, x, t, prompt, update_bank=True)
    assert any(tr.bank is not None and tr.bank.shape[-1] for tr in ctx.traces)
    assert any(set(tr.bank.flatten().tolist()) & set(tr.sink) for tr in ctx.traces), "no duplicate attended"
    full = dit(x, t, prompt, mask=_mask_from_traces(ctx.traces, 15))
    torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_denoise_step_equals_forward_over_clean_past(dit):
    """A denoising pass of chunk c sees the committed past exactly like a forward over [past, chunk]."""
    x, prompt = _latents(9), _prompt(0)
    noisy = _latents(3, seed=5)
    t = torch.zeros(1, 12)
    t[:, 9:] = 700.0
    _, _ctx = _teacher_forced(dit, StreamConfig(memory="full"), torch.cat([x, x[:, :3]], 1), t, prompt)
    ctx2 = _context(dit, StreamConfig(memory="full"), 12)
    ctx2.set_text(dit.text_kv(prompt), None, switch=False)
    for start in range(0, 9, CHUNK):
        ctx2.begin(start, CHUNK, "commit")
        dit(x[:, start:start + 3], t[:, start:start + 3], text_kv=ctx2.text_kv, start_frame=start,
            attention_context=ctx2)
        ctx2.end()
    before = ctx2.k.clone()
    ctx2.begin(9, CHUNK, "denoise")
    out = dit(noisy, t[:, 9:], text_kv=ctx2.text_kv, start_frame=9, attention_context=ctx2)
    ctx2.end()
    assert ctx2.committed == 9
    full = dit(torch.cat([x, noisy], 1), t, prompt, mask=block_causal_mask(12, TOKENS, CHUNK))
    torch.testing.assert_close(out, full[:, 9:], atol=2e-5, rtol=1e-5)
    # a denoising pass may only touch the slots of the chunk it denoises (empty here)
    torch.testing.assert_close(ctx2.k[:, :, :, : 9 * TOKENS], before[:, :, :, : 9 * TOKENS], atol=0, rtol=0)


def _generate(dit, config, frames=24, prompts=None, switches=(), seed=3, trace=False):
    gen = StreamingGenerator(dit, config, trace=trace)
    prompts = prompts or [_prompt(0)]
    noise = _latents(frames, seed=seed)
    with torch.no_grad():
        out = gen.generate(noise, prompts, list(switches), generator=torch.Generator().manual_seed(seed))
    return out, gen


@pytest.mark.parametrize("reference", [True, False])
def test_sma_with_all_frames_equals_nam(dit, reference):
    base = StreamConfig(memory="nam", local_attn_size=6, bank_size=3, record_interval=1, reference=reference)
    sma = dataclasses.replace(base, memory="nam_sma", top_k=base.sink_size + base.bank_size)
    prompts, switches = [_prompt(0), _prompt(1)], [15]
    dense, _ = _generate(dit, base, 36, prompts, switches)
    sparse, gen = _generate(dit, sma, 36, prompts, switches, trace=True)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert any(tr.sma for tr in gen.context.traces)


@pytest.mark.parametrize("per_frame", [False, True])
def test_routed_attention_equals_dense_attention_masked_to_the_routed_frames(per_frame):
    """Gathering the chosen memory frames is the masked dense attention of the definition; all frames = no mask."""
    g = torch.Generator().manual_seed(0)
    b, h, n, t, d, frames, window, k = 2, 3, 3, 4, 8, 5, 6, 2
    q = torch.randn(b, h, n * t, d, generator=g)
    memory_k, memory_v = torch.randn(2, b, h, frames, t, d, generator=g)
    window_k, window_v = torch.randn(2, b, h, window, d, generator=g)
    shape = (b, h, n, frames) if per_frame else (b, h, frames)
    chosen = torch.rand(shape, generator=g).topk(k, dim=-1).indices.sort(dim=-1).values
    allowed = torch.zeros(shape, dtype=torch.bool).scatter_(-1, chosen, True)
    rows = allowed.repeat_interleave(t, dim=2) if per_frame else allowed[:, :, None].expand(-1, -1, n * t, -1)
    mask = torch.cat([rows.repeat_interleave(t, dim=3), torch.ones(b, h, n * t, window, dtype=torch.bool)], 3)
    keys, values = torch.cat([memory_k.flatten(2, 3), window_k], 2), torch.cat([memory_v.flatten(2, 3), window_v], 2)
    routed = routed_attention(q, memory_k, memory_v, window_k, window_v, chosen)
    torch.testing.assert_close(routed, attention(q, keys, values, mask), atol=1e-6, rtol=1e-5)
    every = torch.arange(frames).expand(*shape[:-1], -1)
    torch.testing.assert_close(routed_attention(q, memory_k, memory_v, window_k, window_v, every),
                               attention(q, keys, values), atol=1e-6, rtol=1e-5)


def test_sma_with_fewer_frames_changes_the_output(dit):
    base = StreamConfig(memory="nam", local_attn_size=6, bank_size=3, record_interval=1)
    dense, _ = _generate(dit, base, 24)
    sparse, _ = _generate(dit, dataclasses.replace(base, memory="nam_sma", top_k=2), 24)
    assert not torch.allclose(dense, sparse)


@pytest.mark.parametrize(("reference", "policy"), [(True, "latest"), (True, "first"), (False, "first")])
def test_bank_holds_at_most_bank_size_prototypes(dit, reference, policy):
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=2, bank_record=policy,
                          reference=reference)
    _, gen = _generate(dit, config, 45, trace=True)
    bank = gen.context.bank
    seen = set()
    for tr in gen.context.traces:
        assert tr.bank.shape[-1] <= config.bank_size
        seen.update(tr.bank.flatten().tolist())
    assert seen, "the bank was never visible"
    assert all(frame % CHUNK == 0 for frame in seen), "a prototype is the first latent frame of its chunk"
    assert bank.frames.shape[-1] == config.bank_size
    if not reference:
        for tr in gen.context.traces:  # the paper inserts each prototype once: no duplicates
            for layer in tr.bank[:, 0].tolist():
                assert len(layer) == len(set(layer))


@torch.no_grad()
@pytest.mark.parametrize("reference", [True, False])
def test_a_given_past_fills_the_bank_as_a_sampled_one(dit, reference):
    """Committing chunks that were never sampled (a forced past) lets their prototypes in as sampling does, and
    sampling a chunk twice (an early exit redone) lets its prototype in once."""
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=2, bank_record="first",
                          reference=reference)
    x, prompt, noise = _latents(24), _prompt(0), _latents(3, seed=2)
    sampled, given = StreamingGenerator(dit, config), StreamingGenerator(dit, config)
    for gen in (sampled, given):
        gen.start(prompt, num_frames=24, latent_height=H, latent_width=W)
    for start in range(0, 21, CHUNK):
        sampled.denoise_chunk(noise, generator=torch.Generator().manual_seed(0))
        sampled.denoise_chunk(noise, generator=torch.Generator().manual_seed(0))
        for gen in (sampled, given):
            gen.commit_chunk(x[:, start:start + CHUNK])
    last = [gen.denoise_chunk(noise, generator=torch.Generator().manual_seed(0)) for gen in (sampled, given)]
    torch.testing.assert_close(sampled.context.bank.frames, given.context.bank.frames, atol=0, rtol=0)
    assert (given.context.bank.frames >= 0).all(), "a bank slot was never filled"
    torch.testing.assert_close(last[0], last[1], atol=0, rtol=0)


@torch.no_grad()
def test_prototype_is_the_first_frame_of_the_committed_chunk(dit):
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=1, bank_record="latest")
    x, prompt = _latents(9), _prompt(0)
    _, ctx = _teacher_forced(dit, config, x, torch.zeros(1, 9), prompt)
    bank = ctx.bank
    assert bank.pending_frame == 6
    slot = ctx.bank_slots + ctx.sink + (6 - ctx.sink) % ctx.window
    cached = ctx.k[:, :, :, slot * TOKENS:(slot + 1) * TOKENS]
    torch.testing.assert_close(bank.pending_k, cached, atol=0, rtol=0)


@torch.no_grad()
def test_recache_equals_a_fresh_pass_with_the_new_prompt(dit):
    """Within the window, a re-cache rewrites the cache exactly as one clean pass under the new prompt."""
    config = StreamConfig(memory="none", bank_size=0)
    gen = StreamingGenerator(dit, config)
    noise = _latents(12)
    gen.start(_prompt(0), num_frames=12, latent_height=H, latent_width=W)
    for start in range(0, 9, CHUNK):
        gen.commit_chunk(gen.denoise_chunk(noise[:, start:start + 3], generator=torch.Generator().manual_seed(0)))
    frames = torch.cat(gen._recent, 1)
    gen.switch_prompt(_prompt(1))
    fresh = _context(dit, config, 12)
    fresh.set_text(dit.text_kv(_prompt(1)), None, switch=False)
    fresh.begin(0, 9, "recache")
    dit(frames, torch.zeros(1, 9), text_kv=fresh.text_kv, start_frame=0, attention_context=fresh)
    fresh.end()
    torch.testing.assert_close(gen.context.k, fresh.k, atol=1e-6, rtol=0)
    torch.testing.assert_close(gen.context.v, fresh.v, atol=1e-6, rtol=0)


@torch.no_grad()
def test_recompute_recache_keeps_sink_and_pointers(dit):
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=1)
    gen = StreamingGenerator(dit, config)
    noise = _latents(18)
    gen.start(_prompt(0), num_frames=18, latent_height=H, latent_width=W)
    for start in range(0, 12, CHUNK):
        gen.commit_chunk(gen.denoise_chunk(noise[:, start:start + 3], generator=torch.Generator().manual_seed(0)))
    ctx = gen.context
    sink = slice(ctx.bank_slots * TOKENS, (ctx.bank_slots + ctx.sink) * TOKENS)
    sink_before, window_before = ctx.k[:, :, :, sink].clone(), ctx.k[:, :, :, sink.stop:].clone()
    gen.switch_prompt(_prompt(1))
    assert ctx.committed == 12
    torch.testing.assert_close(ctx.k[:, :, :, sink], sink_before, atol=0, rtol=0)
    assert not torch.allclose(ctx.k[:, :, :, sink.stop:], window_before)


def test_switch_without_global_sink_restarts_the_sink(dit):
    config = StreamConfig(memory="none", bank_size=0, local_attn_size=6, global_sink=False)
    out, gen = _generate(dit, config, 18, [_prompt(0), _prompt(1)], [12], trace=True)
    assert torch.isfinite(out).all()
    after = [tr for tr in gen.context.traces if tr.start >= 12 and tr.kind == "denoise"]
    assert after[0].sink == [6, 7, 8]


def test_state_is_reset_between_runs(dit):
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=1)
    gen = StreamingGenerator(dit, config)
    with torch.no_grad():
        gen.generate(_latents(30, seed=9), [_prompt(4), _prompt(5)], [12], generator=torch.Generator().manual_seed(1))
        second = gen.generate(_latents(24, seed=3), [_prompt(0)], generator=torch.Generator().manual_seed(3))
    fresh, _ = _generate(dit, config, 24)
    torch.testing.assert_close(second, fresh, atol=0, rtol=0)


def _three_chunks_in(dit, config):
    """A generator with three committed chunks of a 12-frame video, and that video's noise."""
    gen = StreamingGenerator(dit, config)
    noise = _latents(12)
    gen.start(_prompt(0), num_frames=12, latent_height=H, latent_width=W)
    for start in range(0, 9, CHUNK):
        with torch.no_grad():
            gen.commit_chunk(gen.denoise_chunk(noise[:, start:start + 3], generator=torch.Generator().manual_seed(0)))
    return gen, noise


def test_gradient_path_matches_inference_path_and_leaves_cache_alone(dit):
    """A denoising step with autograd reads the cache without writing it, and gives the same x0."""
    config = StreamConfig(memory="nam_sma", local_attn_size=6, bank_size=2, record_interval=1, top_k=3,
                          reference=False)
    gen, noise = _three_chunks_in(dit, config)
    cache = slice(gen.context.bank_slots * TOKENS, None)
    before = gen.context.k[:, :, :, cache].clone()
    trained = gen.denoise_chunk(noise[:, 9:], exit_step=0, requires_grad=True)
    trained.square().mean().backward()
    grads = [p.grad for p in dit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    dit.zero_grad(set_to_none=True)
    torch.testing.assert_close(gen.context.k[:, :, :, cache], before, atol=0, rtol=0)
    with torch.no_grad():
        plain = gen.denoise_chunk(noise[:, 9:], exit_step=0)
    torch.testing.assert_close(trained.detach(), plain, atol=1e-5, rtol=1e-5)


def test_generator_rejects_bad_calls(dit):
    gen = StreamingGenerator(dit, StreamConfig())
    with pytest.raises(ValueError, match="multiple of num_frame_per_block"):
        gen.start(_prompt(0), num_frames=10, latent_height=H, latent_width=W)
    with pytest.raises(ValueError, match="switch frames"):
        gen.generate(_latents(6), [_prompt(0), _prompt(1)], [])


def test_memory_trace_lists_what_each_chunk_saw(dit):
    config = StreamConfig(memory="nam_sma", local_attn_size=9, bank_size=2, record_interval=1, top_k=2)
    _, gen = _generate(dit, config, 18, [_prompt(0), _prompt(1)], [9], trace=True)
    trace = gen.memory_trace()
    assert [c["start_frame"] for c in trace["chunks"]] == [0, 3, 6, 9, 12, 15]
    assert [c["switch"] for c in trace["chunks"]] == [False, False, False, True, False, False]
    last = trace["chunks"][-1]
    assert last["sink"] == [0, 1, 2] and last["window"] == [12, 13, 14]
    assert len(last["bank"]) == dit.config.num_layers and all(len(b) <= 2 for b in last["bank"])
    assert len(last["sma"][0]) == dit.config.num_heads and all(len(h) == 2 for h in last["sma"][0])
    with pytest.raises(ValueError, match="trace=True"):
        _generate(dit, config, 6)[1].memory_trace()


def _grad_step(dit, config, checkpointing):
    """Gradients of one autograd denoising step after three committed chunks."""
    dit.zero_grad(set_to_none=True)
    dit.gradient_checkpointing = checkpointing
    gen, noise = _three_chunks_in(dit, config)
    x0 = gen.denoise_chunk(noise[:, 9:], generator=torch.Generator().manual_seed(1), exit_step=1, requires_grad=True)
    x0.square().mean().backward()
    dit.gradient_checkpointing = False
    return x0.detach(), {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("memory", ["nam", "nam_sma"])
def test_gradient_checkpointing_replays_the_same_attention(dit, memory):
    config = StreamConfig(memory=memory, local_attn_size=6, bank_size=2, record_interval=1, top_k=3,
                          reference=False)
    plain_x0, plain = _grad_step(dit, config, checkpointing=False)
    ckpt_x0, ckpt = _grad_step(dit, config, checkpointing=True)
    torch.testing.assert_close(ckpt_x0, plain_x0, atol=0, rtol=0)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)
    dit.zero_grad(set_to_none=True)


def test_the_text_path_trains_through_a_rollout(dit):
    """The autograd step recomputes the text keys/values, so text embedding and cross-attn k/v get gradients."""
    _, grads = _grad_step(dit, StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=1), False)
    assert grads["text_embedding.0.weight"].abs().sum() > 0
    assert grads["blocks.0.cross_attn.k.weight"].abs().sum() > 0
    assert grads["blocks.1.cross_attn.v.weight"].abs().sum() > 0
    dit.zero_grad(set_to_none=True)


@pytest.mark.parametrize("reference", [True, False])
def test_saved_state_continues_a_video_bit_for_bit(dit, reference, tmp_path):
    config = StreamConfig(memory="nam_sma", local_attn_size=6, bank_size=2, record_interval=1, top_k=2,
                          reference=reference)
    noise, prompts = _latents(36, seed=4), [_prompt(0), _prompt(1)]

    def chunks(gen, start, end):
        out = []
        for s in range(start, end, CHUNK):
            if s == 18:
                gen.switch_prompt(prompts[1])
            x0 = gen.denoise_chunk(noise[:, s:s + 3], generator=torch.Generator().manual_seed(s))
            gen.commit_chunk(x0)
            out.append(x0)
        return out

    with torch.no_grad():
        first = StreamingGenerator(dit, config)
        first.start(prompts[0], num_frames=36, latent_height=H, latent_width=W)
        head = chunks(first, 0, 21)
        torch.save(first.state_dict(), tmp_path / "state.pt")
        second = StreamingGenerator(dit, config)
        second.start(prompts[0], num_frames=36, latent_height=H, latent_width=W)
        second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), prompts[1])
        tail = chunks(second, 21, 36)
        again = StreamingGenerator(dit, config)
        again.start(prompts[0], num_frames=36, latent_height=H, latent_width=W)
        reference_run = chunks(again, 0, 36)
    torch.testing.assert_close(torch.cat(head + tail, 1), torch.cat(reference_run, 1), atol=0, rtol=0)
