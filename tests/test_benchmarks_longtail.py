"""benchmarks/longtail.py: AdvrBD on a CIFAR subset cut long-tailed."""
import json

import numpy as np
import pytest

from conftest import load_benchmark


def test_long_tailed_keeps_the_first_images_of_each_class_down_the_tail():
    labels = np.repeat(np.arange(4), 100)[np.random.default_rng(0).permutation(400)]
    samples = [f"s{index}" for index in range(400)]
    kept = load_benchmark("longtail").long_tailed(samples, labels, 4, head=90, ratio=9)
    counts = np.bincount(labels[[samples.index(name) for name in kept]], minlength=4)
    assert counts.tolist() == [90, 43, 21, 10]  # 90 * 9 ** (-c / 3)
    assert kept == sorted(kept, key=samples.index)  # in input order
    first_of_class_3 = [name for name in samples if labels[samples.index(name)] == 3][:10]
    assert set(first_of_class_3) <= set(kept)


def test_a_dominated_set_gives_the_head_class_its_share_and_the_others_equal_parts():
    labels = np.repeat(np.arange(4), 100)[np.random.default_rng(1).permutation(400)]
    samples = [f"s{index}" for index in range(400)]
    kept = load_benchmark("longtail").dominated(samples, labels, 4, head=60, share=0.6, head_class=2)
    counts = np.bincount(labels[[samples.index(name) for name in kept]], minlength=4)
    assert counts.tolist() == [13, 13, 60, 13]  # 60 * 0.4 / 0.6 = 40 shared by three, rounded
    assert kept == sorted(kept, key=samples.index)
    with pytest.raises(ValueError, match="between 0 and 1"):
        load_benchmark("longtail").dominated(samples, labels, 4, head=60, share=1.0)


def test_a_run_reports_recall_fpr_and_the_flagged_share_of_each_class(make_shards, capsys):
    record = load_benchmark("longtail").main([
        "--data", str(make_shards(200)), "--ratio", "2", "--head", "30", "--attack", "badnets", "--rate", "0.1",
        "--arch", "small", "--set", "quick=true", "--set", "batch_size=32", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out) == record
    assert record["poisons"] > 0 and 0 <= record["recall"] <= 100 and 0 <= record["fpr"] <= 100
    assert sum(int(cell.split("/")[1]) for cell in record["flagged_by_class"].values()) == record["samples"]
