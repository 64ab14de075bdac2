"""benchmarks/replay_clean.py: AdvrBD's stages 6-7 again from a detection bench.py kept."""
import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import load_benchmark

bench = load_benchmark("bench")
replay = load_benchmark("replay_clean")


@pytest.fixture
def kept_run(make_shards, tmp_path, monkeypatch):
    """bench.py on 200 real CIFAR images (CPU, --quick), BadNets, AdvrBD, its per-sample figures kept."""
    data = make_shards(200, root=tmp_path / "train")
    test = make_shards(100, root=tmp_path / "test")
    results = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", [
        "bench.py", "--data", str(data), "--test", str(test), "--results", str(results), "--work",
        str(tmp_path / "work"), "--attacks", "badnets", "--methods", "advrbd", "--arch", "small", "--quick",
        "--set", "batch_size=64", "--keep-scores", str(tmp_path / "scores")])
    bench.main()
    [record] = json.loads(results.read_text())
    [scores] = (tmp_path / "scores").iterdir()
    poisoned = next((tmp_path / "work" / "data").glob("cifar10/badnets-*"))
    args = ["--poisoned", str(poisoned), "--scores", str(scores), "--test", str(test), "--arch", "small", "--quick",
            "--set", "batch_size=64", "--device", "cpu"]
    return record, args, scores


def test_the_default_variant_reproduces_the_kept_run_and_others_differ(kept_run, capsys):
    record, args, scores = kept_run
    default, rebalanced = replay.main(args + ["--variants", '[{}, {"finetune_rebalance": true}]'])
    assert (default["acc"], default["asr"], default["acc_by_class"]) == (
        record["acc"], record["asr"], record["acc_by_class"])
    with gzip.open(scores, "rt") as file:
        rows = list(csv.DictReader(file))
    assert sum(default["finetune_kept_by_label"]) == sum(row["finetune_kept"] == "1" for row in rows)
    assert default["metrics"] == {key: record["diagnostics"]["metrics"][key]
                                  for key in ("finetune_excluded", "finetune_unlearned")}
    assert default["unlearned"][0] == sum(row["finetune_unlearned"] == "1" for row in rows)
    assert "finetune_prior_shift" in rebalanced["metrics"] and rebalanced["variant"] == {"finetune_rebalance": True}
    flagged_target = sum(row["suspected"] == "1" and row["poisoned"] == "0" and row["label"] == "0" for row in rows)
    assert default["target_clean_flagged"] == flagged_target
    assert all(0 <= count <= flagged_target for count in default["target_clean_called_target"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one JSON line a variant


def test_a_clean_set_replays_without_an_asr(kept_run, tmp_path):
    """Without truth.json beside the shards (bench.py reads a clean set where it is) there is no trigger to test."""
    _, args, _ = kept_run
    clean = tmp_path / "clean"
    clean.mkdir()
    for shard in Path(args[1]).iterdir():
        if shard.name != "truth.json":
            shutil.copy(shard, clean / shard.name)
    [record] = replay.main(["--poisoned", str(clean), *args[2:], "--variants", '[{"finetune_unlearn": 0}]'])
    assert record["asr"] is None and "clean_to_target" not in record and record["unlearned"] == [0, 0]


def test_variants_may_change_stage_7_only_and_the_scores_must_fit_the_data(kept_run, tmp_path):
    _, args, scores = kept_run
    with pytest.raises(SystemExit, match="stage-7 options only"):
        replay.main(args + ["--variants", '[{"split_margin": 0.7}]'])
    with gzip.open(scores, "rt") as file:
        rows = list(csv.DictReader(file))
    other = tmp_path / "other.csv.gz"
    with gzip.open(other, "wt", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[1:])
    with pytest.raises(SystemExit, match="not a detection of this data: 1 of its samples"):
        replay.main([*args[:2], "--scores", str(other), *args[4:]])
