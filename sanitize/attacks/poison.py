"""Poison a dataset on disk: read it, run an attack, write a poisoned copy and its ground truth.

``OUT`` gets the copy in the input's format (or ``fmt``) plus ``truth.json``.
Untouched samples keep their original bytes; stamped ones (poisoned or cover)
are re-encoded as PNG, lossless, so the trigger survives exactly. The input is
never modified, and ``OUT`` is staged beside itself and moved into place only
when complete.

Keys in truth.json are the keys of the copy, so a defense run on it can be
scored directly. They equal the input keys except in an ImageFolder copy,
where a key is the file's path and so starts with the directory of the
sample's label: a relabeled poison ``cat/0042`` becomes ``dog/cat/0042``
(listed under ``renamed``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
from PIL import Image

from sanitize.attacks.base import Attack, Poisoned
from sanitize.attacks.registry import REGISTRY, make_attack
from sanitize.formats import images, read_dataset, staged_output, write_dataset
from sanitize.formats.keys import class_dir_names, folder_paths, safe_key
from sanitize.formats.records import Ingested, InputError, Sample
from sanitize.formats.writers import FORMATS, POISON_OUTPUT, extras_left_out
from sanitize.methods import coerce

TRUTH_FILE = "truth.json"
OWN_SIZE_STREAM = 1  # the random stream of stamping at an image's own size, apart from the attack's
OWN_SIZE_PIXELS = 1 << 22  # pixels stamped at a time at their own size (48 MB as float32 RGB)


def poison_dataset(data, *, attack: str, rate: float, target, out, seed: int = 0, fmt: str | None = None,
                   overwrite: bool = False, progress=None, **params) -> dict:
    """Write a poisoned copy of the dataset at ``data`` to ``out``; return the truth dict (also in truth.json).

    ``target`` is a class index or name; ``fmt`` "webdataset" or "imagefolder" (default: the
    input's); ``params`` are the attack's parameters. Raises InputError for bad options, an
    ``out`` that overlaps the input, or an existing non-empty ``out`` without ``overwrite``;
    ``overwrite`` replaces only an earlier poisoned copy (a directory holding truth.json),
    never a run's output or other files. Unreadable inputs are not copied: truth.json
    lists them with their reasons under ``unreadable``, and a warning counts them. Nor
    are the files the reader skips (hidden, not images, ...): ``skipped`` counts them by
    reason, and a warning too. ``progress`` (a ``sanitize.pipeline.Progress``, optional) is
    told the stages of ``poison_stages(attack)`` as they start.
    """
    attacker = make_attack(attack, **params)
    rate = coerce("rate", rate, float)
    seed = coerce("seed", seed, int)
    if seed < 0:  # numpy's generators take no negative seed
        raise InputError(f"seed must be at least 0, got {seed}")
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    with staged_output(out, data, overwrite=overwrite, replaceable=POISON_OUTPUT) as staging:
        if progress:
            progress.stage("read")
        ingested = read_dataset(data)
        target_index = target_class(target, ingested.classes)
        result = attacker.poison(ingested.images, ingested.labels, rate=rate, target=target_index, seed=seed,
                                 num_classes=len(ingested.classes), progress=progress)
        fmt = fmt or ingested.format
        own_size, notes = own_size_stamps(attacker, ingested, result, seed)
        samples = poisoned_samples(ingested, result, fmt, own_size)
        truth = build_truth(attacker, ingested, result, samples, rate=rate, target=target_index, seed=seed, fmt=fmt,
                            notes=notes)
        if progress:
            progress.stage("write")
        write_dataset(staging, samples, ingested.classes, fmt=fmt)
        (staging / TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    return truth


def poison_stages(attack: str) -> list[str]:
    """The stage names ``poison_dataset`` reports to its progress for ``attack``, in order."""
    return ["read", *getattr(REGISTRY.get(attack), "stages", Attack.stages), "write"]


def target_class(target, classes: list[str]) -> int:
    """A class index from an index or a class name (CLI values arrive as strings)."""
    if isinstance(target, str) and target in classes:
        return classes.index(target)
    try:
        index = coerce("target class", target, int)  # never 1.7 or True for class 1
    except InputError:
        raise InputError(f"unknown target class {target!r}; classes are {', '.join(classes)}") from None
    if not 0 <= index < len(classes):
        raise InputError(f"target class {index} is outside 0..{len(classes) - 1}")
    return index


def poisoned_samples(ingested: Ingested, result: Poisoned, fmt: str,
                     own_size: dict[int, np.ndarray] | None = None) -> list[Sample]:
    """The copy's samples, row-aligned with the input: stamped ones re-encoded (``own_size`` rows from
    those pixels, the others from ``result.images``), labels as given after poisoning, keys as they
    will read back from the copy. ``own_size`` may be consumed: a row's pixels are dropped once encoded."""
    stamped = result.poisoned | result.cover
    own_size = own_size or {}
    labels = result.labels.tolist()
    keys = copy_keys(ingested.samples, labels, ingested.classes, fmt)
    samples = []
    for row, sample in enumerate(ingested.samples):
        sample = dataclasses.replace(sample, key=keys[row], label=labels[row])
        samples.append(reencoded(sample, own_size.pop(row, result.images[row])) if stamped[row] else sample)
    return samples


def own_size_stamps(attacker: Attack, ingested: Ingested, result: Poisoned,
                    seed: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """The stamped rows whose image is not of the working size, stamped again at their own size, and
    warnings for the user.

    The attack ran on the decoded set, where every image has the working size (resized and
    centre-cropped); the copy must keep each image as it was but for the trigger, so that
    size gives no poison away and no content is cropped. Images of one size are stamped
    together (``Attack.restamp``); their pixels come upright, as the reader saw them. An
    image with a side under ``images.MIN_SIDE`` keeps its working-size stamp (the reader
    scales such images up): a trigger does not fit in a few pixels, and the models take none.
    """
    working = tuple(ingested.images.shape[1:3])
    groups: dict[tuple, list[int]] = {}
    tiny = 0
    for row in np.flatnonzero(result.poisoned | result.cover):
        with images.bomb_guard():  # the header only: most images have the working size
            size = images.oriented_size(images.open_image(ingested.samples[row].data))
        if size != working and min(size) < images.MIN_SIDE:
            tiny += 1
        elif size != working:
            groups.setdefault((size, bool(result.cover[row])), []).append(int(row))
    notes = [f"{tiny} stamped images have a side under {images.MIN_SIDE} px, too small to hold a trigger: they "
             f"are written at the working size {working[0]}x{working[1]}, stamped there"] if tiny else []
    rng = np.random.default_rng([seed, OWN_SIZE_STREAM])
    stamped = {}
    for ((height, width), cover), rows in sorted(groups.items()):
        step = max(1, OWN_SIZE_PIXELS // (height * width))  # a 12-megapixel photo is stamped alone
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            pixels = np.stack([images.decode(ingested.samples[row].data) for row in chunk])
            stamped.update(zip(chunk, attacker.restamp(pixels, result.true_labels[chunk], rng, cover=cover)))
    return stamped, notes


def copy_keys(samples: list[Sample], labels: list[int], classes: list[str], fmt: str) -> list[str]:
    """WebDataset keys are kept; an ImageFolder key must start with its label's directory, as the
    writer places it, so the keys we record are the ones read back."""
    if fmt != "imagefolder":
        return [sample.key for sample in samples]
    dirs = class_dir_names(classes)
    paths = folder_paths([sample.key for sample in samples], [dirs[label] for label in labels])
    return [safe_key(path) for path in paths]


def reencoded(sample: Sample, pixels: np.ndarray) -> Sample:
    data = encode_png(pixels)
    return dataclasses.replace(sample, ext="png", sha256=hashlib.sha256(data).hexdigest(), data=data)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless, and the same bytes for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def build_truth(attacker: Attack, ingested: Ingested, result: Poisoned, samples: list[Sample], *, rate: float,
                target: int, seed: int, fmt: str, notes: list[str] = ()) -> dict:
    """truth.json's contents; ``notes`` are the copy's own warnings (``own_size_stamps``), after the rest."""
    keys = [sample.key for sample in samples]
    poisoned_rows = np.flatnonzero(result.poisoned)
    return {
        "attack": attacker.name,
        "params": attacker.params,
        "rate": rate,
        "target": target,
        "target_class": ingested.classes[target],
        "seed": seed,
        "format": fmt,
        "input": {"path": ingested.path, "format": ingested.format, "fingerprint": ingested.fingerprint},
        "classes": ingested.classes,
        "counts": {"total": ingested.total, "readable": len(samples), "unreadable": len(ingested.unreadable),
                   "poisoned": len(poisoned_rows), "cover": int(result.cover.sum())},
        "skipped": dict(ingested.skipped),
        "poisoned": [keys[row] for row in poisoned_rows],
        "cover": [keys[row] for row in np.flatnonzero(result.cover)],
        "true_labels": {keys[row]: int(result.true_labels[row]) for row in poisoned_rows},
        "renamed": {new.key: old.key for new, old in zip(samples, ingested.samples) if new.key != old.key},
        "unreadable": [item.to_json() for item in ingested.unreadable],
        "warnings": [*result.warnings, *ingested.warnings, *_unreadable_warnings(ingested),
                     *_skipped_warnings(ingested),
                     *(extras_left_out(samples, "the copy") if fmt == "imagefolder" else ()), *notes],
    }


def _skipped_warnings(ingested: Ingested) -> list[str]:
    """Files the reader skipped (hidden, not images, links out of the tree, ...) are not in the copy either."""
    if not ingested.skipped:
        return []
    counted = ", ".join(f"{count} {reason}" for reason, count in sorted(ingested.skipped.items()))
    return [f"{sum(ingested.skipped.values())} files the reader skips are not in the copy ({counted}; "
            f"counts in truth.json under 'skipped')"]


def _unreadable_warnings(ingested: Ingested) -> list[str]:
    """The inputs the copy leaves out, counted where the user looks (the CLI prints every warning)."""
    count = len(ingested.unreadable)
    if not count:
        return []
    return [f"{count} of {ingested.total} input samples are unreadable and not in the copy "
            f"(reasons in truth.json under 'unreadable')"]
