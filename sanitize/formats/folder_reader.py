"""ImageFolder trees -> records (Sample or Unreadable), in torchvision's order.

``root/<class>/.../<file>``: classes are the sorted names of the visible
directories under root (as torchvision numbers them), files are walked in
sorted directory order, then sorted file name. Hidden files and directories,
files that are not images (by extension, case-insensitive), files directly
under root, links to non-files and symlinked sub-directories (which could
loop) are skipped and counted. Walking happens in the calling process; reading and
hashing the files can run in workers (``read_files``).
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from sanitize.formats.images import IMAGE_EXTS
from sanitize.formats.keys import safe_key
from sanitize.formats.records import Listing, Sample, Unreadable

MAX_FILE_BYTES = 256 * 2**20


def class_dirs(root: Path, listing: Listing) -> list[str]:
    """Sorted visible directory names under root; everything else there is counted as skipped."""
    names = []
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            listing.skip("hidden")
        elif entry.is_dir():
            names.append(entry.name)
        else:
            listing.skip("outside_class_dir")
    return sorted(names)


def image_files(class_dir: Path, listing: Listing) -> list[Path]:
    """Image files under one class directory, in torchvision's order: sorted directories, then sorted names."""
    found: dict[str, list[str]] = {}

    def unlistable(error: OSError) -> None:  # os.walk drops unreadable directories silently otherwise
        listing.warnings.append(f"cannot list {error.filename}: {error.strerror}")

    for directory, subdirs, files in os.walk(class_dir, onerror=unlistable):
        _prune(directory, subdirs, listing)
        found[directory] = [name for name in files if _is_image_name(name, listing)]
    return [Path(directory, name) for directory in sorted(found) for name in sorted(found[directory])]


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
    source = path.relative_to(root).as_posix()
    stem, ext = os.path.splitext(source)
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
