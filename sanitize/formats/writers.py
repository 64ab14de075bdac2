"""Outputs: staged output directories, clean/relabeled shards, ImageFolder copies, scores.csv.

Image bytes are always copied, never re-encoded. Shards are reproducible: the
same input and verdicts give byte-identical tar files (fixed member order,
mtime, owner and mode).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import itertools
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sanitize.formats.images import IMAGE_EXTS
from sanitize.formats.keys import (class_dir_names, folder_paths, is_safe_key, readable_name,
                                   safe_component)
from sanitize.formats.readers import expand_braces
from sanitize.formats.shard_reader import LABEL_FIELDS, field_of
from sanitize.formats.records import CLASSES_FILE, Ingested, InputError, Sample, listed
from sanitize.formats.workers import Workers, available_cpus

SCORES_HEADER = ("key", "source", "label", "score", "suspected", "relabel")
FORMATS = ("webdataset", "imagefolder")
TAR_OWNER = "sanitize"
TAR_MTIME = 0  # a fixed timestamp is what makes the same shard byte-identical on every run
# Below this many samples, shards are written inline: every pool worker imports webdataset, and
# torch with it (a second or two), which costs more than writing 10,000 samples (about 1.5 s).
WRITE_POOL_MIN_SAMPLES = 10_000


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What an earlier output of one command looks like, so that ``--overwrite`` can tell it from a user's files.

    ``marker``: a JSON object every such output holds, with at least the ``keys``; ``entries``: the
    names the directory may hold (None: any). A file merely named manifest.json is not enough: a
    project folder can hold one, and --overwrite would delete the project.
    """

    marker: str
    keys: frozenset[str]
    entries: frozenset[str] | None = None

    def describe(self) -> str:
        holds = f", holding only {', '.join(sorted(self.entries))}" if self.entries else ""
        return f"a {self.marker} with {', '.join(sorted(self.keys))}{holds}"


# Each command replaces only its own kind of output (``sanitize poison`` passes POISON_OUTPUT): a run
# must never delete a poisoned copy, which may be someone's only red-team data, nor the reverse.
RUN_OUTPUT = OutputKind("manifest.json", frozenset({"schema_version", "method", "counts", "suspects"}),
                        frozenset({"manifest.json", "scores.csv", "model.onnx", "clean", "relabeled"}))
POISON_OUTPUT = OutputKind("truth.json", frozenset({"attack", "target", "counts", "poisoned"}))
# What a shard copy written by ``write_dataset`` holds beside its shards: a classes.json that says
# who wrote it. A user's own shard folder has a classes.json with "classes" too, and
# ``write_dataset(..., overwrite=True)`` must not take it for a copy of ours.
WRITTEN_BY = "sanitize"
DATASET_COPY = OutputKind(CLASSES_FILE, frozenset({"classes", "written_by"}))
# The extensions torchvision.datasets.ImageFolder loads (its IMG_EXTENSIONS, .ppm and .pgm aside):
# a file with any other extension is silently left out by it.
TORCHVISION_EXTS = frozenset({"jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "ppm", "pgm"})


@contextlib.contextmanager
def staged_output(out, input_path, *, overwrite: bool = False,
                  replaceable: OutputKind = RUN_OUTPUT) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``out``; move it into place as ``out`` on success.

    The directory is named ``.<out>.sanitize-tmp-<host>-<pid>-<random>``, so what a
    killed run leaves behind is hidden and never looks like a result; a later run into
    the same ``out`` removes such leftovers of this host's runs whose process is gone. On an
    exception it is deleted and the exception re-raised. ``out`` is checked again when the
    outputs are done, since files may have appeared there (another run into the same ``out``):
    if it may no longer be replaced, the finished outputs stay in the staging directory and
    an InputError names it. Raises InputError
    before anything is written if ``out`` is, is inside, or contains the input
    (``input_path`` None skips that check), exists non-empty without ``overwrite``,
    or cannot be created (a file in the way, no permission): one line naming the path
    and the reason. Even with ``overwrite``, a non-empty ``out`` is only replaced if it
    is ``replaceable``'s kind (default: a run's output, see ``OutputKind``), i.e. an earlier
    output of the same command: a mistyped ``--out ~/data --overwrite`` must not delete
    someone's files. Nor may ``out`` be the working directory or hold it: a shell left
    in a deleted directory breaks the next command.
    """
    if not str(out).strip():  # Path("") is the working directory
        raise InputError("the output path is empty; name a directory to write to")
    target = Path(out).resolve()
    if input_path is not None:
        _refuse_overlap(target, input_path)
    try:
        _remove_leftovers(target)
        _refuse_existing(target, overwrite, replaceable)
        staging = _make_staging(target)
    except OSError as error:
        raise InputError(f"cannot write the output {target}: {_os_reason(error)}") from None
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in _FULL and not error.filename:  # a write of ours
            raise InputError(f"cannot write the output {target}: {_os_reason(error)}; the partial output was "
                             f"removed") from None
        raise
    try:
        _refuse_existing(target, overwrite, replaceable)
    except (InputError, OSError) as error:  # the finished outputs are kept: the run may have taken hours
        raise InputError(f"{error}; it changed while the run went on, so the finished outputs were kept in "
                         f"{staging}") from None
    try:
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# A write refused for want of room (disk, quota, file size limit): the OS names no file.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _input_locations(input_path) -> list[Path]:
    """The input's directory or shard files, symlinks resolved, as ``read_dataset`` will see them."""
    name = str(input_path)
    names = expand_braces(name) if "{" in name and not os.path.exists(name) else [name]
    return [Path(each).resolve() for each in names]


def _refuse_overlap(target: Path, input_path) -> None:
    for location in _input_locations(input_path):
        if target == location or target.is_relative_to(location) or location.is_relative_to(target):
            raise InputError(f"output {target} overlaps the input {location}; choose an OUT outside it")


def _refuse_existing(target: Path, overwrite: bool, replaceable: OutputKind) -> None:
    if Path.cwd().resolve().is_relative_to(target):
        raise InputError(f"output {target} is the working directory or holds it; choose an OUT below it")
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(f"output {target} exists and is not a directory")
    if os.path.ismount(target):  # docker -v host:/out: OUT is replaced whole at the end, which a mount refuses
        raise InputError(f"output {target} is a mount point, which cannot be replaced by the finished outputs; "
                         f"choose a directory inside it")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise InputError(f"output {target} exists and is not empty (use --overwrite to replace it)")
    foreign = _not_output_of_kind(target, replaceable)
    if foreign is not None:
        raise InputError(f"output {target} is not empty and is not an earlier output of this command "
                         f"({replaceable.describe()}{foreign}); --overwrite only replaces those: choose another "
                         f"OUT or empty it yourself")


def _not_output_of_kind(directory: Path, kind: OutputKind) -> str | None:
    """None if ``directory`` is an output of ``kind``; else "" or, when only other entries are in the way
    (a .DS_Store, an .ipynb_checkpoints folder: hidden, so unseen), ": it also holds <them>"."""
    try:
        marker = json.loads((directory / kind.marker).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not JSON (UnicodeDecodeError is a
        # ValueError), nested deeper than Python's stack
        return ""
    if not isinstance(marker, dict) or not kind.keys <= marker.keys():
        return ""
    foreign = [] if kind.entries is None else sorted(entry.name for entry in directory.iterdir()
                                                     if entry.name not in kind.entries)
    if not foreign:
        return None
    return f": it also holds {listed([readable_name(name) for name in foreign])}"


def _scratch_name(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target``: ``.<name>.sanitize-<kind>-<host>-<pid>-<random>`` (see _remove_leftovers)."""
    return target.parent / f".{target.name}.sanitize-{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _host_token() -> str:
    """This machine and process namespace, for scratch names: on a shared file system another machine's
    live run, or another container's with the same host name, must not look dead here."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:  # no procfs (macOS)
        namespace = ""
    return safe_component(f"{socket.gethostname() or 'host'}_{namespace}").replace("-", "_")


_HOST = _host_token()


def _remove_leftovers(target: Path) -> None:
    """Delete the scratch directories beside ``target`` that runs on this host left when they were killed
    (SIGKILL, a power cut): each holds a whole set of shards. One whose process still runs is kept. A run
    killed between moving the old ``target`` aside and the new one in left no ``target``: the old one is
    moved back first, as the only copy there is."""
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.sanitize-(tmp|old)-{re.escape(_HOST)}-(\d+)-[0-9a-f]+")
    dead = {}
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _process_alive(int(match.group(2))):
            dead[entry] = match.group(1)
    for entry, kind in dead.items():
        if kind == "old" and not target.exists():
            entry.rename(target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # none, or a number no process can have
        return False
    return True


def _make_staging(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _scratch_name(target, "tmp")
    try:
        staging.mkdir()
    except OSError as error:  # the hidden staging name would only puzzle the user: name the directory,
        # and say what failed there: /proc answers "No such file or directory" for a directory that exists
        raise OSError(error.errno, f"no directory can be made in {target.parent} ({error.strerror})") from error
    return staging


def _os_reason(error: OSError) -> str:
    """What the OS refused and where, in words: mkdir's "File exists" means a file is in the way."""
    if isinstance(error, FileExistsError):
        return f"{error.filename} exists and is not a directory"
    return f"{error.strerror or error}: {error.filename}" if error.filename else str(error.strerror or error)


def _move_into_place(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``; an old ``target`` is renamed aside first and removed last."""
    if not target.exists():
        staging.rename(target)
        return
    retired = _scratch_name(target, "old")
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    # The new outputs are in place: an old file that cannot be deleted (no permission) must not fail the
    # run; the next run into this OUT removes what is left (see _remove_leftovers).
    shutil.rmtree(retired, ignore_errors=True)


def write_outputs(tmp, ingested: Ingested, *, score, suspected, relabel, shard_size: int = 10000,
                  relabeled_format: str = "webdataset", workers: int | None = None) -> dict[str, str]:
    """Write the clean shards, the relabeled set and scores.csv under ``tmp``.

    score float [N] (higher = more likely poisoned), suspected bool [N] and
    relabel int [N] (the clean model's label) are aligned with ``ingested.samples``.
    The relabeled set gives each sample its final label (``final_labels``): the relabel
    of a suspect, the given label of every other sample. Returns the relative
    paths written: {"clean": "clean", "relabeled": "relabeled", "scores": "scores.csv"}.
    With ``relabeled_format="imagefolder"``, what a user of torchvision's ImageFolder
    must know about the tree (see ``write_relabeled_folder``) is appended to
    ``ingested.warnings``, which the manifest records.
    """
    score, suspected, relabel = check_verdicts(ingested, score, suspected, relabel)
    if relabeled_format not in FORMATS:
        raise InputError(f"relabeled format must be one of {', '.join(FORMATS)}, got {relabeled_format!r}")
    tmp = Path(tmp)
    samples = ingested.samples
    clean = [index for index in range(len(samples)) if not suspected[index]]
    sets = [(tmp / "clean", "clean", (_clean_fields(samples[i], float(score[i])) for i in clean))]
    relabeled = tmp / "relabeled"
    final = final_labels(ingested.labels, suspected, relabel)
    if relabeled_format == "imagefolder":
        ingested.warnings.extend(write_relabeled_folder(relabeled, samples, final.tolist(), ingested.classes))
    else:
        sets.append((relabeled, "relabeled", (_relabeled_fields(sample, float(score[i]), bool(suspected[i]),
                                                                int(relabel[i]), int(final[i]))
                                              for i, sample in enumerate(samples))))
    write_shard_sets(sets, shard_size, workers)
    _write_classes(tmp / "clean", ingested.classes)
    _write_classes(relabeled, ingested.classes)
    write_scores(tmp / "scores.csv", samples, score, suspected, relabel)
    return {"clean": "clean", "relabeled": "relabeled", "scores": "scores.csv"}


def final_labels(labels, suspected, relabel) -> np.ndarray:
    """The relabeled set's labels: a suspect takes its relabel, every other sample keeps its given label.

    Only suspects are relabeled. The clean model's label for a sample judged clean is
    a prediction, not a correction: on a weak model (``--quick``) it differed from the
    given label on over half the samples, and even a strong one disagrees with a few
    percent of correct labels. Giving those to the user would silently alter the data
    the defense found nothing wrong with. ``relabel`` stays in scores.csv and in the
    relabeled set's ``.json`` for every sample, for users who want the model's view.
    """
    return np.where(np.asarray(suspected, dtype=bool), np.asarray(relabel, dtype=np.int64),
                    np.asarray(labels, dtype=np.int64))


def check_verdicts(ingested: Ingested, score, suspected, relabel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """score float64, suspected bool, relabel int64 arrays, checked: a mismatch is a bug in the method, not bad data."""
    score = np.asarray(score, dtype=np.float64)
    suspected = np.asarray(suspected, dtype=bool)
    relabel = np.asarray(relabel, dtype=np.int64)
    count = len(ingested.samples)
    if not score.shape == suspected.shape == relabel.shape == (count,):
        raise ValueError(f"score/suspected/relabel must be [{count}], got {score.shape} {suspected.shape} "
                         f"{relabel.shape}")
    if not np.isfinite(score).all():
        raise ValueError("score holds NaN or infinity")
    if count and not (0 <= relabel.min() and relabel.max() < len(ingested.classes)):
        raise ValueError(f"relabel outside 0..{len(ingested.classes) - 1}")
    return score, suspected, relabel


def _clean_fields(sample: Sample, score: float) -> dict:
    meta = {"key": sample.key, "source": sample.source, "label": sample.label, "score": score}
    return carried_fields(sample, _cls(sample.label), meta)


def _relabeled_fields(sample: Sample, score: float, suspected: bool, relabel: int, final: int) -> dict:
    meta = {"original_label": sample.label, "relabel": relabel, "suspected": suspected, "score": score}
    return carried_fields(sample, _cls(final), meta)


def carried_fields(sample: Sample, cls: bytes, meta: dict | None) -> dict:
    """One sample of a written shard: the image, ``.cls``, ``.json`` (``meta``) and the members carried
    with it from the input (``sample.extras``), each with its bytes as they were.

    ``meta`` None (a dataset copy) writes no ``.json`` unless a carried member ends in ``.cls`` or
    ``.json``; then it is ``{"label": ...}``. So wherever such a member is carried, the shard has
    exact ``cls`` and ``json`` fields, and reading it back never takes that member for the label (an
    exact field wins): a poisoned copy's label is not contradicted by the ``"label"`` of the input's
    metadata. A carried field that would take one of ours (the input's own ``.json``, also in another
    case), or that webdataset would not write (a leading ``_``), becomes ``input.<field>``: the input's
    metadata ``.json`` is ``input.json``. A field is made safe as a member name like a key
    (``keys.safe_component``).
    """
    if meta is None and any(field_of(suffix) in LABEL_FIELDS for suffix, _ in sample.extras):
        meta = {"label": int(cls)}
    fields = {"__key__": sample.key, sample.ext: sample.data, "cls": cls}
    if meta is not None:
        fields["json"] = _json(meta)
    taken = {name.casefold() for name in fields}  # webdataset's reader lowercases fields: JSON is json
    for suffix, data in sample.extras:
        name = safe_component(suffix, keep_dots=True)
        while name.casefold() in taken or name.startswith("_"):
            name = f"input.{name}"
        taken.add(name.casefold())
        fields[name] = data
    return fields


def extras_left_out(samples: list[Sample], where: str) -> list[str]:
    """A warning when an ImageFolder tree (``where``) cannot hold the members that came with the samples:
    a file beside an image would be read as a sample of its own, or be skipped."""
    carrying = [sample for sample in samples if sample.extras]
    if not carrying:
        return []
    fields = sorted({suffix for sample in carrying for suffix, _ in sample.extras})
    return [f"{where}: the other members of {len(carrying)} sample(s) ({listed(fields)}) are not in the "
            f"ImageFolder tree, which holds images only; write shards to keep them"]


def _cls(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def _json(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")


def write_shards(directory: Path, prefix: str, samples: Iterable[dict], shard_size: int,
                 workers: int | None = None) -> list[str]:
    """WebDataset shards ``<prefix>-%06d.tar`` of ``shard_size`` samples each; returns their names.

    ``samples`` are dicts of ``__key__`` and field -> bytes. No shard is written
    for no samples. See ``write_shard_sets`` for ``workers``.
    """
    return write_shard_sets([(directory, prefix, samples)], shard_size, workers)[0]


def write_shard_sets(sets: list[tuple[Path, str, Iterable[dict]]], shard_size: int,
                     workers: int | None = None) -> list[list[str]]:
    """``write_shards`` for several (directory, prefix, samples) sets at once; the shard names of each.

    Shards are independent, so from WRITE_POOL_MIN_SAMPLES samples in all they are
    written in parallel by one pool of ``workers`` processes (default: one per available CPU, at
    most one per shard) shared by every set; each shard's bytes are the same either way.
    """
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    names, paths, groups = [], [], []
    for directory, prefix, samples in sets:
        directory.mkdir(parents=True, exist_ok=True)
        iterator = iter(samples)
        chunks = list(iter(lambda: list(itertools.islice(iterator, shard_size)), []))
        names.append([f"{prefix}-{index:06d}.tar" for index in range(len(chunks))])
        paths += [directory / name for name in names[-1]]
        groups += chunks
    parallel = len(groups) > 1 and sum(map(len, groups)) >= WRITE_POOL_MIN_SAMPLES
    with Workers(min(workers or available_cpus(), max(1, len(groups)))) as pool:
        for _ in pool.map(_write_shard, paths, groups, parallel=parallel):
            pass
    return names


def _write_shard(path: Path, samples: list[dict]) -> None:
    # webdataset imports torch (a second or more); importing it here keeps reading and its workers light.
    from webdataset import TarWriter

    with open(path, "wb") as file:
        writer = TarWriter(file, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, compress=False, encoder=False,
                           mtime=TAR_MTIME, format="PAX_FORMAT")
        try:
            for sample in samples:
                writer.write(sample)
        finally:
            writer.close()


def _write_classes(directory: Path, classes: list[str]) -> None:
    """classes.json beside shards, so that ``read_dataset`` of the directory gets the class names back.

    Beside an ImageFolder tree (a relabeled set, a copy) it names the classes its directories
    stand for: torchvision ignores files at the root, and ``read_dataset`` takes the names from
    it, so ``0-air plane`` reads back as the class "air plane"."""
    directory.mkdir(parents=True, exist_ok=True)
    value = {"classes": classes, "written_by": WRITTEN_BY}
    (directory / CLASSES_FILE).write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def write_folder(root: Path, samples: list[Sample], labels: list[int], classes: list[str]) -> list[str]:
    """An ImageFolder tree that ``torchvision.datasets.ImageFolder`` and ``read_dataset`` load back.

    A sample goes to ``<class dir>/<key>.<ext>``, or to ``<key>.<ext>`` when its
    key already starts with its class directory (as ImageFolder keys do), so
    that reading the copy gives the same keys. Every class gets a directory,
    even an empty one, because ImageFolder numbers classes by directory.
    See ``class_dir_names`` for how the directories are named. Returns the
    relative paths written, in sample order.
    """
    _require_safe_names(samples)
    dirs = class_dir_names(classes)
    for name in dirs:
        (root / name).mkdir(parents=True, exist_ok=True)
    stems = folder_paths([sample.key for sample in samples], [dirs[label] for label in labels])
    written = [f"{stem}.{sample.ext}" for stem, sample in zip(stems, samples)]
    for relative, sample in zip(written, samples):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.data)
    return written


def write_relabeled_folder(root: Path, samples: list[Sample], labels: list[int], classes: list[str]) -> list[str]:
    """The relabeled set as a tree that ``torchvision.datasets.ImageFolder(root, allow_empty=True)`` loads.

    Every sample is there, in the directory of its label, with its original bytes; torchvision's
    class indices are ours (see ``write_folder``). Returns warnings for the user: the class
    directories left empty, and the samples torchvision's ImageFolder skips by extension (GIF).
    Those are not re-encoded (DESIGN.md: image bytes are copied, never re-encoded; outside
    tools check them against the manifest's sha256): the warning says how to load them.
    """
    write_folder(root, samples, labels, classes)
    return (_empty_class_warnings(labels, classes) + _skipped_by_torchvision_warnings(samples)
            + extras_left_out(samples, "relabeled/"))


def _empty_class_warnings(labels: list[int], classes: list[str]) -> list[str]:
    # An empty class keeps its directory: without it, torchvision would number every later class one lower.
    used = set(labels)
    empty = [name for index, name in enumerate(class_dir_names(classes)) if index not in used]
    if not empty:
        return []
    return [f"relabeled/: class directories {listed(empty)} are empty (no sample has that label in the "
            f"relabeled set); load with torchvision.datasets.ImageFolder(..., allow_empty=True), which keeps "
            f"the class indices"]


def _skipped_by_torchvision_warnings(samples: list[Sample]) -> list[str]:
    skipped = [f"{sample.key}.{sample.ext}" for sample in samples if sample.ext not in TORCHVISION_EXTS]
    if not skipped:
        return []
    return [f"relabeled/: {len(skipped)} samples have an extension torchvision's ImageFolder skips unless told: "
            f"{listed(skipped)}; to load them too, pass ImageFolder(..., is_valid_file=lambda path: True)"]




def _require_safe_names(samples: list[Sample]) -> None:
    """Keys and extensions become paths: an unsafe one (``..``, absolute, dots) is a bug in the caller."""
    unsafe = [f"{s.key}.{s.ext}" for s in samples if not is_safe_key(s.key) or s.ext not in IMAGE_EXTS]
    if unsafe:
        raise ValueError(f"unsafe sample keys or extensions (make keys with keys.safe_key): {unsafe[:3]}")


def write_scores(path: Path, samples: list[Sample], score, suspected, relabel) -> None:
    """scores.csv: one row per readable sample in input order; suspected is ``true``/``false``."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(SCORES_HEADER)
        for index, sample in enumerate(samples):
            writer.writerow((sample.key, sample.source, sample.label, repr(float(score[index])),
                             "true" if suspected[index] else "false", int(relabel[index])))


def write_dataset(out, samples: list[Sample], classes: list[str], *, fmt: str = "webdataset",
                  shard_size: int = 10000, overwrite: bool = False, workers: int | None = None) -> Path:
    """Write a copy of ``samples`` (bytes as they are, ``sample.label`` as label) to ``out``, atomically.

    ``fmt="webdataset"``: shards ``part-%06d.tar`` (``<key>.<ext>``, ``<key>.cls`` and the members
    carried with the sample, see ``carried_fields``) plus classes.json. ``fmt="imagefolder"``:
    ``<out>/<class>/<key>.<ext>`` (see ``write_folder``; ``extras_left_out`` says what a tree cannot
    hold) plus classes.json. Reading ``out`` back with ``read_dataset`` gives the
    same class names, labels and bytes, and the same keys when ``fmt`` is the format the samples
    were read from (an ImageFolder key starts with its class directory, so
    shards written as a folder gain one). ``overwrite`` replaces only an earlier
    shard copy (a directory whose classes.json says sanitize wrote it). Returns ``Path(out)``.
    """
    if fmt not in FORMATS:
        raise InputError(f"dataset format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if len({sample.key for sample in samples}) != len(samples):
        raise ValueError("sample keys must be unique")
    _require_safe_names(samples)
    if any(not 0 <= sample.label < len(classes) for sample in samples):
        raise ValueError(f"a sample label is outside 0..{len(classes) - 1}")
    with staged_output(out, None, overwrite=overwrite, replaceable=DATASET_COPY) as staging:
        if fmt == "imagefolder":
            write_folder(staging, samples, [sample.label for sample in samples], classes)
        else:
            fields = (carried_fields(s, _cls(s.label), None) for s in samples)
            write_shards(staging, "part", fields, shard_size, workers)
        _write_classes(staging, classes)  # a tree's folders may carry index prefixes: the names come back
    return Path(out)
