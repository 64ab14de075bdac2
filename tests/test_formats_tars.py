"""tars.py: the in-memory parser of plain shards gives exactly what the tarfile path gives, or steps aside."""
from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from pathlib import Path

import pytest

from sanitize.formats import tars

CAP = 4096  # max member bytes: the "large" member below is over it


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **extra) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type = (len(data), kind) if kind == tarfile.REGTYPE else (0, kind)
    for key, value in extra.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def build(fmt: int, entries) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for entry in entries:
            add(tar, *entry[:2], **(entry[2] if len(entry) > 2 else {}))
    return buffer.getvalue()


PLAIN = [("a/000.jpg", b"\xff\xd8 jpeg"), ("a/000.cls", b"3"), ("a/", b"", {"type": tarfile.DIRTYPE}),
         ("a/001.jpg", b"x" * 600), ("a/001.cls", b""), ("a/big.jpg", b"y" * (CAP + 1)), ("a/skip.txt", b"text")]


def with_field(raw: bytes, start: int, value: bytes) -> bytes:
    """``raw`` with the first header's bytes at ``start`` replaced and its checksum made valid again."""
    header = bytearray(raw[:512])
    header[start:start + len(value)] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + raw[512:]


def damaged(raw: bytes) -> dict[str, bytes]:
    ustar_header_end = 512 + 512  # first member's header + its one data block
    bad_checksum = bytearray(raw)
    bad_checksum[ustar_header_end + 10] ^= 1  # a byte of the second header's name
    last_member_end = -(-len(raw.rstrip(b"\0")) // 512) * 512  # the last data block; zero blocks follow
    return {
        "no_end_marker": raw[:last_member_end],
        "cut_in_data": raw[:512 * 5 + 100],
        "cut_in_header": raw[:512 * 2 + 100],
        "bad_checksum": bytes(bad_checksum),
        "garbage_after": raw[:-1024] + b"garbage!" * 64 + raw[-512:],
        "bad_mtime": with_field(raw, 136, b"garbage\0"),  # checksum valid, but tarfile stops here
        "base256_size": with_field(raw, 124, b"\x80" + bytes(10) + b"\x0e"),
    }


def cases() -> dict[str, bytes]:
    plain = build(tarfile.USTAR_FORMAT, PLAIN)
    found = {"ustar": plain, "gnu": build(tarfile.GNU_FORMAT, PLAIN), "pax_plain": build(tarfile.PAX_FORMAT, PLAIN),
             "empty": build(tarfile.USTAR_FORMAT, []),
             "long_name_gnu": build(tarfile.GNU_FORMAT, [("d/" + "n" * 150 + ".jpg", b"z")]),
             "long_name_pax": build(tarfile.PAX_FORMAT, [("d/" + "n" * 150 + ".jpg", b"z")]),
             "prefix_ustar": build(tarfile.USTAR_FORMAT, [("p" * 120 + "/x.jpg", b"z")]),
             "unicode": build(tarfile.PAX_FORMAT, [("猫/x.jpg", b"z"), ("猫/x.cls", b"1")]),
             "symlink": build(tarfile.USTAR_FORMAT, [("x.jpg", b"z"), ("y.jpg", b"", {"type": tarfile.SYMTYPE,
                                                                                     "linkname": "x.jpg"})])}
    found.update(damaged(plain))
    return found


def scan(path: Path) -> tuple:
    reader = tars.TarScan(path, CAP)
    members = list(reader.members(lambda name: not name.endswith(".txt")))
    return members, reader.damage, reader.cut_member, reader.end_note, reader.special


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(cases()))
def test_in_memory_parse_gives_what_tarfile_gives(case, compress, tmp_path, monkeypatch):
    raw = cases()[case]
    path = tmp_path / ("shard.tar.gz" if compress else "shard.tar")
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    fast = scan(path)
    if case == "no_end_marker":
        assert fast[3] == tars.END_NOTE and fast[0]
    if case in ("cut_in_data", "cut_in_header", "bad_checksum", "bad_mtime"):
        assert fast[1]  # damage reported
    if case == "garbage_after":  # after the end-of-archive marker: not read, but said, not lost without a word
        assert fast[0] and not fast[1] and "followed by data that was not read" in fast[3]
    monkeypatch.setattr(tars, "IN_MEMORY_BYTES", -1)  # every shard through tarfile
    assert fast == scan(path)


@pytest.mark.parametrize("case, plain", [
    ("ustar", True), ("gnu", True), ("pax_plain", True), ("empty", True), ("no_end_marker", True),
    ("long_name_gnu", False), ("long_name_pax", False), ("prefix_ustar", False), ("unicode", False),
    ("symlink", False), ("cut_in_data", False), ("cut_in_header", False), ("bad_checksum", False),
    ("bad_mtime", False), ("base256_size", False)])
def test_only_plain_shards_are_parsed_in_memory(case, plain):
    parsed = tars.parse_plain(cases()[case], lambda name: True, CAP)
    assert (parsed is not None) == plain
    if case == "ustar":
        members, end_note = parsed
        assert [m.name for m in members] == ["a/000.jpg", "a/000.cls", "a/001.jpg", "a/001.cls", "a/big.jpg",
                                             "a/skip.txt"]
        assert members[0].data == b"\xff\xd8 jpeg" and members[4].data is None and end_note is None


def test_real_cifar_shards_read_the_same_through_both_paths(make_shards, tmp_path, monkeypatch):
    from sanitize.formats import read_dataset, write_dataset

    made = read_dataset(make_shards(300, 100), workers=1)
    # the shards this project writes (webdataset's TarWriter) take the fast path
    ours = write_dataset(tmp_path / "ours", made.samples, made.classes, shard_size=100)
    paths = sorted(ours.glob("*.tar"))
    assert len(paths) == 3 and all(tars.parse_plain(path.read_bytes(), lambda name: True, CAP) for path in paths)
    fast = read_dataset(ours, workers=1)
    monkeypatch.setattr(tars, "IN_MEMORY_BYTES", -1)
    slow = read_dataset(ours, workers=1)
    assert [(s.key, s.source, s.label, s.sha256) for s in fast.samples] == \
        [(s.key, s.source, s.label, s.sha256) for s in slow.samples]
    assert (fast.images == slow.images).all() and fast.fingerprint == slow.fingerprint
    assert [s.data for s in fast.samples] == [s.data for s in made.samples]


def mutations(raw: bytes, count: int, seed: int = 0):
    """``count`` damaged copies of ``raw``: bytes flipped (mostly in headers), cuts, blocks dropped or repeated."""
    import random

    rng = random.Random(seed)
    blocks = len(raw) // 512
    for index in range(count):
        data = bytearray(raw)
        kind = index % 4
        if kind == 0:  # a few bytes of one header or data block changed
            block = rng.randrange(blocks)
            for _ in range(rng.randint(1, 4)):
                data[block * 512 + rng.randrange(512)] = rng.randrange(256)
        elif kind == 1:  # a number field rewritten with its checksum made valid, as a careful forger would
            data = bytearray(with_field(raw, rng.choice([100, 108, 116, 124, 136, 156, 257, 345]),
                                        bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))))
        elif kind == 2:  # cut anywhere
            data = data[:rng.randrange(len(raw))]
        else:  # a block dropped or repeated
            block = rng.randrange(blocks) * 512
            data = data[:block] + (data[block:block + 512] * 2 if rng.random() < 0.5 else b"") + data[block + 512:]
        yield bytes(data)


def test_fuzzed_shards_read_the_same_through_both_paths_and_never_raise(tmp_path, monkeypatch):
    """A differential fuzz: whatever the damage, the in-memory parser either steps aside or agrees with tarfile."""
    raw = build(tarfile.USTAR_FORMAT, PLAIN)
    path = tmp_path / "shard.tar"
    for data in mutations(raw, 400):
        path.write_bytes(data)
        with monkeypatch.context() as patch:
            fast = scan(path)
            patch.setattr(tars, "IN_MEMORY_BYTES", -1)
            slow = scan(path)
        assert fast == slow, data


def test_an_empty_or_unopenable_shard_is_damage_not_a_crash(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert tars.parse_plain(b"", lambda name: True, CAP) is None  # tarfile names it: not a tar at all
    assert scan(empty)[:2] == ([], "ReadError: empty file")
    folder = tmp_path / "folder.tar"
    folder.mkdir()
    assert scan(folder)[:2] == ([], "cannot open: Is a directory")


def scan_both(path: Path, monkeypatch) -> tuple:
    """``scan`` of ``path`` in memory and through tarfile, which must agree."""
    fast = scan(path)
    with monkeypatch.context() as patch:
        patch.setattr(tars, "IN_MEMORY_BYTES", -1)
        assert scan(path) == fast
    return fast


def crc_damaged(raw: bytes, where: str) -> bytes:
    """``raw`` gzipped with one byte changed that only the CRC-32 or length check after the data can catch.

    Stored (level 0) blocks hold the data as it is, so a byte of it changed decompresses without an error."""
    packed = bytearray(gzip.compress(raw, compresslevel=0, mtime=0))
    if where == "data":
        packed[packed.find(b"x" * 600) + 300] ^= 1  # inside a/001.jpg's data: every tar header stays intact
    elif where == "crc":
        packed[-8] ^= 1
    elif where == "length":
        packed[-4] ^= 1
    else:  # the second of two gzip members, the tar split between them where a/001.jpg's data begins
        return gzip.compress(raw[:3072], mtime=0) + crc_damaged(raw[3072:], "data")
    return bytes(packed)


@pytest.mark.parametrize("where", ["data", "crc", "length", "second_member"])
def test_a_gzip_shard_failing_its_crc_gives_no_member_at_all(where, tmp_path, monkeypatch):
    """tarfile stops at the end-of-archive marker, before the gzip trailer, so the CRC failure went unseen and
    the altered image out as a sample. Which member a changed byte is in cannot be known: none is given out."""
    raw = build(tarfile.USTAR_FORMAT, PLAIN)
    packed = crc_damaged(raw, where)
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed|Incorrect length"):  # what gzip -t says too
        gzip.decompress(packed)
    with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(packed)), mode="r|") as tar:  # the hole: read
        assert len([info for info in tar if info.isreg()]) == 6  # to the end-of-archive marker, and no error
    path = tmp_path / "part-000000.tar.gz"
    path.write_bytes(packed)
    members, damage, cut, end_note, special = scan_both(path, monkeypatch)
    assert members == [] and cut is None and end_note is None
    assert damage.startswith("corrupt gzip data, any member may be altered: ")
    assert ("length" if where == "length" else "CRC-32") in damage


def gzip_member(data: bytes, flags: int, name: bytes = b"shard.tar", method: int = 8) -> bytes:
    """One gzip member with the optional header fields ``flags`` asks for (RFC 1952): FEXTRA as bgzip writes it,
    FNAME as ``gzip file.tar`` does, FCOMMENT, and FHCRC, the header's own CRC-16."""
    header = bytes([0x1F, 0x8B, method, flags]) + bytes(4) + b"\x00\x03"
    if flags & 4:
        extra = b"BC" + (2).to_bytes(2, "little") + b"\x12\x34"
        header += len(extra).to_bytes(2, "little") + extra
    if flags & 8:
        header += name + b"\0"
    if flags & 16:
        header += b"made for a test\0"
    if flags & 2:
        header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return header + deflate.compress(data) + deflate.flush() + zlib.crc32(data).to_bytes(4, "little") + \
        (len(data) % 2**32).to_bytes(4, "little")


@pytest.mark.parametrize("flags", [4, 8, 16, 2, 4 | 8 | 16 | 2])
def test_gzip_headers_with_optional_fields_read_as_the_plain_tar(flags, tmp_path, monkeypatch):
    """Real shards carry these fields: ``gzip`` stores the file name, bgzip an extra field, some tools a comment
    or a header CRC. The tar split over two members, the first with a file name longer than one read."""
    raw = build(tarfile.USTAR_FORMAT, PLAIN)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(raw)
    packed = gzip_member(raw[:3072], flags, name=b"n" * (3 * tars._GZIP_INPUT)) + gzip_member(raw[3072:], flags)
    assert gzip.decompress(packed) == raw  # Python's gzip reads it as we mean it
    path = tmp_path / "part-000000.tar.gz"
    path.write_bytes(packed)
    assert scan_both(path, monkeypatch) == scan(plain)
    path.write_bytes(gzip_member(raw, flags, method=7))  # a method gzip does not have
    members, damage = scan_both(path, monkeypatch)[:2]
    assert members == [] and "unknown compression method 7" in damage


def test_a_cifar_gzip_shard_failing_its_crc_is_one_unreadable_not_altered_samples(make_shards, cifar_samples):
    """The audit's case end to end: real JPEGs, one byte of one image changed in a stored gzip stream."""
    from sanitize.formats import read_dataset

    root = make_shards(60, 30)
    raw = (root / "part-000001.tar").read_bytes()
    (root / "part-000001.tar").unlink()
    packed = bytearray(gzip.compress(raw, compresslevel=0, mtime=0))
    jpeg = cifar_samples[40][1]
    packed[packed.find(jpeg[100:300]) + 50] ^= 0x10
    (root / "part-000001.tar.gz").write_bytes(bytes(packed))
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == [key for key, _, _ in cifar_samples[:30]]  # part-000000 only
    [lost] = ingested.unreadable
    assert lost.source == "part-000001.tar.gz" and "CRC-32 check failed" in lost.error
    assert lost.error.startswith("shard's gzip data is corrupt (corrupt gzip data, any member may be altered")
    assert lost.error.endswith("none of its samples was read")


OTHER = [("b/000.jpg", b"\xff\xd8 late"), ("b/000.cls", b"1")]
AFTER_END = "followed by data that was not read"
AFTER_GZIP = "are not gzip and were not read"


def after_end_cases() -> dict[str, tuple[bytes, int, list[str]]]:
    """Shard bytes, how many members are read and what the end note must say, for what may follow a tar's end."""
    raw, other = build(tarfile.USTAR_FORMAT, PLAIN), build(tarfile.USTAR_FORMAT, OTHER)
    packed = gzip.compress(raw, mtime=0)
    return {
        "tars_joined_with_cat": (raw + other, 6, [AFTER_END]),  # GNU tar: "A lone zero block", then stops
        "lone_zero_block_mid_shard": (raw[:2048] + bytes(512) + raw[2048:], 2, [AFTER_END]),
        "gzip_members_each_a_tar": (packed + gzip.compress(other, mtime=0), 6, [AFTER_END]),
        "garbage_after_the_gzip": (packed + b"garbage!", 6, [AFTER_GZIP]),  # gzip -t: "trailing garbage ignored"
        "garbage_after_gzip_zeros": (packed + bytes(100) + b"garbage!", 6, [AFTER_GZIP]),
        "garbage_after_gzip_of_a_tar_without_end": (gzip.compress(raw[:10752], mtime=0) + b"junk", 6,
                                                    [tars.END_NOTE, AFTER_GZIP]),
        # normal: zero padding after the marker or the gzip, and one tar in several gzip members (pigz, bgzip)
        "tar_padded_with_zeros": (raw + bytes(3 * tarfile.RECORDSIZE), 6, []),
        "gzip_padded_with_zeros": (packed + bytes(1000), 6, []),
        "one_tar_in_two_gzip_members": (gzip.compress(raw[:3000], mtime=0) + gzip.compress(raw[3000:], mtime=0), 6,
                                        []),
    }


@pytest.mark.parametrize("case", sorted(after_end_cases()))
def test_what_follows_the_end_is_noted_unless_it_is_padding(case, tmp_path, monkeypatch):
    """Data after the end-of-archive marker, or after the gzip data, was dropped without a word; both paths now
    say so in the end note (a warning naming the shard), and stay quiet about zero padding."""
    data, count, notes = after_end_cases()[case]
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    members, damage, cut, end_note, special = scan_both(path, monkeypatch)
    assert [m.name for m in members] == [name for name, *_ in PLAIN if not name.endswith("/")][:count]
    assert damage is None and cut is None
    parts = end_note.split("; ") if end_note else []  # several notes are joined by "; ", in this order
    assert len(parts) == len(notes) and all(note in part for note, part in zip(notes, parts))
    if AFTER_END in (end_note or ""):
        assert f"marker at byte {10752 if count == 6 else 2048} of the tar" in end_note


def test_tars_joined_with_cat_warn_that_the_second_was_not_read(make_shards, cifar_samples):
    """What the user sees: the first tar's samples and a warning naming the shard; no Unreadable, nothing lost
    without a word. The padded shards the project writes itself warn about nothing."""
    from sanitize.formats import read_dataset

    root = make_shards(60, 30)
    assert read_dataset(root, workers=1).warnings == []
    first, second = root / "part-000000.tar", root / "part-000001.tar"
    first.write_bytes(first.read_bytes() + second.read_bytes())
    second.unlink()
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == [key for key, _, _ in cifar_samples[:30]] and not ingested.unreadable
    [warning] = ingested.warnings
    assert warning.startswith("part-000000.tar: the end-of-archive marker at byte ") and AFTER_END in warning


def gzip_mutations(raw: bytes, count: int, seed: int = 0):
    """``count`` (kind, damaged gzip of ``raw``): a byte changed ("flip", stored or compressed), "cut", "junk"
    appended (after zeros or not) or a "member" appended."""
    import random

    rng = random.Random(seed)
    for index in range(count):
        data = bytearray(gzip.compress(raw, compresslevel=(0, 6)[index % 2], mtime=0))
        kind = ("flip", "cut", "junk", "member")[index // 2 % 4]
        if kind == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "cut":
            data = data[:rng.randrange(len(data))]
        elif kind == "junk":
            data += bytes(rng.randrange(3)) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        else:
            data += gzip.compress(raw[:rng.randrange(len(raw))], mtime=0)
        yield kind, bytes(data)


def test_fuzzed_gzip_shards_read_the_same_through_both_paths(tmp_path, monkeypatch):
    """A differential fuzz of the gzip layer: both paths agree, and a shard gives no member exactly when
    Python's own gzip finds the data corrupt (a failed CRC-32 or length check, data that does not inflate, a
    bad member header), not merely cut short. Bytes after the gzip data are corrupt to Python's gzip, not
    here: they are noted, and the intact tar before them is read."""
    raw = build(tarfile.USTAR_FORMAT, PLAIN)
    path = tmp_path / "shard.tar.gz"
    found = {"crc": 0, "inflate": 0}
    for kind, data in gzip_mutations(raw, 320):
        path.write_bytes(data)
        members, damage = scan_both(path, monkeypatch)[:2]
        try:
            gzip.decompress(data)
            error = None
        except (OSError, EOFError, zlib.error) as raised:
            error = raised
        corrupted = kind in ("flip", "cut") and data[:2] == tars.GZIP_MAGIC and error is not None and \
            not isinstance(error, EOFError)
        assert (damage or "").startswith("corrupt gzip data") == corrupted, (kind, data)
        if corrupted:
            assert members == []
            found["crc" if "CRC check failed" in str(error) or "Incorrect length" in str(error) else "inflate"] += 1
        elif kind == "junk":
            assert len(members) == 6 and damage is None
    assert found["crc"] >= 10 and found["inflate"] >= 3  # the fuzz does reach both (73 and 7 of 320 cases)
