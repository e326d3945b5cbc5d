import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.prompts import check_switch_frames, effective_switch_frame, load_jsonl_prompts, load_text_prompts
from pipeline.schedule import ChunkConditioning, PromptSchedule, PromptSegment, blend, interpolate, slerp
from pipeline.timeline import load_timeline, seconds_to_latent_frame
from utils.errors import ConfigError, MemFlowError

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ data model


def test_schedule_switch_frames_and_texts():
    schedule = PromptSchedule(
        (
            PromptSegment(0, (("a", 1.0),)),
            PromptSegment(6, (("b", 1.0), ("a", 2.0))),
            PromptSegment(12, (("c", 1.0),)),
        ),
        num_frames=21,
        chunk_frames=3,
    )
    assert schedule.switch_frames == [6, 12]
    assert schedule.texts == ["a", "b", "c"]
    assert schedule.num_chunks == 7
    assert [schedule.segment_index(c) for c in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert schedule.to_dict()["segments"][1]["prompts"] == [{"text": "b", "weight": 1.0}, {"text": "a", "weight": 2.0}]


@pytest.mark.parametrize(
    ("starts", "num_frames", "needle"),
    [
        ([3], 12, "first prompt must start at frame 0"),
        ([0, 6, 6], 12, "must increase strictly"),
        ([0, 4], 12, "must be a multiple of 3 below 12"),
        ([0, 12], 12, "must be a multiple of 3 below 12"),
        ([0], 13, "num_output_frames=13 must be a positive multiple"),
    ],
)
def test_schedule_invariants(starts, num_frames, needle):
    segments = tuple(PromptSegment(s, ((f"p{s}", 1.0),)) for s in starts)
    with pytest.raises(ConfigError, match=needle):
        PromptSchedule(segments, num_frames, 3)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "needle"),
    [
        ((), {}, "has no prompt"),
        ((("  ", 1.0),), {}, "empty prompt"),
        ((("a", -1.0),), {}, "must be a number >= 0"),
        ((("a", 0.0),), {}, "sum to 0"),
        ((("a", 1.0),), {"interpolation": "cubic"}, "'cubic' is not one of slerp, linear"),
        ((("a", 1.0),), {"transition_chunks": -1}, "transition_chunks must be >= 0"),
    ],
)
def test_segment_validation(prompts, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        PromptSegment(0, prompts, **kwargs)


# ------------------------------------------------------------------ text file


def test_text_loader_one_video_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat on a mat\n\n   \n  a dog in fog  \n")
    videos = load_text_prompts(path, num_frames=21, chunk_frames=3)
    assert [v.texts for v in videos] == [["a cat on a mat"], ["a dog in fog"]]
    assert all(v.switch_frames == [] and v.num_frames == 21 for v in videos)


def test_text_loader_errors(tmp_path):
    with pytest.raises(MemFlowError, match="does not exist"):
        load_text_prompts(tmp_path / "missing.txt", 21, 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(MemFlowError, match="has no prompts"):
        load_text_prompts(empty, 21, 3)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(MemFlowError, match=r"latin.txt:2: not valid UTF-8"):
        load_text_prompts(latin, 21, 3)


# ------------------------------------------------------------------ JSONL


def write_jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_happy_path(tmp_path):
    lines = [json.dumps({"prompts": ["a", "b", "c"]}), "", json.dumps({"prompts": ["d", "e", "f"]})]
    path = write_jsonl(tmp_path, lines)
    videos = load_jsonl_prompts(path, [6, 12], num_frames=21, chunk_frames=3)
    assert len(videos) == 2
    assert videos[0].switch_frames == [6, 12]
    assert [seg.texts for seg in videos[1].segments] == [("d",), ("e",), ("f",)]


def test_release_example_jsonl_loads():
    videos = load_jsonl_prompts(ROOT / "prompts" / "interactive_example.jsonl", [40, 80, 120, 160, 200], 240, 3)
    assert len(videos) == 4
    assert all(v.switch_frames == [42, 81, 120, 162, 201] for v in videos)


@pytest.mark.parametrize(
    ("indices", "needle"),
    [
        ([6], "has 1 entries but 3 prompts need 2"),
        ([12, 6], r"must increase strictly \(6 follows 12\)"),
        ([6, 6], "must increase strictly"),
        ([0, 6], r"0 is outside \(0, 21\)"),
        ([6, 21], r"21 is outside \(0, 21\)"),
        ([7, 8], r"7 and 8 fall in the same chunk of 3 frames \(both switch at frame 9\)"),
        ([6, 19], "19 takes effect at the next chunk boundary 21, which is the end of the video"),
        ([6, 1.5], "must be a list of integers"),
    ],
)
def test_jsonl_bad_switch_indices(tmp_path, indices, needle):
    path = write_jsonl(tmp_path, [json.dumps({"prompts": ["a", "b", "c"]})])
    with pytest.raises(ConfigError, match=needle) as info:
        load_jsonl_prompts(path, indices, num_frames=21, chunk_frames=3)
    assert "switch_frame_indices" in str(info.value)
    assert f"{path}:1:" in str(info.value)


def test_switch_indices_inside_a_chunk_round_up_like_the_release():
    assert check_switch_frames((3, 9), 3, 12, 3) == [3, 9]
    assert check_switch_frames([40, 80, 120, 160, 200], 6, 240, 3) == [42, 81, 120, 162, 201]
    assert [effective_switch_frame(i, 3) for i in (1, 2, 3, 4)] == [3, 3, 3, 6]


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ('{"prompts": ["a", "b"]', r"p.jsonl:3:\d+: malformed JSON"),
        ('["a", "b"]', r"p.jsonl:3: expected an object"),
        ('{"prompt": ["a", "b"]}', r"p.jsonl:3: expected an object with a \"prompts\" list"),
        ('{"prompts": "a"}', r"p.jsonl:3: \"prompts\" must be a non-empty list"),
        ('{"prompts": ["a", "  "]}', r"p.jsonl:3: \"prompts\"\[1\] is empty"),
        ('{"prompts": ["a", 3]}', r"p.jsonl:3: \"prompts\"\[1\] is empty or not a string"),
    ],
)
def test_jsonl_bad_lines_name_line_number(tmp_path, bad_line, needle):
    good = json.dumps({"prompts": ["x", "y"]})
    path = write_jsonl(tmp_path, [good, "", bad_line])
    with pytest.raises(MemFlowError, match=needle):
        load_jsonl_prompts(path, [6], 21, 3)


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\x0b", "\x1c"])
def test_a_line_separator_inside_a_prompt_keeps_it_one_prompt(tmp_path, separator):
    prompt = f"A fox in the snow.{separator}It looks up at the moon."
    text = tmp_path / "p.txt"
    text.write_text(f"{prompt}\r\nA second prompt.\n", encoding="utf-8")
    assert [s.segments[0].prompts[0][0] for s in load_text_prompts(text, 6, 3)] == [prompt, "A second prompt."]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompts": [prompt, "b"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    (video,) = load_jsonl_prompts(jsonl, [3], 6, 3)
    assert video.segments[0].prompts[0][0] == prompt


def test_jsonl_empty_file(tmp_path):
    path = write_jsonl(tmp_path, [""])
    with pytest.raises(MemFlowError, match="has no prompts"):
        load_jsonl_prompts(path, [], 21, 3)


# ------------------------------------------------------------------ timeline


def timeline(**settings) -> dict:
    return {
        "prompts": [
            {
                "startTime": 0,
                "endTime": 3.0,
                "transitionSteps": 0,
                "temporalInterpolationMethod": "linear",
                "prompts": [{"text": "a panda walks", "weight": 1.0}],
            },
            {
                "startTime": 3.0,
                "endTime": 6.0,
                "transitionSteps": 2,
                "temporalInterpolationMethod": "slerp",
                "prompts": [{"text": "a panda halts", "weight": 3}, {"text": "spring park", "weight": 1}],
            },
        ],
        "settings": {
            "pipelineId": "memflow",
            "inputMode": "text",
            "resolution": {"height": 480, "width": 832},
            "seed": 42,
            "denoisingSteps": [1000, 750, 500, 250],
            **settings,
        },
    }


def write_timeline(tmp_path: Path, data) -> Path:
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def test_seconds_to_latent_frame_rule():
    assert seconds_to_latent_frame(0, 3) == 0
    assert seconds_to_latent_frame(3.0, 3) == 12  # 48 px frames -> latent 12
    assert seconds_to_latent_frame(10.0, 3) == 39  # latent 40 -> nearest chunk boundary 39
    assert seconds_to_latent_frame(0.375, 3) == 3  # latent 1.5 -> 2 (half up) -> 3
    assert seconds_to_latent_frame(0.25, 3) == 0  # latent 1 -> boundary 0


def test_timeline_happy_path(tmp_path):
    loaded = load_timeline(write_timeline(tmp_path, timeline()), chunk_frames=3)
    schedule = loaded.schedule
    assert schedule.num_frames == 24
    assert schedule.switch_frames == [12]
    second = schedule.segments[1]
    assert second.prompts == (("a panda halts", 3.0), ("spring park", 1.0))
    assert (second.transition_chunks, second.interpolation) == (2, "slerp")
    assert loaded.settings == {
        "height": 480,
        "width": 832,
        "seed": 42,
        "denoising_step_list": [1000.0, 750.0, 500.0, 250.0],
    }


def test_timeline_num_frames_from_config(tmp_path):
    path = write_timeline(tmp_path, timeline())
    assert load_timeline(path, 3, num_frames=60).schedule.num_frames == 60
    with pytest.raises(MemFlowError, match=r"prompts\[1\].startTime: starts at latent frame 12, past"):
        load_timeline(path, 3, num_frames=12)


def test_timeline_without_settings(tmp_path):
    data = timeline()
    del data["settings"]
    assert load_timeline(write_timeline(tmp_path, data), 3).settings == {}


def test_timeline_segments_closer_than_a_chunk_are_refused(tmp_path):
    data = mutate(mutate(timeline(), "prompts.0.endTime", 0.1), "prompts.1.startTime", 0.1)
    with pytest.raises(MemFlowError, match=r"prompts\[1\].startTime: 0.1 s maps to latent frame 0, not after"):
        load_timeline(write_timeline(tmp_path, data), chunk_frames=3)


def mutate(data: dict, dotted: str, value) -> dict:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("prompts.1.prompts.0.weight", "heavy", r"prompts\[1\].prompts\[0\].weight: must be a number"),
        ("prompts.1.prompts.0.weight", -1, r"prompts\[1\].prompts\[0\].weight: must be >= 0"),
        ("prompts.1.prompts.1.text", " ", r"prompts\[1\].prompts\[1\].text: is empty"),
        ("prompts.1.prompts.1.text", KeyError, r"prompts\[1\].prompts\[1\].text: is missing"),
        ("prompts.1.prompts", [], r"prompts\[1\].prompts: is empty"),
        ("prompts.1.prompts.0", "text", r"prompts\[1\].prompts\[0\]: must be an object"),
        ("prompts.1.startTime", KeyError, r"prompts\[1\].startTime: is missing"),
        ("prompts.1.startTime", 0.1, r"prompts\[1\].startTime: 0.1 s is before the previous segment ends \(3.0 s\)"),
        ("prompts.1.startTime", 1e308, r"prompts\[1\].startTime: 1e\+308 s is outside \[0, 86400\] seconds"),
        ("settings.seed", 2**64, r"settings.seed: must be >= 0 and < 2\^64"),
        ("prompts.0.startTime", 2.0, r"prompts\[0\].startTime: the first segment must start at 0 s"),
        ("prompts.1.endTime", 2.0, r"prompts\[1\].endTime: 2.0 must be after startTime 3.0"),
        ("prompts.1.transitionSteps", -2, r"prompts\[1\].transitionSteps: must be >= 0"),
        ("prompts.1.transitionSteps", 1.5, r"prompts\[1\].transitionSteps: must be an integer"),
        ("prompts.1.temporalInterpolationMethod", "cubic", r"prompts\[1\].temporalInterpolationMethod: 'cubic'"),
        ("prompts", [], r"prompts: is empty"),
        ("settings.resolution.height", 481, r"settings.resolution.height: 481 must be a positive multiple of 16"),
        ("settings.resolution.width", KeyError, r"settings.resolution.width: is missing"),
        ("settings.seed", -3, r"settings.seed: must be >= 0"),
        ("settings.denoisingSteps", [1000, 1000], r"settings.denoisingSteps: \[1000, 1000\] must decrease"),
        ("settings.denoisingSteps.1", 0, r"settings.denoisingSteps\[1\]: 0 must be a timestep"),
        ("settings.inputMode", "video", r"settings.inputMode: 'video' is not supported"),
    ],
)
def test_timeline_bad_field_names_json_path(tmp_path, field, value, needle):
    path = write_timeline(tmp_path, mutate(timeline(), field, value))
    with pytest.raises(MemFlowError, match=needle) as info:
        load_timeline(path, 3)
    assert str(info.value).startswith(f"{path}: ")


def test_timeline_malformed_json_names_line(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text('{\n  "prompts": [\n    {"startTime": 0,}\n  ]\n}\n')
    with pytest.raises(MemFlowError, match=r"timeline.json:3:\d+: malformed JSON"):
        load_timeline(path, 3)


def test_timeline_needs_end_when_length_not_given(tmp_path):
    data = timeline()
    del data["prompts"][1]["endTime"]
    with pytest.raises(MemFlowError, match=r"prompts\[1\].endTime: the video must end"):
        load_timeline(write_timeline(tmp_path, data), 3)
    assert load_timeline(write_timeline(tmp_path, data), 3, num_frames=30).schedule.num_frames == 30


# ------------------------------------------------------------------ embedding maths


def test_blend_normalises_weights():
    e = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    out = blend(e, [3.0, 1.0])
    assert torch.allclose(out, torch.tensor([[0.75, 0.25], [0.0, 0.0]]))
    assert torch.equal(blend(e, [2.0, 2.0]), blend(e, [1.0, 1.0]))
    assert torch.equal(blend(e[:1], [5.0]), e[0])
    assert out.dtype == e.dtype


def test_blend_keeps_low_precision_dtype():
    e = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    assert blend(e, [1, 1]).dtype == torch.bfloat16


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_blend_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        blend(torch.ones(2, 3, 4), weights)


def test_slerp_orthogonal_unit_vectors_midpoint():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(1))
    angle_a = torch.acos((mid * a).sum(-1))
    angle_b = torch.acos((mid * b).sum(-1))
    assert torch.allclose(angle_a, angle_b)
    assert torch.allclose(angle_a, torch.tensor([math.pi / 4]))
    third = slerp(a, b, 1 / 3)
    assert torch.allclose(torch.acos((third * a).sum(-1)), torch.tensor([math.pi / 6]))


def test_slerp_endpoints_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    assert torch.equal(interpolate(a, b, 1.0, "linear"), b)


def test_slerp_zero_rows_and_parallel_fallback():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    out = slerp(a, b, 0.25)
    assert torch.equal(out[0], torch.zeros(2))  # padding stays exactly zero
    assert torch.allclose(out[1], torch.tensor([1.75, 0.0]))  # parallel: linear
    assert torch.allclose(out[2], torch.tensor([1.5, 0.0]))  # one zero endpoint: linear
    assert torch.allclose(out[3], torch.tensor([0.0, 0.75]))
    assert torch.allclose(out[4], torch.tensor([0.5, 0.0]))  # antiparallel: linear
    assert torch.isfinite(out).all()


def test_slerp_batched_shape_and_dtype():
    a = torch.randn(3, 7, 16, dtype=torch.float16)
    b = torch.randn(3, 7, 16, dtype=torch.float16)
    out = slerp(a, b, 0.3)
    assert out.shape == a.shape and out.dtype == torch.float16


def test_interpolate_dispatch():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(interpolate(a, b, 0.5, "linear"), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(interpolate(a, b, 0.5, "slerp"), torch.tensor([[2**-0.5, 2**-0.5]]))
    with pytest.raises(ValueError, match="cubic"):
        interpolate(a, b, 0.5, "cubic")


# ------------------------------------------------------------------ chunk conditioning


class FakeEncoder:
    """Each text becomes a [T=2, D=3] embedding: a distinct one-hot row and a zero padding row."""

    def __init__(self) -> None:
        self.basis = {"a": 0, "b": 1, "c": 2}
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        out = torch.zeros(len(texts), 2, 3)
        for i, text in enumerate(texts):
            out[i, 0, self.basis[text]] = 1.0
        return out


def make_schedule(transition: int = 0, method: str = "linear") -> PromptSchedule:
    return PromptSchedule(
        (
            PromptSegment(0, (("a", 1.0),)),
            PromptSegment(9, (("b", 1.0), ("a", 1.0)), transition, method),
            PromptSegment(24, (("c", 1.0),)),
        ),
        num_frames=30,
        chunk_frames=3,
    )


def test_conditioning_encodes_each_text_once_and_flags_switches():
    encoder = FakeEncoder()
    cond = ChunkConditioning(make_schedule(), encoder)
    assert encoder.calls == [["a", "b", "c"]]
    chunks = list(cond)
    assert len(chunks) == len(cond) == 10
    assert [c.switch for c in chunks] == [False, False, False, True, False, False, False, False, True, False]
    assert [c.segment for c in chunks] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert [c.start_frame for c in chunks[:4]] == [0, 3, 6, 9]
    assert torch.allclose(chunks[3].embedding[0], torch.tensor([0.5, 0.5, 0.0]))  # equal-weight blend
    assert torch.equal(chunks[3].embedding[1], torch.zeros(3))
    assert all(c.alpha == 1.0 for c in chunks)
    assert cond[9].embedding[0].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(IndexError):
        cond[10]


def test_transition_reaches_new_prompt_one_chunk_after_last_transition_chunk():
    cond = ChunkConditioning(make_schedule(transition=3), FakeEncoder())
    old = cond[2].embedding
    new = cond[7].embedding
    alphas = [cond[c].alpha for c in range(3, 8)]
    assert alphas == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cond[3].switch and not cond[4].switch
    for c, alpha in zip(range(3, 6), alphas, strict=False):
        assert torch.allclose(cond[c].embedding, (1 - alpha) * old + alpha * new)
    assert not torch.equal(cond[5].embedding, new)  # last transition chunk is not yet the new prompt
    assert torch.equal(cond[6].embedding, new)


def test_slerp_transition_stays_on_the_sphere_for_unit_rows():
    schedule = PromptSchedule(
        (PromptSegment(0, (("a", 1.0),)), PromptSegment(3, (("b", 1.0),), 1, "slerp")), num_frames=9, chunk_frames=3
    )
    cond = ChunkConditioning(schedule, FakeEncoder())
    mid = cond[1].embedding
    assert cond[1].alpha == 0.5
    assert torch.allclose(mid[0].norm(), torch.tensor(1.0))
    assert torch.equal(mid[1], torch.zeros(3))


def test_transition_interrupted_by_next_switch_starts_from_what_was_shown():
    schedule = PromptSchedule(
        (
            PromptSegment(0, (("a", 1.0),)),
            PromptSegment(3, (("b", 1.0),), 4, "linear"),
            PromptSegment(6, (("c", 1.0),), 1, "linear"),
        ),
        num_frames=12,
        chunk_frames=3,
    )
    cond = ChunkConditioning(schedule, FakeEncoder())
    shown = cond[1].embedding  # 1/5 of the way from a to b
    assert torch.allclose(shown[0], torch.tensor([0.8, 0.2, 0.0]))
    assert torch.allclose(cond[2].embedding[0], 0.5 * shown[0] + 0.5 * torch.tensor([0.0, 0.0, 1.0]))


def test_conditioning_rejects_wrong_encoder_shape():
    with pytest.raises(ValueError, match="expected \\[P, T, D\\]"):
        ChunkConditioning(make_schedule(), lambda texts: torch.zeros(len(texts) + 1, 2, 3))
