"""Sample keys that are safe as file names, tar member names and WebDataset keys.

A key is made of ``/``-separated components. A component never holds ``.``
(WebDataset splits a member name into key and field at the first dot of its
base name), ``/`` or ``\\``, control characters or characters Windows refuses
in file names; it is never empty, ``..`` or hidden, and never longer than
``MAX_COMPONENT`` characters. The original name always stays in ``source``.
A class directory of an ImageFolder copy may hold dots (``001.Airplane``, as
CUB-200 names its classes): only a base name is split at its first dot.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_COMPONENT = 120
_UNSAFE = re.compile(r'[/\\.<>:"|?*\x00-\x1f\x7f]')
_UNSAFE_IN_DIRECTORY = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')
_EDGE_DOT = re.compile(r"^\.|\.$")  # hidden, "." or "..", or a trailing dot (Windows drops it)
_SEPARATOR = re.compile(r"[/\\]")


def safe_component(part: str, *, keep_dots: bool = False) -> str:
    """One path component made safe; long ones are cut and keep a hash of the whole so they stay distinct.

    ``keep_dots``: a directory name, whose inner dots are harmless."""
    safe = (_UNSAFE_IN_DIRECTORY if keep_dots else _UNSAFE).sub("_", unicodedata.normalize("NFC", part))
    safe = _EDGE_DOT.sub("_", safe) if keep_dots else safe
    safe = "".join("_" if unicodedata.category(char).startswith("C") else char for char in safe)
    if len(safe) > MAX_COMPONENT:
        digest = hashlib.sha256(part.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        safe = f"{safe[:MAX_COMPONENT - 13]}-{digest}"
    return safe or "_"


def safe_key(name: str) -> str:
    """A safe key for ``name``: separators unified, empty/``.``/``..`` components and absolute roots dropped."""
    parts = [part for part in _SEPARATOR.split(name) if part not in ("", ".", "..")]
    return "/".join(safe_component(part) for part in parts) or "_"


def readable_name(name: str) -> str:
    """``name`` as valid UTF-8 text, for a ``source``.

    File and member names are bytes; Python keeps the bytes that are not UTF-8 as
    surrogate escapes, which no strict UTF-8 writer (scores.csv, JSON read elsewhere)
    accepts. They are shown as ``\\xff`` escapes instead; the reader keeps the original
    name to open the file.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_safe_key(key: str) -> bool:
    """Whether ``key`` is already what ``safe_key`` makes of it."""
    return safe_key(key) == key


def dedupe_keys(keys: list[str], *, ignore_case: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Keys made unique in order: the first keeps its key, later ones become ``key~1``, ``key~2`` ...

    Returns the unique keys and the (original, renamed) pairs. Every candidate
    is checked against all keys seen so far, so a renamed key never collides
    with an original ``key~1`` either (that one becomes ``key~1~1``). With
    ``ignore_case``, keys that differ only in case collide too: as file names on
    a case-insensitive file system (macOS, Windows) the second would overwrite the first.
    """
    seen: set[str] = set()
    fold = str.casefold if ignore_case else str
    unique, renamed = [], []
    for key in keys:
        candidate, count = key, 0
        while fold(candidate) in seen:
            count += 1
            candidate = f"{key}~{count}"
        seen.add(fold(candidate))
        unique.append(candidate)
        if candidate != key:
            renamed.append((key, candidate))
    return unique, renamed


def class_dir_names(classes: list[str]) -> list[str]:
    """Directory names for an ImageFolder copy whose sorted order gives back each class's index.

    torchvision numbers ImageFolder classes by sorted directory name, so the
    class names are used as they are only when they are safe, unique (also
    ignoring case, for case-insensitive file systems) and already sorted;
    otherwise every directory is prefixed with its index.
    """
    safe = [safe_component(name, keep_dots=True) for name in classes]
    if safe == classes and sorted(safe) == safe and len({name.casefold() for name in safe}) == len(safe):
        return safe
    width = len(str(len(classes) - 1))
    return [f"{index:0{width}d}-{name}" for index, name in enumerate(safe)]


def folder_placement(key: str, class_dir: str) -> str:
    """Where an ImageFolder copy writes the sample ``key`` in ``class_dir`` (no extension): under it,
    unless the key already starts with that directory, as an ImageFolder input's keys do (the key's
    form of it: ``001_Airplane/x`` goes to ``001.Airplane/x``). ``safe_key`` of it is the key read back."""
    head = f"{safe_component(class_dir)}/"
    return f"{class_dir}/{key[len(head):]}" if key.startswith(head) else f"{class_dir}/{key}"


def folder_paths(keys: list[str], class_dirs: list[str]) -> list[str]:
    """The paths (no extension) an ImageFolder copy writes the samples ``keys`` to, each in its
    ``class_dirs`` entry (``folder_placement``); one that differs from another only in case is renamed
    (``~1``): on macOS or Windows it would overwrite it."""
    return dedupe_keys([folder_placement(key, directory) for key, directory in zip(keys, class_dirs)],
                       ignore_case=True)[0]
