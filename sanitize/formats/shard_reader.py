"""WebDataset shards -> records (Sample or Unreadable), in shard and member order.

Members are grouped into samples the way WebDataset does it: a member name
splits into key and field at the first dot of its base name, consecutive
members with the same key form one sample, and a field seen twice starts a new
sample. The image is the member whose field ends in an image extension, the
label comes from ``.cls`` (integer text) or ``.json`` (``{"label": int}``).
Other members (``.pyd``, ``.pth``, ``.pickle`` ...) are never read, let alone
unpickled. Shards are only ever opened as local files.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sanitize.formats.images import IMAGE_EXTS
from sanitize.formats.keys import safe_key
from sanitize.formats.records import Listing, Sample, Unreadable
from sanitize.formats.tars import Member, TarScan

MAX_MEMBER_BYTES = 256 * 2**20
MAX_LABEL_BYTES = 2**16
LABEL_FIELDS = ("cls", "json")
_INTEGER = re.compile(rb"\s*[+-]?[0-9]+\s*")


class BadSample(Exception):
    """A sample whose members do not make a usable (image, label) pair."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/key.field.ext`` -> (``dir/key``, ``field.ext``); None for hidden or dot-less base names."""
    directory, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{directory}/{stem}" if directory else stem), suffix


def field_of(suffix: str) -> str:
    """The part of a suffix that says what a member holds: ``seg.PNG`` -> ``png``."""
    return suffix.rpartition(".")[2].lower()


def _wanted(name: str) -> bool:
    return field_of(name) in IMAGE_EXTS or field_of(name) in LABEL_FIELDS


@dataclass
class _Group:
    """Consecutive members sharing one key."""

    shard: str
    prefix: str
    fields: dict[str, Member] = field(default_factory=dict)

    def source(self, member: Member | None = None) -> str:
        member = member or next(iter(self.fields.values()))
        return f"{self.shard}:{member.name}"

    def to_record(self) -> Sample | Unreadable:
        key = safe_key(self.prefix)
        try:
            suffix, image = _pick(self.fields, IMAGE_EXTS, "image")
        except BadSample as error:
            return Unreadable(key, self.source(), str(error))
        sha256 = hashlib.sha256(image.data).hexdigest()
        try:
            label = parse_label(self.fields)
        except BadSample as error:
            return Unreadable(key, self.source(image), str(error), sha256)
        return Sample(key, self.source(image), label, field_of(suffix), sha256, image.data)


def _pick(fields: dict[str, Member], names, what: str) -> tuple[str, Member]:
    """The one member whose field is in ``names``; an exact suffix (no extra dots) wins a tie."""
    found = {suffix: member for suffix, member in fields.items() if field_of(suffix) in names}
    if len(found) > 1:
        found = {suffix: member for suffix, member in found.items() if suffix.lower() in names} or found
    if not found:
        raise BadSample(f"no {what} member (fields: {', '.join(fields)})")
    if len(found) > 1:
        raise BadSample(f"ambiguous: several {what} members ({', '.join(found)})")
    suffix, member = next(iter(found.items()))
    if member.data is None:
        raise BadSample(f"{what} member too large ({member.size} bytes)")
    return suffix, member


def parse_label(fields: dict[str, Member]) -> int:
    """The integer label from ``.cls``, else from ``.json``'s ``"label"``. Raises BadSample."""
    if any(field_of(suffix) == "cls" for suffix in fields):
        text = _pick(fields, ("cls",), "label")[1].data
        if len(text) > MAX_LABEL_BYTES or not _INTEGER.fullmatch(text):
            raise BadSample(f"label is not an integer: {text[:40]!r}")
        return int(text)
    if any(field_of(suffix) == "json" for suffix in fields):
        return _json_label(_pick(fields, ("json",), "label")[1].data)
    raise BadSample(f"no label: neither .cls nor .json (fields: {', '.join(fields)})")


def _json_label(text: bytes) -> int:
    if len(text) > MAX_LABEL_BYTES:
        raise BadSample(f"label .json too large ({len(text)} bytes)")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise BadSample(f"label .json is not valid JSON: {error}") from None
    label = value.get("label") if isinstance(value, dict) else None
    if not isinstance(label, int) or isinstance(label, bool):
        raise BadSample(f'label .json has no integer "label": {text[:60]!r}')
    return label


def list_shard(path: Path, name: str) -> Listing:
    """The records of one shard; ``name`` is how sources refer to it."""
    listing = Listing()
    scan = TarScan(path, MAX_MEMBER_BYTES)
    group: _Group | None = None
    for member in scan.members(_wanted):
        split = split_member_name(member.name)
        if split is None:
            listing.skip("hidden" if member.name.rpartition("/")[2].startswith(".") else "no_key")
            continue
        prefix, suffix = split
        if group is None or group.prefix != prefix or suffix in group.fields:
            _flush(group, listing)
            group = _Group(name, prefix)
        group.fields[suffix] = member
    _record_cut(scan, name, group, listing)
    _report(scan, name, listing)
    return listing


def _flush(group: _Group | None, listing: Listing) -> None:
    if group is not None:
        listing.records.append(group.to_record())


def _record_cut(scan: TarScan, name: str, group: _Group | None, listing: Listing) -> None:
    """Flush the last group, or make it Unreadable when the cut member was one of its own."""
    if scan.cut_member is None:
        _flush(group, listing)
        return
    prefix = (split_member_name(scan.cut_member) or (scan.cut_member, ""))[0]
    if group is not None and group.prefix != prefix:
        _flush(group, listing)
    error = f"shard damaged inside member {scan.cut_member!r}: {scan.damage}"
    listing.records.append(Unreadable(safe_key(prefix), f"{name}:{scan.cut_member}", error))


def _report(scan: TarScan, name: str, listing: Listing) -> None:
    if scan.damage:
        listing.warnings.append(f"{name}: damaged, samples before the damage kept: {scan.damage}")
    if scan.end_note:
        listing.warnings.append(f"{name}: {scan.end_note}")
    listing.skip("not_regular_file", scan.special)
