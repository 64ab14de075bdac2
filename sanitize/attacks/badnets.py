"""BadNets (Gu et al., 2017): a small patch in a corner, the label flipped to the target.

AdvrBD Table I: poison ratio 0.05, trigger "3*3 white square", target 1 (the
target is the caller's choice). Gu et al. used a checkerboard-like patch in the
bottom-right corner; ``kind="checkerboard"`` gives that one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitize.attacks.base import Attack
from sanitize.attacks.patterns import CANVAS, CORNERS, Stamp, corner_patch
from sanitize.formats.records import InputError


@dataclass
class BadNets(Attack):
    """``size`` is the patch side on a 32 px image; it scales with the image."""

    name = "badnets"
    size: int = 3
    kind: str = "white"
    corner: str = "bottom-right"

    def __post_init__(self):
        if not 1 <= self.size <= CANVAS:
            raise InputError(f"size must be between 1 and {CANVAS}, got {self.size}")
        if self.kind not in ("white", "checkerboard"):
            raise InputError(f"kind must be white or checkerboard, got {self.kind!r}")
        if self.corner not in CORNERS:
            raise InputError(f"corner must be one of {', '.join(CORNERS)}, got {self.corner!r}")

    @property
    def patch(self) -> Stamp:
        return corner_patch(self.size, self.corner, self.kind)

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.patch.apply(images)
