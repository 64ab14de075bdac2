"""writers.py: staged OUT directories, clean/relabeled sets read back by webdataset and torchvision, dataset copies."""
from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision
import webdataset
from PIL import Image

from conftest import write_shard
from sanitize.formats import InputError, read_dataset, writers, staged_output, write_dataset, write_outputs
from sanitize.formats.keys import class_dir_names, dedupe_keys, is_safe_key, safe_key
from sanitize.formats.writers import write_folder
from sanitize.formats.records import Sample


def verdicts(ingested, seed: int = 0):
    """Deterministic score/suspected/relabel: every fifth sample suspected and moved to class 0; the
    clean model also disagrees with every seventh sample's label (index 3, 10, ...; some are clean)."""
    count = len(ingested.samples)
    score = np.random.default_rng(seed).random(count)
    suspected = np.arange(count) % 5 == 0
    disagree = (ingested.labels + 1) % len(ingested.classes)
    relabel = np.where(suspected, 0, np.where(np.arange(count) % 7 == 3, disagree, ingested.labels))
    return score, suspected, relabel


def final(ingested, suspected, relabel) -> list[int]:
    """The relabeled set's labels: only suspects take their relabel."""
    return [int(r) if s else int(label) for label, s, r in zip(ingested.labels, suspected, relabel)]


def shard_paths(directory: Path) -> list[str]:
    return sorted(str(path) for path in directory.glob("*.tar"))


def digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- staged_output -----------------------------------------------------------------------------------------------


def test_staged_output_moves_a_hidden_temporary_directory_into_place(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, tmp_path / "input") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.sanitize-tmp-")
        (staging / "result.txt").write_text("done")
        assert not out.exists()
    assert (out / "result.txt").read_text() == "done" and not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_output_removes_its_directory_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(tmp_path / "out", tmp_path / "input") as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_names_the_output_and_leaves_nothing_behind(number, tmp_path):
    """A write refused for room carries no file name: the error names the output instead."""
    with pytest.raises(InputError, match=f"cannot write the output {re.escape(str(tmp_path / 'out'))}: "
                                         f"{os.strerror(number)}; the partial output was removed"):
        with staged_output(tmp_path / "out", tmp_path / "input") as staging:
            (staging / "half.txt").write_text("half")
            raise OSError(number, os.strerror(number))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError):  # any other OS error, or one naming its file, goes on as it was
        with staged_output(tmp_path / "out", tmp_path / "input"):
            raise PermissionError(errno.EACCES, "Permission denied", "/somewhere")


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_refused_not_taken_for_the_working_directory(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="the output path is empty"):
        with staged_output(out, tmp_path / "elsewhere"):
            pass


def test_staged_output_refuses_an_out_that_overlaps_the_input(tmp_path):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    for out in (data, data / "clean", link / "cat" / "out", tmp_path):
        with pytest.raises(InputError, match="overlaps the input"):
            with staged_output(out, data, overwrite=True):
                pass
    with pytest.raises(InputError, match="overlaps the input"):
        with staged_output(tmp_path / "part-000001.tar", f"{tmp_path}/part-{{000000..000002}}.tar"):
            pass


def test_staged_output_replaces_only_an_earlier_output_and_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="not empty"):
        with staged_output(out, tmp_path / "input"):
            pass
    with pytest.raises(InputError, match="not an earlier output"):  # someone's files, not ours
        with staged_output(out, tmp_path / "input", overwrite=True):
            pass
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    (out / "manifest.json").write_text(json.dumps(RUN_MARKER))
    with staged_output(out, tmp_path / "input", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        with staged_output(tmp_path / "file", tmp_path / "input", overwrite=True):
            pass


# The least a marker must hold for --overwrite to take its directory for an earlier output.
RUN_MARKER = {"schema_version": 1, "method": "advrbd", "counts": {}, "suspects": []}
POISON_MARKER = {"attack": "blend", "target": 0, "counts": {}, "poisoned": []}


def test_staged_output_replaces_only_its_own_kind_of_output(tmp_path):
    """``run --overwrite`` (manifest.json) must not delete a poisoned copy (truth.json), nor the reverse."""
    for kind, marker, other in ((writers.POISON_OUTPUT, POISON_MARKER, writers.RUN_OUTPUT),
                                (writers.RUN_OUTPUT, RUN_MARKER, writers.POISON_OUTPUT)):
        out = tmp_path / kind.marker
        out.mkdir()
        (out / kind.marker).write_text(json.dumps(marker))
        if kind.entries is None:
            (out / "part-000000.tar").write_bytes(b"someone's only copy")
        with pytest.raises(InputError, match="is not an earlier output of this command"):
            with staged_output(out, tmp_path / "input", overwrite=True, replaceable=other):
                pass
        before = sorted(p.name for p in out.iterdir())
        assert kind.marker in before
        (out / kind.marker).write_text("[" * 100000)  # a marker nested deeper than Python's stack: not ours
        with pytest.raises(InputError, match="is not an earlier output of this command"):
            with staged_output(out, tmp_path / "input", overwrite=True, replaceable=kind):
                pass
        (out / kind.marker).write_text(json.dumps(marker))
        with staged_output(out, tmp_path / "input", overwrite=True, replaceable=kind) as staging:
            (staging / "new.txt").write_text("new")
        assert [p.name for p in out.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("marker_text, extra", [
    ("{}", None),  # a manifest.json that is not ours
    ('{"name": "my-webapp"}', None),
    ("not json", None),
    (json.dumps(RUN_MARKER), "src"),  # ours, beside a user's folder
    (json.dumps(RUN_MARKER), "notes.txt"),
    (json.dumps(RUN_MARKER), ".DS_Store"),  # hidden: the message must name it
])
def test_overwrite_never_takes_a_mere_manifest_json_for_an_earlier_output(marker_text, extra, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text(marker_text)
    if extra:
        (out / extra).mkdir() if "." not in extra else (out / extra).write_text("x")
    named = f": it also holds {re.escape(extra)}\\);" if extra else "[^:]\\);"
    with pytest.raises(InputError, match="not an earlier output of this command .*" + named):
        with staged_output(out, tmp_path / "input", overwrite=True):
            pass
    assert (out / "manifest.json").read_text() == marker_text


def test_out_may_not_be_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(InputError, match="working directory"):
            with staged_output(out, None, overwrite=True):
                pass
    assert work.is_dir() and list(tmp_path.iterdir()) == [work]


def _file_as_parent(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / "out"


def _file_as_grandparent(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / "sub" / "out"


def _name_too_long(tmp_path: Path) -> Path:
    return tmp_path / ("x" * 300) / "out"


def _read_only_parent(tmp_path: Path) -> Path:
    (tmp_path / "locked").mkdir(mode=0o555)
    return tmp_path / "locked" / "out"


def _unreadable_out(tmp_path: Path) -> Path:
    (tmp_path / "locked").mkdir(mode=0o000)
    return tmp_path / "locked"


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NO_PERMISSIONS = pytest.mark.skipif(AS_ROOT, reason="root bypasses file permissions")


@pytest.mark.parametrize("make_out, reason", [
    (_file_as_parent, "afile exists and is not a directory"),
    (_file_as_grandparent, "Not a directory"),
    (_name_too_long, "too long"),
    pytest.param(_read_only_parent, "Permission denied", marks=NO_PERMISSIONS),
    pytest.param(_unreadable_out, "Permission denied", marks=NO_PERMISSIONS),
    pytest.param(lambda tmp_path: Path("/proc/sanitize-out"), "no directory can be made in /proc",
                 marks=pytest.mark.skipif(not Path("/proc/self").exists(), reason="no procfs here")),
    # sysfs refuses a new directory even to root (EPERM): the one refusal of the kind above that CI, run as
    # root, also meets
    pytest.param(lambda tmp_path: Path("/sys/sanitize-out"), r"no directory can be made in /sys \(Operation not",
                 marks=pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs here")),
])
def test_staged_output_turns_an_unusable_out_into_one_line(make_out, reason, tmp_path):
    out = make_out(tmp_path)
    expected = f"cannot write the output {re.escape(str(out.resolve()))}: .*{reason}"
    try:
        with pytest.raises(InputError, match=expected) as caught:
            with staged_output(out, tmp_path / "input", overwrite=True):
                pass
    finally:
        for path in tmp_path.iterdir():
            path.chmod(0o755)
    assert "\n" not in str(caught.value)


def test_staged_output_accepts_an_existing_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    with staged_output(tmp_path / "out", tmp_path / "input") as staging:
        (staging / "a").write_text("a")
    assert (tmp_path / "out" / "a").exists()


def test_files_that_appear_in_out_during_a_run_are_never_deleted(tmp_path):
    """OUT is checked again at the end: a user's files put there while the run went on (or another run's
    outputs) stay, and the finished outputs are kept in the staging directory, which the error names."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match="it changed while the run went on, so the finished outputs were kept in") \
            as caught:
        with staged_output(out, tmp_path / "input") as staging:
            (staging / "result.txt").write_text("done")
            out.mkdir()
            (out / "notes.txt").write_text("precious")
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert str(staging) in str(caught.value) and (staging / "result.txt").read_text() == "done"
    with pytest.raises(InputError, match="it changed while the run went on"):  # two runs, one OUT
        with staged_output(tmp_path / "race", tmp_path / "input") as first:
            (first / "manifest.json").write_text(json.dumps(RUN_MARKER))
            with staged_output(tmp_path / "race", tmp_path / "input") as second:
                (second / "manifest.json").write_text(json.dumps(RUN_MARKER))
    assert (tmp_path / "race" / "manifest.json").exists() and (first / "manifest.json").exists()
    shutil.rmtree(out)
    with staged_output(out, tmp_path / "input", overwrite=True) as staging:  # an earlier run's output, as at
        (staging / "manifest.json").write_text(json.dumps({**RUN_MARKER, "method": "new"}))  # the start
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps(RUN_MARKER))
    assert json.loads((out / "manifest.json").read_text())["method"] == "new"


def test_what_killed_runs_left_beside_out_is_removed_by_the_next_run(tmp_path):
    """A SIGKILL leaves a staging directory of whole shards; the next run into the same OUT on this host
    removes those whose process is gone, and leaves a live run's and another OUT's alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = writers._HOST, int(dead.stdout)
    left = [tmp_path / f".out.sanitize-tmp-{host}-{dead_pid}-0a1b2c3d",
            tmp_path / f".out.sanitize-old-{host}-{dead_pid}-ff"]
    kept = [tmp_path / f".out.sanitize-tmp-{host}-{os.getpid()}-0a1b2c3d",  # alive: this process
            tmp_path / f".out.sanitize-tmp-otherhost-{dead_pid}-0a1b2c3d",  # another machine's, maybe alive
            tmp_path / f".other.sanitize-tmp-{host}-{dead_pid}-0a1b2c3d"]  # another OUT's
    for directory in left + kept:
        (directory / "clean").mkdir(parents=True)
    (tmp_path / "out").mkdir()  # the output the killed runs were replacing is in place
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(RUN_MARKER))
    with staged_output(tmp_path / "out", tmp_path / "input", overwrite=True) as staging:
        (staging / "result.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(k.name for k in kept)])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["result.txt"]


def test_an_old_output_moved_aside_by_a_killed_run_is_moved_back(tmp_path):
    """Killed between the two renames of _move_into_place: OUT is gone, the old output waits aside."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.sanitize-old-{writers._HOST}-{int(dead.stdout)}-ab"
    aside.mkdir()
    (aside / "manifest.json").write_text(json.dumps(RUN_MARKER))
    with pytest.raises(InputError, match="exists and is not empty"):  # back in place, so no --overwrite no run
        with staged_output(tmp_path / "out", tmp_path / "input"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "manifest.json").exists()


def test_a_mount_point_as_out_is_refused_before_the_run(tmp_path, monkeypatch):
    """Docker's -v host:/out: the finished outputs replace OUT whole, which a mount point refuses (EBUSY),
    so the whole run was lost at its end. (os.path.ismount is what finds one; no mount needs root here.)"""
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(writers.os.path, "ismount", lambda path: Path(path) == tmp_path / "mnt")
    with pytest.raises(InputError, match="is a mount point, which cannot be replaced"):
        with staged_output(tmp_path / "mnt", tmp_path / "input"):
            pass


# --- write_outputs -----------------------------------------------------------------------------------------------


def test_clean_and_relabeled_shards_read_back_with_webdataset(make_shards, tmp_path, cifar_samples):
    ingested = read_dataset(make_shards(120, 50), workers=1)
    score, suspected, relabel = verdicts(ingested)
    written = write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel,
                            shard_size=40)
    assert written == {"clean": "clean", "relabeled": "relabeled", "scores": "scores.csv"}
    clean = list(webdataset.WebDataset(shard_paths(tmp_path / "out" / "clean"), shardshuffle=False))
    expected = [sample for sample, flagged in zip(cifar_samples[:120], suspected) if not flagged]
    assert [s["__key__"] for s in clean] == [key for key, _, _ in expected]
    assert [s["jpg"] for s in clean] == [jpg for _, jpg, _ in expected]
    assert [int(s["cls"]) for s in clean] == [label for _, _, label in expected]
    meta = json.loads(clean[0]["json"])
    assert meta == {"key": expected[0][0], "source": f"part-000000.tar:{expected[0][0]}.jpg",
                    "label": expected[0][2], "score": score[1]}
    relabeled = list(webdataset.WebDataset(shard_paths(tmp_path / "out" / "relabeled"), shardshuffle=False))
    assert len(relabeled) == 120 and [int(s["cls"]) for s in relabeled] == final(ingested, suspected, relabel)
    assert json.loads(relabeled[0]["json"]) == {"original_label": cifar_samples[0][2], "relabel": 0,
                                                "suspected": True, "score": score[0]}
    # a sample judged clean keeps its given label in .cls; the clean model's other opinion is only in .json
    assert int(relabeled[3]["cls"]) == cifar_samples[3][2] != relabel[3]
    assert json.loads(relabeled[3]["json"])["relabel"] == relabel[3]
    assert len(shard_paths(tmp_path / "out" / "relabeled")) == 3


def test_outputs_read_back_through_read_dataset(make_shards, tmp_path):
    ingested = read_dataset(make_shards(100, 50), workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel)
    clean = read_dataset(tmp_path / "out" / "clean", workers=1)
    assert clean.classes == ingested.classes and len(clean.samples) == int((~suspected).sum())
    relabeled = read_dataset(tmp_path / "out" / "relabeled", workers=1)
    assert [s.data for s in relabeled.samples] == [s.data for s in ingested.samples]
    assert relabeled.labels.tolist() == final(ingested, suspected, relabel) != relabel.tolist()


def test_shards_are_byte_identical_on_a_second_write(make_shards, tmp_path):
    ingested = read_dataset(make_shards(100, 50), workers=1)
    score, suspected, relabel = verdicts(ingested)
    for name in ("first", "second"):
        write_outputs(tmp_path / name, ingested, score=score, suspected=suspected, relabel=relabel, shard_size=30)
    assert digests(tmp_path / "first") == digests(tmp_path / "second")
    with tarfile.open(tmp_path / "first" / "clean" / "clean-000000.tar") as tar:
        info = tar.getmembers()[0]
    assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "sanitize", "sanitize",
                                                                                    0o444)


def test_shards_written_by_worker_processes_are_the_same_bytes(make_shards, tmp_path, monkeypatch):
    ingested = read_dataset(make_shards(100, 50), workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "inline", ingested, score=score, suspected=suspected, relabel=relabel, shard_size=30,
                  workers=1)
    monkeypatch.setattr(writers, "WRITE_POOL_MIN_SAMPLES", 0)
    write_outputs(tmp_path / "pool", ingested, score=score, suspected=suspected, relabel=relabel, shard_size=30,
                  workers=2)
    assert digests(tmp_path / "inline") == digests(tmp_path / "pool")
    assert len(shard_paths(tmp_path / "pool" / "relabeled")) == 4


def shards_with_captions(root: Path, cifar_samples, cifar_classes, n: int = 30) -> dict[str, dict[str, bytes]]:
    """Shards like img2dataset's: each sample has a caption ``.txt`` and a metadata ``.json`` that also
    holds the label; some have more. Returns each key's members beside the image and ``.cls``."""
    root.mkdir()
    extras = {}
    members = []
    for index, (key, jpg, label) in enumerate(cifar_samples[:n]):
        meta = json.dumps({"label": label, "url": f"https://example.com/{index}.jpg"}).encode()
        extras[key] = {"txt": f"caption {index}".encode(), "json": meta}
        if index % 3 == 0:  # more members, and names that would meet ours
            extras[key] = {"TXT": b"upper", "txt": b"lower", "JSON": meta, "seg.png": b"mask", "_private": b"kept"}
        members += [(f"{key}.jpg", jpg), (f"{key}.cls", str(label).encode())]
        members += [(f"{key}.{suffix}", data) for suffix, data in extras[key].items()]
    write_shard(root / "part-000000.tar", members)
    (root / "classes.json").write_text(json.dumps({"classes": cifar_classes}))
    return extras


def carried(extras: dict[str, bytes]) -> dict[str, bytes]:
    """The fields the input members ``extras`` become in a written shard."""
    renamed = {"json": "input.json", "_private": "input._private", "JSON": "input.JSON", "txt": "input.txt"}
    if "TXT" not in extras:
        del renamed["txt"]  # sorted, TXT comes first and keeps its name; txt, which webdataset would take for it, not
    return {renamed.get(suffix, suffix): data for suffix, data in extras.items()}


def test_members_beside_the_image_are_carried_into_every_shard_set(tmp_path, cifar_samples, cifar_classes):
    extras = shards_with_captions(tmp_path / "data", cifar_samples, cifar_classes)
    ingested = read_dataset(tmp_path / "data", workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel)
    for name in ("clean", "relabeled"):
        written = list(webdataset.WebDataset(shard_paths(tmp_path / "out" / name), shardshuffle=False))
        assert len(written) == (int((~suspected).sum()) if name == "clean" else 30)
        for sample in written:
            ours = {"__key__", "__url__", "__local_path__", "jpg", "cls", "json"}
            expected = {k.lower(): v for k, v in carried(extras[sample["__key__"]]).items()}  # as webdataset reads
            assert {k: v for k, v in sample.items() if k not in ours} == expected
            assert json.loads(sample["json"]).keys() >= {"score"}, "the .json is ours; the input's is input.json"
    # read back, an input.json "label" never overrides the final label, even where a suspect was relabeled
    relabeled = read_dataset(tmp_path / "out" / "relabeled", workers=1)
    assert relabeled.labels.tolist() == final(ingested, suspected, relabel) and not relabeled.unreadable
    assert dict(relabeled.samples[1].extras)["input.json"] == extras[ingested.samples[1].key]["json"]


def test_a_dataset_copy_carries_the_members_and_its_labels_win(tmp_path, cifar_samples, cifar_classes):
    extras = shards_with_captions(tmp_path / "data", cifar_samples, cifar_classes)
    ingested = read_dataset(tmp_path / "data", workers=1)
    flipped = [dataclasses.replace(s, label=(s.label + 1) % 10) for s in ingested.samples]  # as a dirty-label attack
    write_dataset(tmp_path / "copy", flipped, ingested.classes)
    copy = read_dataset(tmp_path / "copy", workers=1)
    assert [s.label for s in copy.samples] == [s.label for s in flipped] and not copy.unreadable
    for sample in copy.samples:
        assert {k: v for k, v in sample.extras if k != "json"} == carried(extras[sample.key])
        assert json.loads(dict(sample.extras)["json"]) == {"label": sample.label}
    # a copy of samples with nothing beside the image and label stays as it was: image and .cls
    write_dataset(tmp_path / "plain", [dataclasses.replace(s, extras=()) for s in flipped], ingested.classes)
    with tarfile.open(tmp_path / "plain" / "part-000000.tar") as tar:
        assert {name.partition(".")[2] for name in tar.getnames()} == {"jpg", "cls"}


def test_an_imagefolder_tree_says_which_members_it_cannot_hold(tmp_path, cifar_samples, cifar_classes):
    shards_with_captions(tmp_path / "data", cifar_samples, cifar_classes)
    ingested = read_dataset(tmp_path / "data", workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel,
                  relabeled_format="imagefolder")
    assert ingested.warnings[-1] == ("relabeled/: the other members of 30 sample(s) (JSON, TXT, _private, json, "
                                     "seg.png and 1 more) are not in the ImageFolder tree, which holds images "
                                     "only; write shards to keep them")
    assert not [path for path in (tmp_path / "out" / "relabeled").rglob("*") if path.suffix in (".txt", ".png")]


def test_scores_csv_has_one_row_per_readable_sample_in_input_order(make_shards, tmp_path):
    root = make_shards(60, 30)
    (root / "part-000002.tar").write_bytes(b"not a tar")
    ingested = read_dataset(root, workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel)
    with open(tmp_path / "out" / "scores.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["key", "source", "label", "score", "suspected", "relabel"]
    assert [row[0] for row in rows[1:]] == [s.key for s in ingested.samples]
    assert [float(row[3]) for row in rows[1:]] == score.tolist()
    assert rows[1][4:] == ["true", "0"] and rows[2][4] == "false"


def test_relabeled_imagefolder_loads_with_torchvision(make_imagefolder, tmp_path, cifar_samples):
    ingested = read_dataset(make_imagefolder(80), workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel,
                  relabeled_format="imagefolder")
    root = tmp_path / "out" / "relabeled"
    folder = torchvision.datasets.ImageFolder(root, allow_empty=True)
    assert folder.classes == ingested.classes
    by_path = {Path(path).relative_to(root).as_posix(): label for path, label in folder.samples}
    assert sorted(by_path.values()) == sorted(final(ingested, suspected, relabel))
    for index in (1, 3):  # not suspected (3: the clean model disagrees): same class directory, path and key
        kept = ingested.samples[index]
        assert by_path[kept.source] == kept.label and (root / kept.source).read_bytes() == kept.data
    assert relabel[3] != ingested.samples[3].label
    moved = next(s for s, flagged in zip(ingested.samples, suspected) if flagged and s.label != 0)
    assert by_path[f"{ingested.classes[0]}/{moved.key}.jpg"] == 0  # relabeled to class 0: nested under it
    assert len(list(webdataset.WebDataset(shard_paths(tmp_path / "out" / "clean"), shardshuffle=False))) == 64


def gif_bytes(jpg: bytes) -> bytes:
    """An animated two-frame GIF with a transparent colour, made from a real image: its first frame is the sample."""
    first = Image.open(io.BytesIO(jpg)).convert("RGB").quantize(64)
    second = Image.new("P", first.size, 0)
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], transparency=3, duration=100)
    return buffer.getvalue()


def folder_placement(ingested, suspected, relabel, dirs) -> list[tuple[str, int]]:
    """(path without extension, class index) that every sample must have in the relabeled tree."""
    placed = []
    for sample, label in zip(ingested.samples, final(ingested, suspected, relabel)):
        key = sample.key if sample.key.startswith(f"{dirs[label]}/") else f"{dirs[label]}/{sample.key}"
        placed.append((key, label))
    return sorted(placed)


def loaded_placement(folder, root: Path) -> list[tuple[str, int]]:
    return sorted((Path(path).relative_to(root).with_suffix("").as_posix(), label) for path, label in folder.samples)


def test_relabeled_imagefolder_loads_whole_with_torchvision_given_the_warned_arguments(
        make_imagefolder, tmp_path, cifar_samples, cifar_classes):
    data = make_imagefolder(60)
    gif = gif_bytes(cifar_samples[100][1])
    (data / "cat" / "animated.gif").write_bytes(gif)
    ingested = read_dataset(data, workers=1)
    score, suspected, relabel = verdicts(ingested)
    trucks = ingested.labels == 9
    suspected[trucks], relabel[trucks] = True, 1  # every "truck" suspected and relabeled ...
    relabel[relabel == 9] = 1  # ... and no suspect relabeled "truck": an empty class directory
    row = next(i for i, s in enumerate(ingested.samples) if s.key == "cat/animated")
    suspected[row], relabel[row] = False, 5  # kept in the clean shards, so it keeps "cat" (the model said "dog")
    write_outputs(tmp_path / "out", ingested, score=score, suspected=suspected, relabel=relabel,
                  relabeled_format="imagefolder")
    root = tmp_path / "out" / "relabeled"
    with pytest.raises(FileNotFoundError, match="truck"):  # what the warning tells the user to avoid
        torchvision.datasets.ImageFolder(root)
    folder = torchvision.datasets.ImageFolder(root, allow_empty=True)
    assert folder.classes == cifar_classes and not any((root / "truck").iterdir())
    gif_path = root / "cat" / "animated.gif"
    assert gif_path.read_bytes() == gif, "never re-encoded"
    assert str(gif_path) not in [path for path, _ in folder.samples]  # torchvision skips .gif unless told ...
    every = torchvision.datasets.ImageFolder(root, allow_empty=True, is_valid_file=lambda path: True)
    assert (str(gif_path), 3) in every.samples  # ... as the warning says
    assert loaded_placement(every, root) == folder_placement(ingested, suspected, relabel, cifar_classes)
    assert any("truck" in w and "allow_empty=True" in w for w in ingested.warnings)
    assert any("cat/animated.gif" in w and "is_valid_file" in w for w in ingested.warnings)
    assert json.loads((root / "classes.json").read_text())["classes"] == cifar_classes
    clean = {s["__key__"]: s for s in webdataset.WebDataset(shard_paths(tmp_path / "out" / "clean"),
                                                             shardshuffle=False)}
    assert clean["cat/animated"]["gif"] == gif, "the shards keep the original bytes"


def relabeled_tree(data: Path, out: Path):
    """``data`` read and written to ``out`` with ``verdicts`` and an ImageFolder relabeled set; returns
    (ingested, suspected, relabel, the tree's root, the tree as torchvision loads it)."""
    ingested = read_dataset(data, workers=1)
    score, suspected, relabel = verdicts(ingested)
    write_outputs(out, ingested, score=score, suspected=suspected, relabel=relabel, relabeled_format="imagefolder")
    return ingested, suspected, relabel, out / "relabeled", torchvision.datasets.ImageFolder(out / "relabeled",
                                                                                              allow_empty=True)


def test_relabeled_imagefolder_keeps_our_class_indices_for_unsorted_classes(make_shards, tmp_path, cifar_classes):
    """torchvision numbers classes by sorted directory name; classes.json of shards need not be sorted."""
    data = make_shards(80, 80)
    classes = cifar_classes[::-1]
    (data / "classes.json").write_text(json.dumps({"classes": classes}))
    ingested, suspected, relabel, root, folder = relabeled_tree(data, tmp_path / "out")
    dirs = class_dir_names(classes)
    assert folder.class_to_idx == {name: index for index, name in enumerate(dirs)} and dirs[0] == "0-truck"
    assert loaded_placement(folder, root) == folder_placement(ingested, suspected, relabel, dirs)
    assert json.loads((root / "classes.json").read_text())["classes"] == classes  # the names behind "0-truck"
    again = read_dataset(root, workers=1)  # a second run on the tree gets the names back, not "0-truck"
    assert again.classes == classes and "outside_class_dir" not in again.skipped
    final_of = dict(zip((s.key for s in ingested.samples), final(ingested, suspected, relabel)))
    assert all(final_of[s.key.split("/", 1)[1]] == s.label for s in again.samples)


def test_dotted_class_names_are_the_relabeled_tree_folders_not_nested_again(make_imagefolder, tmp_path):
    data = make_imagefolder(60)
    for index, folder in enumerate(sorted(data.iterdir())):
        folder.rename(data / f"{index:03d}.{folder.name}")
    ingested, suspected, relabel, root, folder = relabeled_tree(data, tmp_path / "out")
    assert list(folder.class_to_idx) == ingested.classes == sorted(path.name for path in data.iterdir())
    kept = [sample for sample, s in zip(ingested.samples, suspected) if not s]  # in the folder they came from
    assert all((root / sample.source).read_bytes() == sample.data for sample in kept)
    again = read_dataset(root, workers=1)
    assert {s.key for s in kept} <= {s.key for s in again.samples}  # and read back under their keys
    assert again.classes == ingested.classes and len(again.samples) == len(ingested.samples)


def test_class_dir_names_keep_inner_dots_only():
    assert class_dir_names(["001.Airplane", "002.Bird"]) == ["001.Airplane", "002.Bird"]
    assert class_dir_names([".hidden", "b"]) == ["0-_hidden", "1-b"]
    assert class_dir_names(["a", "b."]) == ["0-a", "1-b_"]  # Windows drops a trailing dot
    assert class_dir_names(["..", "b"]) == ["0-__", "1-b"]


def test_a_classes_json_that_does_not_fit_the_folders_is_skipped_not_trusted(make_imagefolder, cifar_classes):
    root = make_imagefolder(40)
    (root / "classes.json").write_text(json.dumps({"classes": cifar_classes[::-1]}))  # not what the folders say
    ingested = read_dataset(root, workers=1)
    assert ingested.classes == cifar_classes and ingested.skipped == {"outside_class_dir": 1}
    (root / "classes.json").write_text("{broken")
    assert read_dataset(root, workers=1).skipped == {"outside_class_dir": 1}
    listed = root.parent / "names.txt"
    listed.write_text("\n".join(cifar_classes))
    (root / "classes.json").write_text(json.dumps({"classes": cifar_classes}))  # fits, but --classes decides
    assert read_dataset(root, classes_file=listed, workers=1).skipped == {"outside_class_dir": 1}


def test_verdicts_that_do_not_fit_are_a_bug_not_bad_data(make_shards, tmp_path):
    ingested = read_dataset(make_shards(30, 30), workers=1)
    score, suspected, relabel = verdicts(ingested)
    with pytest.raises(ValueError, match="must be"):
        write_outputs(tmp_path / "a", ingested, score=score[:-1], suspected=suspected, relabel=relabel)
    with pytest.raises(ValueError, match="NaN"):
        write_outputs(tmp_path / "b", ingested, score=score * np.nan, suspected=suspected, relabel=relabel)
    with pytest.raises(ValueError, match="relabel outside"):
        write_outputs(tmp_path / "c", ingested, score=score, suspected=suspected, relabel=relabel + 10)


# --- write_dataset -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_write_dataset_round_trips_keys_labels_and_bytes(layout, make_shards, make_imagefolder, tmp_path):
    source = make_shards(90, 40) if layout == "shards" else make_imagefolder(90)
    ingested = read_dataset(source, workers=1)
    out = write_dataset(tmp_path / "copy", ingested.samples, ingested.classes, fmt=ingested.format, shard_size=25)
    back = read_dataset(out, workers=1)
    assert back.format == ingested.format and back.classes == ingested.classes
    assert [(s.key, s.label, s.data) for s in back.samples] == [(s.key, s.label, s.data)
                                                                for s in ingested.samples]
    assert not any(p.name.startswith(".copy") for p in tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_renamed_duplicate_keys_survive_a_round_trip(fmt, tmp_path, cifar_samples):
    first = cifar_samples[0]
    other = next(sample for sample in cifar_samples if sample[2] != first[2])
    root = tmp_path / "shards"
    root.mkdir()
    for name in ("a.tar", "b.tar"):
        write_shard(root / name, [("dup.jpg", first[1]), ("dup.cls", str(first[2]).encode()),
                                  (f"{other[0]}.jpg", other[1]), (f"{other[0]}.cls", str(other[2]).encode())])
    ingested = read_dataset(root, workers=1)
    assert [s.key for s in ingested.samples] == ["dup", other[0], "dup~1", f"{other[0]}~1"]
    back = read_dataset(write_dataset(tmp_path / "copy", ingested.samples, ingested.classes, fmt=fmt), workers=1)
    prefix = (lambda s: f"{ingested.classes[s.label]}/") if fmt == "imagefolder" else (lambda s: "")
    assert sorted(s.key for s in back.samples) == sorted(prefix(s) + s.key for s in ingested.samples)
    assert not any("duplicate" in warning for warning in back.warnings)


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_write_dataset_across_formats_keeps_labels_and_bytes(fmt, make_shards, make_imagefolder, tmp_path):
    """An ImageFolder key is its path, so shards -> folder gains a class directory; folder -> shards keeps it."""
    ingested = read_dataset(make_shards(60, 40) if fmt == "imagefolder" else make_imagefolder(60), workers=1)
    back = read_dataset(write_dataset(tmp_path / "copy", ingested.samples, ingested.classes, fmt=fmt), workers=1)
    prefix = (lambda s: f"{ingested.classes[s.label]}/") if fmt == "imagefolder" else (lambda s: "")
    assert sorted((s.key, s.label, s.data) for s in back.samples) == sorted(
        (prefix(s) + s.key, s.label, s.data) for s in ingested.samples)


def test_write_dataset_refuses_unsafe_or_duplicate_keys_and_existing_output(tmp_path, cifar_samples):
    key, jpg, label = cifar_samples[0]
    sample = Sample(key, "x", label, "jpg", hashlib.sha256(jpg).hexdigest(), jpg)
    classes = [str(i) for i in range(10)]
    evil = Sample("../escape", "x", label, "jpg", sample.sha256, jpg)
    with pytest.raises(ValueError, match="unsafe"):
        write_dataset(tmp_path / "a", [evil], classes, fmt="imagefolder")
    with pytest.raises(ValueError, match="unique"):
        write_dataset(tmp_path / "b", [sample, sample], classes)
    write_dataset(tmp_path / "c", [sample], classes)
    with pytest.raises(InputError, match="not empty"):
        write_dataset(tmp_path / "c", [sample], classes)
    write_dataset(tmp_path / "c", [sample], classes, overwrite=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "escape.jpg").exists()


def test_write_dataset_overwrite_never_replaces_a_users_own_shard_folder(make_shards, tmp_path, cifar_classes):
    """A user's shards with their own classes.json look like a copy of ours but for the marker."""
    data = make_shards(20, 20)
    (data / "classes.json").write_text(json.dumps({"classes": cifar_classes}))
    before = digests(data)
    ingested = read_dataset(data, workers=1)
    with pytest.raises(InputError, match="is not an earlier output"):
        write_dataset(data, ingested.samples, ingested.classes, overwrite=True)
    assert digests(data) == before
    copy = write_dataset(tmp_path / "copy", ingested.samples, ingested.classes)
    assert json.loads((copy / "classes.json").read_text()) == {"classes": cifar_classes, "written_by": "sanitize"}
    write_dataset(copy, ingested.samples[:5], ingested.classes, overwrite=True)  # our own copy: replaced
    assert len(read_dataset(copy, workers=1).samples) == 5


# --- keys --------------------------------------------------------------------------------------------------------


def test_safe_keys():
    assert safe_key("../../etc/passwd") == "etc/passwd"
    assert safe_key("/abs//x/./y") == "abs/x/y"
    assert safe_key("a.b\\c~d") == "a_b/c~d"
    assert safe_key("") == safe_key("..") == "_"
    assert safe_key("tab\there\x00") == "tab_here_"
    long = safe_key("x" * 500)
    assert len(long) <= 120 and long != safe_key("x" * 499)
    assert all(is_safe_key(key) for key in ["a/b", "a~1", "é/猫"]) and not is_safe_key("a.b")
    assert not is_safe_key("../a") and not is_safe_key("/a") and not is_safe_key("a//b")


def test_dedupe_keys_in_order():
    assert dedupe_keys(["a", "b", "a", "a", "b", "a~1"]) == (
        ["a", "b", "a~1", "a~2", "b~1", "a~1~1"], [("a", "a~1"), ("a", "a~2"), ("b", "b~1"), ("a~1", "a~1~1")])


def test_class_dir_names_keep_torchvision_numbering():
    assert class_dir_names(["cat", "dog"]) == ["cat", "dog"]
    assert class_dir_names(["dog", "cat"]) == ["0-dog", "1-cat"]
    assert class_dir_names(["a/b", "c"]) == ["0-a_b", "1-c"]
    names = class_dir_names([f"c{i}" for i in range(12)][::-1])
    assert sorted(names) == names


def test_names_that_differ_only_in_case_never_share_a_path(tmp_path):
    # On macOS or Windows "Cat" and "cat" are one directory, "x" and "X" one file: a copy would lose samples.
    assert dedupe_keys(["Cat/x", "cat/x", "cat/X"], ignore_case=True)[0] == ["Cat/x", "cat/x~1", "cat/X~2"]
    assert dedupe_keys(["a", "A"])[0] == ["a", "A"]  # case-sensitive by default (tar members, scores.csv)
    assert class_dir_names(["Cat", "cat"]) == ["0-Cat", "1-cat"]
    samples = [Sample(key, f"src/{key}", 0, "png", "", b"bytes " + key.encode()) for key in ("x", "X")]
    written = write_folder(tmp_path / "copy", samples, [0, 0], ["c0", "c1"])
    assert written == ["c0/x.png", "c0/X~1.png"]
    assert len({path.casefold() for path in written}) == 2
