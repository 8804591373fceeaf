"""A labelled contact sheet of phantom films: normal and every finding, two seeds each, each
film beside a panel of its ground truth (mask filled, boxes, lung and heart outlines at the
same scale), so a person can check that each finding looks right and sits where the truth
says. A last row shows findings placed by real annotations (RSNA opacity boxes, SIIM
pneumothorax masks), the requested region outlined in yellow. Films are shown shrunk to 176
pixels and 32 grey levels to keep the PNG small.

    python -m sista_core.phantom.contact_sheet --out docs/phantom_contact_sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..findings import OBSERVATIONS, Finding
from .render import Phantom, render

LUNG_OPACITY, PNEUMOTHORAX = "Lung Opacity", "Pneumothorax"

LABEL_HEIGHT = 20
TILE = 176  # shown size: films render at `size` and are shrunk to keep the PNG small
GREY_LEVELS = 32
OUTLINE = (255, 60, 40)
BOX = (60, 220, 90)
ANATOMY = (110, 110, 110)
PLACED = (240, 210, 40)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (set pixels with an unset 4-neighbour), bool (H, W)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _shrink(mask: np.ndarray, tile: int) -> np.ndarray:
    """A mask at tile scale; any coverage counts, so a three-pixel granuloma stays visible."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((tile, tile), Image.BOX)) > 40


def film_tile(phantom: Phantom, tile: int = TILE) -> Image.Image:
    """The film as shown: shrunk and reduced to GREY_LEVELS (a person cannot see the
    difference; the PNG gets three times smaller)."""
    small = Image.fromarray(phantom.image).resize((tile, tile), Image.LANCZOS)
    step = 256 // GREY_LEVELS
    return Image.fromarray((np.asarray(small) // step * step).astype(np.uint8)).convert("RGB")


def truth_panel(phantom: Phantom, tile: int = TILE) -> Image.Image:
    """A schematic of the ground truth at the film's scale: lung and heart outlines in grey,
    finding masks filled red with their outlines, boxes in green, placed regions (what a
    `Placement` asked for, before clipping to the lungs) outlined in yellow."""
    panel = np.zeros((tile, tile, 3), dtype=np.uint8)
    for name in ("lungs", "heart"):
        panel[outline(_shrink(phantom.anatomy[name], tile))] = ANATOMY
    for mask in phantom.masks.values():
        small = _shrink(mask, tile)
        panel[small] = (150, 30, 20)
        panel[outline(small)] = OUTLINE
    for region in phantom.placed.values():
        panel[outline(_shrink(region, tile))] = PLACED
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    scale = tile / phantom.image.shape[0]
    for boxes in phantom.boxes.values():
        for x0, y0, x1, y1 in (boxes * scale).tolist():
            draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=BOX)
    return image


def caption(observation: str, phantom: Phantom) -> str:
    drawn = [f for f in phantom.findings if f.observation == observation]
    if not drawn:
        return f"{observation} | {phantom.view}"
    f = drawn[0]
    details = " ".join(x for x in (f.side, f.severity, f.zone) if x)
    return f"{observation}: {details} | {phantom.view}"


# Rows of the real tables shown: an RSNA image with one mid-sized box and one with two lower-
# zone boxes; a SIIM apical-lateral crescent and a bilateral pneumothorax.
RSNA_ROWS = (16, 3)
SIIM_ROWS = (42, 38)


def placed_examples(size: int) -> list[tuple[str, str, Phantom]]:
    """(source, observation, film) for the RSNA-placed opacities and SIIM-placed
    pneumothoraces of ``RSNA_ROWS`` and ``SIIM_ROWS``, each named by its source image id."""
    from ..datasets.embedded_tasks import rsna_placement, rsna_table, siim_placement, siim_table

    rsna, siim = rsna_table().positives, siim_table().positives
    examples = [
        (f"RSNA {rsna[row][0][:8]}", LUNG_OPACITY, rsna_placement(rsna[row][1]))
        for row in RSNA_ROWS
    ]
    examples += [
        (f"SIIM ..{siim[row][0][-10:]}", PNEUMOTHORAX, siim_placement(siim[row][1]))
        for row in SIIM_ROWS
    ]
    return [
        (source, observation, render([Finding(observation)], 500 + k, size, {observation: where}))
        for k, (source, observation, where) in enumerate(examples)
    ]


def contact_sheet(
    size: int = 224, seeds: tuple[int, int] = (11, 12), columns: int = 2
) -> Image.Image:
    """Per observation, two films with their ground-truth panels side by side, captioned with
    the attributes the renderer used: the first with every attribute left to the renderer
    (as most reports leave them), the second stated "large" to show the far end of the range.
    ``columns`` observations per row; then a row of findings placed by real annotations."""
    pair = 2 * TILE
    cell_w, cell_h = pair * len(seeds) + 12, TILE + LABEL_HEIGHT
    rows = -(-len(OBSERVATIONS) // columns) + 1
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for index, observation in enumerate(OBSERVATIONS):
        row, col = divmod(index, columns)
        for k, seed in enumerate(seeds):
            severity = "large" if k == 1 else None
            findings = (
                [] if observation == "No Finding" else [Finding(observation, severity=severity)]
            )
            phantom = render(findings, seed=seed + 100 * index, size=size)
            x, y = col * cell_w + k * pair, row * cell_h
            sheet.paste(film_tile(phantom), (x, y))
            sheet.paste(truth_panel(phantom), (x + TILE, y))
            draw.text((x + 3, y + TILE + 4), caption(observation, phantom), fill=(255, 255, 255))
    for k, (source, observation, phantom) in enumerate(placed_examples(size)):
        col, slot = divmod(k, len(seeds))
        x, y = col * cell_w + slot * pair, (rows - 1) * cell_h
        sheet.paste(film_tile(phantom), (x, y))
        sheet.paste(truth_panel(phantom), (x + TILE, y))
        text = f"{source} -> {caption(observation, phantom)}"
        draw.text((x + 3, y + TILE + 4), text, fill=(255, 255, 255))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_contact_sheet.png"))
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(size=args.size)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
