"""benchmarks/report.py: the target checks and the markdown it writes."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def record(method="advrbd", attack="badnets", acc=89.0, asr=0.5, recall=99.0, fpr=1.0, seconds=80.0, **extra):
    return {"dataset": "cifar10", "attack": attack, "rate": 0.05 if attack != "none" else 0.0, "method": method,
            "acc": acc, "asr": asr, "recall": recall, "fpr": fpr, "auroc": 99.0, "seconds": seconds,
            "peak_mem_gb": 2.5, "device": "H100", "commit": "abc1234", "timings_s": {"warmup": 5.0}, **extra}


BASELINE = record(method="none", acc=89.3, asr=100.0, recall=None, fpr=None)


def test_a_run_that_meets_every_target():
    assert report.missed_targets(record(), BASELINE) == []


@pytest.mark.parametrize("changes, expected", [
    ({"asr": 1.5}, "ASR 1.5 > 1"),
    ({"acc": 87.0}, "ACC 2.3 pts below"),
    ({"recall": 97.0}, "recall 97.0 < 98"),
    ({"fpr": 6.0}, "FPR 6.0 > 5"),
    ({"seconds": 95.0}, "95 s > 90 s"),
])
def test_each_missed_advrbd_target_is_named(changes, expected):
    missed = report.missed_targets(record(**changes), BASELINE)
    assert len(missed) == 1 and expected in missed[0]


def test_detection_targets_skip_clean_label_attacks_and_dbd_has_its_own():
    assert report.missed_targets(record(attack="sig", recall=40.0, fpr=20.0), {**BASELINE, "attack": "sig"}) == []
    assert report.missed_targets(record(method="dbd", acc=86.5, recall=90.0, fpr=48.0, seconds=500), BASELINE) == []
    assert report.missed_targets(record(method="dbd", seconds=700), BASELINE) == ["700 s > 600 s"]


def test_clean_set_limits_flagged_share_and_accuracy_drop():
    clean = record(attack="none", asr=None, recall=None, fpr=7.0, acc=88.0)
    base = record(method="none", attack="none", asr=None, recall=None, fpr=None, acc=89.3)
    missed = report.missed_targets(clean, base)
    assert any("flagged 7.0%" in m for m in missed) and any("ACC 1.3 pts" in m for m in missed)


def test_markdown_tables_replace_only_the_marked_section(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([BASELINE, record(asr=3.0)]))
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(f"# Results\nhand-written\n{report.BEGIN}\nold table\n{report.END}\nnotes\n")
    monkeypatch.setattr("sys.argv", ["report.py", "--results", str(results), "--markdown", str(markdown),
                                     "--plot", str(tmp_path / "p.svg")])
    report.main()
    text = markdown.read_text()
    assert "old table" not in text and "hand-written" in text and text.endswith("notes\n")
    assert "| badnets | 5% | advrbd | 89.0 | 3.0 |" in text and "missed: ASR 3.0 > 1" in text
    assert (tmp_path / "p.svg").read_text().count("<circle") == 2 + len(report.COLOURS)
