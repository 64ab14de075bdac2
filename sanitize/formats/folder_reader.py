"""ImageFolder trees -> records (Sample or Unreadable), in torchvision's order.

``root/<class>/.../<file>``: classes are the sorted names of the visible
directories under root (as torchvision numbers them), files are walked in
sorted directory order, then sorted file name. Hidden files and directories,
files that are not images (by extension, case-insensitive), files directly
under root and links to non-files are skipped and counted.

Links never lead out of the input: nothing whose resolved path lies outside the
resolved root is read, or its bytes would be hashed and copied into the outputs.
Symlinked directories, class directories included, are skipped at every level
(they could loop, or graft another tree in); a file link is read when its target
lies inside the root (the bytes are part of the input, as torchvision would read
them: datasets share one image between classes or splits that way), and skipped
when it leads outside or nowhere. Every skipped link is counted.

Walking happens in the calling process; reading and hashing the files can run in
workers (``read_files``).
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from sanitize.formats.images import IMAGE_EXTS
from sanitize.formats.keys import readable_name, safe_key
from sanitize.formats.records import CLASSES_FILE, Listing, Sample, Unreadable

MAX_FILE_BYTES = 256 * 2**20


def class_dirs(root: Path, listing: Listing) -> list[str]:
    """Sorted visible directory names under root; everything else there but a classes.json is counted as
    skipped."""
    names = []
    for entry in os.scandir(root):
        if entry.name == CLASSES_FILE and entry.is_file(follow_symlinks=False):
            continue
        if entry.name.startswith("."):
            listing.skip("hidden")
        elif entry.is_dir(follow_symlinks=False):
            names.append(entry.name)
        elif entry.is_dir():  # a link to a directory: it could lead out of the input, or back into it (a loop)
            listing.skip("symlinked_dir")
        else:
            listing.skip("outside_class_dir")
    return sorted(names)


def image_files(root: Path, class_dir: Path, listing: Listing) -> list[Path]:
    """Image files under one class directory, in torchvision's order: sorted directories, then sorted names."""
    found: dict[str, list[str]] = {}
    real_root = os.path.realpath(root)

    def unlistable(error: OSError) -> None:  # os.walk drops unreadable directories silently otherwise
        listing.warnings.append(f"cannot list {error.filename}: {error.strerror}")

    for directory, subdirs, files in os.walk(class_dir, onerror=unlistable):
        _prune(directory, subdirs, listing)
        found[directory] = [name for name in files if _is_listed(directory, name, real_root, listing)]
    return [Path(directory, name) for directory in sorted(found) for name in sorted(found[directory])]


def holds_image(root: Path, class_dir: Path) -> bool:
    """Whether ``image_files(root, class_dir)`` would find an image; stops at the first one."""
    listing = Listing()  # what it would skip is not counted: the caller only asks
    real_root = os.path.realpath(root)
    for directory, subdirs, files in os.walk(class_dir):
        _prune(directory, subdirs, listing)
        if any(_is_listed(directory, name, real_root, listing) for name in files):
            return True
    return False


def _is_listed(directory: str, name: str, real_root: str, listing: Listing) -> bool:
    """An image file name that is no link out of the root (nor a dangling one); what is not, is counted."""
    return _is_image_name(name, listing) and _stays_inside(os.path.join(directory, name), real_root, listing)


def _prune(directory: str, subdirs: list[str], listing: Listing) -> None:
    """Keep os.walk out of hidden and symlinked sub-directories (it does not follow links: they could loop)."""
    kept = []
    for name in subdirs:
        if name.startswith("."):
            listing.skip("hidden")
        elif os.path.islink(os.path.join(directory, name)):
            listing.skip("symlinked_dir")
        else:
            kept.append(name)
    subdirs[:] = kept


def _stays_inside(path: str, real_root: str, listing: Listing) -> bool:
    """False (counted) for a link that leads nowhere or out of the root; True for anything else."""
    if not os.path.islink(path):
        return True
    target = os.path.realpath(path)
    if not os.path.exists(target):  # dangling, or a loop of links
        listing.skip("dangling_symlink")
        return False
    if os.path.commonpath([target, real_root]) != real_root:
        listing.skip("symlink_outside_root")
        return False
    return True


def _is_image_name(name: str, listing: Listing) -> bool:
    if name.startswith("."):
        listing.skip("hidden")
        return False
    if os.path.splitext(name)[1][1:].lower() not in IMAGE_EXTS:
        listing.skip("not_image")
        return False
    return True


def file_record(root: Path, path: Path, label: int) -> Sample | Unreadable | None:
    """One file as a record; None when it is (a link to) something that is not a regular file."""
    relative = path.relative_to(root).as_posix()
    source = readable_name(relative)
    stem, ext = os.path.splitext(relative)
    key = safe_key(stem)
    try:
        data = _read_regular(path)
    except OSError as error:
        return Unreadable(key, source, f"cannot read: {error.strerror or error}")
    if data is None:
        return None
    if len(data) > MAX_FILE_BYTES:
        return Unreadable(key, source, f"file larger than {MAX_FILE_BYTES} bytes")
    return Sample(key, source, label, ext[1:].lower(), hashlib.sha256(data).hexdigest(), data)


def _read_regular(path: Path) -> bytes | None:
    """The file's bytes (at most one byte over the cap), or None for a FIFO, device or socket: reading could hang."""
    with open(path, "rb", opener=_open_nonblocking) as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        return file.read(MAX_FILE_BYTES + 1)


def _open_nonblocking(path, flags):
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def read_files(root: Path, files: list[tuple[Path, int]]) -> list[Sample | Unreadable | None]:
    """``file_record`` for each (path, label), in order; runs in a worker for large folders."""
    return [file_record(root, path, label) for path, label in files]
