"""Streaming, damage-aware reading of one tar shard, plain or gzip.

tarfile in stream mode stops *silently* at a cut header, an invalid header or
a missing end-of-archive marker, so ``TarScan`` keeps the most recent bytes of
the stream and, once tarfile stops, looks at what really follows the last
member. Nothing here interprets member names or contents.

Most shards are plain: ASCII names, regular files and directories, intact. Those
(up to IN_MEMORY_BYTES decompressed) are parsed in memory, faster than tarfile's
per-header Python (a CIFAR shard lists in half the time, hashing and all); the first
thing that is not plain (damage, links, PAX or GNU long-name headers, a bad checksum
or number, a name prefix, non-ASCII) hands the whole shard to the tarfile path,
which reads and reports it as always.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 512
_KEEP = 4 * tarfile.RECORDSIZE  # tarfile reads a record at a time, so the block it stopped at is in here
DAMAGE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
IN_MEMORY_BYTES = 256 * 2**20  # larger shards stream through tarfile: 16 workers must not hold 16 GB
END_NOTE = "no end-of-archive marker: possibly truncated at a member boundary"
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode ... devminor


@dataclass(frozen=True)
class Member:
    """A regular-file member; ``data`` is None when it was not wanted or is larger than the cap."""

    name: str
    size: int
    data: bytes | None


class _RecentBytes(io.RawIOBase):
    """A read-only stream that counts what was read and keeps the last ``_KEEP`` bytes."""

    def __init__(self, raw):
        self.raw = raw
        self.position = 0
        self.recent = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self._remember(data)
        return len(data)

    def _remember(self, data: bytes) -> None:
        self.position += len(data)
        self.recent += data
        del self.recent[:-_KEEP]

    def bytes_at(self, offset: int, count: int) -> bytes:
        """Up to ``count`` bytes from ``offset`` (a recent position), reading further as needed; short at the end."""
        while self.position < offset + count and (data := self.raw.read(offset + count - self.position)):
            self._remember(data)
        start = offset - (self.position - len(self.recent))
        if start < 0:
            raise AssertionError(f"offset {offset} is older than the kept bytes")
        return bytes(self.recent[start:start + count])


class TarScan:
    """The regular-file members of one shard, in order.

    After ``members()`` is exhausted: ``damage`` (str or None) says why reading
    stopped early (or never started: a file that cannot be opened, an empty file,
    one that is not a tar), ``cut_member`` names a wanted member whose data was cut,
    ``end_note`` flags a shard that ends without an end-of-archive marker (it
    may have been truncated at a member boundary), ``special`` counts links and
    devices that were skipped.
    """

    def __init__(self, path, max_member_bytes: int):
        self.path = path
        self.max_member_bytes = max_member_bytes
        self.damage: str | None = None
        self.cut_member: str | None = None
        self.end_note: str | None = None
        self.special = 0

    def members(self, wanted: Callable[[str], bool]) -> Iterator[Member]:
        """Yield members; ``wanted(name)`` says whether to read the data."""
        try:
            file = open(self.path, "rb")
        except OSError as error:  # no permission, an I/O error: this shard is lost, the others are still read
            self.damage = f"cannot open: {error.strerror or error}"
            return
        with file:
            plain = self._read_plain(file, wanted)
            if plain is None:
                yield from self._read_stream(file, wanted)
                return
        members, self.end_note = plain
        yield from members

    def _read_plain(self, file, wanted) -> tuple[list[Member], str | None] | None:
        """(members, end note) of a plain shard read whole into memory, or None: use tarfile."""
        if os.fstat(file.fileno()).st_size > IN_MEMORY_BYTES:  # image shards barely compress: too big either way
            return None
        try:
            raw = _decompressed(file).read(IN_MEMORY_BYTES + 1)
        except DAMAGE_ERRORS:
            return None
        if len(raw) > IN_MEMORY_BYTES:
            return None
        return parse_plain(raw, wanted, self.max_member_bytes)

    def _read_stream(self, file, wanted) -> Iterator[Member]:
        """The members as tarfile's stream mode reads them, the damage recorded where it stops."""
        try:
            file.seek(0)
            stream = _RecentBytes(_decompressed(file))
            tar = tarfile.open(fileobj=stream, mode="r|")
            yield from self._walk(tar, wanted)
            self._check_end(stream, tar.offset)
        except DAMAGE_ERRORS as error:
            self.damage = f"{type(error).__name__}: {error}"

    def _walk(self, tar: tarfile.TarFile, wanted) -> Iterator[Member]:
        while (info := tar.next()) is not None:
            tar.members = []  # stream mode keeps every header otherwise; memory would grow with the shard
            if not info.isreg():
                self.special += not info.isdir()
                continue
            data = None
            if wanted(info.name) and info.size <= self.max_member_bytes:
                self.cut_member = info.name
                data = tar.extractfile(info).read()
                self.cut_member = None
            yield Member(info.name, info.size, data)

    def _check_end(self, stream: _RecentBytes, offset: int) -> None:
        """Classify what follows the last member: end marker, nothing, a cut header, or garbage."""
        block = stream.bytes_at(offset, BLOCK)
        if stream.position < offset:
            self.damage = f"cut inside the data of the last member ({stream.position} of {offset} bytes)"
        elif not block:
            self.end_note = END_NOTE
        elif len(block) < BLOCK:
            self.damage = f"cut inside a member header at byte {offset}"
        elif block.count(0) != BLOCK:
            self.damage = f"invalid member header at byte {offset}; the rest of the shard was not read"


def parse_plain(raw: bytes, wanted, max_member_bytes: int) -> tuple[list[Member], str | None] | None:
    """The members of the tar ``raw`` and its end note, as tarfile would give them, or None if it is not plain.

    Plain: every header has a valid checksum, an ASCII name, no name prefix, an octal
    size and type regular or directory (a directory with no data); every member's data
    and padding are all there; the archive ends in a zero block or exactly after a member.
    An empty file is not plain: tarfile calls it what it is, not a tar.
    """
    if not raw:
        return None
    members, position, numbers_seen = [], 0, set()
    while True:
        header = raw[position:position + BLOCK]
        if not header:
            return members, END_NOTE
        if len(header) < BLOCK:
            return None
        if header.count(0) == BLOCK:
            return members, None
        parsed = _plain_header(header, numbers_seen)
        if parsed is None:
            return None
        name, size, regular = parsed
        start = position + BLOCK
        position = start + -(-size // BLOCK) * BLOCK
        if position > len(raw) or not (regular or size == 0):
            return None
        if regular:
            take = wanted(name) and size <= max_member_bytes
            members.append(Member(name, size, raw[start:start + size] if take else None))


def _plain_header(header: bytes, numbers_seen: set) -> tuple[str, int, bool] | None:
    """(name, size, regular?) of a plain header (see ``parse_plain``), or None.

    ``numbers_seen`` holds the mode ... devminor bytes of headers already checked: the
    members of one shard nearly always share them, so each distinct run is parsed once.
    """
    checksum, size = _octal(header[148:156]), _octal(header[124:136])
    if checksum is None or size is None or size < 0 or checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        return None
    numbers = header[100:124] + header[136:148] + header[329:345]
    if numbers not in numbers_seen:
        if any(_octal(header[start:end]) is None for start, end in _OTHER_NUMBERS):  # tarfile would stop there
            return None
        numbers_seen.add(numbers)
    if header[345:500].split(b"\0", 1)[0]:  # a ustar name prefix: leave it to tarfile
        return None
    name_bytes, kind = header[:100].split(b"\0", 1)[0], header[156:157]
    if not name_bytes.isascii():
        return None
    name = name_bytes.decode("ascii")
    if kind == b"5" or (kind == b"\0" and name.endswith("/")):
        return name, size, False
    return (name, size, True) if kind in (b"0", b"\0") else None


def _octal(field: bytes) -> int | None:
    """A header number as tarfile reads it when it is octal text; None for base-256 or garbage."""
    if field[:1] in (b"\x80", b"\xff"):
        return None
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _decompressed(file):
    """The shard's tar bytes: gzip is recognised by its magic number, not by the file name."""
    if file.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=file, mode="rb")
    return file
