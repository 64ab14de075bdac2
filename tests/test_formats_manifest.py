"""manifest.py: DESIGN.md's manifest, its schema and invariants, and typed scores.csv reading."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from sanitize.formats.records import InputError

from conftest import write_shard
from sanitize.formats import (build_manifest, read_dataset, read_manifest, read_scores, validate_manifest,
                              write_manifest, write_outputs)

MODEL = {"file": "model.onnx", "arch": "resnet18", "input_size": [32, 32]}


@pytest.fixture
def run(make_shards, tmp_path):
    """An ingested input with one unreadable sample, verdicts, and the manifest built from them."""
    root = make_shards(60, 30)
    write_shard(root / "part-000002.tar", [("broken.jpg", b"\xff\xd8 cut"), ("broken.cls", b"1")])
    ingested = read_dataset(root, workers=1)
    count = len(ingested.samples)
    score = np.linspace(0, 1, count)[::-1].copy()
    score[5] = score[3]  # a tie, to check the order is still reproducible
    suspected = score > 0.8
    relabel = np.where(suspected, 0, ingested.labels)
    manifest = build_manifest(
        ingested, method="advrbd", options={"epochs": 2, "size": (32, 32), "path": Path("x")}, seed=0,
        score=score, suspected=suspected, relabel=relabel, model=MODEL,
        timings_s={"ingest": 0.5, "score": np.float32(1.25)}, environment={"torch": "2.x", "device": "cpu"},
        metrics={"auc": np.float64(0.9)})
    return ingested, score, suspected, relabel, manifest


def test_manifest_has_the_design_shape(run):
    ingested, score, suspected, relabel, manifest = run
    assert manifest["schema_version"] == 1 and manifest["tool"]["name"] == "sanitize"
    assert manifest["method"] == "advrbd" and manifest["seed"] == 0
    assert manifest["options"] == {"epochs": 2, "size": [32, 32], "path": "x"}
    assert manifest["created"].endswith("Z")
    assert manifest["input"]["format"] == "webdataset" and manifest["input"]["classes"] == ingested.classes
    assert manifest["input"]["fingerprint"] == ingested.fingerprint
    assert manifest["input"]["image_size"] == [32, 32] and "32x32" in manifest["input"]["size_rule"]
    assert manifest["counts"] == {"total": 61, "clean": int((~suspected).sum()), "suspected": int(suspected.sum()),
                                  "unreadable": 1}
    assert manifest["unreadable"][0]["source"] == "part-000002.tar:broken.jpg"
    assert manifest["model"] == MODEL and manifest["metrics"] == {"auc": 0.9}
    assert manifest["timings_s"] == {"ingest": 0.5, "score": 1.25}
    validate_manifest(manifest)


def test_suspects_are_sorted_by_descending_score_with_full_records(run):
    ingested, score, suspected, relabel, manifest = run
    suspects = manifest["suspects"]
    assert [s["score"] for s in suspects] == sorted(score[suspected].tolist(), reverse=True)
    by_key = {sample.key: sample for sample in ingested.samples}
    assert [s["key"] for s in suspects][:6] == [ingested.samples[i].key for i in (0, 1, 2, 3, 5, 4)]
    first = suspects[0]
    sample = by_key[first["key"]]
    assert first == {"key": sample.key, "source": sample.source, "sha256": sample.sha256, "label": sample.label,
                     "relabel": 0, "score": 1.0}


def test_per_class_counts_every_class(run):
    ingested, score, suspected, relabel, manifest = run
    per_class = manifest["per_class"]
    assert list(per_class) == ingested.classes
    assert sum(c["total"] for c in per_class.values()) == len(ingested.samples)
    assert sum(c["suspected"] for c in per_class.values()) == int(suspected.sum())


def test_write_and_read_back(run, tmp_path):
    ingested, score, suspected, relabel, manifest = run
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    write_outputs(tmp_path, ingested, score=score, suspected=suspected, relabel=relabel)
    rows = read_scores(tmp_path)
    assert rows[0] == {"key": ingested.samples[0].key, "source": ingested.samples[0].source,
                       "label": ingested.samples[0].label, "score": float(score[0]), "suspected": True,
                       "relabel": 0}
    assert [row["score"] for row in rows] == score.tolist()
    assert [row["suspected"] for row in rows] == suspected.tolist()


@pytest.mark.parametrize("path, value, message", [
    (("schema_version",), 2, "schema_version"),
    (("counts", "clean"), -1, "counts/clean"),
    (("suspects", 0, "sha256"), "nothex", "suspects/0/sha256"),
    (("input", "format"), "zip", "input/format"),
    (("model",), {"file": "model.onnx"}, "model"),
    (("counts", "clean"), 0, "clean \\+ suspected \\+ unreadable != total"),
    (("suspects", 0, "label"), 99, "label or relabel outside input/classes"),
    (("suspects", 0, "relabel"), 10, "label or relabel outside input/classes"),
    (("per_class", "airplane", "total"), 0, "per_class: (totals do not add up|a class with more suspects)"),
    (("per_class", "cat", "suspected"), 10**6, "per_class: suspected do not add up"),
    (("suspects", 0, "label"), 1.0, "not a whole number"),  # inspect failed on a float index
])
def test_validation_names_the_first_problem(run, path, value, message):
    manifest = copy.deepcopy(run[-1])
    target = manifest
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        validate_manifest(manifest)


def test_validation_checks_order_and_extra_keys(run):
    manifest = copy.deepcopy(run[-1])
    manifest["suspects"].reverse()
    with pytest.raises(ValueError, match="descending"):
        validate_manifest(manifest)
    manifest = copy.deepcopy(run[-1])
    manifest["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        validate_manifest(manifest)


def test_read_manifest_rejects_an_invalid_file(run, tmp_path):
    manifest = copy.deepcopy(run[-1])
    del manifest["counts"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="counts"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid sanitize manifest"):
        read_manifest(tmp_path)
    broken = json.dumps(manifest).replace('"schema_version"', '"score_nan": NaN, "schema_version"')
    (tmp_path / "manifest.json").write_text(broken)
    with pytest.raises(InputError, match="NaN is not a JSON number"):
        read_manifest(tmp_path)
    twice = copy.deepcopy(run[-1])
    twice["suspects"][1] = dict(twice["suspects"][0])
    with pytest.raises(ValueError, match="a key listed twice"):
        validate_manifest(twice)
    (tmp_path / "manifest.json").write_text("[" * 100_000)  # RecursionError before
    with pytest.raises(InputError, match="nested too deeply"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a sanitize output directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").mkdir()  # IsADirectoryError before
    with pytest.raises(InputError, match="cannot read .*manifest.json: Is a directory"):
        read_manifest(tmp_path)


def test_non_json_values_are_a_bug(run):
    ingested, score, suspected, relabel, _ = run
    with pytest.raises(TypeError, match="set"):
        build_manifest(ingested, method="m", options={"bad": {1, 2}}, seed=0, score=score, suspected=suspected,
                       relabel=relabel, model=MODEL, timings_s={}, environment={})
