"""``poison_dataset`` on real shards and ImageFolder trees: the copy reads back, matches truth.json, and the
input is untouched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_shard
from sanitize.attacks import poison_dataset
from sanitize.attacks.poison import TRUTH_FILE
from sanitize.formats import read_dataset
from sanitize.formats.records import InputError


def tree_hashes(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def check_copy(data: Path, out: Path, truth: dict, *, target: int) -> None:
    """The copy holds every input sample once: untouched ones byte-identical, stamped ones PNG, labels per truth."""
    before, after = read_dataset(data), read_dataset(out)
    assert json.loads((out / TRUTH_FILE).read_text()) == truth
    renamed = truth["renamed"]
    originals = {sample.key: sample for sample in before.samples}
    copies = {sample.key: sample for sample in after.samples}
    assert len(copies) == len(originals) == truth["counts"]["readable"]
    stamped = set(truth["poisoned"]) | set(truth["cover"])
    for key, copy in copies.items():
        original = originals[renamed.get(key, key)]
        if key in stamped:
            assert copy.ext == "png" and copy.sha256 != original.sha256
        else:
            assert copy.data == original.data and copy.label == original.label
        if key in truth["poisoned"]:
            assert truth["true_labels"][key] == original.label
            assert copy.label == target
        elif key in truth["cover"]:
            assert copy.label == original.label


def test_poison_shards_round_trip(make_shards, tmp_path):
    data = make_shards(120, per_shard=50)
    hashes = tree_hashes(data)
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out", seed=2)
    assert tree_hashes(data) == hashes, "the input was modified"
    assert truth["counts"]["poisoned"] == 12 and truth["format"] == "webdataset" and not truth["renamed"]
    check_copy(data, tmp_path / "out", truth, target=1)
    copy = read_dataset(tmp_path / "out")
    rows = [index for index, sample in enumerate(copy.samples) if sample.key in truth["poisoned"]]
    assert (copy.images[rows][:, -3:, -3:] == 255).all(), "the patch survives encoding"


def test_poison_imagefolder_round_trip_with_cover_samples(make_imagefolder, tmp_path):
    data = make_imagefolder(120)
    hashes = tree_hashes(data)
    truth = poison_dataset(data, attack="tact", rate=0.05, target="automobile", out=tmp_path / "out",
                           cover_rate="0.05")
    assert tree_hashes(data) == hashes
    assert truth["target"] == 1 and truth["params"]["cover_rate"] == 0.05
    assert truth["counts"]["poisoned"] == 6 and truth["counts"]["cover"] == 6
    assert all(key.startswith("automobile/airplane/") for key in truth["poisoned"]), "poisons move to the target"
    check_copy(data, tmp_path / "out", truth, target=1)


def test_poison_imagefolder_with_dotted_class_names_keeps_their_folders(make_imagefolder, tmp_path):
    """CUB-200 and Caltech-256 name their classes 001.Black_footed_Albatross: a copy keeps those folders."""
    data = make_imagefolder(60)
    for index, folder in enumerate(sorted(data.iterdir())):
        folder.rename(data / f"{index:03d}.{folder.name}")
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir()) == \
        sorted(path.name for path in data.iterdir())
    assert all(key.startswith("001_automobile/") for key in truth["poisoned"])  # a key's form of 001.automobile
    check_copy(data, tmp_path / "out", truth, target=1)


def test_an_imagefolder_copy_of_keys_that_differ_only_in_case_names_the_keys_it_wrote(tmp_path, cifar_samples):
    """IMG1 and img1 in one folder would overwrite each other on macOS or Windows: the copy renames one,
    and truth.json must name the key that reads back."""
    from conftest import write_shard

    root = tmp_path / "shards"
    root.mkdir()
    members = []
    for index, (_, jpg, label) in enumerate(cifar_samples[:40]):
        key = f"IMG{index // 2}" if index % 2 else f"img{index // 2}"
        members += [(f"{key}.jpg", jpg), (f"{key}.cls", str(label % 2).encode())]
    write_shard(root / "a.tar", members)
    truth = poison_dataset(root, attack="badnets", rate=0.3, target=1, out=tmp_path / "out", fmt="imagefolder")
    keys = {sample.key for sample in read_dataset(tmp_path / "out").samples}
    assert set(truth["poisoned"]) <= keys and len(keys) == 40


def test_a_poisoned_copy_keeps_every_samples_other_members(tmp_path, cifar_samples, cifar_classes):
    data = tmp_path / "data"
    data.mkdir()
    members = []
    for key, jpg, label in cifar_samples[:60]:
        members += [(f"{key}.cls", str(label).encode()), (f"{key}.jpg", jpg), (f"{key}.txt", f"{key} caption".encode())]
    write_shard(data / "part-000000.tar", members)
    (data / "classes.json").write_text(json.dumps({"classes": cifar_classes}))
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out", seed=0)
    copy = read_dataset(tmp_path / "out")
    assert len(copy.samples) == 60 and truth["counts"]["poisoned"] == 6
    assert all(sample.extras == (("txt", f"{sample.key} caption".encode()),) for sample in copy.samples)
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "tree", seed=0,
                           fmt="imagefolder")
    assert "the copy: the other members of 60 sample(s) (txt) are not in the ImageFolder tree" in truth["warnings"][-1]


def test_poison_converts_formats(make_imagefolder, tmp_path):
    data = make_imagefolder(60)
    truth = poison_dataset(data, attack="sig", rate=0.05, target=1, out=tmp_path / "out", fmt="webdataset")
    assert truth["format"] == "webdataset" and read_dataset(tmp_path / "out").format == "webdataset"
    check_copy(data, tmp_path / "out", truth, target=1)


def test_poison_refuses_overlap_and_existing_output(make_shards, tmp_path):
    data = make_shards(40, per_shard=40)
    with pytest.raises(InputError, match="overlaps"):
        poison_dataset(data, attack="badnets", rate=0.1, target=1, out=data / "inside")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out")
    with pytest.raises(InputError, match="not an earlier output"):
        poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out", overwrite=True)
    (tmp_path / "out" / TRUTH_FILE).write_text("{}")  # a truth.json that is not ours: still someone's files
    with pytest.raises(InputError, match="not an earlier output"):
        poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out", overwrite=True)
    (tmp_path / "out" / TRUTH_FILE).write_text(json.dumps({"attack": "blend", "target": 0, "counts": {},
                                                           "poisoned": []}))  # an earlier poisoned copy
    poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / TRUTH_FILE).is_file()
    with pytest.raises(InputError, match="unknown attack"):
        poison_dataset(data, attack="nope", rate=0.1, target=1, out=tmp_path / "other")
    with pytest.raises(InputError, match="unknown target class"):
        poison_dataset(data, attack="badnets", rate=0.1, target="unicorn", out=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_each_overwrite_replaces_only_its_own_kind_of_output(make_shards, tmp_path):
    """``run --overwrite`` must not delete a poisoned copy (maybe the only one), nor ``poison`` a run's output."""
    from sanitize import pipeline

    data = make_shards(40, per_shard=40)
    poisoned = tmp_path / "poisoned"
    poison_dataset(data, attack="badnets", rate=0.1, target=1, out=poisoned)
    hashes = tree_hashes(poisoned)
    with pytest.raises(InputError, match="is not an earlier output of this command .a manifest.json"):
        pipeline.run(data, out=poisoned, overwrite=True, device="cpu", arch="small", quick=True)
    assert tree_hashes(poisoned) == hashes
    run_output = tmp_path / "sanitized"
    run_output.mkdir()
    (run_output / "manifest.json").write_text(json.dumps({"schema_version": 1, "method": "advrbd", "counts": {},
                                                         "suspects": []}))
    with pytest.raises(InputError, match="is not an earlier output of this command .a truth.json"):
        poison_dataset(data, attack="badnets", rate=0.1, target=1, out=run_output, overwrite=True)
    assert [p.name for p in run_output.iterdir()] == ["manifest.json"]


def test_poison_lists_the_unreadable_inputs_it_leaves_out(make_imagefolder, tmp_path):
    data = make_imagefolder(40)
    (data / "cat" / "broken.jpg").write_bytes(b"not an image")
    (data / "dog" / "empty.png").write_bytes(b"")
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out")
    assert truth["counts"] == {"total": 42, "readable": 40, "unreadable": 2, "poisoned": 4, "cover": 0}
    assert [(item["key"], item["source"]) for item in truth["unreadable"]] == [
        ("cat/broken", "cat/broken.jpg"), ("dog/empty", "dog/empty.png")]
    assert all(item["error"] for item in truth["unreadable"])
    assert any(w.startswith("2 of 42 input samples are unreadable and not in the copy") for w in truth["warnings"])
    check_copy(data, tmp_path / "out", truth, target=1)


def test_poison_counts_the_files_the_reader_skips(make_imagefolder, tmp_path, cifar_samples):
    data = make_imagefolder(30)
    (data / "cat" / ".hidden.jpg").write_bytes(cifar_samples[0][1])
    (data / "dog" / "notes.txt").write_text("not an image")
    truth = poison_dataset(data, attack="badnets", rate=0.1, target=1, out=tmp_path / "out")
    assert truth["skipped"] and sum(truth["skipped"].values()) == 2
    assert truth["counts"]["total"] == 30 and truth["counts"]["unreadable"] == 0
    assert any(w.startswith("2 files the reader skips are not in the copy") and "truth.json" in w
               for w in truth["warnings"])
    assert json.loads((tmp_path / "out" / "truth.json").read_text())["skipped"] == truth["skipped"]
    assert not any(path.name in (".hidden.jpg", "notes.txt") for path in (tmp_path / "out").rglob("*"))
    clean = poison_dataset(make_imagefolder(30, root=tmp_path / "plain"), attack="badnets", rate=0.1, target=1,
                           out=tmp_path / "out2")
    assert clean["skipped"] == {} and not any("skips" in w for w in clean["warnings"])


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "seed must be at least 0"),  # numpy's ValueError before
    ({"rate": None}, "rate must be a finite number"),  # TypeError before
    ({"rate": float("nan")}, "rate must be a finite number"),
    ({"target": 1.7}, "unknown target class 1.7"),  # silently class 1 before
    ({"target": True}, "unknown target class True"),
])
def test_poison_refuses_bad_arguments_in_one_line(make_shards, tmp_path, options, message):
    data = make_shards(20, per_shard=20)
    arguments = {"attack": "badnets", "rate": 0.1, "target": 1, "out": tmp_path / "out", **options}
    with pytest.raises(InputError, match=message):
        poison_dataset(data, **arguments)
    assert not (tmp_path / "out").exists()
    assert poison_dataset(data, **{**arguments, **{"rate": "0.1", "target": "1", "seed": 0}})["counts"]["poisoned"] == 2


def test_the_library_call_is_the_command(make_shards, tmp_path):
    import sanitize

    data = make_shards(30, per_shard=30)
    truth = sanitize.poison(data, attack="badnets", rate=0.1, target="automobile", out=tmp_path / "api", seed=4)
    assert truth == json.loads((tmp_path / "api" / TRUTH_FILE).read_text())
    assert truth["target"] == 1 and truth["counts"]["poisoned"] == 3 and truth["seed"] == 4
    folder = sanitize.poison(data, attack="blend", rate=0.1, out=tmp_path / "folder", format="imagefolder",
                             alpha=0.3)  # the flag's name, not poison_dataset's fmt
    assert folder["format"] == "imagefolder" and folder["params"]["alpha"] == 0.3


def test_poison_is_deterministic(make_shards, tmp_path):
    data = make_shards(60, per_shard=60)
    first = poison_dataset(data, attack="blend", rate=0.1, target=0, out=tmp_path / "a", seed=5)
    second = poison_dataset(data, attack="blend", rate=0.1, target=0, out=tmp_path / "b", seed=5)
    assert first == second
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert np.array_equal(read_dataset(tmp_path / "a").images, read_dataset(tmp_path / "b").images)


def mixed_size_folder(root: Path, cifar_samples, cifar_classes, count: int = 60) -> dict[str, tuple[int, int]]:
    """CIFAR images as an ImageFolder tree, every third one saved at 48x40 and every fifth at 20x28 (PNG);
    returns each file's key and (H, W)."""
    import io

    from PIL import Image

    sizes = {}
    for index, (key, jpg, label) in enumerate(cifar_samples[:count]):
        image = Image.open(io.BytesIO(jpg)).convert("RGB")
        size = (48, 40) if index % 3 == 0 else (20, 28) if index % 5 == 0 else (32, 32)
        path = root / cifar_classes[label] / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize(size[::-1]).save(path)
        sizes[f"{cifar_classes[label]}/{key}"] = size
    return sizes


def own_pixels(sample) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(sample.data)).convert("RGB"))


@pytest.mark.parametrize("attack, params", [
    ("badnets", {}), ("blend", {}), ("wanet", {}),
    ("label_consistent", dict(surrogate_arch="small", epochs=1, pgd_steps=2, batch_size=64)),
])
def test_a_poisoned_image_keeps_its_own_size(tmp_path, cifar_samples, cifar_classes, attack, params):
    """The attack runs at the working size (32x32 here); an image of another size is stamped at its own,
    so neither its size nor a crop gives the poison away."""
    data = tmp_path / "mixed"
    sizes = mixed_size_folder(data, cifar_samples, cifar_classes)
    rate = 0.1 if attack == "label_consistent" else 0.5  # clean-label: the target class holds ~10%
    truth = poison_dataset(data, attack=attack, rate=rate, target=1, out=tmp_path / "out", **params)
    copy = {sample.key: sample for sample in read_dataset(tmp_path / "out").samples}
    originals = {sample.key: sample for sample in read_dataset(data).samples}
    stamped = truth["poisoned"] + truth["cover"]
    assert {sizes[truth["renamed"].get(key, key)] for key in stamped} >= {(48, 40), (32, 32)}
    for key in stamped:
        source = originals[truth["renamed"].get(key, key)]
        before, after = own_pixels(source), own_pixels(copy[key])
        assert after.shape[:2] == sizes[source.key], f"{key}: {after.shape[:2]} is not its own size"
        assert (after != before).any(), f"{key}: no trigger"
    if attack == "badnets":  # the white patch on the bottom-right 3/32 of each side, the rest as it was
        for key in truth["poisoned"]:
            before, after = own_pixels(originals[truth["renamed"].get(key, key)]), own_pixels(copy[key])
            height, width = after.shape[:2]
            rows = (2 * np.arange(height) + 1) * 32 // (2 * height) >= 29  # by pixel centres
            cols = (2 * np.arange(width) + 1) * 32 // (2 * width) >= 29
            patch = rows[:, None] & cols[None, :]
            assert (after[patch] == 255).all() and np.array_equal(after[~patch], before[~patch])


def test_own_size_stamping_in_bounded_chunks_gives_the_same_copy(tmp_path, cifar_samples, cifar_classes,
                                                                   monkeypatch):
    """Photos are stamped a few at a time (OWN_SIZE_PIXELS), not all decoded at once; BadNets has no
    randomness, so one image at a time must give the same bytes."""
    from sanitize.attacks import poison

    data = tmp_path / "mixed"
    mixed_size_folder(data, cifar_samples, cifar_classes)
    poison_dataset(data, attack="badnets", rate=0.5, target=1, out=tmp_path / "whole")
    monkeypatch.setattr(poison, "OWN_SIZE_PIXELS", 1)
    poison_dataset(data, attack="badnets", rate=0.5, target=1, out=tmp_path / "one_by_one")
    assert tree_hashes(tmp_path / "whole") == tree_hashes(tmp_path / "one_by_one")


@pytest.mark.parametrize("attack, params", [
    ("badnets", {}), ("tact", {}),
    ("label_consistent", dict(surrogate_arch="small", epochs=1, pgd_steps=2, batch_size=64)),
])
def test_small_images_keep_a_trigger(tmp_path, cifar_samples, cifar_classes, attack, params):
    """At 10x9 px a corner patch sampled by the pixels' left edges vanished (a pure label flip); under
    8 px Label-Consistent's PGD crashed. 8 px and up: stamped at their own size, by pixel centres;
    smaller: written at the working size, with a warning."""
    import io

    from PIL import Image

    data = tmp_path / "small"
    sizes = {}
    for index, (key, jpg, label) in enumerate(cifar_samples[:60]):
        size = [(10, 9), (6, 7), (32, 32)][index % 3]
        path = data / cifar_classes[label] / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(jpg)).convert("RGB").resize(size[::-1]).save(path)
        sizes[f"{cifar_classes[label]}/{key}"] = size
    rate = 0.1 if attack == "label_consistent" else 0.5
    truth = poison_dataset(data, attack=attack, rate=rate, target=1, out=tmp_path / "out", **params)
    copy = {sample.key: sample for sample in read_dataset(tmp_path / "out").samples}
    ingested = read_dataset(data)
    originals = {sample.key: sample for sample in ingested.samples}
    seen = set()
    for key in truth["poisoned"]:
        source = originals[truth["renamed"].get(key, key)]
        before, after = own_pixels(source), own_pixels(copy[key])
        size = sizes[source.key]
        seen.add(size)
        assert after.shape[:2] == (size if min(size) >= 8 else ingested.image_size)
        if before.shape == after.shape:
            assert (after != before).any(), f"{key} ({size}): no trigger"
    assert (10, 9) in seen
    if (6, 7) in seen:
        assert any("side under 8 px" in warning for warning in truth["warnings"])
