"""What every attack shares: choosing the samples, the ground truth, the test-time trigger.

An attack is a dataclass of its parameters. ``poison`` picks ``round(rate * N)``
samples and stamps them; ``trigger`` stamps test images to measure the attack
success rate (ASR). Images are uint8 ``[N, H, W, 3]`` numpy arrays; the trigger
arithmetic runs on float32 copies in 0..255 units and is rounded back once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from sanitize.formats.records import InputError


@dataclass
class Poisoned:
    """The poisoned copy of a dataset and its ground truth, row-aligned with the input.

    images:      uint8 [N, H, W, 3], a new array (the input is never written).
    labels:      int64 [N], the given labels after poisoning.
    poisoned:    bool [N], rows that carry the trigger for the attack (label ``target``
                 unless the attack is clean-label).
    cover:       bool [N], rows that carry a trigger but keep their true label
                 (TaCT, WaNet noise mode, Adaptive-Blend/Patch); never ``poisoned``.
    true_labels: int64 [N], the labels before poisoning.
    warnings:    human-readable notes, e.g. a clean-label rate capped by the class size.
    """

    images: np.ndarray
    labels: np.ndarray
    poisoned: np.ndarray
    cover: np.ndarray
    true_labels: np.ndarray
    warnings: list[str] = field(default_factory=list)


class Attack:
    """Base of the registered attacks. Subclasses are dataclasses and override the hooks below.

    ``clean_label``: poisons are drawn from the target class and keep their label.
    ``cover_rate``:  fraction of the dataset stamped as cover samples (0: none).
    ``stages``:      the stage names ``poison`` reports to a progress (``sanitize.pipeline.Progress``:
                     ``stage(name)``, ``advance(done, total)``); one unless stamping is slow.
    """

    name = ""
    clean_label = False
    cover_rate = 0.0
    stages = ("poison",)

    @property
    def params(self) -> dict:
        """The resolved parameters, JSON-serialisable (for truth.json)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def poison(self, images: np.ndarray, labels: np.ndarray, *, rate: float, target: int, seed: int,
               num_classes: int, progress=None) -> Poisoned:
        """Poison ``round(rate * N)`` samples (capped by the eligible pool, with a warning).

        ``progress`` (optional) is told the ``stages`` as they start, and the steps within them."""
        labels = np.asarray(labels)
        _check_inputs(images, labels, rate, target, num_classes)
        self.check_target(target, num_classes)
        rng = np.random.default_rng(seed)
        notes: list[str] = []
        if rate > 0 and round(rate * len(labels)) == 0:
            notes.append(f"a rate of {rate} of {len(labels)} samples rounds to no poisoned sample at all")
        pool = self.poison_pool(labels, target)
        if round(rate * len(labels)) and not len(pool):  # a copy with no poison is not what was asked for
            raise InputError(f"no sample is eligible for {self.name} with target class {target} (a clean-label "
                             f"attack poisons images of the target class, TaCT images of its source classes, "
                             f"the others images of any other class): none was poisoned")
        poison_rows = _draw(rng, pool, round(rate * len(labels)), "poisoned", notes)
        cover_pool = np.setdiff1d(self.cover_pool(labels, target), poison_rows)
        cover_rows = _draw(rng, cover_pool, round(self.cover_rate * len(labels)), "cover", notes)
        out = images.copy()
        out[poison_rows] = self.stamp_poisons(images, labels, poison_rows, rng, num_classes, seed, progress)
        out[cover_rows] = in_chunks(self.stamp_cover, images[cover_rows], rng)
        given = labels.astype(np.int64, copy=True)
        if not self.clean_label:
            given[poison_rows] = target
        return Poisoned(out, given, _mask(len(labels), poison_rows), _mask(len(labels), cover_rows),
                        labels.astype(np.int64, copy=True), notes)

    def trigger(self, images: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """The test-time trigger on uint8 ``[N, H, W, 3]`` images; ``seed`` drives any randomness in it."""
        _check_images(images)
        return in_chunks(self.apply, images, np.random.default_rng(seed))

    def asr_mask(self, labels: np.ndarray, target: int) -> np.ndarray:
        """bool [N]: the test samples that count for the ASR (default: every non-target sample)."""
        return np.asarray(labels) != target

    def success_rate(self, predict, images: np.ndarray, labels: np.ndarray, target: int, *, seed: int = 0) -> float:
        """Attack success rate in percent: of the test ``images`` the ASR counts (``asr_mask``), the share
        that ``predict`` (uint8 [N, H, W, 3] -> labels [N]) assigns to ``target`` once triggered."""
        counted = self.asr_mask(labels, target)
        if not counted.any():
            return float("nan")
        predicted = np.asarray(predict(self.trigger(images[counted], seed=seed)))
        return float((predicted == target).mean() * 100)

    def restamp(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                cover: bool) -> np.ndarray:
        """uint8 [n, h, w, 3] images of one size other than the poisoned set's, stamped as poisons (or
        as covers) at that size: a poisoned copy on disk keeps each image's own size (``poison_dataset``).
        ``labels`` are the images' true labels. Call after ``poison``, which may have learned from the data.
        """
        return in_chunks(self.stamp_cover if cover else self.stamp, images, rng)

    # Hooks -------------------------------------------------------------------------------

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Test-time trigger: float32 [n, H, W, 3] in 0..255 -> same (unclipped is fine)."""
        raise NotImplementedError

    def stamp(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Training-time trigger of a poisoned sample; the test-time one unless the attack differs."""
        return self.apply(images, rng)

    def stamp_cover(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Training-time trigger of a cover sample."""
        return self.stamp(images, rng)

    def stamp_poisons(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                      rng: np.random.Generator, num_classes: int, seed: int, progress=None) -> np.ndarray:
        """uint8 [len(rows), H, W, 3]: the poisoned versions of ``images[rows]``.

        Gets the whole dataset because an attack may learn from it (Label-Consistent).
        """
        if progress:
            progress.stage("poison")
        return in_chunks(self.stamp, images[rows], rng)

    def poison_pool(self, labels: np.ndarray, target: int) -> np.ndarray:
        """Rows eligible for poisoning. Dirty-label attacks skip the target class, so every
        poison is a real label flip; clean-label attacks use only the target class."""
        eligible = labels == target if self.clean_label else labels != target
        return np.flatnonzero(eligible)

    def cover_pool(self, labels: np.ndarray, target: int) -> np.ndarray:
        """Rows eligible as cover samples (the poisons are removed afterwards)."""
        return np.arange(len(labels))

    def check_target(self, target: int, num_classes: int) -> None:
        """Raise :class:`InputError` if the parameters cannot work with this target."""


# Rows stamped at a time: bounds the float32 working copy (1024 x 224 x 224 x 3 x 4 B = 0.6 GB).
CHUNK = 1024


def in_chunks(stamp, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 result of ``stamp(float32 rows, rng)`` over ``images`` in chunks of :data:`CHUNK` rows."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        out[start:start + CHUNK] = to_uint8(stamp(images[start:start + CHUNK].astype(np.float32), rng))
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must be between 0 and 1, got {value}")


def _draw(rng: np.random.Generator, pool: np.ndarray, count: int, what: str, notes: list[str]) -> np.ndarray:
    """``count`` rows from ``pool`` without replacement, sorted; all of the pool if it is too small."""
    if count > len(pool):
        notes.append(f"asked for {count} {what} samples but only {len(pool)} are eligible; using all of them")
        count = len(pool)
    return np.sort(rng.choice(pool, size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)


def _mask(size: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[rows] = True
    return mask


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must be a uint8 array [N, H, W, 3], got {getattr(images, 'dtype', type(images))} "
                         f"{getattr(images, 'shape', '')}")


def _check_inputs(images, labels, rate: float, target: int, num_classes: int) -> None:
    _check_images(images)
    if np.shape(labels) != (len(images),):
        raise InputError(f"labels must have shape [{len(images)}], got {np.shape(labels)}")
    check_fraction("rate", rate)
    if not 0 <= target < num_classes:
        raise InputError(f"target class {target} is outside 0..{num_classes - 1}")
