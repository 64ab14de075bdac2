"""Streaming, damage-aware reading of one tar shard, plain or gzip.

tarfile in stream mode stops *silently* at a cut header, an invalid header or
a missing end-of-archive marker, so ``TarScan`` keeps the most recent bytes of
the stream and, once tarfile stops, looks at what really follows the last
member. Nothing here interprets member names or contents.
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 512
_KEEP = 4 * tarfile.RECORDSIZE  # tarfile reads a record at a time, so the block it stopped at is in here
DAMAGE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


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
    stopped early, ``cut_member`` names a wanted member whose data was cut,
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
        with open(self.path, "rb") as file:
            stream = _RecentBytes(_decompressed(file))
            try:
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
            self.end_note = "no end-of-archive marker: possibly truncated at a member boundary"
        elif len(block) < BLOCK:
            self.damage = f"cut inside a member header at byte {offset}"
        elif block.count(0) != BLOCK:
            self.damage = f"invalid member header at byte {offset}; the rest of the shard was not read"


def _decompressed(file):
    """The shard's tar bytes: gzip is recognised by its magic number, not by the file name."""
    if file.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=file, mode="rb")
    return file
