"""WebDataset shards -> records (Sample or Unreadable), in shard and member order.

Members are grouped into samples by key: a member name splits into key and field
at the first dot of its base name, the members with the same key form one sample,
and a field seen twice starts a new sample (a duplicate key). WebDataset itself
joins only consecutive members; a plain ``tar czf`` of a folder stores them in
directory order, so members apart are joined by key all the same, with a warning
that WebDataset would not read such a shard correctly. The image is the member
whose field ends in an image extension, the label comes from ``.cls`` (integer
text) or ``.json`` (``{"label": int}``); a sample whose ``.cls`` and ``.json``
labels disagree is unreadable. A sample's other members (a caption ``.txt``,
metadata, a mask, even ``.pyd`` or ``.pth``) are kept as bytes in ``Sample.extras``, to
be carried into the outputs, and never decoded, let alone unpickled; one over the
member cap is left out with a warning. A group with neither an image nor a label
member (``readme.txt``) is not a sample and is counted as skipped. Shards are only
ever opened as local files.

Damage ends the reading of a shard: the samples before it are kept, and the shard
itself becomes one Unreadable (source: the shard) that says where the damage struck
and what was lost. How many samples the unread rest held cannot be known, so that
entry counts once however many it was.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sanitize.formats.images import IMAGE_EXTS
from sanitize.formats.keys import readable_name, safe_key
from sanitize.formats.records import Listing, Sample, Unreadable
from sanitize.formats.tars import CORRUPT_GZIP, Member, TarScan

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
    """Every member that can belong to a sample: the image, the label and the members carried with them."""
    return split_member_name(name) is not None


@dataclass
class _Group:
    """Consecutive members sharing one key."""

    shard: str
    prefix: str
    fields: dict[str, Member] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)  # suffixes of members too large to carry

    def source(self, member: Member | None = None) -> str:
        member = member or next(iter(self.fields.values()))
        return f"{self.shard}:{readable_name(member.name)}"

    def is_sample(self) -> bool:
        """Whether it has an image or a label member; anything else (``readme.txt``) is not a sample."""
        return self._has(IMAGE_EXTS) or self._has(LABEL_FIELDS)

    def is_complete(self) -> bool:
        return self._has(IMAGE_EXTS) and self._has(LABEL_FIELDS)

    def _has(self, names) -> bool:
        return any(field_of(suffix) in names for suffix in self.fields)

    def to_record(self) -> Sample | Unreadable:
        key = safe_key(self.prefix)
        try:
            suffix, image = _pick(self.fields, IMAGE_EXTS, "image")
        except BadSample as error:
            return Unreadable(key, self.source(), str(error))
        sha256 = hashlib.sha256(image.data).hexdigest()
        try:
            label, label_suffix = parse_label(self.fields)
        except BadSample as error:
            return Unreadable(key, self.source(image), str(error), sha256)
        used = {suffix, label_suffix}
        others = sorted((each, member) for each, member in self.fields.items() if each not in used)
        self.left_out = [each for each, member in others if member.data is None]
        extras = tuple((each, member.data) for each, member in others if member.data is not None)
        return Sample(key, self.source(image), label, field_of(suffix), sha256, image.data, extras)


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


def parse_label(fields: dict[str, Member]) -> tuple[int, str | None]:
    """The integer label from ``.cls``, else from ``.json``'s ``"label"``; both must agree. Raises BadSample.

    Also returns the suffix of the ``.cls`` it was read from (None for a ``.json``): that member's value is
    the label, so it is not carried; a ``.json`` is, for the metadata it may hold."""
    if any(field_of(suffix) == "cls" for suffix in fields):
        suffix, member = _pick(fields, ("cls",), "label")
        if len(member.data) > MAX_LABEL_BYTES or not _INTEGER.fullmatch(member.data):
            raise BadSample(f"label is not an integer: {member.data[:40]!r}")
        return _agreeing(_label_value(member.data), fields), suffix
    if any(field_of(suffix) == "json" for suffix in fields):
        return _json_label(_pick(fields, ("json",), "label")[1].data), None
    raise BadSample(f"no label: neither .cls nor .json (fields: {', '.join(fields)})")


def _label_value(text: bytes) -> int:
    """A ``.cls`` that matches ``_INTEGER`` as an int. Leading zeros are dropped first, and a label of more
    than 18 digits is a BadSample: Python refuses to convert more than 4,300 digits (a ValueError, then a
    traceback), and no class list is that long."""
    text = text.strip()
    digits = text.lstrip(b"+-").lstrip(b"0")
    if len(digits) > 18:
        raise BadSample(f"label is out of range: {len(digits)} digits ({text[:20].decode()}...)")
    return -int(digits or b"0") if text.startswith(b"-") else int(digits or b"0")


def _agreeing(label: int, fields: dict[str, Member]) -> int:
    """``label`` (from ``.cls``) unless a ``.json`` names another: which one is right cannot be known.

    A ``.json`` beside ``.cls`` often holds other metadata; one without a usable ``"label"`` is ignored."""
    try:
        other = _json_label(_pick(fields, ("json",), "label")[1].data)
    except BadSample:
        return label
    if other != label:
        raise BadSample(f'labels disagree: .cls says {label}, .json "label" says {other}')
    return label


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
    groups: list[_Group] = []  # in the order their keys first appear
    latest: dict[str, _Group] = {}  # key -> its latest group (a duplicate key starts another)
    scattered: list[str] = []  # keys whose members are not next to each other
    group: _Group | None = None  # the group of the last member read
    last = None  # the name of the last member read, to say where damage struck
    for member in scan.members(_wanted):
        last = member.name
        split = split_member_name(member.name)
        if split is None:
            listing.skip("hidden" if member.name.rpartition("/")[2].startswith(".") else "no_key")
            continue
        prefix, suffix = split
        joined = latest.get(prefix)
        if joined is None or suffix in joined.fields:
            joined = latest[prefix] = _Group(name, prefix)
            groups.append(joined)
        elif joined is not group:
            scattered.append(prefix)
        group = joined
        group.fields[suffix] = member
    _record_end(scan, name, groups, latest, group, last, listing)
    too_large = [f"{each.prefix}.{suffix}" for each in groups for suffix in each.left_out]
    if too_large:
        listing.warnings.append(
            f"{name}: {len(too_large)} member(s) over {MAX_MEMBER_BYTES // 2**20} MiB beside a sample's image "
            f"and label are left out of the outputs (first: {readable_name(too_large[0])!r})")
    if scattered:
        listing.warnings.append(
            f"{name}: the members of {len(set(scattered))} sample(s) are not next to each other (first: key "
            f"{readable_name(scattered[0])!r}); sanitize joined them by key, but WebDataset's own reader "
            f"splits such samples: write shards with their members sorted by name (tar --sort=name)")
    _report(scan, name, listing)
    return listing


def _flush(group: _Group, listing: Listing) -> None:
    if group.is_sample():
        listing.records.append(group.to_record())
    else:
        listing.skip("no_image_or_label")


def _record_end(scan: TarScan, name: str, groups: list[_Group], latest: dict[str, _Group], group: _Group | None,
                last: str | None, listing: Listing) -> None:
    """Flush the groups; on damage, add the shard itself as Unreadable, saying what was lost.

    The sample the damage struck (a member of it cut, or the last one read still missing its
    members) is part of that loss, not a second entry; with a sample's members apart, another
    one still missing a member is listed on its own as well. ``group`` is the last member's
    group, ``latest`` each key's latest group."""
    struck = _struck_prefix(scan, group)
    struck_group = latest.get(struck) if struck is not None else None
    cut = split_member_name(scan.cut_member) if scan.cut_member is not None else None
    if struck_group is not None and cut is not None and cut[1] in struck_group.fields:
        struck_group = None  # the cut member began another sample of that key: the earlier one is whole
    for each in groups:
        if each is not struck_group:
            _flush(each, listing)
    if scan.damage is None:
        return
    listing.records.append(Unreadable(safe_key(name), name, _loss(scan, last, struck is not None)))


def _loss(scan: TarScan, last: str | None, struck: bool) -> str:
    """Where the damage struck and what it cost, for the shard's Unreadable."""
    if scan.cut_member is not None:
        where = f"inside member {readable_name(scan.cut_member)!r}"
    elif last is not None:
        where = f"after member {readable_name(last)!r}"
    elif scan.damage.startswith(CORRUPT_GZIP):  # it reads, but which of its bytes changed cannot be known
        return f"shard's gzip data is corrupt ({scan.damage}): none of its samples was read"
    else:
        return f"not a readable tar shard ({scan.damage}): nothing in it could be read"
    lost = "that sample and the rest" if struck else "the rest"
    return f"shard damaged {where}: {lost} of the shard could not be read ({scan.damage})"


def _struck_prefix(scan: TarScan, group: _Group | None) -> str | None:
    """The key prefix of the sample the damage struck, if it struck one: the cut member's, or the last
    group's when it still lacks its image or label (the rest of its members were behind the damage)."""
    if scan.cut_member is not None:
        return (split_member_name(scan.cut_member) or (scan.cut_member, ""))[0]
    if scan.damage and group is not None and group.is_sample() and not group.is_complete():
        return group.prefix
    return None


def _report(scan: TarScan, name: str, listing: Listing) -> None:
    """What is worth a warning but lost nothing (damage is an Unreadable, see ``_record_end``)."""
    if scan.end_note:
        listing.warnings.append(f"{name}: {scan.end_note}")
    listing.skip("not_regular_file", scan.special)
