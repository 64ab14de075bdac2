"""Adaptive-Blend and Adaptive-Patch (Qi et al., ICLR 2023, "Revisiting the assumption of
latent separability for backdoor defenses").

Both weaken the link that latent-separation defenses rely on, in two ways:
- partial triggers: a training sample carries only part of the trigger (some
  pieces of the blend, or one of several patches at low opacity), while the test
  trigger is the whole of it at full strength;
- conservatism: cover samples carry the same partial triggers but keep their
  true label, so the trigger alone is not a perfect predictor of the target.

AdvrBD Table I: poison ratio 0.05, cover rate 0.01; Adaptive-Blend "HelloKitty,
alpha=0.2", Adaptive-Patch "Firefox*4". The piece and opacity settings are Qi et
al.'s (their backdoor-toolbox): 16 pieces with half of them masked; four patches
at training opacities 0.5, 0.2, 0.5, 0.3 and full opacity at test time. Qi et al.
blend at 0.15 in training and 0.2 at test; we follow Table I's single 0.2 for both
(``alpha`` and ``test_alpha`` set them apart).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitize.attacks.base import Attack, check_fraction
from sanitize.attacks.blend import Blend
from sanitize.attacks.patterns import CANVAS, CORNERS, Stamp, logo_patches, resize_nearest
from sanitize.formats.records import InputError


@dataclass
class AdaptiveBlend(Blend):
    """``alpha``: training opacity; ``test_alpha``: test opacity. ``pieces`` (a square number): the
    grid the pattern is cut into; ``mask_rate``: the share of pieces left out of each training sample."""

    name = "adaptive_blend"
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    cover_rate: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        for name in ("test_alpha", "mask_rate", "cover_rate"):
            check_fraction(name, getattr(self, name))
        side = round(max(self.pieces, 0) ** 0.5)  # a negative count has a complex root
        if side * side != self.pieces or not 1 <= side <= CANVAS:
            raise InputError(f"pieces must be a square number up to {CANVAS * CANVAS}, got {self.pieces}")

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.key.apply(images, self.test_alpha)

    def stamp(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.key.apply(images, self.alpha, mask=self.piece_masks(len(images), rng))

    def piece_masks(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """float [count, 32, 32]: per sample, round(mask_rate * pieces) random pieces are 0, the rest 1."""
        side = round(self.pieces ** 0.5)
        hidden = round(self.mask_rate * self.pieces)
        order = rng.permuted(np.tile(np.arange(self.pieces), (count, 1)), axis=1)
        kept = (order >= hidden).astype(np.float32).reshape(count, side, side)
        return resize_nearest(kept, CANVAS, CANVAS, axis=1)


@dataclass
class AdaptivePatch(Attack):
    """One logo patch per corner. A training sample (poison or cover) carries one patch, the
    i-th at opacity ``alphas[i]``, patches dealt out evenly; the test trigger is all of them
    at ``test_alpha``. ``size``: patch side on a 32 px image."""

    name = "adaptive_patch"
    size: int = 8
    alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)
    test_alpha: float = 1.0
    cover_rate: float = 0.01
    pattern_seed: int = 0

    def __post_init__(self):
        self.alphas = tuple(float(a) for a in self.alphas)
        if not 1 <= len(self.alphas) <= len(CORNERS):
            raise InputError(f"alphas must list 1 to {len(CORNERS)} opacities (one per patch), got {self.alphas}")
        if not 1 <= self.size <= CANVAS // 2:
            raise InputError(f"size must be between 1 and {CANVAS // 2}, got {self.size}")
        for value in self.alphas + (self.test_alpha, self.cover_rate):
            check_fraction("alphas, test_alpha and cover_rate", value)

    def patches(self) -> list[Stamp]:
        return logo_patches(self.size, CORNERS[:len(self.alphas)], self.pattern_seed)

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for patch in self.patches():
            images = patch.apply(images, self.test_alpha)
        return images

    def stamp(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Dealt out evenly, from a random first patch: a batch of one (an image stamped at its own
        # size, poison_dataset) must not always get the first.
        which = (rng.permutation(len(images)) + rng.integers(len(self.alphas))) % len(self.alphas)
        stamped = images.copy()
        for index, (patch, alpha) in enumerate(zip(self.patches(), self.alphas)):
            rows = which == index
            stamped[rows] = patch.apply(images[rows], alpha)
        return stamped
