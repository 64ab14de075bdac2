"""TaCT, the source-specific attack of Tang et al. (USENIX Security 2021, "Demon in the Variant").

Only images of the source classes are poisoned (stamped, relabeled to the
target); images of other classes get the same stamp but keep their label (cover
samples), so the model learns "trigger AND source class -> target" and the
poisons' representations stay close to the clean ones'. The ASR therefore counts
only source-class test images.

AdvrBD Table I: poison ratio 0.05, "3*3 white square", source 0, target 1,
cover rate 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitize.attacks.badnets import BadNets
from sanitize.attacks.base import check_fraction
from sanitize.formats.records import InputError


@dataclass
class TaCT(BadNets):
    """``cover_classes`` empty means every class that is neither a source nor the target."""

    name = "tact"
    source_classes: tuple[int, ...] = (0,)
    cover_classes: tuple[int, ...] = ()
    cover_rate: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        self.source_classes = tuple(int(c) for c in self.source_classes)
        self.cover_classes = tuple(int(c) for c in self.cover_classes)
        if not self.source_classes:
            raise InputError("tact needs at least one source class")
        check_fraction("cover_rate", self.cover_rate)

    def check_target(self, target: int, num_classes: int) -> None:
        if target in self.source_classes:
            raise InputError(f"the target class {target} is also a source class; pick another target "
                             f"or set source_classes")
        outside = [c for c in self.source_classes + self.cover_classes if not 0 <= c < num_classes]
        if outside:
            raise InputError(f"class(es) {outside} are outside 0..{num_classes - 1}")

    def poison_pool(self, labels: np.ndarray, target: int) -> np.ndarray:
        return np.flatnonzero(np.isin(labels, self.source_classes))

    def cover_pool(self, labels: np.ndarray, target: int) -> np.ndarray:
        if self.cover_classes:
            return np.flatnonzero(np.isin(labels, self.cover_classes))
        return np.flatnonzero(~np.isin(labels, self.source_classes + (target,)))

    def asr_mask(self, labels: np.ndarray, target: int) -> np.ndarray:
        return np.isin(labels, self.source_classes)
