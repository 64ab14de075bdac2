"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet -- Imperceptible warping-based backdoor attack").

The trigger is a fixed, smooth warp of the image: a random k x k field of
offsets, normalised, upsampled bicubically to the image and scaled by s / H.
In "noise mode" some other samples are warped by the same field plus a random
per-sample jitter and keep their label (cover samples), so the model must learn
the exact warp rather than "warped-looking".

WaNet paper (Sec. 4.1): k = 4, s = 0.5, grid_rescale = 1. AdvrBD Table I: poison
ratio 0.05 and cover rate 0.05 (WaNet's own cross ratio 2 would be 0.10 at that
poison ratio; set ``cover_rate`` for it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.attacks.base import Attack, check_fraction
from sanitize.attacks.patterns import CANVAS
from sanitize.formats.records import InputError


@dataclass
class WaNet(Attack):
    """``pattern_seed`` fixes the warp field, so training poisons and test triggers share it."""

    name = "wanet"
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cover_rate: float = 0.05
    pattern_seed: int = 0

    def __post_init__(self):
        if not 2 <= self.k <= CANVAS:  # a control grid finer than a CIFAR image is noise (and k=100000 took 149 GiB)
            raise InputError(f"k must be between 2 and {CANVAS}, got {self.k}")
        # s / H of the image is the mean displacement in grid units (2 = the whole image), so an s past
        # CANVAS moves a CIFAR pixel half the image away; a grid_rescale past 2 samples outside it
        # (s or grid_rescale at 1e308 made near-white poisons). WaNet: s 0.5, grid_rescale 1.
        for name, top in (("s", CANVAS), ("grid_rescale", 2)):
            if not 0 < getattr(self, name) <= top:
                raise InputError(f"{name} must be above 0 and at most {top}, got {getattr(self, name)}")
        check_fraction("cover_rate", self.cover_rate)

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """float [1, H, W, 2] sampling grid in grid_sample's [-1, 1] coordinates."""
        rng = np.random.default_rng(self.pattern_seed)
        offsets = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, self.k, self.k)).astype(np.float32))
        offsets = offsets / offsets.abs().mean()  # WaNet's normalisation: s alone sets the strength
        field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]
        return ((identity + self.s * field.permute(0, 2, 3, 1) / height) * self.grid_rescale).clamp(-1, 1)

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return warp(images, self.warp_grid(*images.shape[1:3]))

    def stamp_cover(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        grid = self.warp_grid(*images.shape[1:3])
        jitter = rng.uniform(-1, 1, size=(len(images), *grid.shape[1:])).astype(np.float32)
        noisy = (grid + torch.from_numpy(jitter) / images.shape[1]).clamp(-1, 1)
        return warp(images, noisy)


def warp(images: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Resample float [n, H, W, 3] images at ``grid`` ([1 or n, H, W, 2]), bilinear, as WaNet does."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    grid = grid.expand(len(images), -1, -1, -1)
    warped = F.grid_sample(batch, grid, mode="bilinear", align_corners=True)
    return warped.permute(0, 2, 3, 1).numpy()
