"""Prompt files -> validated prompt schedules: one prompt per line, or the release's JSONL.

* a text file, one prompt per line: each non-blank line is one single-prompt video;
* the release JSONL: one ``{"prompts": [p1, p2, ...]}`` object per line (one video per line), with
  the switch frames given by the config's ``switch_frame_indices`` (an index inside a chunk takes
  effect at the next chunk boundary, as in the release: 40 -> 42 with 3-frame chunks).

Scope's timeline JSON is read by :mod:`pipeline.timeline`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from utils.errors import ConfigError, MemFlowError
from utils.lfs import check_not_lfs_pointer

from .schedule import PromptSchedule, PromptSegment

log = logging.getLogger(__name__)


def read_prompt_file(path: str | Path, what: str) -> tuple[Path, str]:
    """The UTF-8 text of a prompt file (a BOM is dropped); a folder, a missing file, a Git LFS pointer or
    another encoding is one MemFlowError."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MemFlowError(f"{what} {path} {state}")
    check_not_lfs_pointer(path, what)
    raw = path.read_bytes()
    try:
        return path, raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise MemFlowError(f"{path}:{line}: not valid UTF-8 text; save the file as UTF-8") from None


def text_lines(text: str) -> list[str]:
    """The lines of a text file: split at ``\n`` (and ``\r\n``) only. ``str.splitlines`` would also split at
    U+2028, U+0085 and other separators, which may stand inside a prompt or a JSON string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def prompt_lines(path: str | Path, what: str = "prompt file") -> tuple[Path, list[tuple[int, str]]]:
    """``(line number, stripped text)`` of every non-blank line of a prompt file."""
    path, text = read_prompt_file(path, what)
    return path, [(n, line.strip()) for n, line in enumerate(text_lines(text), start=1) if line.strip()]


def load_text_prompts(path: str | Path, num_frames: int, chunk_frames: int) -> list[PromptSchedule]:
    """One single-prompt video per non-blank line of a text file."""
    path, lines = prompt_lines(path)
    videos = [PromptSchedule.single(line, num_frames, chunk_frames) for _, line in lines]
    if not videos:
        raise MemFlowError(f"{path} has no prompts; write one prompt per line")
    return videos


def effective_switch_frame(index: int, chunk_frames: int) -> int:
    """The chunk-boundary frame where a switch requested at latent frame ``index`` takes effect.

    As in the release, a prompt switch happens at the first chunk that starts at or after the
    requested frame, so an index inside a chunk is rounded up to the next boundary (40 -> 42).
    """
    return -(-index // chunk_frames) * chunk_frames


def check_switch_frames(
    indices: Sequence[int], num_prompts: int, num_frames: int, chunk_frames: int,
    field: str = "switch_frame_indices",
) -> list[int]:
    """Validate the switch indices for ``num_prompts`` prompts; return the effective switch frames.

    There must be one index fewer than prompts, strictly increasing and inside (0, num_frames).
    Each is rounded up to a chunk boundary (:func:`effective_switch_frame`); two indices that land
    on the same chunk, or one that lands at the end of the video, are errors rather than a switch
    that silently never happens.
    """
    indices = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ConfigError(f"{field} must be a list of integers like [40, 80], got {indices}")
    if len(indices) != num_prompts - 1:
        raise ConfigError(
            f"{field} has {len(indices)} entries but {num_prompts} prompts need {num_prompts - 1} "
            "(one switch before each prompt after the first)"
        )
    for before, after in pairwise(indices):
        if after <= before:
            raise ConfigError(f"{field}={indices} must increase strictly ({after} follows {before})")
    effective = []
    for index in indices:
        if not 0 < index < num_frames:
            raise ConfigError(
                f"{field}: {index} is outside (0, {num_frames}); switches must fall inside the video "
                "(or raise num_output_frames)"
            )
        frame = effective_switch_frame(index, chunk_frames)
        if frame >= num_frames:
            raise ConfigError(
                f"{field}: {index} takes effect at the next chunk boundary {frame}, which is the end of "
                f"the video; use at most {num_frames - chunk_frames} or raise num_output_frames"
            )
        if effective and frame == effective[-1]:
            raise ConfigError(
                f"{field}: {indices[len(effective) - 1]} and {index} fall in the same chunk of "
                f"{chunk_frames} frames (both switch at frame {frame}); move them at least one chunk apart"
            )
        effective.append(frame)
    moved = [(i, f) for i, f in zip(indices, effective, strict=True) if i != f]
    if moved:
        log.info("%s: switches rounded up to chunk boundaries: %s", field,
                 ", ".join(f"{i} -> {f}" for i, f in moved))
    return effective


def load_jsonl_prompts(
    path: str | Path, switch_frame_indices: Sequence[int], num_frames: int, chunk_frames: int
) -> list[PromptSchedule]:
    """Release JSONL: one ``{"prompts": [...]}`` video per non-blank line, switching at the given frames.

    Prompt texts are kept verbatim (as the release encodes them); other keys on a line are ignored.
    """
    path, lines = prompt_lines(path)
    videos = []
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MemFlowError(
                f"{where}:{err.colno}: malformed JSON ({err.msg}); each line must be one object like "
                '{"prompts": ["first prompt", "second prompt"]}'
            ) from None
        if not isinstance(record, dict) or "prompts" not in record:
            raise MemFlowError(f'{where}: expected an object with a "prompts" list, got {line.strip()[:60]!r}')
        prompts = record["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise MemFlowError(f'{where}: "prompts" must be a non-empty list of strings')
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise MemFlowError(f'{where}: "prompts"[{i}] is empty or not a string; write the prompt text')
        try:
            starts = [0, *check_switch_frames(switch_frame_indices, len(prompts), num_frames, chunk_frames)]
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        segments = [PromptSegment(start, ((p, 1.0),)) for start, p in zip(starts, prompts, strict=True)]
        videos.append(PromptSchedule(tuple(segments), num_frames, chunk_frames))
    if not videos:
        raise MemFlowError(f'{path} has no prompts; write one {{"prompts": [...]}} object per line')
    return videos
