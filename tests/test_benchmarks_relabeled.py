"""benchmarks/relabeled.py: the relabeled set's figures from kept per-sample files, two-attack copies included."""
import csv
import gzip
import json

from conftest import load_benchmark


def kept(path, rows):
    with gzip.open(path, "wt", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "label", "score", "suspected", "relabel", "poisoned"])
        writer.writerows(rows)


def test_each_kept_file_gets_its_copys_true_labels(tmp_path, monkeypatch, capsys):
    scores, copies = tmp_path / "scores", tmp_path / "copies"
    scores.mkdir()
    for copy, labels in (("badnets-0.05", {"p0": 2, "p1": 3}), ("badnets+blend-0.05", {"p1": 0, "p2": 4})):
        (copies / copy).mkdir(parents=True)
        (copies / copy / "truth.json").write_text(json.dumps({"true_labels": labels}))
    # clean c0 changed, c1 kept; p0 given its true label 2, p1 its label before the first attack (3), p2 missed
    rows = [["c0", 1, 0.9, 1, 2, 0], ["c1", 1, 0.1, 0, 2, 0], ["p0", 0, 0.8, 1, 2, 1], ["p1", 0, 0.7, 1, 3, 1],
            ["p2", 1, 0.2, 0, 4, 1]]
    kept(scores / "badnets+blend-0.05-advrbd-0123456789.csv.gz", rows)
    kept(scores / "train10k-advrbd-0123456789.csv.gz", [row[:5] + [0] for row in rows])  # the clean set
    monkeypatch.setattr("sys.argv", ["relabeled.py", "--scores", str(scores), "--copies", str(copies)])
    load_benchmark("relabeled").main()
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first == {"file": "badnets+blend-0.05-advrbd-0123456789.csv.gz", "clean_labels_changed": 50.0,
                     "poisons_relabeled_true": 66.67, "poisons_keep_given": 33.33}
    assert second == {"file": "train10k-advrbd-0123456789.csv.gz", "clean_labels_changed": 60.0}


def test_a_file_with_the_clean_models_doubt_gets_the_figures_by_threshold(tmp_path, monkeypatch, capsys):
    scores, copies = tmp_path / "scores", tmp_path / "copies"
    scores.mkdir()
    (copies / "badnets-0.05").mkdir(parents=True)
    (copies / "badnets-0.05" / "truth.json").write_text(json.dumps({"true_labels": {"p0": 2}}))
    with gzip.open(scores / "badnets-0.05-dbd-0123456789.csv.gz", "wt", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "label", "score", "suspected", "relabel", "poisoned", "head_loss", "relabel_doubt"])
        writer.writerows([["c0", 1, 0.9, 1, 2, 0, 0.3, 0.7], ["p0", 0, 0.8, 1, 2, 1, 0.9, 0.999]])
    monkeypatch.setattr("sys.argv", ["relabeled.py", "--scores", str(scores), "--copies", str(copies)])
    load_benchmark("relabeled").main()
    found = json.loads(capsys.readouterr().out)
    assert found["clean_labels_changed"] == 100.0 and found["poisons_relabeled_true"] == 100.0
    assert found["relabel_by_doubt"]["0.5"]["clean_labels_changed"] == 100.0
    assert found["relabel_by_doubt"]["0.8"] == {"clean_labels_changed": 0.0, "poisons_relabeled_true": 100.0,
                                                "poisons_keep_given": 0.0}
