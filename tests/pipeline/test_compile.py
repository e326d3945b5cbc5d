"""The compiled chunk step: one graph per call kind from the first chunk on, outputs and traces equal to eager.

Most cases trace with the ``aot_eager`` backend (the compiler's graph capture and functionalisation without code
generation, seconds on the CPU); one case runs inductor itself, the backend users get.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from memflow import StreamConfig
from memflow.dit import build_dit
from memflow.loading import materialize
from pipeline.streaming import StreamingGenerator

H, W = 4, 6
CACHE = 9  # local_attn_size: the chunk of frames 6-8 is the first to see a full cache
SWITCHES = [12, 21]  # both after the cache is full, so both re-caches have one length

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit(dtype):
    return materialize(lambda: build_dit("tiny"), torch.device("cpu"), dtype, 0)


def _inputs(frames):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, frames, 16, H, W, generator=g), [torch.randn(1, 5, 32, generator=g) for _ in range(3)]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _chunks(gen, noise, prompts, graphs_after_chunk):
    """Generate chunk by chunk (switching at SWITCHES), noting the compiled graph count after every chunk."""
    gen.start(prompts[0], num_frames=noise.shape[1], latent_height=H, latent_width=W)
    out, segment = [], 0
    with torch.no_grad():
        for start in range(0, noise.shape[1], 3):
            if segment < len(SWITCHES) and start == SWITCHES[segment]:
                segment += 1
                gen.switch_prompt(prompts[segment])
            x0 = gen.denoise_chunk(noise[:, start:start + 3], generator=torch.Generator().manual_seed(start))
            gen.commit_chunk(x0)
            out.append(x0)
            graphs_after_chunk.append(_graphs())
    return torch.cat(out, 1)


@pytest.mark.parametrize(("memory", "reference", "dtype"), [
    ("nam", True, torch.float32), ("nam_sma", True, torch.float32), ("nam_sma", False, torch.float32),
    ("nam_sma", True, torch.bfloat16),
])  # fmt: skip
def test_one_graph_per_call_kind_and_eager_outputs(memory, reference, dtype):
    """Denoising steps and commits share one graph (their shapes are equal) while the cache fills (masked) and one
    from the first full chunk on (no mask); the re-cache has its own. Nothing recompiles after that, from chunk to
    chunk, across the switches, or between the first denoising step (the noise) and later ones."""
    torch._dynamo.reset()
    counters.clear()
    dit = _dit(dtype)
    config = StreamConfig(memory=memory, local_attn_size=CACHE, bank_size=2, record_interval=1, top_k=2,
                          reference=reference)
    noise, prompts = _inputs(30)
    eager_gen = StreamingGenerator(dit, config, trace=True)
    eager = _chunks(eager_gen, noise, prompts, [])
    assert _graphs() == 0
    graphs: list[int] = []
    compiled_gen = StreamingGenerator(dit, config, trace=True, compile=True, compile_backend="aot_eager")
    compiled = _chunks(compiled_gen, noise, prompts, graphs)
    full, switch = CACHE // 3 - 1, SWITCHES[0] // 3
    assert graphs == [1] * full + [2] * (switch - full) + [3] * (len(graphs) - switch)
    torch.testing.assert_close(compiled, eager, atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=0)
    if dtype == torch.float32:  # the same frames were attended, call by call
        assert compiled_gen.memory_trace() == eager_gen.memory_trace()


def test_a_shorter_recache_is_its_own_graph():
    """A switch before the cache is full re-caches fewer frames (masked): a second re-cache graph, as documented."""
    torch._dynamo.reset()
    counters.clear()
    gen = StreamingGenerator(_dit(torch.float32), StreamConfig(memory="nam", local_attn_size=CACHE, bank_size=2),
                             compile=True, compile_backend="aot_eager")  # fmt: skip
    noise, prompts = _inputs(18)
    with torch.no_grad():
        gen.generate(noise, prompts, [6, 12], generator=torch.Generator().manual_seed(0))
    assert _graphs() == 4  # the chunk graphs, filling and full, and one re-cache graph per length


def test_inductor_compiled_chunk_step_equals_eager():
    torch._dynamo.reset()
    counters.clear()
    dit = _dit(torch.float32)
    config = StreamConfig(memory="nam", local_attn_size=6, bank_size=2, record_interval=1)
    noise, prompts = _inputs(12)
    runs = []
    for compile in (False, True):
        gen = StreamingGenerator(dit, config, compile=compile)
        with torch.no_grad():
            runs.append(gen.generate(noise, prompts[:1], generator=torch.Generator().manual_seed(0)))
    assert _graphs() == 2  # the first chunk's (masked) and the steady chunks'
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=0)
