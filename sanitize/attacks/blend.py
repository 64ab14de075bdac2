"""Blend (Chen et al., 2017, "Targeted backdoor attacks ... using data poisoning"), Sec. 4:
x' = (1 - alpha) x + alpha * pattern over the whole image, label flipped to the target.

AdvrBD Table I: poison ratio 0.05, "HelloKitty, alpha=0.2". We do not ship the
Hello Kitty image; the pattern is Chen et al.'s other blend key, a fixed random
noise image, generated from ``pattern_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitize.attacks.base import Attack, check_fraction
from sanitize.attacks.patterns import Stamp, noise_pattern


@dataclass
class Blend(Attack):
    name = "blend"
    alpha: float = 0.2
    pattern_seed: int = 0

    def __post_init__(self):
        check_fraction("alpha", self.alpha)

    @property
    def key(self) -> Stamp:
        return noise_pattern(self.pattern_seed)

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.key.apply(images, self.alpha)
