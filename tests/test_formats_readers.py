"""read_dataset: real CIFAR data laid out as shards and folders, plus every hostile input we promise to survive."""
from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from conftest import decode_jpegs, write_shard, write_shards
from sanitize.formats import InputError, build_manifest, read_dataset, validate_manifest
from sanitize.formats import images as images_module
from sanitize.formats import readers as readers_module
from sanitize.formats import shard_reader


def members_of(samples, label_ext="cls"):
    """(name, bytes) tar members for CIFAR (key, jpg, label) samples."""
    members = []
    for key, jpg, label in samples:
        members += [(f"{key}.jpg", jpg), (f"{key}.{label_ext}", str(label).encode())]
    return members


def data_offset(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


def two_labels(samples):
    """The first two samples with different labels (a dataset needs two classes)."""
    first = samples[0]
    return first, next(sample for sample in samples if sample[2] != first[2])


def unreadable_by_key(ingested) -> dict[str, str]:
    return {item.key: item.error for item in ingested.unreadable}


# --- WebDataset: layouts ---------------------------------------------------------------------------------------


def test_shard_directory_reads_every_sample_with_its_bytes_label_and_pixels(make_shards, cifar_samples, cifar_classes):
    ingested = read_dataset(make_shards(200, 80), workers=1)
    assert ingested.format == "webdataset" and ingested.classes == cifar_classes
    assert [s.key for s in ingested.samples] == [key for key, _, _ in cifar_samples[:200]]
    assert [s.data for s in ingested.samples] == [jpg for _, jpg, _ in cifar_samples[:200]]
    assert ingested.labels.tolist() == [label for _, _, label in cifar_samples[:200]]
    expected, _ = decode_jpegs(cifar_samples[:200])
    assert np.array_equal(ingested.images, expected)
    assert ingested.image_size == (32, 32) and "32x32" in ingested.size_rule
    assert ingested.samples[80].source == f"part-000001.tar:{cifar_samples[80][0]}.jpg"
    assert ingested.samples[0].ext == "jpg"
    assert all(s.sha256 == hashlib.sha256(s.data).hexdigest() for s in ingested.samples)
    assert ingested.unreadable == [] and ingested.warnings == [] and ingested.skipped == {}


def test_single_shard_gzip_shard_and_brace_pattern(make_shards, tmp_path, cifar_samples):
    root = make_shards(90, 30)
    gz = tmp_path / "one.tar.gz"
    gz.write_bytes(gzip.compress((root / "part-000000.tar").read_bytes()))
    keys = [key for key, _, _ in cifar_samples[:90]]
    assert [s.key for s in read_dataset(root / "part-000001.tar", workers=1).samples] == keys[30:60]
    assert [s.key for s in read_dataset(gz, workers=1).samples] == keys[:30]
    pattern = read_dataset(f"{root}/part-{{000000..000002}}.tar", workers=1)
    assert [s.key for s in pattern.samples] == keys
    assert pattern.samples[31].source == f"part-000001.tar:{keys[31]}.jpg"


def test_brace_pattern_naming_a_missing_shard_is_an_input_error(make_shards):
    root = make_shards(60, 30)
    with pytest.raises(InputError, match="not found"):
        read_dataset(f"{root}/part-{{000000..000005}}.tar", workers=1)


def test_classes_file_json_label_and_inferred_classes(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    picked = [(key, jpg, label % 3) for key, jpg, label in cifar_samples[:30]]
    members = []
    for key, jpg, label in picked:
        members += [(f"{key}.jpg", jpg), (f"{key}.json", json.dumps({"label": label, "note": "x"}).encode())]
    write_shard(root / "a.tar", members)
    inferred = read_dataset(root, workers=1)
    assert inferred.classes == ["0", "1", "2"] and inferred.labels.tolist() == [label for _, _, label in picked]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\nfish\n")
    assert read_dataset(root, classes_file=names, workers=1).classes == ["cat", "dog", "bird", "fish"]
    (root / "classes.json").write_text(json.dumps(["x", "y", "z"]))
    assert read_dataset(root, workers=1).classes == ["x", "y", "z"]


def test_classes_file_as_torchvision_class_to_idx(tmp_path, make_shards, cifar_classes):
    root = make_shards(40, 40)
    class_to_idx = {name: index for index, name in enumerate(cifar_classes)}
    (root / "classes.json").write_text(json.dumps(dict(reversed(class_to_idx.items()))))  # order is the index's
    assert read_dataset(root, workers=1).classes == cifar_classes
    (root / "classes.json").write_text(json.dumps({"cat": 0, "dog": 2}))
    with pytest.raises(InputError, match=r"mapping must give the indices 0\.\.1 once each"):
        read_dataset(root, workers=1)
    # deeper than Python's stack, more digits than it converts: RecursionError / ValueError tracebacks before
    for text, reason in (("[" * 100000, "nested too deeply"),
                         ('{"cat": 1' + "0" * 5000 + "}", "a number of more than 4,300 digits$")):
        (root / "classes.json").write_text(text)
        with pytest.raises(InputError, match=f"classes.json: not valid JSON: {reason}"):
            read_dataset(root, workers=1)
    (root / "classes.json").write_text("[]")  # was "label 1 is outside the 0 classes" for every sample
    with pytest.raises(InputError, match="classes.json: the class list is empty"):
        read_dataset(root, workers=1)


def test_brace_pattern_over_folders_reads_the_classes_beside_the_shards(make_shards, tmp_path, cifar_classes):
    root = make_shards(60, 30)
    top = tmp_path / "top"
    for part, folder in enumerate(["train", "extra"]):
        (top / folder).mkdir(parents=True)
        (top / folder / "part.tar").write_bytes((root / f"part-00000{part}.tar").read_bytes())
        (top / folder / "classes.json").write_text(json.dumps(cifar_classes))
    ingested = read_dataset(f"{top}/{{train,extra}}/part.tar", workers=1)
    assert ingested.classes == cifar_classes and len(ingested.samples) == 60
    assert ingested.samples[0].source.startswith("train/part.tar:")
    (top / "extra" / "classes.json").unlink()  # one folder's list serves the pattern
    assert read_dataset(f"{top}/{{train,extra}}/part.tar", workers=1).classes == cifar_classes
    (top / "extra" / "classes.json").write_text(json.dumps(cifar_classes[::-1]))
    with pytest.raises(InputError, match="class lists disagree"):
        read_dataset(f"{top}/{{train,extra}}/part.tar", workers=1)
    assert read_dataset(f"{top}/{{train,extra}}/part.tar", classes_file=top / "train" / "classes.json",
                        workers=1).classes == cifar_classes


def test_one_huge_label_cannot_make_a_huge_class_list(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    picked = [(key, jpg, index % 2) for index, (key, jpg, _) in enumerate(cifar_samples[:20])]
    write_shard(root / "a.tar", members_of(picked) + members_of([("huge", cifar_samples[20][1], 99999)]))
    with pytest.raises(InputError, match="labels run up to 99999 but only 3 distinct") as error:
        read_dataset(root, workers=1)
    assert "classes.json" in str(error.value) and "\n" not in str(error.value)
    (root / "classes.json").write_text(json.dumps(["a", "b"]))
    ingested = read_dataset(root, workers=1)
    assert ingested.classes == ["a", "b"] and "outside the 2 classes" in unreadable_by_key(ingested)["huge"]


def test_sparse_labels_error_names_the_shard_as_given_not_its_directory(tmp_path, cifar_samples, monkeypatch):
    picked = [(key, jpg, index % 2) for index, (key, jpg, _) in enumerate(cifar_samples[:20])]
    write_shard(tmp_path / "a.tar", members_of(picked) + members_of([("huge", cifar_samples[20][1], 99999)]))
    monkeypatch.chdir(tmp_path)
    for given in ("a.tar", "{a}.tar"):
        with pytest.raises(InputError, match=r"labels run up to 99999") as error:
            read_dataset(given, workers=1)
        assert str(error.value).startswith(f"{given}: ")


def test_class_list_shorter_than_the_labels_gives_one_warning(make_shards, tmp_path, cifar_samples, cifar_classes):
    names = tmp_path / "five.json"
    names.write_text(json.dumps(cifar_classes[:5]))
    ingested = read_dataset(make_shards(100, 50), classes_file=names, workers=1)
    beyond = [label for _, _, label in cifar_samples[:100] if label >= 5]
    assert len(ingested.unreadable) == len(beyond) and max(beyond) == 9
    assert ingested.warnings == [f"{len(beyond)} samples have labels outside the 5 classes of the class list "
                                 f"(largest label 9): they are unreadable; is the class list complete?"]


def test_a_missing_class_is_still_inferred(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    picked = [(key, jpg, 2 * (index % 2)) for index, (key, jpg, _) in enumerate(cifar_samples[:20])]  # 0 and 2
    write_shard(root / "a.tar", members_of(picked))
    assert read_dataset(root, workers=1).classes == ["0", "1", "2"]


# --- WebDataset: hostile members ------------------------------------------------------------------------------


def test_bad_labels_are_unreadable_with_reasons_and_the_rest_is_read(make_shards, cifar_samples):
    root = make_shards(40, 40)
    (key_a, jpg_a, _), (key_b, jpg_b, _) = cifar_samples[40:42]
    extra = [
        ("nolabel.jpg", jpg_a),
        ("word.jpg", jpg_a), ("word.cls", b"cat"),
        ("big.jpg", jpg_b), ("big.cls", b"10"),
        ("neg.jpg", jpg_b), ("neg.cls", b"-1"),
        ("jsonless.jpg", jpg_a), ("jsonless.json", b'{"class": 3}'),
        ("badjson.jpg", jpg_a), ("badjson.json", b"[[[[" * 10),
        ("boolean.jpg", jpg_a), ("boolean.json", b'{"label": true}'),
        ("onlylabel.cls", b"3"),
        # more digits than Python converts (4,300): a ValueError and a traceback before
        ("huge.jpg", jpg_a), ("huge.cls", b"1" * 5000),
        # leading zeros are no digits: label 3
        ("zeros.jpg", jpg_b), ("zeros.cls", b"0" * 5000 + b"3"),
    ]
    write_shard(root / "part-000001.tar", extra)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 41 and ingested.total == 50
    assert [s.label for s in ingested.samples if s.key == "zeros"] == [3]
    errors = unreadable_by_key(ingested)
    assert "no label" in errors["nolabel"]
    assert "not an integer" in errors["word"]
    assert "outside the 10 classes" in errors["big"] and "outside" in errors["neg"]
    assert 'no integer "label"' in errors["jsonless"] and 'no integer "label"' in errors["boolean"]
    assert "not valid JSON" in errors["badjson"]
    assert "no image member" in errors["onlylabel"]
    assert errors["huge"] == "label is out of range: 5000 digits (11111111111111111111...)"  # not all 5,000
    assert all(item.sha256 for item in ingested.unreadable if item.key != "onlylabel")


def test_shard_cut_mid_member_keeps_what_came_before_and_reads_other_shards(make_shards, cifar_samples):
    root = make_shards(90, 30)
    middle = root / "part-000001.tar"
    cut_key = cifar_samples[40][0]
    middle.write_bytes(middle.read_bytes()[:data_offset(middle, f"{cut_key}.jpg") + 100])
    ingested = read_dataset(root, workers=1)
    keys = [s.key for s in ingested.samples]
    assert keys == [key for key, _, _ in cifar_samples[:40]] + [key for key, _, _ in cifar_samples[60:90]]
    [lost] = ingested.unreadable
    assert lost.source == "part-000001.tar" and lost.key == "part-000001_tar"
    assert lost.error.startswith(f"shard damaged inside member '{cut_key}.jpg': that sample and the rest of the shard")
    assert ingested.warnings == []  # the damage is in unreadable, not repeated as a warning


def test_shard_cut_inside_a_label_member_makes_that_sample_unreadable(make_shards, cifar_samples):
    root = make_shards(30, 30)
    shard = root / "part-000000.tar"
    cut_key = cifar_samples[10][0]
    shard.write_bytes(shard.read_bytes()[:data_offset(shard, f"{cut_key}.cls")])
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 10 and [item.source for item in ingested.unreadable] == ["part-000000.tar"]
    assert f"inside member '{cut_key}.cls': that sample" in ingested.unreadable[0].error


def test_shard_cut_at_a_member_boundary_is_kept_but_flagged(make_shards, cifar_samples):
    root = make_shards(30, 30)
    shard = root / "part-000000.tar"
    with tarfile.open(shard) as tar:
        end = tar.getmember(f"{cifar_samples[19][0]}.cls").offset_data + 512
    shard.write_bytes(shard.read_bytes()[:end])
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 20 and ingested.unreadable == []
    assert any("possibly truncated" in warning for warning in ingested.warnings)


@pytest.mark.parametrize("damage", ["header-cut", "garbage-header"])
def test_damaged_header_is_reported(make_shards, damage):
    root = make_shards(30, 30)
    shard = root / "part-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        start = tar.getmembers()[20].offset  # the header of sample 10's image
    broken = data[:start + 100] if damage == "header-cut" else data[:start] + b"\x07" * 512 + data[start + 512:]
    shard.write_bytes(broken)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 10
    [lost] = ingested.unreadable
    assert lost.source == "part-000000.tar" and "header" in lost.error and "could not be read" in lost.error


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "not-gzip-at-all"])
def test_broken_gzip_shard_is_reported_not_a_crash(make_shards, tmp_path, damage):
    root = make_shards(60, 30)
    packed = bytearray(gzip.compress((root / "part-000001.tar").read_bytes(), mtime=0))
    (root / "part-000001.tar").unlink()
    if damage == "corrupt":
        packed[len(packed) // 2:len(packed) // 2 + 64] = bytes(64)
    elif damage == "truncated":
        del packed[len(packed) // 2:]
    else:
        packed = bytearray(b"\x1f\x8b" + b"garbage" * 10)
    (root / "part-000001.tar.gz").write_bytes(bytes(packed))
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) >= 30  # all of part-000000, and whatever came before the damage
    [lost] = ingested.unreadable
    assert lost.source == "part-000001.tar.gz"
    # zeroed bytes that still inflate: the CRC-32 check fails and none of the shard's samples is trusted
    assert any(said in lost.error for said in ("rest of the shard could not be read", "nothing in it could be read",
                                               "none of its samples was read"))


def verdicts_manifest(ingested) -> dict:
    """The manifest of ``ingested`` with every readable sample judged clean, validated (counts add up)."""
    count = len(ingested.samples)
    manifest = build_manifest(ingested, method="advrbd", options={}, seed=0, score=np.zeros(count),
                              suspected=np.zeros(count, bool), relabel=ingested.labels,
                              model={"file": "model.onnx", "arch": "small", "input_size": [32, 32]},
                              timings_s={}, environment={})
    validate_manifest(manifest)
    return manifest


def test_shard_damaged_mid_stream_is_listed_unreadable_saying_what_was_lost(make_shards):
    root = make_shards(100, 50)
    raw = bytearray((root / "part-000001.tar").read_bytes())
    with tarfile.open(root / "part-000001.tar") as tar:
        start = tar.getmembers()[50].offset  # the header of the shard's 26th sample's image
    raw[start:start + 512] = b"garbage!" * 64  # the tar is damaged, not the gzip: its CRC holds (a gzip whose
    (root / "part-000001.tar").unlink()  # CRC fails gives no sample at all: test_formats_tars)
    (root / "part-000001.tar.gz").write_bytes(gzip.compress(bytes(raw), mtime=0))
    ingested = read_dataset(root, workers=1)
    assert 50 <= len(ingested.samples) < 100  # part-000000 whole, part-000001 up to the damage
    [lost] = [item for item in ingested.unreadable if item.source == "part-000001.tar.gz"]
    assert lost.error.startswith("shard damaged after member ")
    assert "the rest of the shard could not be read" in lost.error
    counts = verdicts_manifest(ingested)["counts"]
    assert counts["total"] == len(ingested.samples) + len(ingested.unreadable) and counts["unreadable"] >= 1


@pytest.mark.parametrize("name, data", [("empty.tar", b""), ("junk.tgz", b"\x1f\x8b" + b"garbage" * 10),
                                        ("junk.tar", b"not a tar archive " * 100)])
def test_shard_that_cannot_be_read_at_all_is_listed_unreadable(make_shards, name, data):
    root = make_shards(40, 40)
    (root / name).write_bytes(data)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 40
    said = "shard's gzip data is corrupt" if name.endswith(".tgz") else "not a readable tar shard"
    assert [(item.source, item.error.split(" (")[0]) for item in ingested.unreadable] == [(name, said)]
    assert verdicts_manifest(ingested)["unreadable"][0]["source"] == name


def test_duplicate_keys_are_kept_renamed_and_reported(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    (ka, ja, la), (kb, jb, lb) = two_labels(cifar_samples)
    write_shard(root / "a.tar", members_of([("same", ja, la), ("other", jb, lb), ("same", jb, lb)]))
    write_shard(root / "b.tar", members_of([("same", ja, la)]) + members_of([(kb, jb, lb)]))
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == ["same", "other", "same~1", "same~2", kb]
    assert [s.source for s in ingested.samples][2:4] == ["a.tar:same.jpg", "b.tar:same.jpg"]
    assert sum("duplicate key 'same'" in warning for warning in ingested.warnings) == 2


def test_members_apart_are_joined_by_key_with_a_warning(tmp_path, cifar_samples):
    """A plain ``tar czf`` of a folder stores members in directory order: every image apart from its label."""
    root = tmp_path / "shards"
    root.mkdir()
    chosen = cifar_samples[:6]
    members = [(f"{key}.jpg", jpg) for key, jpg, _ in chosen[::-1]] + \
        [(f"{key}.cls", str(label).encode()) for key, _, label in chosen]
    members += members_of([("dup", chosen[0][1], chosen[0][2])]) + [("dup.jpg", chosen[1][1]), ("x.jpg", chosen[2][1]),
                                                                     ("dup.cls", str(chosen[1][2]).encode())]
    write_shard(root / "a.tar", members)
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == [key for key, _, _ in chosen[::-1]] + ["dup", "dup~1"]
    by_key = {s.key: s for s in ingested.samples}
    assert all(by_key[key].data == jpg and by_key[key].label == label for key, jpg, label in chosen)
    assert (by_key["dup"].data, by_key["dup~1"].data) == (chosen[0][1], chosen[1][1])
    assert by_key["dup~1"].label == chosen[1][2]
    [lone] = ingested.unreadable
    assert (lone.key, lone.error.split(" (")[0]) == ("x", "no label: neither .cls nor .json")
    [note] = [warning for warning in ingested.warnings if "not next to each other" in warning]
    assert note.startswith(f"a.tar: the members of 6 sample(s) are not next to each other (first: key "
                           f"{chosen[1][0]!r})")
    assert "tar --sort=name" in note


def test_shard_cut_inside_a_duplicate_keys_member_keeps_the_earlier_whole_sample(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    (ka, ja, la), (kb, jb, lb) = two_labels(cifar_samples)
    shard = write_shard(root / "a.tar", members_of([("same", ja, la), (kb, jb, lb), ("same", jb, lb)]))
    shard.write_bytes(shard.read_bytes()[:_second_offset(shard, "same.jpg") + 100])  # inside the second "same"
    ingested = read_dataset(root, workers=1)
    assert [(s.key, s.data) for s in ingested.samples] == [("same", ja), (kb, jb)]  # the first "same" was lost
    assert [item.source for item in ingested.unreadable] == ["a.tar"]


def _second_offset(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return [member.offset_data for member in tar.getmembers() if member.name == name][1]


def test_shard_cut_inside_a_member_whose_key_came_earlier_loses_only_that_sample(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    chosen = list({label: (key, jpg, label) for key, jpg, label in cifar_samples[::-1]}.values())[-4:]
    members = [(f"{key}.jpg", jpg) for key, jpg, _ in chosen] + \
        [(f"{key}.cls", str(label).encode()) for key, _, label in chosen]
    shard = write_shard(root / "a.tar", members)
    shard.write_bytes(shard.read_bytes()[:data_offset(shard, f"{chosen[2][0]}.cls")])
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == [key for key, _, _ in chosen[:2]]
    assert sorted(unreadable_by_key(ingested)) == ["a_tar", chosen[3][0]]
    assert f"inside member '{chosen[2][0]}.cls': that sample and the rest" in unreadable_by_key(ingested)["a_tar"]


def test_hostile_member_names_get_safe_keys_and_keep_their_source(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    (_, jpg, label), (_, jpg2, label2) = two_labels(cifar_samples)
    names = ["../../etc/evil", "/abs/path/x", "./dots/a", "sp ace:|*"]
    members = []
    for name in names:
        members += [(f"{name}.jpg", jpg), (f"{name}.cls", str(label).encode())]
    members += [("multi.part.name.JPG", jpg2), ("multi.part.name.cls", str(label2).encode())]
    write_shard(root / "a.tar", members)
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == ["etc/evil", "abs/path/x", "dots/a", "sp ace___", "multi"]
    assert ingested.samples[0].source == "a.tar:../../etc/evil.jpg"
    assert ingested.samples[4].ext == "jpg" and ingested.samples[4].label == label2


def test_cls_and_json_labels_must_agree(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    jpg = cifar_samples[0][1]
    write_shard(root / "a.tar", [
        ("clash.jpg", jpg), ("clash.cls", b"2"), ("clash.json", b'{"label": 5}'),
        ("same.jpg", jpg), ("same.cls", b"5"), ("same.json", b'{"label": 5}'),
        ("meta.jpg", jpg), ("meta.cls", b"2"), ("meta.json", b'{"caption": "a frog"}'),
    ])
    ingested = read_dataset(root, workers=1)
    assert {s.key: s.label for s in ingested.samples} == {"same": 5, "meta": 2}
    error = unreadable_by_key(ingested)["clash"]
    assert "disagree" in error and ".cls says 2" in error and '"label" says 5' in error


def assert_utf8_text(source: str) -> None:
    """``source`` survives strict UTF-8 JSON and CSV, as in manifest.json and scores.csv."""
    source.encode("utf-8")
    assert json.loads(json.dumps(source, ensure_ascii=False).encode("utf-8")) == source
    text = io.StringIO()
    csv.writer(text).writerow(["key", source])
    assert next(csv.reader(io.StringIO(text.getvalue().encode("utf-8").decode("utf-8")))) == ["key", source]


def test_undecodable_shard_and_member_names_give_utf8_sources(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    (key, jpg, label), (key2, jpg2, label2) = two_labels(cifar_samples)
    bad = os.fsdecode(b"bad\xffname")
    shard = root / os.fsdecode(b"part\xfe.tar")
    write_shard(shard, members_of([(bad, jpg, label), (key2, jpg2, label2)]))
    ingested = read_dataset(root, workers=1)
    assert [s.source for s in ingested.samples] == ["part\\xfe.tar:bad\\xffname.jpg", f"part\\xfe.tar:{key2}.jpg"]
    assert ingested.samples[0].key == "bad_name" and ingested.samples[0].data == jpg
    for sample in ingested.samples:
        assert_utf8_text(sample.source)


def test_pickled_members_are_never_unpickled(tmp_path, cifar_samples):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return open, (str(marker), "w")

    root = tmp_path / "shards"
    root.mkdir()
    members = members_of(cifar_samples[:20])
    payload = pickle.dumps(Exploit())
    key = cifar_samples[0][0]
    members[2:2] = [(f"{key}.pyd", payload), (f"{key}.pickle", payload), (f"{key}.pth", payload)]
    write_shard(root / "a.tar", members)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 20 and not marker.exists()
    assert ingested.samples[0].extras == (("pickle", payload), ("pth", payload), ("pyd", payload))  # bytes, to carry


def test_a_samples_other_members_are_kept_as_bytes(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    (key, jpg, label), (plain_key, *_) = cifar_samples[:2]
    meta = json.dumps({"label": label, "url": "https://example.com/a.jpg"}).encode()
    extras = {"txt": b"a cat on a mat", "json": meta, "seg.png": b"\x89PNG mask"}
    members = members_of(cifar_samples[:10])
    members[2:2] = [(f"{key}.{suffix}", data) for suffix, data in extras.items()]
    write_shard(root / "a.tar", members)
    ingested = read_dataset(root, workers=1)
    assert [s.label for s in ingested.samples] == [label for _, _, label in cifar_samples[:10]]
    assert not ingested.warnings and not ingested.skipped
    first, second = ingested.samples[:2]
    assert first.data == jpg and first.ext == "jpg"
    assert first.extras == tuple(sorted(extras.items())), "the .cls the label came from is not carried"
    assert second.key == plain_key and second.extras == ()


def test_a_member_too_large_to_carry_is_left_out_with_a_warning(tmp_path, cifar_samples, monkeypatch):
    monkeypatch.setattr(shard_reader, "MAX_MEMBER_BYTES", 8000)  # a CIFAR JPEG is about 1-2 kB
    root = tmp_path / "shards"
    root.mkdir()
    key = cifar_samples[0][0]
    members = members_of(cifar_samples[:10])
    members[2:2] = [(f"{key}.npy", bytes(9000)), (f"{key}.txt", b"caption")]
    write_shard(root / "a.tar", members)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 10 and ingested.samples[0].extras == (("txt", b"caption"),)
    assert ingested.warnings == [f"a.tar: 1 member(s) over 0 MiB beside a sample's image and label are left out "
                                 f"of the outputs (first: '{key}.npy')"]


def test_links_and_hidden_members_in_a_shard_are_skipped(tmp_path, cifar_samples):
    root = tmp_path / "shards"
    root.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members_of(cifar_samples[:20]) + [("._hidden.jpg", b"x"), ("README", b"hi")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (root / "a.tar").write_bytes(buffer.getvalue())
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 20
    assert ingested.skipped == {"hidden": 1, "no_key": 1, "not_regular_file": 1}


def test_shard_without_image_samples_says_so(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "a.tar", [("readme.txt", b"nothing to see")])
    with pytest.raises(InputError, match="no image samples found") as error:
        read_dataset(root, workers=1)
    assert str(root) in str(error.value) and "class" not in str(error.value)


def test_corrupt_images_are_unreadable_and_the_run_goes_on(make_shards, cifar_samples):
    root = make_shards(30, 30)
    _, jpg, _ = cifar_samples[0]
    write_shard(root / "part-000001.tar", [
        ("zero.jpg", b""), ("zero.cls", b"1"),
        ("cut.jpg", jpg[:len(jpg) // 2]), ("cut.cls", b"1"),
        ("text.png", b"hello"), ("text.cls", b"1"),
    ])
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 30
    assert sorted(unreadable_by_key(ingested)) == ["cut", "text", "zero"]
    assert all(error.startswith("cannot decode image") for error in unreadable_by_key(ingested).values())


def test_class_folders_beside_a_shard_are_refused_not_dropped(make_imagefolder, make_shards):
    root = make_imagefolder(40)
    (make_shards(20, 20) / "part-000000.tar").rename(root / "stray.tar")
    with pytest.raises(InputError, match="both") as error:
        read_dataset(root, workers=1)
    message = str(error.value)
    assert "stray.tar" in message and "brace pattern" in message and "move" in message and "\n" not in message
    assert len(read_dataset(root / "stray.tar", workers=1).samples) == 20


def test_shard_directory_with_harmless_extras_reads_as_webdataset(make_shards, cifar_samples, tmp_path):
    root = make_shards(40, 20)
    (root / "README.md").write_text("about these shards")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(cifar_samples[0][1])
    (root / "notes").mkdir()
    (root / "notes" / "log.txt").write_text("no images here")
    (root / "stray.JPG").write_bytes(cifar_samples[1][1])
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: neither a sample nor counted
    (root / ".part-000009.tar").write_bytes(b"")  # a hidden shard name is not a shard
    # a folder whose only "images" are links out of the input or to nothing is no class folder: an
    # ImageFolder reader would find no image in it either
    (root / "links").mkdir()
    (root / "links" / "out.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (tmp_path / "elsewhere.jpg").write_bytes(cifar_samples[2][1])
    (root / "links" / "gone.jpg").symlink_to(root / "missing.jpg")
    ingested = read_dataset(root, workers=1)
    assert ingested.format == "webdataset" and len(ingested.samples) == 40
    # nothing beside the shards goes uncounted; an image there is worth a warning
    assert ingested.skipped == {"not_a_shard": 1, "image_beside_shards": 1}
    assert [w for w in ingested.warnings if "beside the shards" in w] == \
        [f"1 image file(s) beside the shards in {root} are not read: only samples inside the shards are"]


def test_shards_in_folders_beside_the_shards_are_counted_and_named_not_read(make_shards, tmp_path):
    """A val/ split beside the training shards was neither read nor counted nor warned about (the audit)."""
    root = make_shards(40, 20)
    (root / "classes.json").unlink()  # the 20 samples left lack two classes: a warning of its own
    (root / "val" / "deeper").mkdir(parents=True)
    (root / "part-000001.tar").rename(root / "val" / "deeper" / "part-000001.tar")
    (root / "notes").mkdir()  # a folder without shards is no concern
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 20 and ingested.skipped == {"folder_of_shards": 1}
    assert ingested.warnings == [f"1 folder(s) beside the shards in {root} hold shards that are not read (val): only "
                                 f"the shards in the folder itself are; name others with a brace pattern or run on "
                                 f"each folder"]


def test_a_brace_range_that_runs_backwards_is_refused(make_shards):
    """{000001..000000} expanded to no shard: "no image samples found", which hid the typo."""
    root = make_shards(40, 20)
    with pytest.raises(InputError, match=r"brace range \{000001\.\.000000\} runs backwards: write "
                                         r"\{000000\.\.000001\}"):
        read_dataset(f"{root}/part-{{000001..000000}}.tar", workers=1)


def test_a_brace_pattern_that_names_one_shard_twice_is_refused(make_shards):
    """{000000,000000} read the shard twice: every sample in it duplicated in training and the outputs."""
    root = make_shards(40, 20)
    assert len(read_dataset(f"{root}/part-{{000000,000001}}.tar", workers=1).samples) == 40
    for pattern in (f"{root}/part-{{000000,000000}}.tar", f"{root}/{{part-000000.tar,../{root.name}/part-000000.tar}}"):
        with pytest.raises(InputError, match=r"names the same shard more than once \(.*part-000000\.tar\)"):
            read_dataset(pattern, workers=1)


# --- ImageFolder ------------------------------------------------------------------------------------------------


def add_odd_files(root: Path, jpg: bytes) -> None:
    """Files an ImageFolder reader must skip, count, or read despite odd names."""
    (root / "cat" / ".hidden.jpg").write_bytes(jpg)
    (root / "cat" / ".cache").mkdir()
    (root / "cat" / ".cache" / "x.jpg").write_bytes(jpg)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "UPPER.JPG").write_bytes(jpg)
    (root / "cat" / "a.b.c.jpeg").write_bytes(jpg)
    (root / "cat" / "nested").mkdir()
    (root / "cat" / "nested" / "deep.jpg").write_bytes(jpg)
    (root / "cat" / "nested.jpg").write_bytes(jpg)
    (root / "README.md").write_text("at the root, outside any class")


def test_imagefolder_matches_torchvision_order_and_labels(make_imagefolder, cifar_samples):
    root = make_imagefolder(100)
    add_odd_files(root, cifar_samples[0][1])
    reference = torchvision.datasets.ImageFolder(root)
    (root / ".git").mkdir()  # torchvision would make this a class; a hidden directory is not one
    ingested = read_dataset(root, workers=1)
    expected = [(Path(path).relative_to(root).as_posix(), label) for path, label in reference.samples
                if not Path(path).name.startswith(".") and ".cache" not in path]
    assert [(s.source, s.label) for s in ingested.samples] == expected
    assert ingested.classes == reference.classes and ingested.format == "imagefolder"
    assert ingested.skipped == {"hidden": 3, "not_image": 1, "outside_class_dir": 1}


def test_imagefolder_keys_are_relative_paths_without_extension(make_imagefolder, cifar_samples):
    root = make_imagefolder(40)
    add_odd_files(root, cifar_samples[0][1])
    by_source = {s.source: s for s in read_dataset(root, workers=1).samples}
    assert by_source["cat/a.b.c.jpeg"].key == "cat/a_b_c" and by_source["cat/a.b.c.jpeg"].ext == "jpeg"
    assert by_source["cat/UPPER.JPG"].key == "cat/UPPER" and by_source["cat/UPPER.JPG"].ext == "jpg"
    assert by_source["cat/nested/deep.jpg"].key == "cat/nested/deep"
    key, jpg, label = cifar_samples[0]
    assert by_source[f"airplane/{key}.jpg" if label == 0 else f"{read_classes()[label]}/{key}.jpg"].data == jpg


def read_classes() -> list[str]:
    from conftest import CIFAR

    return json.loads((CIFAR / "classes.json").read_text())["classes"]


def test_imagefolder_same_stem_different_extension_is_deduplicated(make_imagefolder, cifar_samples):
    root = make_imagefolder(20)
    (root / "cat" / "twin.jpg").write_bytes(cifar_samples[0][1])
    Image.new("RGB", (32, 32)).save(root / "cat" / "twin.png")
    keys = [s.key for s in read_dataset(root, workers=1).samples]
    assert "cat/twin" in keys and "cat/twin~1" in keys


def test_imagefolder_skips_fifos_and_symlinked_directories_without_hanging(make_imagefolder):
    root = make_imagefolder(20)
    os.mkfifo(root / "cat" / "pipe.jpg")
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    ingested = read_dataset(root, workers=1)
    assert ingested.skipped == {"not_regular_file": 1, "symlinked_dir": 1}


def test_imagefolder_undecodable_file_name_gives_a_utf8_source(make_imagefolder, cifar_samples):
    root = make_imagefolder(20)
    jpg = cifar_samples[30][1]
    with open(os.path.join(os.fsencode(root / "cat"), b"bad\xff\xfename.jpg"), "wb") as file:
        file.write(jpg)
    [sample] = [s for s in read_dataset(root, workers=1).samples if "bad" in s.source]
    assert sample.source == "cat/bad\\xff\\xfename.jpg" and sample.key == "cat/bad__name" and sample.data == jpg
    assert_utf8_text(sample.source)


def test_imagefolder_undecodable_class_dir_gives_a_utf8_class_name(make_imagefolder, cifar_samples):
    root = make_imagefolder(20)
    odd = os.path.join(os.fsencode(root), b"fr\xe9g")
    os.mkdir(odd)
    for key, jpg, _ in cifar_samples[30:32]:
        with open(os.path.join(odd, f"{key}.jpg".encode()), "wb") as file:
            file.write(jpg)
    ingested = read_dataset(root, workers=1)
    assert "fr\\xe9g" in ingested.classes
    for name in ingested.classes:
        assert_utf8_text(name)
    in_odd = [s for s in ingested.samples if ingested.classes[s.label] == "fr\\xe9g"]
    assert [s.data for s in in_odd] == [jpg for _, jpg, _ in cifar_samples[30:32]]
    assert all(s.source.startswith("fr\\xe9g/") for s in in_odd)


def test_imagefolder_class_dirs_that_read_as_one_name_are_refused(make_imagefolder):
    root = make_imagefolder(20)
    for name in (b"fr\xe9g", b"fr\\xe9g"):  # the byte 0xe9, and the four characters "\xe9"
        os.mkdir(os.path.join(os.fsencode(root), name))
        Image.new("RGB", (32, 32)).save(os.path.join(os.fsencode(root), name, b"x.png"))
    with pytest.raises(InputError, match="read as the same class name"):
        read_dataset(root, workers=1)


def link_case(case: str, root: Path, outside: Path) -> None:
    """One symlink of the kind ``case`` in the ImageFolder ``root``; ``outside`` holds outside.jpg and cat/."""
    if case == "file_out":
        (root / "cat" / "link_out.jpg").symlink_to(outside / "outside.jpg")
    elif case == "text_file_out":  # as passwd.jpg -> /etc/passwd: bytes that must never be hashed or copied
        (root / "cat" / "passwd.jpg").symlink_to(outside / "passwd")
    elif case == "class_dir_out":
        (root / "zz_linked").symlink_to(outside / "cat", target_is_directory=True)
    elif case == "loop":
        (root / "loop").symlink_to(root, target_is_directory=True)
    else:
        (root / "cat" / "dangling.jpg").symlink_to(outside / "missing.jpg")


@pytest.mark.parametrize("case, reason", [
    ("file_out", "symlink_outside_root"), ("text_file_out", "symlink_outside_root"),
    ("class_dir_out", "symlinked_dir"), ("loop", "symlinked_dir"), ("dangling", "dangling_symlink")])
def test_imagefolder_never_reads_through_a_link_out_of_the_tree(case, reason, make_imagefolder, tmp_path,
                                                                cifar_samples):
    root = make_imagefolder(40)
    plain = read_dataset(root, workers=1)
    outside = tmp_path / "outside"
    (outside / "cat").mkdir(parents=True)
    secret = cifar_samples[100][1]
    (outside / "outside.jpg").write_bytes(secret)
    (outside / "cat" / "x.jpg").write_bytes(secret)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    link_case(case, root, outside)
    ingested = read_dataset(root, workers=1)
    assert ingested.classes == plain.classes and ingested.samples == plain.samples and ingested.unreadable == []
    assert ingested.skipped == {reason: 1}


def test_a_class_of_links_out_of_the_tree_is_named_in_the_warning_and_the_error(tmp_path, cifar_samples):
    """A symlink farm (DVC's cache, git-annex) whose links lead outside the root: the messages say why
    a class came out empty."""
    outside, root = tmp_path / "pool", tmp_path / "farm"
    outside.mkdir()
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for key, jpg, _ in cifar_samples[:6]:
        (outside / f"{key}.jpg").write_bytes(jpg)
        (root / "cat" / f"{key}.jpg").symlink_to(outside / f"{key}.jpg")
    for key, jpg, _ in cifar_samples[6:10]:
        (root / "dog" / f"{key}.jpg").write_bytes(jpg)
    with pytest.raises(InputError, match=r"need two classes \(skipped files: 6 symlink_outside_root\)"):
        read_dataset(root, workers=1)
    (root / "bird").mkdir()
    for key, jpg, _ in cifar_samples[10:14]:
        (root / "bird" / f"{key}.jpg").write_bytes(jpg)
    ingested = read_dataset(root, workers=1)
    assert "class directory 'cat' holds no image that can be read: skipped 6 symlink_outside_root" in ingested.warnings


@pytest.mark.parametrize("layout", ["imagefolder", "shards"])
def test_a_class_whose_every_image_fails_to_decode_is_named(layout, tmp_path, cifar_samples, cifar_classes):
    """Its samples are listed as unreadable one by one; the warning says what that means for the class."""
    samples = [(key, jpg if label != 3 else jpg[:200], label) for key, jpg, label in cifar_samples[:80]]
    cats = sum(label == 3 for _, _, label in samples)
    if layout == "shards":
        root = write_shards(tmp_path / "shards", samples, cifar_classes)
    else:
        root = tmp_path / "tree"
        for key, jpg, label in samples:
            (root / cifar_classes[label]).mkdir(parents=True, exist_ok=True)
            (root / cifar_classes[label] / f"{key}.jpg").write_bytes(jpg)
    ingested = read_dataset(root, workers=1)
    assert cats > 0 and len(ingested.unreadable) == cats
    assert f"1 class(es) have no image that decodes, every sample of theirs unreadable: 'cat' ({cats}); the model " \
           f"keeps an output for each, never trained on it" in ingested.warnings
    whole = read_dataset(write_shards(tmp_path / "whole", cifar_samples[:80], cifar_classes), workers=1)
    assert not any("no image that decodes" in warning for warning in whole.warnings)


def test_imagefolder_reads_a_file_link_that_stays_inside_the_tree(make_imagefolder):
    root = make_imagefolder(40)
    target = sorted((root / "cat").iterdir())[0]
    (root / "dog" / "shared.jpg").symlink_to(os.path.relpath(target, root / "dog"))
    by_source = {s.source: s for s in read_dataset(root, workers=1).samples}
    assert by_source["dog/shared.jpg"].data == target.read_bytes() and by_source["dog/shared.jpg"].label == 5


def test_imagefolder_corrupt_file_is_unreadable(make_imagefolder):
    root = make_imagefolder(20)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    ingested = read_dataset(root, workers=1)
    assert len(ingested.samples) == 20 and list(unreadable_by_key(ingested)) == ["cat/broken"]


def test_imagefolder_classes_file_orders_classes_and_rejects_unknown_dirs(make_imagefolder, tmp_path, cifar_classes):
    root = make_imagefolder(100)
    reordered = tmp_path / "classes.json"
    reordered.write_text(json.dumps({"classes": cifar_classes[::-1]}))
    ingested = read_dataset(root, classes_file=reordered, workers=1)
    assert ingested.classes == cifar_classes[::-1]
    assert all(ingested.classes[s.label] == s.source.split("/")[0] for s in ingested.samples)
    reordered.write_text(json.dumps(cifar_classes[1:]))
    with pytest.raises(InputError, match="not in"):
        read_dataset(root, classes_file=reordered, workers=1)


# --- working size, workers, fingerprint, input errors ---------------------------------------------------------------


def test_mixed_sizes_follow_the_working_size_rule(tmp_path):
    root = tmp_path / "folder"
    for label, (size, count) in enumerate([((32, 32), 6), ((40, 30), 2)]):
        (root / f"c{label}").mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", size, (index * 20, 0, 0)).save(root / f"c{label}" / f"{index}.png")
    kept = read_dataset(root, workers=1)
    assert kept.image_size == (32, 32) and kept.images.shape == (8, 32, 32, 3)
    Image.new("RGB", (500, 400)).save(root / "c0" / "big.png")
    for index in range(6):
        Image.new("RGB", (300, 200)).save(root / "c1" / f"big{index}.png")
    assert read_dataset(root, workers=1).images.shape == (15, 224, 224, 3)
    assert read_dataset(root, image_size=(20, 24), workers=1).images.shape == (15, 20, 24, 3)
    for too_small in (0, 7, (8, 3), True, "32", 32.0, (32,), (True, 32), (True, 32, 32), range(32, 34)):
        with pytest.raises(InputError, match="image_size must be an int or \\(H, W\\) between 8 and 4096"):
            read_dataset(root, image_size=too_small, workers=1)
    assert read_dataset(root, image_size=np.array([20, 24]), workers=1).image_size == (20, 24)  # numpy's ints too


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_process_pool_gives_the_same_result_as_inline(layout, make_shards, make_imagefolder, monkeypatch):
    root = make_shards(120, 40) if layout == "shards" else make_imagefolder(120)
    if layout == "shards":
        write_shard(root / "part-000003.tar", [("bad.jpg", b"junk"), ("bad.cls", b"1")])
    else:
        (root / "cat" / "bad.jpg").write_bytes(b"junk")
    inline = read_dataset(root, workers=1)
    for module in (images_module, readers_module):
        monkeypatch.setattr(module, "POOL_MIN_SAMPLES", 10)
        monkeypatch.setattr(module, "CHUNK", 16)
    monkeypatch.setattr(readers_module, "POOL_MIN_BYTES", 0)
    pooled = read_dataset(root, workers=2)
    assert np.array_equal(pooled.images, inline.images) and len(inline.unreadable) == 1
    assert pooled.samples == inline.samples and pooled.unreadable == inline.unreadable


def test_fingerprint_follows_content(make_shards, tmp_path):
    root = make_shards(40, 20)
    first = read_dataset(root, workers=1).fingerprint
    assert read_dataset(root, workers=1).fingerprint == first
    write_shard(root / "part-000001.tar", [("x.jpg", b"junk"), ("x.cls", b"1")])
    assert read_dataset(root, workers=1).fingerprint != first


def test_input_errors(tmp_path, make_imagefolder, cifar_samples):
    with pytest.raises(InputError, match="not found"):
        read_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image samples"):
        read_dataset(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="neither a directory nor"):
        read_dataset(tmp_path / "file.txt")
    os.mkfifo(tmp_path / "pipe")  # a pipe, as /dev/null is a device: no listing of it, and no shard
    for special in (tmp_path / "pipe", "/dev/null"):
        with pytest.raises(InputError, match="neither a directory nor a .* shard file"):
            read_dataset(special)
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    (one / "only" / "a.jpg").write_bytes(cifar_samples[0][1])
    with pytest.raises(InputError, match="need at least two"):
        read_dataset(one)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    write_shard(unlabeled / "a.tar", [("a.jpg", cifar_samples[0][1]), ("a.cls", b"cat")])
    with pytest.raises(InputError, match="none of the 1 samples is readable; first: a.tar:a.jpg: label is not"):
        read_dataset(unlabeled)
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        (broken / name / "x.jpg").write_bytes(b"junk")
    with pytest.raises(InputError, match="none of the 2 samples is readable"):
        read_dataset(broken)


def test_randomly_damaged_shards_never_crash_the_reader(tmp_path, cifar_samples):
    """Bytes flipped, cuts and a corrupted gzip stream, 60 times: each read ends in samples plus
    recorded damage, or in one InputError, never another exception; the shard is left unchanged."""
    import random

    raw = write_shard(tmp_path / "source.tar", members_of(cifar_samples[:30])).read_bytes()
    rng = random.Random(0)
    outcomes = set()
    for index in range(60):
        data = bytearray(raw)
        if index % 3 == 0:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif index % 3 == 1:
            data = data[:rng.randrange(len(data))]
        blob = gzip.compress(bytes(data), mtime=0) if index % 2 else bytes(data)
        if index % 2 and index % 3 == 2:  # damage the compressed stream itself
            blob = bytearray(blob)
            blob[rng.randrange(10, len(blob))] ^= 0xFF
        folder = tmp_path / f"case{index}"
        folder.mkdir()
        shard = folder / ("part.tar.gz" if index % 2 else "part.tar")
        shard.write_bytes(bytes(blob))
        try:
            ingested = read_dataset(folder, workers=1)
        except InputError:
            outcomes.add("input error")
        else:
            assert len(ingested.samples) + len(ingested.unreadable) <= 30 and len(ingested.samples) > 0
            outcomes.add("damage recorded" if ingested.unreadable or ingested.warnings else "read")
        assert shard.read_bytes() == bytes(blob)
    assert {"input error", "damage recorded", "read"} <= outcomes


def test_class_names_that_read_alike_in_other_unicode_forms_are_named_in_a_warning(make_imagefolder):
    """"café" as macOS writes a folder name (NFD) beside "café" as Linux keeps it (NFC): two classes that
    print the same, each with part of what a user thinks of as one (the audit). Read as two, with a warning."""
    root = make_imagefolder(20)
    for name in ("caf\u00e9", "cafe\u0301"):
        (root / name).mkdir()
        Image.new("RGB", (32, 32)).save(root / name / "x.png")
    ingested = read_dataset(root, workers=1)
    assert "caf\u00e9" in ingested.classes and "cafe\u0301" in ingested.classes
    assert ingested.warnings[0] == ("classes 'cafe\\u0301' and 'caf\\xe9' read alike (one text in other Unicode "
                                    "normal forms) but are 2 classes; merge their folders or class names if they are "
                                    "one")
    assert ingested.warnings[1].startswith("duplicate key")  # the keys, made safe, are one text too: one renamed


def test_classes_of_the_class_list_with_no_sample_are_named_for_shards_too(make_shards, cifar_classes):
    """A classes.json listing classes no sample has gave no warning for shards, where an ImageFolder names its
    empty class folder (the audit); classes inferred from the labels are not a list anyone wrote."""
    root = make_shards(40, 40)
    assert read_dataset(root, workers=1).warnings == []
    (root / "classes.json").write_text(json.dumps(cifar_classes + ["unicorn", "yeti"]))
    assert read_dataset(root, workers=1).warnings == [
        "2 class(es) of the class list have no sample in the shards: 'unicorn', 'yeti'; the model keeps an output "
        "for each, never trained on it"]


def test_a_sample_with_two_images_is_unreadable_not_guessed(tmp_path, cifar_samples, cifar_classes):
    """Which of x.jpg and x.png is the sample cannot be known: neither is taken."""
    key, jpg, _ = cifar_samples[0]
    write_shard(tmp_path / "part-000000.tar", members_of(cifar_samples[1:21]) + [
        ("two.jpg", jpg), ("two.png", cifar_samples[1][1]), ("two.cls", b"1")])
    (tmp_path / "classes.json").write_text(json.dumps(cifar_classes))
    ingested = read_dataset(tmp_path, workers=1)
    assert len(ingested.samples) == 20 and [record.to_json() for record in ingested.unreadable] == [
        {"key": "two", "source": "part-000000.tar:two.jpg", "error": "ambiguous: several image members (jpg, png)"}]


def test_an_image_over_the_size_cap_is_unreadable_in_either_format(tmp_path, cifar_samples, cifar_classes,
                                                                   monkeypatch):
    """The cap (256 MiB) is lowered here: a JPEG with bytes after its end still decodes, so only the cap
    stops it."""
    from sanitize.formats import folder_reader

    monkeypatch.setattr(shard_reader, "MAX_MEMBER_BYTES", 4000)
    monkeypatch.setattr(folder_reader, "MAX_FILE_BYTES", 4000)
    key, jpg, label = cifar_samples[0]
    padded = jpg + bytes(5000)
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "part-000000.tar",
                members_of(cifar_samples[1:21]) + [("big.jpg", padded), ("big.cls", str(label).encode())])
    (tmp_path / "shards" / "classes.json").write_text(json.dumps(cifar_classes))
    shards = read_dataset(tmp_path / "shards", workers=1)
    assert [record.key for record in shards.unreadable] == ["big"]
    assert shards.unreadable[0].error == f"image member too large ({len(padded)} bytes)"
    for key, jpg, label in cifar_samples[1:21] + [("big", padded, label)]:
        (tmp_path / "tree" / cifar_classes[label]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / cifar_classes[label] / f"{key}.jpg").write_bytes(jpg)
    folder = read_dataset(tmp_path / "tree", workers=1)
    assert [(record.key, record.error) for record in folder.unreadable] == [
        (f"{cifar_classes[label]}/big", "file larger than 4000 bytes")]
    assert len(folder.samples) == len(shards.samples) == 20


def test_a_file_the_disk_cannot_read_is_unreadable_with_the_reason(make_imagefolder, monkeypatch):
    """An I/O error on one file (a bad sector, a network share gone) costs that sample, not the run."""
    from sanitize.formats import folder_reader

    root = make_imagefolder(40)
    victim = sorted((root / "cat").iterdir())[0]
    real = folder_reader._read_regular

    def failing(path):
        if path == victim:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(folder_reader, "_read_regular", failing)
    ingested = read_dataset(root, workers=1)
    assert [(record.source, record.error) for record in ingested.unreadable] == [
        (f"cat/{victim.name}", "cannot read: Input/output error")]
    assert len(ingested.samples) == 39


@pytest.mark.parametrize("content, message", [
    (b'["cat", "dog", "cat"]', "class names must be unique non-empty strings"),
    (b'["cat", ""]', "class names must be unique non-empty strings"),
    (b'["cat", 3]', "class names must be unique non-empty strings"),
    (b'[]', "the class list is empty"),
    (b'"cat"', "expected a list of class names"),
    (b'["caf\xe9", "dog"]', "cannot read class list .*utf-8"),
    (None, "cannot read class list .*No such file"),
])
def test_a_bad_class_list_is_one_line(content, message, make_shards, tmp_path):
    data = make_shards(40)
    listed = tmp_path / "given.json"
    if content is not None:
        listed.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        read_dataset(data, classes_file=listed, workers=1)
    assert "\n" not in str(caught.value)


def test_many_duplicate_keys_are_named_twenty_times_then_counted(tmp_path, cifar_samples, cifar_classes):
    members = members_of(cifar_samples[:30])
    for index in range(3):  # three shards with the same 30 keys: 60 renamed
        write_shard(tmp_path / f"part-00000{index}.tar", members)
    (tmp_path / "classes.json").write_text(json.dumps(cifar_classes))
    ingested = read_dataset(tmp_path, workers=1)
    renamed = [warning for warning in ingested.warnings if warning.startswith("duplicate key ")]
    assert len(ingested.samples) == 90 and len({sample.key for sample in ingested.samples}) == 90
    assert len(renamed) == readers_module.MAX_WARNINGS
    assert f"... and {60 - readers_module.MAX_WARNINGS} more duplicate keys renamed" in ingested.warnings


def test_one_class_left_readable_says_which_and_why_the_others_are_not(tmp_path, cifar_samples):
    for index, (key, jpg, _) in enumerate(cifar_samples[:40]):
        name = "cat" if index < 20 else "dog"
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{key}.jpg").write_bytes(jpg if name == "cat" else jpg[:100])
    with pytest.raises(InputError, match=r"every readable sample has the same label \(0, 'cat'\); need two classes "
                                         r"\(20 unreadable, first: dog/\S+\.jpg: cannot decode image"):
        read_dataset(tmp_path, workers=1)
