"""The records that cross the seam between the formats layer and the rest.

Glossary (used everywhere): a *sample* is one input image with its given
*label*; its *key* is a name safe in a file system and in a tar archive; its
*source* says where it came from (``shard.tar:member`` or a path relative to the
input root), always as valid UTF-8 text (see ``keys.readable_name``). Nothing here
imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One readable input sample. ``data`` holds the original bytes, never re-encoded.

    ``extras``: a WebDataset sample's other members (a caption ``.txt``, metadata ``.json``, a
    mask ``.seg.png`` ...) as (field, bytes), in field order; the writers carry them into every
    shard they write, bytes as they are (see ``writers.carried_fields``)."""

    key: str
    source: str
    label: int
    ext: str  # original image extension without the dot, lower case ("jpg")
    sha256: str
    data: bytes = field(repr=False)
    extras: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Unreadable:
    """An input we could not use, and why. Counted in ``total``, never silently lost.

    Usually one sample; for a damaged shard, the shard itself (``source`` is the shard),
    standing for everything in it from the damage on, however many samples that was."""

    key: str
    source: str
    error: str
    sha256: str = ""  # of the bytes we got, when there were any; feeds the input fingerprint

    def to_json(self) -> dict[str, str]:
        """The entry that manifest.json and truth.json list under ``unreadable``."""
        return {"key": self.key, "source": self.source, "error": self.error}


@dataclass
class Ingested:
    """Everything read from the input.

    ``images`` is uint8 ``[N, H, W, 3]`` RGB, row ``i`` belongs to ``samples[i]``.
    """

    path: str
    format: str  # "webdataset" | "imagefolder"
    classes: list[str]
    samples: list[Sample]
    images: np.ndarray
    unreadable: list[Unreadable]
    fingerprint: str
    image_size: tuple[int, int]
    size_rule: str
    skipped: dict[str, int] = field(default_factory=dict)  # e.g. {"hidden": 2, "not_image": 5}
    warnings: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.unreadable)


@dataclass
class Listing:
    """What a reader found, before decoding: records (Sample | Unreadable) in input order."""

    records: list = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def extend(self, other: Listing) -> None:
        """Append what ``other`` found after what this one found."""
        self.records += other.records
        for reason, count in other.skipped.items():
            self.skip(reason, count)
        self.warnings += other.warnings


def is_flag(value) -> bool:
    """A bool of Python, numpy or torch, which is never taken for a number (``operator.index(True)`` is 1)."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def skipped_text(skipped: dict[str, int]) -> str:
    """"40 symlink_outside_root, 12 not_image": skipped files by reason, most first."""
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items(), key=lambda item: -item[1]))


# The class names beside a dataset (shards, or an ImageFolder tree's class directories): read by the
# readers, written by the writers.
CLASSES_FILE = "classes.json"


class InputError(Exception):
    """A problem with the user's input or options: reported as one line, non-zero exit."""


class OnnxCheckError(RuntimeError):
    """The exported file disagrees with the torch model: the run must fail, not ship it. Defined here,
    not beside the export, so that the command line can catch it without importing torch."""


def too_long(error: ValueError) -> str:
    """A parser's error as a user should read it: Python's own refusal to convert a number of more than
    4,300 digits suggests ``sys.set_int_max_str_digits()``, which is no advice for a data file."""
    text = str(error)
    return "a number of more than 4,300 digits" if "integer string conversion" in text else text


MAX_LISTED = 5  # names (sample keys, classes) given in one warning; the rest are counted


def listed(names: list[str]) -> str:
    """"a, b, c, d, e and 3 more": the first MAX_LISTED of ``names``, the rest counted."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"
