"""benchmarks/calibrate_dbd.py: DBD's stages 3-4 once per variant on one backbone and head."""
import json

import pytest

from conftest import load_benchmark

calibrate = load_benchmark("calibrate_dbd")


def test_each_variant_filters_and_finetunes_the_same_head(make_shards, tmp_path, capsys):
    data = make_shards(200, root=tmp_path / "train")
    test = make_shards(100, root=tmp_path / "test")
    args = ["--data", str(data), "--test", str(test), "--arch", "small", "--quick", "--device", "cpu",
            "--set", "ss_epochs=1", "--set", "head_steps=20", "--set", "batch_size=32"]
    by_class, global_ = calibrate.main(args + ["--variants", '[{}, {"filter_by_class": false, "mixmatch_epochs": 1}]'])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one JSON line a variant
    assert by_class["stages_1_2_s"] == global_["stages_1_2_s"] and set(by_class["stages_1_2_s"]) == {"simclr", "head"}
    assert global_["changes"] == {"ss_epochs": 1, "head_steps": 20, "batch_size": 32, "filter_by_class": False,
                                  "mixmatch_epochs": 1}
    assert by_class["head_loss_auroc"] == global_["head_loss_auroc"]  # one head, two filters
    assert sum(global_["head_labeled_by_class"]) + global_["head_labeled_poisons"] == 100  # half of 200
    # by class: each class the same share, so the 10 poisons' target class gets no more than the median class
    assert max(by_class["head_labeled_by_class"]) - min(by_class["head_labeled_by_class"]) <= 3
    for record in (by_class, global_):
        # the re-filtering by class keeps the head's count of each class; the poisons all carry class 0
        assert record["labeled_by_class"][1:] == record["head_labeled_by_class"][1:]
        assert (record["labeled_by_class"][0] + record["labeled_poisons"]
                == record["head_labeled_by_class"][0] + record["head_labeled_poisons"])
        assert 0 <= record["acc"] <= 100 and 0 <= record["asr"] <= 100 and len(record["acc_by_class"]) == 10
        assert 0 <= record["head_unlabeled_clean_right"] <= 100 and record["recall"] is not None
        relabeled = record["relabeled"]  # no true labels here: the poisons' given ones only
        assert set(relabeled) == {"clean_labels_changed", "poisons_keep_given", "relabel_by_doubt"}
        tight = relabeled["relabel_by_doubt"]["0.99"]  # fewer suspects relabeled: no more labels changed
        assert tight["clean_labels_changed"] <= relabeled["clean_labels_changed"]
        assert tight["poisons_keep_given"] >= relabeled["poisons_keep_given"]
    assert len(by_class["mixmatch_loss_x"]) == 4 and len(global_["mixmatch_loss_x"]) == 1  # --quick: 4 epochs
    json.dumps([by_class, global_])


def test_variants_may_change_stages_3_and_4_only(make_shards, tmp_path):
    data = make_shards(50, root=tmp_path / "train")
    with pytest.raises(SystemExit, match=r"stage 3-4 options only \(filter_by_class, .*not \['ss_epochs'\]"):
        calibrate.main(["--data", str(data), "--test", str(data), "--variants", '[{"ss_epochs": 3}]'])
    with pytest.raises(SystemExit, match="--variants is not JSON"):
        calibrate.main(["--data", str(data), "--test", str(data), "--variants", "[{ss_epochs: 3}]"])
    with pytest.raises(SystemExit, match="must be a JSON list of option objects"):
        calibrate.main(["--data", str(data), "--test", str(data), "--variants", '{"lambda_u": 75}'])
