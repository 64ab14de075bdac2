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

Both paths look past the end: data after the tar's end-of-archive marker and bytes
after a gzip's last member that are not gzip are noted (``end_note``), not read;
zero padding after either is normal and passes. A gzip shard is decompressed to its
very end before any member is given out, so that every gzip member's CRC-32 is checked
(tarfile stops at the end-of-archive marker, before the one check gzip has): a shard
that fails it gives no member at all (see ``TarScan._inflate_all``).
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
GZIP_MAGIC = b"\x1f\x8b"
CORRUPT_GZIP = "corrupt gzip data"  # how ``damage`` begins for a gzip that failed its CRC-32 or length check
_GZIP_INPUT = 2**14  # compressed bytes inflated at a time: at most ~16 MiB come out, even of a gzip bomb
_GZIP_CUT = "Compressed file ended before the end-of-stream marker was reached"  # gzip's own words
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode ... devminor


@dataclass(frozen=True)
class Member:
    """A regular-file member; ``data`` is None when it was not wanted or is larger than the cap."""

    name: str
    size: int
    data: bytes | None


def after_end_note(offset: int) -> str:
    """The end note of a tar whose end-of-archive marker (a zero block) is followed by more than zero padding.

    Not read on, as ``tar --ignore-zeros`` would: WebDataset's reader (tarfile) stops at the marker too, so
    what sanitize checks stays what training reads, and reading on would also mean skipping whatever
    follows that is not a header, silently. Said, so that the data is not lost without a word."""
    return (f"the end-of-archive marker at byte {offset} of the tar is followed by data that was not read "
            f"(tars joined with cat, or a stray zero block? WebDataset stops there too, tar --ignore-zeros reads on)")


def _gzip_note(offset: int) -> str:
    return (f"the bytes after the gzip data (from byte {offset}) are not gzip and were not read "
            f"(gzip -d ignores them too, with a warning)")


class CorruptGzip(gzip.BadGzipFile):
    """A gzip member whose data does not match the CRC-32 or length stored after it: some byte was altered."""


class _Gunzip(io.RawIOBase):
    """The data of a gzip file: its members' decompressed bytes, in order, as ``gzip -d`` gives them.

    Not ``gzip.GzipFile``: its errors do not tell apart what must be told apart here. A member that
    fails its CRC-32 or length check raises CorruptGzip. Bytes after the last member that are not
    gzip end the data, and ``trailing`` says where they start (GzipFile raises; ``gzip -d`` warns
    "trailing garbage ignored"); zero bytes there are padding. Raises EOFError when the file ends
    inside a member and zlib.error (or BadGzipFile, for a header) on data that does not decompress.
    """

    def __init__(self, file):
        self.file = file
        self.pending = b""  # compressed bytes read from the file and not used yet
        self.offset = 0  # where ``pending`` starts in the file
        self.inflate = None  # the current member's decompressor; None before a member's header
        self.crc = self.size = 0  # of the current member's data so far
        self.ended = False
        self.trailing: int | None = None
        self.left = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.left:
            self.left = memoryview(self.more())
        count = min(len(buffer), len(self.left))
        buffer[:count] = self.left[:count]
        self.left = self.left[count:]
        return count

    def more(self) -> bytes:
        """The next decompressed bytes; b"" once the last member has ended and passed its checks."""
        while not self.ended:
            if self.inflate is None:
                self._start_member()
            elif self.inflate.eof:
                self._end_member()
            else:
                chunk = self.pending or self._read()
                data = self.inflate.decompress(chunk)
                self.pending = self.inflate.unused_data  # the member's trailer and what follows it, once at its end
                self.offset += len(chunk) - len(self.pending)
                if data:
                    self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)
                    return data
        return b""

    def _read(self) -> bytes:
        data = self.file.read(_GZIP_INPUT)
        if not data:
            raise EOFError(_GZIP_CUT)
        return data

    def _take(self, count: int) -> bytes:
        """The next ``count`` compressed bytes; EOFError if the file ends first."""
        while len(self.pending) < count:
            self.pending += self._read()
        taken, self.pending = self.pending[:count], self.pending[count:]
        self.offset += count
        return taken

    def _skip_past_zero(self) -> None:
        """Skip a zero-terminated header field (a file name or a comment), however long."""
        while (end := self.pending.find(0)) < 0:
            self.offset += len(self.pending)
            self.pending = self._read()
        self._take(end + 1)

    def _start_member(self) -> None:
        """Read a member's header (RFC 1952); the magic number was seen by whoever started it."""
        start = self.offset
        header = self._take(10)
        if header[2] != 8:
            raise gzip.BadGzipFile(f"unknown compression method {header[2]} in the gzip header at byte {start}")
        flags = header[3]
        if flags & 4:  # FEXTRA
            self._take(int.from_bytes(self._take(2), "little"))
        for flag in (8, 16):  # FNAME, FCOMMENT
            if flags & flag:
                self._skip_past_zero()
        if flags & 2:  # FHCRC
            self._take(2)
        self.inflate, self.crc, self.size = zlib.decompressobj(-zlib.MAX_WBITS), 0, 0

    def _end_member(self) -> None:
        """Check the member just inflated against its trailer, then go on to the next member or end."""
        trailer = self._take(8)
        if int.from_bytes(trailer[:4], "little") != self.crc:
            raise CorruptGzip(f"CRC-32 check failed for the gzip member ending at byte {self.offset}")
        if int.from_bytes(trailer[4:], "little") != self.size % 2**32:
            raise CorruptGzip(f"length check failed for the gzip member ending at byte {self.offset}")
        self.inflate = None
        while len(self.pending) < 2 and (data := self.file.read(_GZIP_INPUT)):
            self.pending += data
        if self.pending[:2] == GZIP_MAGIC:
            return  # another member: concatenated gzip files decompress to the concatenation
        self.ended = True
        rest, self.pending = self.pending, b""
        while rest:
            if rest.count(0) != len(rest):
                self.trailing = self.offset
                return
            rest = self.file.read(_GZIP_INPUT)


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
        start = self._index(offset)
        return bytes(self.recent[start:start + count])

    def _index(self, offset: int) -> int:
        """Where stream position ``offset`` lies in ``recent``."""
        start = offset - (self.position - len(self.recent))
        if start < 0:
            raise AssertionError(f"offset {offset} is older than the kept bytes")
        return start

    def zeros_to_end(self, offset: int) -> bool:
        """Whether only zero bytes follow ``offset`` (a recent position): reads to the end or the first other byte."""
        start = self._index(offset)
        if self.recent.count(0, start) != len(self.recent) - start:
            return False
        while data := self.raw.read(_KEEP):
            self._remember(data)
            if data.count(0) != len(data):
                return False
        return True


class TarScan:
    """The regular-file members of one shard, in order.

    After ``members()`` is exhausted: ``damage`` (str or None) says why reading
    stopped early (or never started: a file that cannot be opened, an empty file,
    one that is not a tar), ``cut_member`` names a wanted member whose data was cut,
    ``end_note`` flags a shard that ends without an end-of-archive marker (it
    may have been truncated at a member boundary) or with data after it, or a gzip
    shard with bytes after its gzip data (both are then said, joined by "; "),
    ``special`` counts links and devices that were skipped.
    """

    def __init__(self, path, max_member_bytes: int):
        self.path = path
        self.max_member_bytes = max_member_bytes
        self.damage: str | None = None
        self.cut_member: str | None = None
        self.end_note: str | None = None
        self.special = 0
        self._gzip_note: str | None = None

    def members(self, wanted: Callable[[str], bool]) -> Iterator[Member]:
        """Yield members; ``wanted(name)`` says whether to read the data."""
        try:
            file = open(self.path, "rb")
        except OSError as error:  # no permission, an I/O error: this shard is lost, the others are still read
            self.damage = f"cannot open: {error.strerror or error}"
            return
        with file:
            plain = self._read_plain(file, wanted)
            if plain is None and self.damage is None:  # damage already: a gzip that failed its check
                yield from self._read_stream(file, wanted)
        if plain is not None:
            members, self.end_note = plain
            yield from members
        self.end_note = "; ".join(note for note in (self.end_note, self._gzip_note) if note) or None

    def _read_plain(self, file, wanted) -> tuple[list[Member], str | None] | None:
        """(members, end note) of a plain shard read whole into memory, or None: use tarfile (or,
        where ``damage`` is set, nothing)."""
        # image shards barely compress: a file over the limit is too big either way
        keep = IN_MEMORY_BYTES if os.fstat(file.fileno()).st_size <= IN_MEMORY_BYTES else -1
        if file.peek(2)[:2] == GZIP_MAGIC:
            raw = self._inflate_all(file, keep)
        else:
            try:
                raw = file.read(keep + 1) if keep >= 0 else None
            except DAMAGE_ERRORS:
                return None
        if raw is None or len(raw) > keep:
            return None
        return parse_plain(raw, wanted, self.max_member_bytes)

    def _inflate_all(self, file, keep: int) -> bytes | None:
        """The decompressed tar if it is at most ``keep`` bytes, else None; the gzip is read to its end either way.

        To its end, however large, because a gzip's one check of its data is each member's CRC-32
        (and length), stored after the member: tarfile stops at the tar's end-of-archive marker and
        never reaches it, so a changed byte would go out as a sample. When a check fails, which bytes
        changed cannot be known: an image, a label, a tar header (a name, a size: where the members
        begin). So no member of the shard is given out, and it is one Unreadable (``damage``) rather
        than samples with a warning: nothing says which of them are altered, and altered pixels or
        labels must not pass on as clean data. The same goes for data that does not inflate (a zlib
        error): zlib notices a changed byte some way after it, and what it gave out in between may be
        altered. A gzip that is only cut short is left to the tarfile path, which reads up to the cut
        and says where, as for a plain tar: deflate output before a cut is exactly what was
        compressed. The cost: a gzip shard over
        IN_MEMORY_BYTES is decompressed twice, once here and once by tarfile.
        """
        stream = _Gunzip(file)
        chunks, size = [], 0
        try:
            while data := stream.more():
                size += len(data)
                if size <= keep:
                    chunks.append(data)
                elif chunks:
                    chunks = []
        except (gzip.BadGzipFile, zlib.error) as error:  # a failed check (CorruptGzip), data that does not inflate
            self.damage = f"{CORRUPT_GZIP}, any member may be altered: {type(error).__name__}: {error}"
            return None
        except DAMAGE_ERRORS:  # cut short (EOFError), unreadable: the tarfile path keeps what came before
            return None
        if stream.trailing is not None:
            self._gzip_note = _gzip_note(stream.trailing)
        return b"".join(chunks) if size <= keep else None

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
        elif not stream.zeros_to_end(offset):
            self.end_note = after_end_note(offset)


def parse_plain(raw: bytes, wanted, max_member_bytes: int) -> tuple[list[Member], str | None] | None:
    """The members of the tar ``raw`` and its end note, as tarfile would give them, or None if it is not plain.

    Plain: every header has a valid checksum, an ASCII name, no name prefix, an octal
    size and type regular or directory (a directory with no data); every member's data
    and padding are all there; the archive ends in a zero block or exactly after a member.
    An empty file is not plain: tarfile calls it what it is, not a tar. Data after the
    end-of-archive marker is not read, as tarfile does not, but noted (``after_end_note``).
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
            return members, None if raw.count(0, position) == len(raw) - position else after_end_note(position)
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
    if file.peek(2)[:2] == GZIP_MAGIC:
        return _Gunzip(file)
    return file
