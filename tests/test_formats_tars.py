"""tars.py: the in-memory parser of plain shards gives exactly what the tarfile path gives, or steps aside."""
from __future__ import annotations

import gzip
import io
import tarfile
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
