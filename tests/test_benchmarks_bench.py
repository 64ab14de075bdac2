"""benchmarks/bench.py: the figures it computes from a run and how it reads its options."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_auroc_counts_pairs_and_ties_half():
    positive = np.array([True, True, False, False, False])
    assert bench.auroc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    assert bench.auroc(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), positive) == 0.0
    assert bench.auroc(np.zeros(5), positive) == 0.5
    # one positive ties one negative, the rest are ordered: (5 + 0.5) / 6 pairs
    assert bench.auroc(np.array([0.3, 0.9, 0.3, 0.1, 0.2]), positive) == pytest.approx(5.5 / 6)


def test_split_at_gives_recall_and_fpr_per_margin():
    score = np.array([0.95, 0.6, 0.2, 0.7, -0.3])
    positive = np.array([True, True, True, False, False])
    table = bench.split_at(score, positive)
    assert table["0.5"] == [66.67, 50.0]
    assert bench.split_at(score, np.zeros(5, bool))["0.5"] == [None, 60.0]


def test_sets_are_json_when_they_parse_and_strings_otherwise():
    assert bench.parse_sets(["split_margin=0.6", "detect_augment=flip", "quick=true", "name=\"x=y\"", "rounds=[1, 2]"]) \
        == {"split_margin": 0.6, "detect_augment": "flip", "quick": True, "name": "x=y", "rounds": [1, 2]}
