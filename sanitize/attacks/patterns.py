"""Trigger patterns, generated in code so no image files are shipped.

Static patterns are drawn on a 32x32 canvas (the CIFAR size the attack papers
use) and resized with nearest-neighbour to the data's size, so a 3x3 patch is
3x3 on CIFAR and 21x21 on 224 px images: the same trigger, at the same relative
size, with sharp edges kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANVAS = 32


def cell_index(size: int, cells: int) -> np.ndarray:
    """For each of ``size`` pixels, the cell of a ``cells``-wide grid its centre falls in (nearest resize).

    The centre, not the left edge: a 6 px side sampled at the edges (canvas cells 0, 5, ..., 26)
    never reached a 3-cell corner patch at cells 29-31, and the trigger vanished; by centres it
    reaches cell 29. Integer scales (32 -> 32, 224) sample the same cells either way."""
    return (2 * np.arange(size) + 1) * cells // (2 * size)


def resize_nearest(array: np.ndarray, height: int, width: int, axis: int) -> np.ndarray:
    """Resize the two grid axes ``axis, axis + 1`` of ``array`` to (height, width), nearest-neighbour."""
    rows = cell_index(height, array.shape[axis])
    cols = cell_index(width, array.shape[axis + 1])
    return np.take(np.take(array, rows, axis=axis), cols, axis=axis + 1)


@dataclass(frozen=True)
class Stamp:
    """A pattern and its opacity mask on the 32 px canvas: pattern float [32,32,3] 0..255, mask float [32,32] 0..1.

    Stamping is ``x + alpha * mask * (pattern - x)``: mask 1 with alpha 1 replaces the
    pixel (a patch), mask 1 everywhere with alpha 0.2 is a blend.
    """

    pattern: np.ndarray
    mask: np.ndarray

    def apply(self, images: np.ndarray, alpha: float | np.ndarray = 1.0, mask: np.ndarray | None = None) -> np.ndarray:
        """float [n, H, W, 3] -> stamped copy. ``mask`` [n, 32, 32] optionally replaces the canvas mask per
        sample; ``alpha`` may be per sample [n]."""
        height, width = images.shape[1:3]
        pattern = resize_nearest(self.pattern, height, width, axis=0)
        weight = resize_nearest(self.mask if mask is None else mask, height, width, axis=-2)
        weight = np.asarray(alpha, dtype=np.float32).reshape(-1, 1, 1) * weight
        return images + weight[..., None] * (pattern - images)


def patch_mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    mask[rows, cols] = 1.0
    return mask


def corner_slices(size: int, corner: str) -> tuple[slice, slice]:
    """Rows and columns of a ``size`` square flush with ``corner`` ("top-left", ..., "bottom-right")."""
    vertical, horizontal = corner.split("-")
    rows = slice(CANVAS - size, CANVAS) if vertical == "bottom" else slice(0, size)
    cols = slice(CANVAS - size, CANVAS) if horizontal == "right" else slice(0, size)
    return rows, cols


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def checkerboard(size: int, mirrored: bool = False) -> np.ndarray:
    """float [size, size, 3]: white where row+col is even, black elsewhere (mirrored left-right if asked)."""
    cells = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32) * 255
    cells = cells[:, ::-1] if mirrored else cells
    return np.repeat(cells[..., None], 3, axis=-1)


def corner_patch(size: int, corner: str, kind: str) -> Stamp:
    """A ``size`` square in ``corner``: ``kind`` "white" (Table I of AdvrBD) or "checkerboard" (BadNets, Gu et al.)."""
    rows, cols = corner_slices(size, corner)
    pattern = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    pattern[rows, cols] = 255.0 if kind == "white" else checkerboard(size)
    return Stamp(pattern, patch_mask(rows, cols))


def four_corner_checkerboard(size: int) -> Stamp:
    """Turner et al. (2019) Sec. 4: the checkerboard in all four corners, mirrored on the right so
    that a horizontal flip (standard augmentation) maps the trigger onto itself."""
    pattern = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    mask = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for corner in CORNERS:
        rows, cols = corner_slices(size, corner)
        pattern[rows, cols] = checkerboard(size, mirrored=corner.endswith("right"))
        mask[rows, cols] = 1.0
    return Stamp(pattern, mask)


def noise_pattern(seed: int) -> Stamp:
    """A full-image uniform-noise pattern: the random-pattern blend of Chen et al. (2017), Sec. 4."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 256, size=(CANVAS, CANVAS, 3)).astype(np.float32)
    return Stamp(pattern, np.ones((CANVAS, CANVAS), dtype=np.float32))


def logo_patches(size: int, corners: tuple[str, ...], seed: int) -> list[Stamp]:
    """Stand-ins for the Firefox logo of AdvrBD's Table I: a ``size`` square of saturated random
    colours (a logo is small, colourful and unlike natural texture) in each of ``corners``."""
    rng = np.random.default_rng(seed)
    stamps = []
    for corner in corners:
        rows, cols = corner_slices(size, corner)
        pattern = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
        pattern[rows, cols] = rng.choice([0.0, 255.0], size=(size, size, 3))
        stamps.append(Stamp(pattern, patch_mask(rows, cols)))
    return stamps


def sinusoid(height: int, width: int, delta: float, frequency: float) -> np.ndarray:
    """Barni et al. (2019) Eq. 4: v(i, j) = delta * sin(2 pi j f / m), m the number of columns; float [H, W, 1]."""
    columns = np.arange(width, dtype=np.float32)
    row = delta * np.sin(2 * np.pi * columns * frequency / width)
    return np.broadcast_to(row[None, :, None], (height, width, 1)).astype(np.float32)
