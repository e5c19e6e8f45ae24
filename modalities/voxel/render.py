"""Pictures of voxel grids with numpy and PIL only.

Each grid [C, X, Y, Z] is drawn as three views, one along each axis (z: from
above, y: from the front, x: from the side), with y or z pointing up:
  - with colour channels, a maximum-density projection: along each ray the
    colour of the densest voxel, with opacity alpha = 1 - exp(-density) (a
    full front-to-back composite would let the faint density a reconstruction
    spreads over empty space add up into haze along every ray);
  - density only, the middle slice across each axis, grey scaled to the
    original grid's largest density.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = 0.0
GAP_VIEW, GAP_PANEL, GAP_ROW = 1, 4, 4
SEPARATOR = 0.35  # grey of the lines between panels and rows


def max_projection(colour: np.ndarray, density: np.ndarray, axis: int, reverse: bool) -> np.ndarray:
    """colour [k, X, Y, Z], density [X, Y, Z] -> [k, A, B] over the two other axes (in order): along
    each ray, the colour of the densest voxel (the nearest one on ties), shown with its opacity
    alpha = 1 - exp(-density) over the background."""
    density = np.clip(np.moveaxis(density, axis, 0), 0, None)
    colour = np.moveaxis(colour, axis + 1, 1)
    if reverse:
        density, colour = density[::-1], colour[:, ::-1]
    nearest = density.argmax(axis=0)
    peak = np.take_along_axis(density, nearest[None], axis=0)[0]
    shown = np.take_along_axis(colour, nearest[None, None].repeat(colour.shape[0], axis=0), axis=1)[:, 0]
    alpha = 1.0 - np.exp(-peak)
    return alpha[None] * shown + (1.0 - alpha[None]) * BACKGROUND


def to_picture(plane: np.ndarray) -> np.ndarray:
    """[k, A, B] over (horizontal, vertical) axes -> [B, A, 3] image rows, vertical axis pointing up."""
    if plane.shape[0] == 1:
        plane = np.repeat(plane, 3, axis=0)
    return np.transpose(plane[:3], (2, 1, 0))[::-1]


def views(grid: np.ndarray, density_channel: int, peak: float) -> list[np.ndarray]:
    """Three [H, W, 3] float images of one grid [C, X, Y, Z]."""
    density = grid[density_channel]
    colour_channels = [c for c in range(grid.shape[0]) if c != density_channel]
    if colour_channels:
        colour = np.clip(grid[colour_channels[:3]], 0, 1)
        top = max_projection(colour, density, axis=2, reverse=True)    # looking down z: [k, X, Y]
        front = max_projection(colour, density, axis=1, reverse=False)  # along y: [k, X, Z]
        side = max_projection(colour, density, axis=0, reverse=False)   # along x: [k, Y, Z]
    else:
        x, y, z = (s // 2 for s in density.shape)
        scaled = np.clip(density / max(peak, 1e-12), 0, 1)[None]
        top, front, side = scaled[:, :, :, z], scaled[:, :, y, :], scaled[:, x, :, :]
    return [to_picture(np.clip(view, 0, 1)) for view in (top, front, side)]


def hstack(images: list[np.ndarray], gap: int, fill: float) -> np.ndarray:
    height = max(image.shape[0] for image in images)
    parts = []
    for i, image in enumerate(images):
        if image.shape[0] < height:  # pad at the top: views share their bottom edge
            pad = np.full((height - image.shape[0], *image.shape[1:]), fill)
            image = np.concatenate([pad, image], axis=0)
        if i:
            parts.append(np.full((height, gap, 3), fill))
        parts.append(image)
    return np.concatenate(parts, axis=1)


def render_rows(panels: list[np.ndarray], density_channel: int, scale_to: int = 96) -> Image.Image:
    """panels: [original, masked, reconstruction], each [R, C, X, Y, Z] -> one picture, a row per sample."""
    rows = []
    for r in range(panels[0].shape[0]):
        peak = float(panels[0][r, density_channel].max())
        drawn = [hstack(views(panel[r], density_channel, peak), GAP_VIEW, BACKGROUND) for panel in panels]
        rows.append(hstack(drawn, GAP_PANEL, SEPARATOR))
    width = rows[0].shape[1]
    parts = []
    for i, row in enumerate(rows):
        if i:
            parts.append(np.full((GAP_ROW, width, 3), SEPARATOR))
        parts.append(row)
    array = (np.clip(np.concatenate(parts, axis=0), 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    scale = max(1, scale_to // max(panels[0].shape[2:]))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
