"""SIG (Barni et al., ICIP 2019, "A new backdoor attack in CNNs by training set corruption
without label poisoning"): a horizontal sinusoid added to target-class images, labels kept.

AdvrBD Table I: poison ratio 0.05, "Sinusoidal signal", clean-label. The signal
parameters are Barni et al.'s (Sec. 4): delta = 20, f = 6. A clean-label attack
can poison at most the target class (AdvrBD Sec. VI: at most 10% on CIFAR-10).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitize.attacks.base import Attack
from sanitize.attacks.patterns import sinusoid
from sanitize.formats.records import InputError


@dataclass
class SIG(Attack):
    """``delta`` in 0..255 pixel units; ``frequency`` in periods across the image width."""

    name = "sig"
    clean_label = True
    delta: float = 20.0
    frequency: float = 6.0

    def __post_init__(self):
        if not 0 < self.delta <= 255:
            raise InputError(f"delta must be in (0, 255], got {self.delta}")
        if not self.frequency > 0:  # 0 draws no signal at all
            raise InputError(f"frequency must be above 0, got {self.frequency}")

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = images.shape[1:3]
        return images + sinusoid(height, width, self.delta, self.frequency)
