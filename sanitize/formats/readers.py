"""``read_dataset``: an ImageFolder tree or WebDataset shards -> :class:`Ingested`.

Bad *data* never stops a run: every sample is either readable or recorded as
Unreadable with its reason (a damaged shard, from the damage on, is one Unreadable),
and anything that is not a sample is counted in ``skipped``. Bad *input* (nothing
there, no usable classes, an ambiguous layout) is an InputError.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import operator
import os
import re
import unicodedata
from functools import partial
from pathlib import Path

import numpy as np

from sanitize.formats.folder_reader import class_dirs, holds_image, image_files, read_files
from sanitize.formats.images import CHUNK, IMAGE_EXTS, MIN_SIDE, POOL_MIN_SAMPLES, decode_images
from sanitize.formats.keys import class_dir_names, dedupe_keys, readable_name
from sanitize.formats.records import (CLASSES_FILE, Ingested, InputError, Listing, Sample, Unreadable, is_flag,
                                      listed, skipped_text, too_long)
from sanitize.formats.shard_reader import list_shard
from sanitize.formats.workers import Workers

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Without a class list the classes are 0..K-1, K = the largest label + 1. A set may lack some classes (a
# subset in its original labels), but one sample labelled 99999 must not make 100,000 classes (a 50 MB
# model and manifest, suspects relabeled to an empty class): K may be at most twice the number of distinct
# labels seen, or up to 16 in any case (a CIFAR-10 subset, however sparse; a stray label costs little there).
INFERRED_PER_LABEL = 2
INFERRED_ALWAYS = 16
MAX_SHARDS = 1_000_000
POOL_MIN_BYTES = 4 * 2**20  # shards smaller than this in all are listed inline: a pool would start slower
MAX_WARNINGS = 20  # per kind; a set with 50,000 duplicate keys needs one line, not 50,000
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def read_dataset(path, *, classes_file=None, image_size=None, workers=None) -> Ingested:
    """Read every sample under ``path`` and decode it at one working size.

    path: an ImageFolder root, a directory of WebDataset shards, one shard, or a
    brace pattern such as ``part-{000000..000009}.tar`` (.tar, .tar.gz, .tgz).
    classes_file: JSON (a list, or ``{"classes": [...]}``) or text (one name a
    line); for shards it overrides ``classes.json`` beside them, for an
    ImageFolder it orders the class directories.
    image_size: int or (H, W). Working-size rule: ``image_size`` if given;
    else, if at least half of the readable images share one size whose longer
    side is <= 64, that size (the others are resized to it); else 224x224.
    Resizing scales the image to cover the target and center-crops it.
    workers: processes (default: the CPUs available to us) that read shards (4 MiB or
    more in all) or files (2,000 or more) and decode images (2,000 or more) in
    parallel, in chunks; smaller inputs are read and decoded inline.

    Returns Ingested with ``images`` uint8 [N, H, W, 3], row i = ``samples[i]``.
    Raises InputError when the path is missing, holds no samples, fewer than two
    classes, or no readable sample; when a directory holds both shards and class
    folders of images; when labels without a class list are too sparse to infer
    the classes from (see INFERRED_PER_LABEL).
    """
    requested = _requested_size(image_size)
    with Workers(workers) as pool:
        return _read(path, classes_file, requested, pool)


def _read(path, classes_file, requested, pool: Workers) -> Ingested:
    fmt, classes, listing = _list(str(path), classes_file, pool)
    if not listing.records:
        raise InputError(f"{path}: no image samples found (skipped: {listing.skipped or 'nothing'})")
    if not any(isinstance(record, Sample) for record in listing.records):
        raise _none_readable(path, listing.records)
    if len(classes) < 2:
        raise InputError(f"{path}: found {len(classes)} class(es) {classes[:1]}; need at least two")
    listing.warnings += _look_alike(classes)
    records = _unique_keys(listing)
    to_decode = [record for record in records if isinstance(record, Sample)]
    decoded = decode_images([record.data for record in to_decode], pool, image_size=requested)
    records = _apply_decoding(records, decoded.errors)
    samples = [record for record in records if isinstance(record, Sample)]
    unreadable = [record for record in records if isinstance(record, Unreadable)]
    _require_readable(path, classes, samples, unreadable, listing.skipped)
    listing.warnings += _classes_lost_in_decoding(classes, to_decode, samples)
    return Ingested(os.path.abspath(str(path)), fmt, classes, samples, decoded.images, unreadable,
                    fingerprint(records), decoded.image_size, decoded.size_rule, dict(sorted(listing.skipped.items())),
                    listing.warnings)


def _classes_lost_in_decoding(classes: list[str], decoded: list[Sample], samples: list[Sample]) -> list[str]:
    """A warning naming the classes that had samples (``decoded``) but none whose image decodes (``samples``,
    what is left): like an empty class folder, the model keeps an output for each that it never learns, and
    the reason is easy to miss among the unreadable samples."""
    readable = {sample.label for sample in samples}
    counts = collections.Counter(sample.label for sample in decoded if sample.label not in readable)
    if not counts:
        return []
    names = [f"{classes[label]!r} ({count})" for label, count in sorted(counts.items())]
    return [f"{len(counts)} class(es) have no image that decodes, every sample of theirs unreadable: "
            f"{listed(names)}; the model keeps an output for each, never trained on it"]


def _look_alike(classes: list[str]) -> list[str]:
    """A warning for each set of class names that are one text in other Unicode normal forms ("café" as
    macOS writes a folder name, NFD, and as Linux keeps it, NFC): they print alike and stay two classes,
    each with part of the images a user thinks of as one."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    return [f"classes {' and '.join(ascii(name) for name in names)} read alike (one text in other Unicode normal "
            f"forms) but are {len(names)} classes; merge their folders or class names if they are one"
            for names in groups.values() if len(names) > 1]


def fingerprint(records) -> str:
    """sha256 of the sorted input listing: one ``source<TAB>sha256`` line per sample, readable or not."""
    lines = sorted(f"{record.source}\t{record.sha256}\n" for record in records)
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _requested_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = ()  # from an int (numpy's and torch's too) or a list/tuple/array of two; never a bool
    sides = list(image_size) if isinstance(image_size, (list, tuple, np.ndarray)) else [image_size, image_size]
    if not any(is_flag(side) for side in sides):
        try:
            size = tuple(operator.index(side) for side in sides)
        except TypeError:
            pass
    if len(size) != 2 or not all(MIN_SIDE <= side <= 4096 for side in size):
        raise InputError(f"image_size must be an int or (H, W) between {MIN_SIDE} and 4096, got {image_size!r}")
    return size


def _list(path: str, classes_file, pool: Workers) -> tuple[str, list[str], Listing]:
    """Detect the format and list the input: (format, classes, listing)."""
    if _BRACE.search(path) and not os.path.exists(path):  # a real name with braces is read as it is
        shards = [Path(name) for name in expand_braces(path)]
        missing = [str(shard) for shard in shards if not shard.is_file()]
        if missing:
            raise InputError(f"{len(missing)} shard(s) of {path} not found, first: {missing[0]}")
        # A shard the pattern names twice ({0,0}, or two spellings of one file) would be read twice: every
        # sample in it duplicated in training and in the outputs.
        real = [os.path.realpath(shard) for shard in shards]
        if len(set(real)) < len(real):
            twice = next(shard for shard, name in zip(shards, real) if real.count(name) > 1)
            raise InputError(f"{path} names the same shard more than once ({readable_name(str(twice))}); "
                             f"name each shard once")
        return _list_shards(path, shards, Path(os.path.dirname(path[:path.index("{")]) or "."), classes_file, pool)
    location = Path(path)
    if not location.exists():
        raise InputError(f"input not found: {path}")
    if location.is_file() and is_shard_name(location.name):
        return _list_shards(path, [location], location.parent, classes_file, pool)
    if not location.is_dir():  # another file, a device, a pipe, a socket
        raise InputError(f"{path}: neither a directory nor a .tar/.tar.gz/.tgz shard file")
    # One listing of the folder, hidden entries left out, for the shards and both checks beside them
    # (DirEntry caches the file type, so a folder of many shards is not stat-ed three times over).
    with os.scandir(location) as scan:
        entries = [entry for entry in scan if not entry.name.startswith(".")]
    shards = sorted(Path(entry.path) for entry in entries if is_shard_name(entry.name) and entry.is_file())
    if shards:
        _refuse_mixed(location, shards, entries)
        fmt, classes, listing = _list_shards(path, shards, location, classes_file, pool)
        _count_beside_shards(location, listing, entries)
        return fmt, classes, listing
    return _list_folder(location, classes_file, pool)


def _count_beside_shards(root: Path, listing: Listing, entries: list[os.DirEntry]) -> None:
    """Files beside the shards (``entries``: the folder's visible entries) are not samples, but every input is
    accounted for: count them as skipped, and warn about images there (a WebDataset sample lives inside a
    shard; one beside it is easily missed)."""
    images, folders = 0, []
    for entry in entries:
        # The shards are the visible files with a shard name (``_list``): tested as such, not looked up
        # in the list of shards, which would cost shards x entries comparisons in a folder of many.
        is_shard = is_shard_name(entry.name) and entry.is_file()
        if entry.is_dir() and not entry.is_symlink() and _holds_shard(entry.path):
            folders.append(entry.name)
            listing.skip("folder_of_shards")
        if entry.name == CLASSES_FILE or is_shard or entry.is_dir():
            continue
        is_image = os.path.splitext(entry.name)[1].lower().lstrip(".") in IMAGE_EXTS
        images += is_image
        listing.skip("image_beside_shards" if is_image else "not_a_shard")
    if images:
        listing.warnings.append(f"{images} image file(s) beside the shards in {readable_name(str(root))} are not "
                                f"read: only samples inside the shards are")
    if folders:
        # Not read: a val/ or test/ split beside the training shards must not end up in training.
        shown = ", ".join(readable_name(name) for name in sorted(folders)[:3])
        listing.warnings.append(f"{len(folders)} folder(s) beside the shards in {readable_name(str(root))} hold "
                                f"shards that are not read ({shown}): only the shards in the folder itself are; "
                                f"name others with a brace pattern or run on each folder")


def _holds_shard(folder: str) -> bool:
    """Whether a shard lies anywhere under ``folder`` (links not followed); stops at the first one."""
    return any(is_shard_name(name) for _, _, files in os.walk(folder) for name in files)


def _refuse_mixed(root: Path, shards: list[Path], entries: list[os.DirEntry]) -> None:
    """Shards beside class directories of images (``entries``: the folder's visible entries): reading either
    kind would silently drop the other.

    Other directories (no image under them), classes.json, READMEs and hidden entries are harmless."""
    folders = sorted(entry.name for entry in entries
                     if entry.is_dir() and not entry.is_symlink() and holds_image(root, Path(entry.path)))
    if folders:
        raise InputError(
            f"{root} holds both {len(shards)} shard(s) (first: {readable_name(shards[0].name)}) and {len(folders)} "
            f"class folder(s) of images (first: {readable_name(folders[0])}), so it is neither WebDataset nor "
            f"ImageFolder; to read the shards, name them with a file or brace pattern "
            f"(e.g. {readable_name(str(shards[0]))}); to read the folder, move the shards out")


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}-{x,y}.tar`` -> the 6 names, in order; numeric ranges keep the zero padding of the first bound."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for item in _brace_items(match.group(1)) for name in expand_braces(head + item + tail)]


def _brace_items(body: str) -> list[str]:
    numeric = _RANGE.fullmatch(body)
    if numeric is None:
        return body.split(",")
    first, last = numeric.groups()
    if int(last) < int(first):  # read as no shard at all, "no image samples found", before
        raise InputError(f"brace range {{{body}}} runs backwards: write {{{last}..{first}}}")
    if int(last) - int(first) >= MAX_SHARDS:
        raise InputError(f"brace range {{{body}}} names more than {MAX_SHARDS} shards")
    width = len(first) if first.startswith("0") else 0
    return [f"{number:0{width}d}" for number in range(int(first), int(last) + 1)]


def _list_shards(path: str, shards: list[Path], root: Path, classes_file,
                 pool: Workers) -> tuple[str, list[str], Listing]:
    """``path`` as the user gave it names the input in errors; ``root`` is where classes.json and sources start."""
    listing = Listing()
    names = [readable_name(shard.relative_to(root).as_posix() if shard.is_relative_to(root) else str(shard))
             for shard in shards]
    parallel = len(shards) > 1 and sum(shard.stat().st_size for shard in shards) >= POOL_MIN_BYTES
    for part in pool.map(list_shard, shards, names, parallel=parallel):
        listing.extend(part)
    names = load_classes(classes_file) if classes_file else _classes_beside(shards, root)
    classes = names if names is not None else _inferred_classes(listing.records, path)
    _check_labels(listing, len(classes))
    if names is not None:  # a class list's class no sample has: an ImageFolder's empty class folder is named too
        labels = {record.label for record in listing.records if isinstance(record, Sample)}
        empty = [name for index, name in enumerate(classes) if index not in labels]
        if empty:
            listing.warnings.append(f"{len(empty)} class(es) of the class list have no sample in the shards: "
                                    f"{listed([repr(name) for name in empty])}; the model keeps an output for "
                                    f"each, never trained on it")
    return "webdataset", classes, listing


def _classes_beside(shards: list[Path], root: Path) -> list[str] | None:
    """The class list in a classes.json beside the shards (in each folder that holds shards, as a brace
    pattern may span several; else at ``root``), or None. Files that disagree are an InputError."""
    files = [folder / CLASSES_FILE for folder in dict.fromkeys(shard.parent for shard in shards)]
    files = [file for file in files if file.is_file()] or [file for file in [root / CLASSES_FILE] if file.is_file()]
    lists = [(file, load_classes(file)) for file in files]
    for other, names in lists[1:]:
        if names != lists[0][1]:
            raise InputError(f"the shards' class lists disagree: {readable_name(str(lists[0][0]))} and "
                             f"{readable_name(str(other))} name different classes; pass --classes FILE")
    return lists[0][1] if lists else None


def _inferred_classes(records, path: str) -> list[str]:
    """Classes "0".."K-1", K = the largest label + 1, when there is no class list (see INFERRED_PER_LABEL)."""
    labels = {record.label for record in records if isinstance(record, Sample) and record.label >= 0}
    count = max(labels, default=-1) + 1
    if count > max(INFERRED_ALWAYS, INFERRED_PER_LABEL * len(labels)):
        raise InputError(f"{path}: labels run up to {count - 1} but only {len(labels)} distinct values were seen, "
                         f"too few to infer {count} classes; pass --classes FILE or put a classes.json "
                         f"beside the shards")
    return [str(index) for index in range(count)]


def _check_labels(listing: Listing, num_classes: int) -> None:
    """Samples with a label outside the classes become Unreadable; labels beyond the class list get one warning
    (inferred classes reach the largest label, so only a given class list can be too short)."""
    beyond = [record.label for record in listing.records if isinstance(record, Sample) and record.label >= num_classes]
    listing.records = [_check_label(record, num_classes) for record in listing.records]
    if beyond:
        listing.warnings.append(f"{len(beyond)} samples have labels outside the {num_classes} classes of the class "
                                f"list (largest label {max(beyond)}): they are unreadable; is the class list complete?")


def _check_label(record, num_classes: int):
    if isinstance(record, Sample) and not 0 <= record.label < num_classes:
        return _as_unreadable(record, f"label {record.label} is outside the {num_classes} classes")
    return record


def _list_folder(root: Path, classes_file, pool: Workers) -> tuple[str, list[str], Listing]:
    listing = Listing()
    dirs = class_dirs(root, listing)
    names = _class_names(root, dirs)
    classes = names if classes_file is None else load_classes(classes_file)
    named = _named_by_classes_file(root, names, listing, wanted=classes_file is None)
    if named:  # directories 0-air plane, 1-café, ... stand for the classes "air plane", "café", ...
        classes, names = named, named
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise InputError(f"{root}: class directories not in {classes_file}: {', '.join(unknown[:5])}")
    files = [(path, classes.index(name)) for directory, name in zip(dirs, names)
             for path in _class_files(root, directory, name, listing)]
    chunks = [files[start:start + CHUNK] for start in range(0, len(files), CHUNK)]
    for records in pool.map(partial(read_files, root), chunks, parallel=len(files) >= POOL_MIN_SAMPLES):
        listing.records += [record for record in records if record is not None]
        listing.skip("not_regular_file", records.count(None))
    return "imagefolder", classes, listing


def _named_by_classes_file(root: Path, names: list[str], listing: Listing, wanted: bool) -> list[str] | None:
    """The class names of a tree sanitize wrote (a relabeled set, an ImageFolder copy): its classes.json
    lists them, and its directories are ``class_dir_names`` of them (names unsafe or unsorted as
    directories carry an index prefix). None when there is no such file, it does not fit the
    directories exactly, or a ``--classes`` file names the classes (not ``wanted``); a file not
    used is counted as skipped."""
    path = root / CLASSES_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        classes = load_classes(path) if wanted else None
    except InputError:
        classes = None
    if classes is None or class_dir_names(classes) != names:
        listing.skip("outside_class_dir")
        return None
    return classes


def _class_names(root: Path, dirs: list[str]) -> list[str]:
    """The class name of each directory: its name as valid UTF-8 text (see ``readable_name``), since class names
    go into JSON and ONNX metadata; the directory keeps its own name to be opened. Raises InputError when two
    directories read as one name (``fr\\xe9g`` as bytes and as text): either way one class would swallow the other."""
    names = [readable_name(directory) for directory in dirs]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise InputError(f"{root}: several class directories read as the same class name {clashes[0]!r} "
                         f"(one of them is not valid UTF-8); rename one")
    return names


def _class_files(root: Path, directory: str, name: str, listing: Listing) -> list[Path]:
    """The image files under ``root/directory``, the on-disk name; ``name`` is its class name, for the warning."""
    before = dict(listing.skipped)
    files = image_files(root, root / directory, listing)
    if not files:
        skipped = {reason: count - before.get(reason, 0) for reason, count in listing.skipped.items()
                   if count > before.get(reason, 0)}
        listing.warnings.append(f"class directory {name!r} holds no image" + (
            f" that can be read: skipped {skipped_text(skipped)}"
            if skipped else ""))
    return files


def load_classes(path) -> list[str]:
    """Class names from JSON (a list or ``{"classes": [...]}``) or text (one a line). Raises InputError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read class list {path}: {error}") from None
    names = _parse_classes(text, path)
    if not names:
        raise InputError(f"{path}: the class list is empty")
    if not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
        raise InputError(f"{path}: class names must be unique non-empty strings")
    return names


def _parse_classes(text: str, path) -> list:
    if not str(path).lower().endswith(".json"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        value = json.loads(text)
    except ValueError as error:  # JSONDecodeError, and a number of more than 4,300 digits
        raise InputError(f"{path}: not valid JSON: {too_long(error)}") from None
    except RecursionError:  # nested deeper than Python's stack
        raise InputError(f"{path}: not valid JSON: nested too deeply") from None
    if isinstance(value, dict) and "classes" not in value and value and all(
            isinstance(index, int) and not isinstance(index, bool) for index in value.values()):
        if sorted(value.values()) != list(range(len(value))):  # torchvision's class_to_idx, {"cat": 0, ...}
            raise InputError(f"{path}: a class -> index mapping must give the indices 0..{len(value) - 1} once each")
        return sorted(value, key=value.get)
    names = value.get("classes") if isinstance(value, dict) else value
    if not isinstance(names, list):
        raise InputError(f'{path}: expected a list of class names, {{"classes": [...]}} or {{"name": index, ...}}')
    return names


def _as_unreadable(sample: Sample, error: str) -> Unreadable:
    return Unreadable(sample.key, sample.source, error, sample.sha256)


def _unique_keys(listing: Listing) -> list:
    """Records with unique keys (``key~1`` ...); each renaming is reported in the warnings."""
    keys, renamed = dedupe_keys([record.key for record in listing.records])
    records, notes = [], []
    for record, key in zip(listing.records, keys):
        if key != record.key:
            notes.append(f"duplicate key {record.key!r}: {record.source} renamed to {key!r}")
            record = dataclasses.replace(record, key=key)
        records.append(record)
    listing.warnings.extend(notes[:MAX_WARNINGS])
    if len(renamed) > MAX_WARNINGS:
        listing.warnings.append(f"... and {len(renamed) - MAX_WARNINGS} more duplicate keys renamed")
    return records


def _apply_decoding(records: list, errors: dict[int, str]) -> list:
    """Samples the decoder refused (``errors`` is indexed over samples only) become Unreadable, in place."""
    result, index = [], 0
    for record in records:
        if isinstance(record, Sample):
            record = _as_unreadable(record, errors[index]) if index in errors else record
            index += 1
        result.append(record)
    return result


def _require_readable(path, classes: list[str], samples: list[Sample], unreadable: list[Unreadable],
                      skipped: dict[str, int]) -> None:
    if not samples:
        raise _none_readable(path, unreadable)
    if len({sample.label for sample in samples}) < 2:
        label = samples[0].label
        why = [f"skipped files: {skipped_text(skipped)}"] if skipped else []
        if unreadable:  # often the other classes' images: say so, with the first reason
            why.append(f"{len(unreadable)} unreadable, first: {unreadable[0].source}: {unreadable[0].error}")
        raise InputError(f"{path}: every readable sample has the same label ({label}, {classes[label]!r}); need two "
                         f"classes" + (f" ({'; '.join(why)})" if why else ""))


def _none_readable(path, unreadable: list[Unreadable]) -> InputError:
    return InputError(f"{path}: none of the {len(unreadable)} samples is readable; first: "
                      f"{unreadable[0].source}: {unreadable[0].error}")
