"""benchmarks/calibrate_advrbd.py: the per-round figures of AdvrBD's detection stages."""
import numpy as np
import pytest

from conftest import load_benchmark

from sanitize import methods
from sanitize.attacks import make_attack
from sanitize.data import Bank


@pytest.fixture
def checkerboard(cifar_arrays, cifar_classes):
    """(bank, poisoned): the 600 test images, 10% of them with a checkerboard BadNets patch, target 0."""
    images, labels = cifar_arrays
    poisoned = make_attack("badnets", kind="checkerboard").poison(images, labels, rate=0.1, target=0, seed=0,
                                                                 num_classes=len(cifar_classes))
    return Bank.from_arrays(poisoned.images, poisoned.labels, cifar_classes), poisoned


def test_detection_only_reports_every_round_and_consistent_counts(checkerboard):
    calibrate = load_benchmark("calibrate_advrbd")
    bank, poisoned = checkerboard
    options = methods.resolve_options("advrbd", arch="small", quick=True, enhance_rounds=2, batch_size=64)
    found = calibrate.calibrate(bank, options, poisoned.poisoned, detect_only=True)
    assert [r["round"] for r in found["rounds"]] == [0, 1, 2]
    assert found["rounds"][-1]["poisons_in_unlearn_set"] == found["poisons_in_unlearn_set"]
    # the last round's split is the run's split
    last = found["rounds"][-1]
    assert (last["recall"], last["fpr"], last["auroc"]) == (found["recall"], found["fpr"], found["score_auroc"])
    assert found["unlearn_set"] == 2 * round(options.partition_rate * bank.n)  # the partition and one growth
    assert set(found["timings_s"]) == {"warmup", "score", "enhance", "split"}
    assert found["split_at"][str(options.split_margin)] == [found["recall"], found["fpr"]]
    clean = int((~poisoned.poisoned).sum())
    assert sum(found["false_positives_by_label"]) == round(found["fpr"] * clean / 100)
    assert len(found["false_positives_by_label"]) == bank.num_classes
    recalls = [recall for recall, _ in found["split_at"].values()]
    assert recalls == sorted(recalls, reverse=True)  # a higher margin flags fewer
    assert np.isfinite(found["score_auroc"]) and np.isfinite(found["warmup_kl_auroc"])


def test_warmup_only_reports_the_fitted_shares_and_the_crop_hides_a_corner_trigger(checkerboard):
    calibrate = load_benchmark("calibrate_advrbd")
    bank, poisoned = checkerboard
    found = {}
    for augmentation in ("none", "crop"):
        options = methods.resolve_options("advrbd", arch="small", quick=True, warmup_epochs=6, batch_size=64,
                                          detect_augment=augmentation)
        found[augmentation] = calibrate.warmup(bank, options, poisoned.poisoned)
    assert set(found["none"]) == {"seconds", "poisons_fit", "clean_fit", "margin_auroc", "poisons_confident_other",
                                  "confident_other_by_label"}
    # the patch is learned: no poison is assigned confidently to its true class, and every class has a share
    assert found["none"]["poisons_confident_other"] < 10
    assert len(found["none"]["confident_other_by_label"]) == 10
    assert all(0 <= share <= 100 for share in found["none"]["confident_other_by_label"])
    # Without augmentation the patch is learned (100% of the poisons fitted, 56% of the
    # clean samples, chance is 10%); the crop cuts it off in ~40% of views and the warm-up
    # fits 8% (6 epochs, torch 2.14, CPU).
    assert found["none"]["clean_fit"] > 25 and found["none"]["poisons_fit"] > 80 and found["none"]["margin_auroc"] > 80
    assert found["crop"]["poisons_fit"] < found["none"]["poisons_fit"] - 40


def test_the_clean_set_gives_flagged_shares_and_no_poison_figures(cifar_arrays, cifar_classes):
    calibrate = load_benchmark("calibrate_advrbd")
    bank = Bank.from_arrays(*cifar_arrays, cifar_classes)
    none = np.zeros(bank.n, bool)
    options = methods.resolve_options("advrbd", arch="small", quick=True, enhance_rounds=1, batch_size=64)
    found = calibrate.calibrate(bank, options, none, detect_only=True)
    assert found["recall"] is None and found["score_auroc"] is None and found["warmup_kl_auroc"] is None
    assert 0 <= found["fpr"] <= 100 and found["poisons_in_unlearn_set"] == 0
    assert found["rounds"][0]["poisons_fit"] is None and found["rounds"][0]["clean_rest_fit"] is not None
    assert found["split_at"]["0.0"][0] is None


def test_score_steps_compares_each_partition_with_the_default_and_a_reseeded_one(checkerboard):
    calibrate = load_benchmark("calibrate_advrbd")
    bank, poisoned = checkerboard
    options = methods.resolve_options("advrbd", arch="small", quick=True, batch_size=64, pgd_steps=3)
    found = calibrate.score_steps(bank, options, poisoned.poisoned, "2,1")
    for stage in ("warmup", "enhanced"):
        rows = found[stage]["steps"]
        assert list(rows) == ["3", "2", "1"] and rows["3"]["overlap"] == 1.0
        assert all(0 <= row["overlap"] <= 1 and row["seconds"] > 0 for row in rows.values())
        assert 0 <= found[stage]["reseeded_overlap"] < 1  # other masks and starts pick other samples
        assert all(0 <= row["poisons_in_partition"] <= round(0.05 * bank.n) for row in rows.values())


def test_overlap_counts_shared_samples():
    calibrate = load_benchmark("calibrate_advrbd")
    assert calibrate._overlap(np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6])) == 0.5


@pytest.mark.parametrize("variants, message", [("[{warmup_epochs: 10}]", "--variants is not JSON"),
                                               ('{"warmup_epochs": 10}', "must be a JSON list"),
                                               ('[{"warmup_epoch": 10}]', "AdvrBD options only")])
def test_bad_variants_are_refused_before_any_data_is_read(variants, message, monkeypatch, tmp_path):
    """A typo in --variants was a JSON traceback, or an option error after the poisoning."""
    calibrate = load_benchmark("calibrate_advrbd")
    monkeypatch.setattr("sys.argv", ["calibrate_advrbd.py", "--data", str(tmp_path / "missing"),
                                     "--variants", variants])
    with pytest.raises(SystemExit, match=message):
        calibrate.main()
