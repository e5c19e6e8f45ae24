"""Pictures of grey radiographs and volumes with numpy and PIL.

A row per sample: original | masked | reconstruction. A radiograph is one cell; a
volume [X, Y, Z] is three cells, its middle slices across each axis (axial: z,
coronal: y, sagittal: x), each with its second axis pointing up, as a viewer shows
RAS-ordered volumes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CELL = 96          # pixels of the longer side of a cell, at least
GAP, VIEW_GAP = 6, 2


def orthogonal_slices(volume: np.ndarray) -> list[np.ndarray]:
    """[X, Y, Z] -> three 2D [rows, cols] pictures: axial (x across, y up), coronal (x across,
    z up), sagittal (y across, z up)."""
    x, y, z = (s // 2 for s in volume.shape)
    planes = (volume[:, :, z], volume[:, y, :], volume[x, :, :])
    return [plane.T[::-1] for plane in planes]


def side_by_side(images: list[np.ndarray], gap: int, fill: float = 1.0) -> np.ndarray:
    height = max(image.shape[0] for image in images)
    parts = []
    for i, image in enumerate(images):
        if i:
            parts.append(np.full((height, gap), fill))
        padded = np.full((height, image.shape[1]), fill)
        padded[: image.shape[0]] = image
        parts.append(padded)
    return np.concatenate(parts, axis=1)


def render_rows(panels: list[np.ndarray], volumes: bool) -> Image.Image:
    """`panels`: original, masked, reconstruction, each [B, H, W] (or [B, X, Y, Z]) in [0, 1]."""
    rows = []
    for sample in range(panels[0].shape[0]):
        cells = []
        for panel in panels:
            cell = panel[sample]
            cells.append(side_by_side(orthogonal_slices(cell), VIEW_GAP, 0.0) if volumes else cell)
        rows.append(cells)
    height, width = rows[0][0].shape
    scale = max(1, int(np.ceil(CELL / max(height, width))))
    grid_w = 3 * width * scale + 4 * GAP
    grid_h = len(rows) * height * scale + (len(rows) + 1) * GAP
    picture = Image.new("L", (grid_w, grid_h), 255)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            image = Image.fromarray(np.round(np.clip(cell, 0, 1) * 255).astype(np.uint8))
            picture.paste(image.resize((width * scale, height * scale), Image.NEAREST),
                          (GAP + c * (width * scale + GAP), GAP + r * (height * scale + GAP)))
    return picture.convert("RGB")
