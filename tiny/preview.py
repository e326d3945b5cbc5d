"""Write one story-world narrative so a person can look at it: MP4, prompts/metadata JSON, PNG contact sheet.

usage: python scripts/world_preview.py --seed N --out DIR [--latent-frames 42] [--scale 3]

The contact sheet has one row per segment (its prompt above it) and shows up to eight evenly spaced
frames of that segment; the JSON also carries the oracle's scores of the ground-truth video.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw

from tiny.oracle import Oracle
from tiny.world import FPS, Narrative, narrative_from_seed

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = 8
CAPTION = 14  # pixels of caption text above each row


def contact_sheet(narrative: Narrative, scale: int) -> Image.Image:
    """One row per segment: its prompt, then ``COLUMNS`` evenly spaced frames scaled by ``scale``."""
    tile = narrative.frames.shape[1] * scale
    rows = len(narrative.segments)
    sheet = Image.new("RGB", (COLUMNS * (tile + 2), rows * (tile + CAPTION + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, segment in enumerate(narrative.segments):
        top = row * (tile + CAPTION + 4)
        draw.text((2, top + 1), f"[{segment.start}-{segment.end}) {segment.prompt}", fill="black")
        picks = np.linspace(segment.pixel_start, segment.pixel_end - 1, COLUMNS).round().astype(int)
        for column, index in enumerate(picks):
            image = Image.fromarray(narrative.frames[index]).resize((tile, tile), Image.NEAREST)
            sheet.paste(image, (column * (tile + 2), top + CAPTION))
    return sheet


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--latent-frames", type=int, default=42, help="a multiple of 3, at least 24")
    parser.add_argument("--scale", type=int, default=3, help="contact-sheet magnification")
    args = parser.parse_args(argv)
    narrative = narrative_from_seed(args.seed, args.latent_frames)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"narrative_{args.seed}"
    imageio.mimwrite(f"{stem}.mp4", list(narrative.frames), fps=FPS, macro_block_size=1)
    contact_sheet(narrative, args.scale).save(f"{stem}.png")
    record = narrative.to_json() | {"oracle_on_ground_truth": Oracle().score(narrative, narrative.frames)}
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {stem}.mp4, {stem}.png and {stem}.json")
    return 0
