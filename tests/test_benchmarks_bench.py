"""benchmarks/bench.py: the detection figures and stage diagnostics it records."""
import csv
import gzip
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from sanitize.attacks import make_attack

bench = load_benchmark("bench")

# Ten samples of classes 0, 1, 2, 0, 1, ..., the last two poisoned: the score ranks one poison on top and
# one in the middle.
SCORES = [{"key": f"k{i}", "label": i % 3, "score": s, "suspected": s > 0.85, "relabel": i % 3}
          for i, s in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.55])]
CLASSES = {"input": {"classes": ["a", "b", "c"]}}
TRUTH = {"poisoned": ["k8", "k9"]}


def test_detection_figures_count_against_the_ground_truth():
    figures = bench.detection_figures(SCORES, TRUTH)
    assert figures["recall"] == 50.0 and figures["fpr"] == 0.0
    # poison 0.9 beats all 8 clean, poison 0.55 beats 5 of 8: (8 + 5) / 16
    assert figures["auroc"] == pytest.approx(100 * 13 / 16, abs=0.01)
    assert bench.detection_figures(SCORES, None) == {"recall": None, "fpr": 10.0, "auroc": None}


def test_diagnostics_count_poisons_in_sets_and_rank_float_details_only():
    unlearn = np.zeros(10, bool)
    unlearn[[0, 1, 9]] = True
    result = SimpleNamespace(metrics={"enhance_rounds": 3, "onnx_check": {"max_abs_diff": 0.0}},
                             manifest={"options": {}, **CLASSES},
                             details={"unlearn": unlearn, "warmup_kl": np.linspace(1.0, 0.0, 10),
                                      "finetune_label": np.arange(10),
                                      "unlearn_round": np.array([0, 0, -1, -1, 1, -1, -1, -1, -1, 2])})
    found = bench.diagnostics(result, SCORES, TRUTH)
    assert found["metrics"] == {"enhance_rounds": 3}
    assert found["poisons_in_unlearn"] == 1 and found["unlearn_size"] == 3
    assert found["warmup_kl_auroc"] == 0.0  # both poisons have the lowest KL
    assert "finetune_label_auroc" not in found
    assert found["poisons_by_unlearn_round"] == [0, 0, 1]  # k8 never, k9 in round 2
    # the clean scores' 95th percentile is 0.765: only the 0.9 poison is above it
    assert found["recall_at_fpr5"] == 50.0
    assert found["false_positives_by_label"] == [0, 0, 0]  # the one flagged sample is a poison
    # without a ground truth every flagged sample counts: k8, of class 2
    assert bench.diagnostics(result, SCORES, None) == {"metrics": {"enhance_rounds": 3},
                                                       "false_positives_by_label": [0, 0, 1],
                                                       "clean_labels_changed": 0.0}


def test_the_relabeled_sets_labels_are_counted_against_the_given_and_the_true_ones():
    """A suspect's label there is the clean model's, everyone else's the given one: clean samples it
    changes, poisons it gives their true label back (two triggers: the label before the first)."""
    scores = [{"key": "c0", "label": 0, "score": 0.9, "suspected": True, "relabel": 1},  # clean, changed
              {"key": "c1", "label": 1, "score": 0.8, "suspected": True, "relabel": 1},  # clean, kept
              {"key": "c2", "label": 2, "score": 0.1, "suspected": False, "relabel": 0},  # not a suspect: kept
              {"key": "c3", "label": 0, "score": 0.2, "suspected": False, "relabel": 0},
              {"key": "p0", "label": 0, "score": 0.7, "suspected": True, "relabel": 2},  # poison, true label back
              {"key": "p1", "label": 0, "score": 0.6, "suspected": True, "relabel": 1},  # poison, wrong label
              {"key": "p2", "label": 0, "score": 0.3, "suspected": False, "relabel": 2}]  # missed: label stays 0
    result = SimpleNamespace(metrics={}, details={}, manifest={"options": {}, **CLASSES})
    truth = {"poisoned": ["p0", "p1", "p2"], "true_labels": {"p0": 2, "p1": 2, "p2": 2}}
    found = bench.diagnostics(result, scores, truth)
    assert found["clean_labels_changed"] == 25.0 and found["poisons_relabeled_true"] == pytest.approx(33.33)
    assert bench.diagnostics(result, scores, None)["clean_labels_changed"] == pytest.approx(100 * 3 / 7, abs=0.01)
    assert found["poisons_keep_given"] == pytest.approx(33.33)  # p2, missed
    assert "relabel_by_doubt" not in found


def test_the_relabeled_set_under_each_doubt_threshold():
    """A suspect keeps its given label unless the clean model's doubt in it reaches the threshold."""
    labels, relabel = np.array([0, 1, 0, 0, 0]), np.array([1, 0, 2, 2, 2])
    suspected = np.array([True, True, True, True, False])
    is_poison = np.array([False, False, True, True, True])
    true = np.array([-1, -1, 2, 2, 2])
    doubt = np.array([0.6, 0.95, 0.99, 0.85, 1.0])  # c0 doubted a little; p1 less than the tight thresholds
    found = bench.relabeled_figures(labels, suspected, relabel, is_poison, true, doubt)
    assert (found["clean_labels_changed"], found["poisons_relabeled_true"]) == (100.0, pytest.approx(66.67))
    by = found["relabel_by_doubt"]
    assert list(by) == [str(threshold) for threshold in bench.DOUBT_THRESHOLDS]
    assert by["0.5"] == {"clean_labels_changed": 100.0, "poisons_relabeled_true": pytest.approx(66.67),
                         "poisons_keep_given": pytest.approx(33.33)}
    assert by["0.9"] == {"clean_labels_changed": 50.0, "poisons_relabeled_true": pytest.approx(33.33),
                         "poisons_keep_given": pytest.approx(66.67)}  # c0 and p1 keep their given labels
    assert by["0.99"] == {"clean_labels_changed": 0.0, "poisons_relabeled_true": pytest.approx(33.33),
                          "poisons_keep_given": pytest.approx(66.67)}


def test_split_at_other_margins_for_advrbd_runs_with_and_without_poisons():
    result = SimpleNamespace(metrics={}, details={}, manifest={"options": {"split_margin": 0.5}, **CLASSES})
    found = bench.diagnostics(result, SCORES, TRUTH)
    assert found["split_at"]["0.5"] == [100.0, 37.5]  # 0.9, 0.55 above; of the clean 0.6, 0.7, 0.8 above: 3 of 8
    assert found["split_at"]["0.7"] == [50.0, 12.5]
    clean = bench.diagnostics(result, SCORES, None)["split_at"]
    assert clean["0.5"] == [None, 50.0] and set(clean) == {str(m) for m in bench.SPLIT_MARGINS}


def test_a_failing_cell_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def run_cell(args, method, poisoned, test, options, device):
        if method == "dbd":
            raise RuntimeError("out of memory")
        return {"acc": 90.0, "asr": 1.0}

    monkeypatch.setattr(bench, "read_dataset", lambda path: None)
    monkeypatch.setattr(bench, "prepare_data", lambda args, attack, rate: {"attack": attack})
    monkeypatch.setattr(bench, "run_cell", run_cell)
    results = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", ["bench.py", "--data", "d", "--test", "t", "--results", str(results),
                                     "--attacks", "badnets,blend", "--methods", "dbd,none"])
    with pytest.raises(SystemExit, match="2 cell"):
        bench.main()
    recorded = json.loads(results.read_text())
    assert [(r["attack"], r["method"]) for r in recorded] == [("badnets", "none"), ("blend", "none")]
    assert capsys.readouterr().err.count("FAILED") == 2


class FirstPixelModel(torch.nn.Module):
    """Predicts class (the first pixel's red value) mod 3."""

    def forward(self, inputs):
        return torch.nn.functional.one_hot((inputs[:, 0, 0, 0] * 255).round().long() % 3, 3).float()


def test_evaluate_gives_the_asr_beside_the_clean_images_called_the_target_anyway():
    labels = np.array([0, 1, 2, 1, 2, 0])
    images = np.zeros((6, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = [0, 1, 0, 0, 2, 0]  # what the model predicts
    test = SimpleNamespace(images=images, labels=labels, classes=["a", "b", "c"])
    attack = SimpleNamespace(success_rate=lambda predict, images, labels, target, seed: 40.0,
                             asr_mask=lambda labels, target: labels != target)
    figures = bench.evaluate(FirstPixelModel(), test, [(attack, 0)], torch.device("cpu"))
    assert figures["acc"] == 66.67 and figures["acc_by_class"] == [100.0, 50.0, 50.0]
    # of the four images of classes 1 and 2, two are called 0 without any trigger
    assert figures["asr"] == 40.0 and figures["clean_to_target"] == 50.0
    assert "clean_to_target" not in bench.evaluate(FirstPixelModel(), test, [], torch.device("cpu"))
    # TaCT counts its source class only, for the floor as for the ASR: both images of class 2 are called 0
    # untriggered (3 of the 4 of classes 1 and 2)
    test.images[4, 0, 0, 0] = 0
    tact = make_attack("tact", source_classes=(2,))
    assert bench.evaluate(FirstPixelModel(), test, [(tact, 0)], torch.device("cpu"))["clean_to_target"] == 100.0


def test_auroc_counts_pairs_and_ties_half():
    positive = np.array([True, True, False, False, False])
    assert bench.auroc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    assert bench.auroc(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), positive) == 0.0
    assert bench.auroc(np.zeros(5), positive) == 0.5
    # one positive ties one negative, the rest are ordered: (5 + 0.5) / 6 pairs
    assert bench.auroc(np.array([0.3, 0.9, 0.3, 0.1, 0.2]), positive) == pytest.approx(5.5 / 6)


def test_a_real_cell_records_every_figure_and_is_not_recomputed(make_shards, tmp_path, monkeypatch, capsys):
    """bench.py end to end on 200 real CIFAR images (CPU, --quick): poison, sanitize, evaluate, resume."""
    data = make_shards(200, root=tmp_path / "train")
    test = make_shards(100, root=tmp_path / "test")
    results = tmp_path / "results.json"
    argv = ["bench.py", "--data", str(data), "--test", str(test), "--results", str(results), "--work",
            str(tmp_path / "work"), "--attacks", "badnets", "--methods", "none,advrbd", "--arch", "small",
            "--quick", "--set", "batch_size=64", "--keep-scores", str(tmp_path / "scores"), "--dataset", "cifar10-200"]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    none, advrbd = json.loads(results.read_text())
    assert (none["method"], advrbd["method"]) == ("none", "advrbd") and none["attack"] == "badnets"
    assert none["dataset"] == advrbd["dataset"] == "cifar10-200"
    for record in (none, advrbd):
        assert 0 <= record["acc"] <= 100 and 0 <= record["asr"] <= 100 and record["device"] == "cpu"
        assert 0 <= record["clean_to_target"] <= 100
        by_class = record["acc_by_class"]  # the 100 test images: every class is there
        assert len(by_class) == 10 and all(0 <= acc <= 100 for acc in by_class)
    assert all(0 <= advrbd[k] <= 100 for k in ("recall", "fpr", "auroc"))
    assert advrbd["options"]["batch_size"] == 64 and advrbd["set"] == {"batch_size": 64}
    assert (none["arch"], none["epochs"], advrbd["arch"], advrbd["quick"]) == ("small", 2, "small", True)
    assert "suspect_target" in advrbd
    assert none["attack_params"] == advrbd["attack_params"] and advrbd["attack_params"]["badnets"]["size"] == 3
    assert set(advrbd["diagnostics"]["split_at"]) == {str(m) for m in bench.SPLIT_MARGINS}
    assert set(advrbd["timings_s"]) >= {"ingest", "warmup", "enhance", "write", "export", "total"}
    assert "stage 2/9: warmup" in capsys.readouterr().err  # stage lines in the log as the run goes
    # the defended cell's per-sample figures, to study split rules offline (no-defense cells have none)
    [kept] = (tmp_path / "scores").iterdir()
    with gzip.open(kept, "rt") as file:
        rows = list(csv.DictReader(file))
    truth = json.loads(next((tmp_path / "work" / "data").glob("cifar10-200/badnets-*/truth.json")).read_text())
    assert len(rows) == 200 and sum(int(row["poisoned"]) for row in rows) == len(truth["poisoned"]) > 0
    assert {"warmup_kl", "unlearn_round", "finetune_kept"} <= set(rows[0])
    found = [int(row["suspected"]) for row in rows if row["poisoned"] == "1"]
    assert round(100 * sum(found) / len(found), 2) == advrbd["recall"]  # the same run as the record
    final = [int(row["relabel"]) if row["suspected"] == "1" else int(row["label"]) for row in rows]
    restored = [final[i] == truth["true_labels"][row["key"]] for i, row in enumerate(rows) if row["poisoned"] == "1"]
    assert advrbd["diagnostics"]["poisons_relabeled_true"] == round(100 * sum(restored) / len(restored), 2)
    bench.main()  # resumed: both cells are done
    assert capsys.readouterr().out.count("skip (done)") == 2 and len(json.loads(results.read_text())) == 2


def test_label_consistent_trains_its_surrogate_here_with_the_benchmarks_model(make_shards, tmp_path):
    """On a machine without CUDA the surrogate runs on the CPU (it asked for CUDA and failed), and it is the
    benchmark's architecture; the cached copy is per dataset and surrogate."""
    data = make_shards(200, root=tmp_path / "train")
    args = SimpleNamespace(data=data, work=tmp_path / "work", dataset="cifar10-200", arch="small")
    poisoned = bench.prepare_data(args, "label_consistent", 0.05)
    assert poisoned["path"] == tmp_path / "work" / "data" / "cifar10-200" / "label_consistent-0.05-small"
    truth = json.loads((poisoned["path"] / "truth.json").read_text())
    assert truth["params"]["surrogate_arch"] == "small" and len(poisoned["truth"]["poisoned"]) > 0
    assert truth["params"]["eps"] == pytest.approx(16 / 255)  # the DBD paper's, to sit beside its figures
    if not torch.cuda.is_available():
        assert truth["params"]["device"] == "cpu"
    [(attack, target)] = poisoned["attacks"]
    assert attack.name == "label_consistent" and target == bench.TARGET


def test_tact_takes_its_poisons_from_the_class_after_the_target(make_shards, tmp_path):
    """TaCT's default source class is 0, the benchmark's target: the matrix cell failed before it trained."""
    data = make_shards(300, root=tmp_path / "train")
    args = SimpleNamespace(data=data, work=tmp_path / "work", dataset="cifar10-300", arch="small")
    poisoned = bench.prepare_data(args, "tact", 0.05)
    truth = json.loads((poisoned["path"] / "truth.json").read_text())
    assert truth["params"]["source_classes"] == [bench.TARGET + 1] and truth["target"] == bench.TARGET
    assert truth["true_labels"] and set(truth["true_labels"].values()) == {bench.TARGET + 1}


def test_no_defense_runs_of_another_model_or_length_are_other_cells():
    before = bench.hashlib.sha256(b"{}").hexdigest()[:10]  # the id every no-defense run had
    assert bench.options_id("none", {"arch": "resnet18", "quick": False}) == before
    ids = {bench.options_id("none", {"arch": arch}, epochs) for arch in ("resnet18", "small") for epochs in (8, 20)}
    assert len(ids) == 4


def test_a_poisoned_copy_is_reused_only_if_poisoned_with_the_same_parameters(make_shards, tmp_path, monkeypatch):
    """The cache in --work was keyed by dataset, attack and rate: a parameter changed in code reused the
    old copy. Now it is poisoned again, and so is a second trigger poisoned on top of it."""
    data = make_shards(200, root=tmp_path / "train")
    args = SimpleNamespace(data=data, work=tmp_path / "work", dataset="cifar10-200", arch="small")
    calls = []
    real = bench.poison_dataset
    monkeypatch.setattr(bench, "poison_dataset", lambda *a, **k: calls.append(k["attack"]) or real(*a, **k))
    first = bench.prepare_data(args, "badnets+blend", 0.05)
    assert calls == ["badnets", "blend"]
    again = bench.prepare_data(args, "badnets+blend", 0.05)
    assert calls == ["badnets", "blend"] and again["truth"] == first["truth"]  # reused as it was
    monkeypatch.setattr(bench, "attack_params", lambda name, target, arch: {"size": 4} if name == "badnets" else {})
    changed = bench.prepare_data(args, "badnets+blend", 0.05)
    assert calls == ["badnets", "blend"] * 2 and changed["params"]["badnets"]["size"] == 4
    truth = json.loads((changed["path"].parent / "badnets-0.05" / "truth.json").read_text())
    assert truth["params"]["size"] == 4
