"""PhysicalBA (Li et al., ICLR 2021 workshop, "Backdoor attack in the physical world").

A patch trigger whose poisoned training images are also put through random
spatial and colour transformations (flip, rotation, shift, zoom, brightness,
contrast), so the backdoor survives the distortions of a photographed scene. The
test-time trigger applies the same random transformations (seeded) after
stamping: the ASR is measured under physical-like conditions.

AdvrBD Table I: poison ratio 0.05, trigger "Firefox" (a logo patch; we generate
a colourful stand-in). The transformation ranges are those of the authors'
BackdoorBox example for CIFAR-10: RandomHorizontalFlip(), ColorJitter(brightness=0.2,
contrast=0.2), RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.8, 0.9)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.attacks.base import Attack, check_fraction
from sanitize.attacks.patterns import CANVAS, CORNERS, Stamp, logo_patches
from sanitize.formats.records import InputError

GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as torchvision's contrast uses


@dataclass
class PhysicalBA(Attack):
    """``size``: logo side on a 32 px image. ``translate``: max shift as a fraction of the side.
    ``degrees``: max rotation. ``brightness``/``contrast``: max relative change."""

    name = "physicalba"
    size: int = 8
    corner: str = "bottom-right"
    flip_prob: float = 0.5
    degrees: float = 10.0
    translate: float = 0.1
    scale_min: float = 0.8
    scale_max: float = 0.9
    brightness: float = 0.2
    contrast: float = 0.2
    pattern_seed: int = 0

    def __post_init__(self):
        if not 1 <= self.size <= CANVAS:
            raise InputError(f"size must be between 1 and {CANVAS}, got {self.size}")
        if self.corner not in CORNERS:
            raise InputError(f"corner must be one of {', '.join(CORNERS)}, got {self.corner!r}")
        if not 0 <= self.degrees <= 180:
            raise InputError(f"degrees must be between 0 and 180, got {self.degrees}")
        if not 0 < self.scale_min <= self.scale_max:
            raise InputError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        for name in ("flip_prob", "translate", "brightness", "contrast"):
            check_fraction(name, getattr(self, name))

    @property
    def logo(self) -> Stamp:
        return logo_patches(self.size, (self.corner,), self.pattern_seed)[0]

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.jitter_colour(self.move(self.logo.apply(images), rng), rng)

    def move(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random flip, rotation, shift and zoom per image, as one resampling."""
        count = len(images)
        angle = np.deg2rad(rng.uniform(-self.degrees, self.degrees, count))
        flip = np.where(rng.random(count) < self.flip_prob, -1.0, 1.0)
        shift = rng.uniform(-self.translate, self.translate, (count, 2)) * 2  # grid coordinates span 2
        zoom = rng.uniform(self.scale_min, self.scale_max, count)
        # affine_grid maps output to input coordinates: the inverse of p -> zoom * R * Flip * p + shift.
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        inverse = np.stack([np.stack([cos * flip, sin * flip], -1), np.stack([-sin, cos], -1)], 1)
        offset = -np.einsum("nij,nj->ni", inverse, shift)
        theta = torch.from_numpy(np.concatenate([inverse, offset[..., None]], -1).astype(np.float32))
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        # Only poisons are transformed in a stored dataset, so a black fill would mark them
        # as clearly as the logo does; reflection keeps the border looking natural.
        moved = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return moved.permute(0, 2, 3, 1).numpy()

    def jitter_colour(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """torchvision's ColorJitter(brightness, contrast), brightness first, clamped after each."""
        count = len(images)
        brightness = rng.uniform(1 - self.brightness, 1 + self.brightness, (count, 1, 1, 1)).astype(np.float32)
        contrast = rng.uniform(1 - self.contrast, 1 + self.contrast, (count, 1, 1, 1)).astype(np.float32)
        images = np.clip(images * brightness, 0, 255)
        mean = (images @ GRAY).mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
        return np.clip(contrast * images + (1 - contrast) * mean, 0, 255)
