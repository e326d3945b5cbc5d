import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline.memory_trace import (
    BANK_DARK,
    BANK_LIGHT,
    CHUNK,
    FUTURE,
    PAST,
    SINK,
    SMA_DARK,
    SMA_LIGHT,
    SWITCH,
    WINDOW,
    draw_memory_trace,
    render_memory_trace,
    shade,
)
from pipeline.outputs import (
    VideoWriter,
    check_writable,
    make_folder,
    output_stem,
    reserve_stem,
    slugify,
    to_uint8_frames,
    unique_path,
    unique_stem,
)
from pipeline.sidecar import write_sidecar
from utils.errors import MemFlowError

ROOT = Path(__file__).resolve().parents[2]
H, W = 32, 48


def read_video(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def grey_chunk(values: list[int]) -> np.ndarray:
    return np.stack([np.full((H, W, 3), v, np.uint8) for v in values])


# ------------------------------------------------------------------ names


def test_slugify_is_safe_and_bounded():
    assert slugify("A Panda walks / in the PARK!") == "a-panda-walks-in-the-park"
    assert slugify("Café crème brûlée") == "cafe-creme-brulee"
    assert slugify("???") == "video"
    long = slugify("word " * 40, max_len=30)
    assert len(long) <= 30 and not long.endswith("-") and long.startswith("word-word")
    assert len(slugify("x" * 100, max_len=20)) == 20


def test_output_stem():
    assert output_stem(3, "A cat.", save_with_index=True) == "0003-a-cat"
    assert output_stem(3, "A cat.", save_with_index=False) == "a-cat"


def test_unique_path_never_returns_existing(tmp_path):
    first = unique_path(tmp_path, "v", ".mp4")
    assert first == tmp_path / "v.mp4"
    first.touch()
    second = unique_path(tmp_path, "v", ".mp4")
    assert second == tmp_path / "v-1.mp4"
    second.touch()
    assert unique_path(tmp_path, "v", ".mp4") == tmp_path / "v-2.mp4"
    (tmp_path / "w.json").touch()
    assert unique_stem(tmp_path, "w", [".mp4", ".json"]) == "w-1"


def test_check_writable_creates_nothing_and_rejects(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable(target) == target and list(tmp_path.iterdir()) == []
    assert make_folder(target).is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MemFlowError, match=f"output folder {blocker} is a file"):
        check_writable(blocker)
    with pytest.raises(MemFlowError, match=f"output folder {blocker / 'sub'} is not writable: {blocker} is a file"):
        check_writable(blocker / "sub")


def test_reserving_a_stem_claims_it_and_racing_reservations_take_the_next_numbers(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    assert reserve_stem(tmp_path, "v", [".json", ".mp4"]) == "v-1" and (tmp_path / "v-1.json").exists()
    with ThreadPoolExecutor(8) as pool:  # what several processes starting at once do
        stems = list(pool.map(lambda _: reserve_stem(tmp_path, "w", [".json", ".mp4"]), range(40)))
    assert sorted(stems) == sorted(["w", *(f"w-{n}" for n in range(1, 40))])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(MemFlowError, match="is not writable"):
            check_writable(locked)
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ video


def test_to_uint8_frames_layouts():
    t = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 2, 4)
    out = to_uint8_frames(t)
    assert out.shape == (1, 2, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    arr = np.zeros((2, 4, 6, 3), np.uint8)
    assert to_uint8_frames(arr).shape == (2, 4, 6, 3)
    with pytest.raises(ValueError):
        to_uint8_frames(np.zeros((2, 4, 6, 3), np.float32))
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(2, 4, 6, 3))


def test_video_writer_writes_all_chunks(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path, fps=16) as writer:
        writer.write(grey_chunk([20] * 9))
        frames = torch.full((12, 3, H, W), 0.5)  # -> 191
        writer.write(frames)
        assert writer.frames_written == 21
    video = read_video(path)
    assert video.shape == (21, H, W, 3)
    assert abs(float(video[:9].mean()) - 20) < 3
    assert abs(float(video[9:].mean()) - 191) < 3


def test_video_writer_refuses_existing_file(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"keep me")
    with pytest.raises(MemFlowError, match="already exists"):
        VideoWriter(path)
    assert path.read_bytes() == b"keep me"


def test_video_writer_checks_folder_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MemFlowError, match="is not writable"):
        VideoWriter(blocker / "sub" / "v.mp4")


def test_video_writer_without_frames_leaves_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoWriter(path):
        assert not path.exists()  # claimed at the first frames: a run killed before them leaves no empty MP4
    assert not path.exists()


def test_video_writer_rejects_odd_size_and_size_change(tmp_path):
    with pytest.raises(MemFlowError, match="must be even"), VideoWriter(tmp_path / "odd.mp4") as writer:
        writer.write(np.zeros((1, 31, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="differs"), VideoWriter(tmp_path / "change.mp4") as writer:
        writer.write(np.zeros((1, 32, 48, 3), np.uint8))
        writer.write(np.zeros((1, 32, 64, 3), np.uint8))
    assert len(read_video(tmp_path / "change.mp4")) == 1


def test_error_inside_block_still_finalises_the_file(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="engine broke"), VideoWriter(path) as writer:
        writer.write(grey_chunk([100] * 5))
        raise RuntimeError("engine broke")
    assert len(read_video(path)) == 5


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from pipeline.outputs import VideoWriter
    path, chunks, per_chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writer = VideoWriter(path)
    for c in range(chunks):
        writer.write(np.full((per_chunk, 32, 48, 3), 40 * (c + 1), np.uint8))
        print("flushed", writer.frames_written, flush=True)
    time.sleep(120)
    """
)


def test_killed_run_leaves_playable_file(tmp_path):
    """SIGKILL the writer and its ffmpeg together: every flushed frame but the last stays readable."""
    path = tmp_path / "killed.mp4"
    chunks, per_chunk = 3, 6
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(chunks), str(per_chunk)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(chunks)]
        assert lines[-1] == f"flushed {chunks * per_chunk}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    video = read_video(path)
    assert len(video) >= chunks * per_chunk - 1
    means = video.reshape(len(video), -1).mean(axis=1)
    for k, mean in enumerate(means):
        assert abs(mean - 40 * (k // per_chunk + 1)) < 4


# ------------------------------------------------------------------ sidecar


def test_sidecar_round_trip_and_conversion(tmp_path):
    path = tmp_path / "run.json"
    data = {
        "config": OmegaConf.create({"a": 1, "b": "${a}"}),
        "seed": np.int64(7),
        "switch_frames": (42, 81),
        "timings": torch.tensor([0.5, 0.25]),
        "output": tmp_path / "v.mp4",
        "prompt": "café",
    }
    write_sidecar(path, data)
    back = json.loads(path.read_text(encoding="utf-8"))
    assert back == {
        "config": {"a": 1, "b": 1},
        "seed": 7,
        "switch_frames": [42, 81],
        "timings": [0.5, 0.25],
        "output": str(tmp_path / "v.mp4"),
        "prompt": "café",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_sidecar_never_overwrites_unless_replacing(tmp_path):
    path = tmp_path / "run.json"
    write_sidecar(path, {"chunks": 1})
    with pytest.raises(MemFlowError, match="already exists"):
        write_sidecar(path, {"chunks": 2})
    write_sidecar(path, {"chunks": 2}, replace=True)
    assert json.loads(path.read_text()) == {"chunks": 2}


def test_sidecar_failure_leaves_no_partial_file(tmp_path):
    path = tmp_path / "run.json"
    with pytest.raises(ValueError):
        write_sidecar(path, {"bad": float("nan")})
    with pytest.raises(TypeError, match="object"):
        write_sidecar(path, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ memory trace


def make_trace(with_sma: bool = True) -> dict:
    """4 chunks of 3 frames, 2 layers x 2 heads; chunk 3 starts with a prompt switch."""
    sma = [[[0], [0, 3]], [[0], [3]]] if with_sma else None
    return {
        "num_frames": 12,
        "chunk_frames": 3,
        "num_layers": 2,
        "num_heads": 2,
        "chunks": [
            {"chunk": 0, "start_frame": 0, "num_frames": 3, "switch": False, "sink": [], "window": [],
             "bank": None, "sma": None},
            {"chunk": 1, "start_frame": 3, "num_frames": 3, "switch": False, "sink": [0, 1, 2], "window": [],
             "bank": [[], []], "sma": None},
            {"chunk": 2, "start_frame": 6, "num_frames": 3, "switch": False, "sink": [0, 1, 2], "window": [3, 4, 5],
             "bank": [[3], [3]], "sma": None},
            {"chunk": 3, "start_frame": 9, "num_frames": 3, "switch": True, "sink": [0, 1, 2], "window": [6, 7, 8],
             "bank": [[3], [6]], "sma": sma},
        ],
    }


def pixel(image: Image.Image, layout, row: int, frame: int, stripe: str) -> tuple:
    return image.getpixel(layout.cell_center(row, frame, stripe))


def test_memory_trace_png_roles(tmp_path):
    path = tmp_path / "trace.png"
    layout = render_memory_trace(make_trace(), path)
    image = Image.open(path).convert("RGB")
    drawn, _ = draw_memory_trace(make_trace())
    assert image.size == drawn.size
    assert image.size[0] >= layout.left + layout.grid_width
    assert image.size[1] >= layout.top + layout.grid_height
    assert (layout.num_rows, layout.num_frames, layout.stripes) == (4, 12, ("context", "bank", "sma"))

    assert pixel(image, layout, 0, 0, "context") == CHUNK
    assert pixel(image, layout, 0, 5, "context") == FUTURE
    assert pixel(image, layout, 2, 1, "context") == SINK
    assert pixel(image, layout, 2, 4, "context") == WINDOW
    assert pixel(image, layout, 3, 4, "context") == PAST
    assert pixel(image, layout, 3, 10, "context") == CHUNK
    assert pixel(image, layout, 2, 3, "bank") == BANK_DARK  # both layers hold frame 3
    assert pixel(image, layout, 3, 3, "bank") == shade(BANK_LIGHT, BANK_DARK, 0.5)  # one of two layers
    assert pixel(image, layout, 3, 1, "bank") == FUTURE  # sink frames are not bank frames
    assert pixel(image, layout, 3, 0, "sma") == shade(SMA_LIGHT, SMA_DARK, 0.75)  # 3 of 4 (layer, head)
    assert pixel(image, layout, 3, 3, "sma") == shade(SMA_LIGHT, SMA_DARK, 0.5)
    assert pixel(image, layout, 2, 0, "sma") == FUTURE

    # the switch row has the marker left of the grid and a rule above it
    x0, y0, _, _ = layout.cell_box(3, 0, "context")
    row_mid = layout.top + 3 * layout.row_height + (layout.row_height - layout.row_gap) // 2
    assert image.getpixel((layout.left - 10, row_mid)) == SWITCH
    assert image.getpixel((x0 + 2, y0 - 2)) == SWITCH
    assert image.getpixel((x0 + 2, layout.top + 2 * layout.row_height - 2)) != SWITCH


def test_memory_trace_without_memory_has_one_stripe(tmp_path):
    trace = make_trace()
    for chunk in trace["chunks"]:
        chunk["bank"] = chunk["sma"] = None
    _, layout = draw_memory_trace(trace)
    assert layout.stripes == ("context",)


def test_memory_trace_refuses_existing_png(tmp_path):
    path = tmp_path / "trace.png"
    path.write_bytes(b"x")
    with pytest.raises(MemFlowError, match="already exists"):
        render_memory_trace(make_trace(), path)
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t["chunks"][2].update(window=[3, 12]), r"chunks\[2\].window: frame 12 is not an id in 0..11"),
        (lambda t: t["chunks"][2].update(bank=[[3]]), r"chunks\[2\].bank: must hold one frame list per layer \(2\)"),
        (
            lambda t: t["chunks"][3]["sma"].__setitem__(1, [[0]]),
            r"chunks\[3\].sma\[1\]: must hold one frame list per head",
        ),
        (lambda t: t["chunks"][3].update(start_frame=11), r"chunks\[3\]: start_frame=11, num_frames=3 do not fit"),
        (lambda t: t.update(num_layers=0), "num_layers: must be a positive integer"),
        (lambda t: t.update(chunks=[]), "chunks: must be a non-empty list"),
    ],
)
def test_memory_trace_validation_names_field(edit, needle):
    trace = make_trace()
    edit(trace)
    with pytest.raises(MemFlowError, match=needle):
        draw_memory_trace(trace)
