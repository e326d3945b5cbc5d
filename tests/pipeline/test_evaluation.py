"""Evaluation of generated videos: metrics on controlled features, tiny random DINO / CLIP, the CLI end to end."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.evaluation import evaluate_videos, find_videos
from pipeline.evaluation.cli import main as evaluate_main
from pipeline.evaluation.compare import compare_reports, pair_videos
from pipeline.evaluation.features import clip_input, dino_input, load_clip, load_dino, prompt_windows
from pipeline.evaluation.metrics import consistency, cross_similarity, frame_similarities
from pipeline.evaluation.report import encode_frames, score_video, segment_text_features
from pipeline.evaluation.videos import VideoEntry, pixel_start, segments_from_schedule
from pipeline.plan import plan_run
from pipeline.runner import VideoRunner, build_components
from utils.config import load_config, run_cli
from utils.errors import MemFlowError

from ..conftest import ROOT, refusal

TINY_INTERACTIVE = ROOT / "configs" / "tiny" / "interactive_inference.yaml"
NARRATIVES = [
    ["A red fox trots through fresh snow.", "The red fox stops by a frozen stream.", "The fox curls up under a pine."],
    ["An old fisherman rows across a misty lake.", "The fisherman casts a net at sunrise.", "He rows back home."],
]


# --------------------------------------------------------------------------------------------
# Fixtures: tiny random models saved by save_pretrained, tiny videos made by the project's inference


def _tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges), written offline."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tokenizer = _tokenizer(root)
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": 512,
            "eos_token_id": 513, "pad_token_id": 513}  # fmt: skip
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**small, "image_size": 32, "patch_size": 16},
                                projection_dim=16))  # fmt: skip
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=16, **small), add_pooling_layer=False).save_pretrained(root / "dino")
    return {"dino": root / "dino", "clip": root / "clip"}


@pytest.fixture(scope="module")
def encoders(models):
    return load_dino(str(models["dino"]), torch.device("cpu")), load_clip(str(models["clip"]), torch.device("cpu"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two 3-segment narratives (18 latent frames, switches at 6 and 12) from the tiny interactive config."""
    root = tmp_path_factory.mktemp("generated")
    prompts = root / "narratives.jsonl"
    prompts.write_text("".join(json.dumps({"prompts": p}) + "\n" for p in NARRATIVES))
    overrides = [f"output_folder={root / 'videos'}", f"data_path={prompts}", "save_trace=false"]
    plan = plan_run(load_config(TINY_INTERACTIVE, overrides))
    runner = VideoRunner(plan, build_components(plan))
    for job in plan.jobs:
        runner.run(job)
    return root / "videos"


def _entry(starts: list[int], pixel_frames: int, prompts: list[str] | None = None) -> VideoEntry:
    prompts = prompts or [f"prompt {i}" for i in range(len(starts))]
    schedule = {"segments": [{"start_frame": s, "prompts": [{"text": p, "weight": 1.0}]}
                             for s, p in zip(starts, prompts, strict=True)]}  # fmt: skip
    segments = segments_from_schedule(schedule, pixel_frames, Path("v.json"))
    timings = {"total_s": 1.0, "chunks": []}
    return VideoEntry(Path("v.mp4"), Path("v.json"), 0, 0, "nam", "cpu", "float32", pixel_frames, 16, segments, timings)


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Metrics and inputs


def test_consistency_is_vbench_mean_of_first_and_previous_clipped_at_zero():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # frame 1: cos to first 0, to previous 0 -> 0; frame 2: to first -1 -> 0, to previous 0 -> 0
    assert consistency(features) == 0.0
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    assert consistency(features) == pytest.approx(((0.6 + 0.6) / 2 + (0.6 + 1.0) / 2) / 2)
    assert consistency(features[:1]) == 1.0
    assert cross_similarity(features[:1], features[1:]) == pytest.approx(0.6)


def test_segments_follow_the_vae_frame_mapping():
    assert [pixel_start(k) for k in (0, 1, 3, 6, 12)] == [0, 1, 9, 21, 45]
    entry = _entry([0, 6, 12], 69)
    assert [(s.start, s.end) for s in entry.segments] == [(0, 21), (21, 45), (45, 69)]


def test_inputs_follow_vbench_geometry():
    frames = torch.zeros(2, 3, 480, 832, dtype=torch.uint8)
    assert dino_input(frames).shape == (2, 3, 224, 388)  # shorter side 224, no crop
    assert clip_input(frames, 224).shape == (2, 3, 224, 224)  # shorter side 224, centre crop
    white = clip_input(torch.full((1, 3, 40, 60), 255, dtype=torch.uint8), 32)
    assert torch.allclose(white[0, :, 0, 0], (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073]))
                          / torch.tensor([0.26862954, 0.26130258, 0.27577711]))  # fmt: skip


def test_long_prompts_are_split_into_windows_at_sentence_ends():
    words = len  # one token per character: easy to count
    assert prompt_windows("Short one.", words, 20) == ["Short one."]
    windows = prompt_windows("A fox runs. It jumps high. Snow falls on it.", words, 20)
    assert windows == ["A fox runs.", "It jumps high.", "Snow falls on it."]
    assert all(words(w) <= 20 for w in windows)


def test_constant_video_scores_consistency_one(encoders):
    frames = np.repeat(_image(0)[None], 33, axis=0)
    subject, background = encode_frames([frames[:20], frames[20:]], *encoders)
    entry = _entry([0, 3], 33)
    report = score_video(entry, subject, background, encoders[1].text_features(["a", "b"]), window=16)
    keys = ("subject_consistency", "background_consistency")
    scores = [report[k] for k in (*keys, "cross_switch_subject", "cross_switch_background")]
    scores += [seg[k] for seg in report["segments"] for k in keys]
    assert scores == pytest.approx([1.0] * len(scores), abs=1e-6)


def test_hard_cut_lowers_consistency_at_the_cut_and_only_there(encoders):
    cut = pixel_start(6)
    dark, bright = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    frames = np.stack([dark] * cut + [bright] * (45 - cut))
    subject, background = encode_frames([frames], *encoders)
    for features in (subject, background):
        _, to_previous = frame_similarities(features)
        drops = [t for t, value in enumerate(to_previous.tolist()) if value < 1 - 1e-6]
        assert drops == [cut]
        assert to_previous[cut] < 0.99
    report = score_video(_entry([0, 6], 45), subject, background, encoders[1].text_features(["a", "b"]), 16)
    for seg in report["segments"]:
        assert seg["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
        assert seg["background_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert report["subject_consistency"] < 0.99 and report["background_consistency"] < 0.99
    assert report["cross_switch_subject"] < 0.99 and report["cross_switch_background"] < 0.99


class ColourEncoder:
    """Image feature = mean colour; text feature = the colour the prompt names: alignment is known exactly."""

    name = "colour"
    colours = (("red", [1.0, 0.0, 0.0]), ("green", [0.0, 1.0, 0.0]))

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.float().mean(dim=(2, 3))

    def text_features(self, texts):
        return torch.tensor([next(v for k, v in self.colours if k in t) for t in texts])


def test_swapping_prompts_changes_text_alignment_the_right_way():
    red, green = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    red[..., 0], green[..., 1] = 200, 200
    frames = np.stack([red] * pixel_start(6) + [green] * (45 - pixel_start(6)))
    encoder = ColourEncoder()
    subject, background = encode_frames([frames], encoder, encoder)
    rows = {}
    for name, prompts in (("right", ["a red kite", "a green field"]), ("swapped", ["a green field", "a red kite"])):
        entry = _entry([0, 6], 45, prompts)
        report = score_video(entry, subject, background, segment_text_features(encoder, entry.segments), 16)
        rows[name] = [seg["text_alignment"] for seg in report["segments"]]
        rows[name + " margin"] = report["text_alignment_margin"]
    # pure colours and colour-named prompts: every similarity is exactly 1 or 0
    assert [(r["own"], r["others"]) for r in rows["right"]] == [(1.0, [0.0]), (1.0, [0.0])]
    assert [(r["own"], r["others"]) for r in rows["swapped"]] == [(0.0, [1.0]), (0.0, [1.0])]
    assert (rows["right margin"], rows["swapped margin"]) == (1.0, -1.0)


# --------------------------------------------------------------------------------------------
# Comparison


def _report(videos_folder: Path, encoders) -> dict:
    return evaluate_videos(find_videos(videos_folder), *encoders, window=8)


def test_comparison_of_a_folder_with_itself_is_exactly_zero(videos, encoders):
    first, second = _report(videos, encoders), _report(videos, encoders)
    comparison = compare_reports(first, second, ["a", "b"])
    assert comparison["pairs"] == 2
    for stat in comparison["metrics"].values():
        assert (stat["mean_diff"], stat["se"], stat["wins"], stat["losses"]) == (0.0, 0.0, 0, 0)
    assert all(d == 0.0 for row in comparison["narratives"] for d in row["diffs"].values())


def test_comparison_counts_wins_and_requires_partners(videos, encoders):
    a = _report(videos, encoders)
    b = json.loads(json.dumps(a))
    b["videos"][0]["subject_consistency"] += 0.1
    b["videos"][1]["subject_consistency"] -= 0.05
    stat = compare_reports(a, b, ["a", "b"])["metrics"]["subject_consistency"]
    assert (stat["wins"], stat["losses"], stat["n"]) == (1, 1, 2)
    assert stat["mean_diff"] == pytest.approx(0.025) and stat["se"] == pytest.approx(0.075)
    b["videos"][1]["segments"][0]["prompt"] = "another story"
    with pytest.raises(MemFlowError, match=r"has no partner in b"):
        pair_videos(a, b, ["a", "b"])


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_evaluates_and_compares_end_to_end(videos, models, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    model_args = ["--dino", str(models["dino"]), "--clip", str(models["clip"]), "--device", "cpu"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(videos), "--out", str(tmp_path / "report.json"),
         *model_args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overall"]["videos"] == 2 and len(report["videos"]) == 2
    assert [len(v["segments"]) for v in report["videos"]] == [3, 3]
    assert [s["pixel_frame"] for s in report["videos"][0]["switches"]] == [21, 45]
    assert report["videos"][0]["speed"]["fps_transformer"] > report["videos"][0]["speed"]["fps_with_decode"] > 0
    assert "**overall**" in result.stdout and "report.json" in result.stdout
    assert "frame" in result.stderr  # the progress bar

    out = tmp_path / "self.md"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, ["--compare", str(videos), str(videos), "--out", str(out), *model_args])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "self.json", "self.md", "self.png"]
    stats = json.loads((tmp_path / "self.json").read_text())["metrics"]
    assert all((s["mean_diff"], s["se"], s["wins"], s["losses"]) == (0.0, 0.0, 0, 0) for s in stats.values())
    assert "| subject consistency | " in out.read_text() and "self.png" in out.read_text()

    # a saved report stands in for its folder (no models needed)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_main, ["--compare", str(tmp_path / "report.json"), str(tmp_path / "report.json")])
    assert exit_info.value.code == 0
    assert "| subject consistency | " in capsys.readouterr().out


def test_vbench_scores_are_put_beside_ours(videos, models, tmp_path, monkeypatch, capsys):
    """A stand-in ``vbench`` package with VBench's interface: its scores land in the report per video."""
    package = tmp_path / "fake" / "vbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import json, os\n"
        "class VBench:\n"
        "    def __init__(self, device, full_info_dir, output_path):\n"
        "        self.output_path = output_path\n"
        "    def evaluate(self, videos_path, name, dimension_list=None, mode='vbench_standard', **kwargs):\n"
        "        files = sorted(f for f in os.listdir(videos_path) if f.endswith('.mp4'))\n"
        "        rows = [{'video_path': os.path.join(videos_path, f), 'video_results': 0.5} for f in files]\n"
        "        with open(os.path.join(self.output_path, name + '_eval_results.json'), 'w') as handle:\n"
        "            json.dump({d: [0.5, rows] for d in dimension_list}, handle)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    out = tmp_path / "report.json"
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate_main, [str(videos), "--vbench", "--out", str(out), "--dino", str(models["dino"]),
                                     "--clip", str(models["clip"])])  # fmt: skip
    finally:
        sys.modules.pop("vbench", None)  # the stand-in must not outlive this test
    assert exit_info.value.code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["overall"]["vbench"] == {"subject_consistency": 0.5, "background_consistency": 0.5}
    assert all(v["vbench"] == {"subject_consistency": 0.5, "background_consistency": 0.5} for v in report["videos"])


def _copy_videos(videos: Path, folder: Path) -> Path:
    shutil.copytree(videos, folder)
    return folder


def _edit_sidecar(folder: Path, **fields) -> None:
    sidecar = sorted(folder.glob("*.json"))[0]
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **fields}))


def _case_no_sidecar(tmp_path, videos, models):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted(videos.glob("*.mp4"))[0], folder)
    return [str(folder)], r"0000-a-red-fox.*\.mp4 has no sidecar 0000-a-red-fox.*\.json beside it"


def _case_incomplete(tmp_path, videos, models):
    _edit_sidecar(_copy_videos(videos, tmp_path / "in"), complete=False)
    return [str(tmp_path / "in")], r"0000-a-red-fox.*\.json says complete: false .*regenerate the video"


def _case_frames(tmp_path, videos, models):
    _edit_sidecar(_copy_videos(videos, tmp_path / "in"), pixel_frames=70)
    return [str(tmp_path / "in")], r"0000-a-red-fox.*\.mp4 has 69 frames but its sidecar says pixel_frames 70"


def _case_empty(tmp_path, videos, models):
    (tmp_path / "in").mkdir()
    return [str(tmp_path / "in")], r"video folder .*in has no \.mp4 videos; generate some"


def _case_missing_model(tmp_path, videos, models):
    return [str(videos), "--dino", str(tmp_path / "no-such-model")], r"--dino .*no-such-model: cannot load the DINO"


def _case_not_a_dino(tmp_path, videos, models):
    return [str(videos), "--dino", str(models["clip"])], r"--dino .*clip: cannot load the DINO model \(it is a 'clip'"


def _case_existing_out(tmp_path, videos, models):
    (tmp_path / "report.json").write_text("{}")
    return [str(videos), "--out", str(tmp_path / "report.json")], r"report\.json already exists; .*never overwritten"


def _case_vbench_missing(tmp_path, videos, models):
    return [str(videos), "--vbench"], r"--vbench needs the vbench package.*pip install vbench"


def _case_unpaired(tmp_path, videos, models):
    folder = _copy_videos(videos, tmp_path / "in")
    for path in sorted(folder.iterdir())[2:]:  # keep the first narrative's video and sidecar only
        path.unlink()
    return ["--compare", str(videos), str(folder)], r"0001-an-old-fisherman.*\.mp4 has no partner in .*in"


BAD_INPUTS = {
    "no sidecar": _case_no_sidecar,
    "incomplete run": _case_incomplete,
    "frame count": _case_frames,
    "empty folder": _case_empty,
    "missing model": _case_missing_model,
    "not a dino": _case_not_a_dino,
    "existing out": _case_existing_out,
    "vbench missing": _case_vbench_missing,
    "unpaired videos": _case_unpaired,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, videos, models, tmp_path, capsys):
    if case == "vbench missing" and importlib.util.find_spec("vbench") is not None:
        pytest.skip("vbench is installed here")
    argv, message = BAD_INPUTS[case](tmp_path, videos, models)
    if "--dino" not in argv:
        argv += ["--dino", str(models["dino"])]
    argv += ["--clip", str(models["clip"])]
    before = sorted(tmp_path.rglob("*")) + sorted(videos.rglob("*"))
    err = refusal(evaluate_main, argv, capsys)
    assert re.search(message, err), err
    assert sorted(tmp_path.rglob("*")) + sorted(videos.rglob("*")) == before
