"""benchmarks/report.py: the target checks and the markdown it writes."""
import json

import pytest

from conftest import BENCHMARKS, load_benchmark

report = load_benchmark("report")


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
    assert "| badnets | 5% | advrbd | 89.0 | 3.0 | – |" in text and "missed: ASR 3.0 > 1" in text
    assert (tmp_path / "p.svg").read_text().count("<circle") == 2 + len(report.COLOURS)


PAPERS = BENCHMARKS / "papers.json"
PAPER_DEFENSES = {"none": "No Defense", "advrbd": "AdvrBD", "dbd": "DBD (ours)"}


def published(paper="advrbd", table="II", attack="badnets", defense="advrbd", acc=85.72, asr=0.0, **extra):
    return {"paper": paper, "table": table, "dataset": "cifar10", "attack": attack, "defense": defense,
            "model": "resnet18", "rate": 0.05, "acc": acc, "asr": asr, "paper_attack": attack,
            "paper_defense": PAPER_DEFENSES.get(defense, defense), "variant": None, "epsilon": None, "target": 1,
            "note": None, **extra}


def test_a_runs_published_figures_merge_tables_and_leave_out_other_defenses():
    papers = [published(), published(table="IV", variant="without relabeling and relearning"),
              published(table="IV", variant="with relabeling and relearning", acc=86.81),
              published(defense="CLP", acc=34.18, asr=0.55), published(attack="blend", acc=85.71),
              published(paper="dbd", table="1", defense="none", acc=94.92, asr=100.0, target=3),
              published(paper="dbd", table="3", defense="none", acc=94.92, asr=100.0, target=3)]
    found = report.published_for(record(), papers)
    assert [(p["tables"], p["variant"], p["acc"]) for p in found] == [
        (["II", "IV"], "without relabeling and relearning", 85.72), (["IV"], "with relabeling and relearning", 86.81)]
    assert [(p["paper"], p["tables"]) for p in report.published_for(BASELINE, papers)] == [("dbd", ["1", "3"])]
    assert report.published_for(record(method="dbd"), papers) == []
    assert report.published_for(record(attack="badnets+blend"), papers) == []
    assert report.published_for(record(dataset="gtsrb"), papers) == []
    # A figure at another poisoning rate is not set beside a run's.
    twenty = published(table="V", variant="without relabeling and relearning", rate=0.2, acc=82.2)
    assert [(p["tables"], p["acc"]) for p in report.published_for(record(rate=0.2), [*papers, twenty])] == [
        (["V"], 82.2)]
    assert twenty not in report.published_for(record(), [*papers, twenty])


def test_a_rerun_stands_for_the_runs_it_repeats_beside_the_papers():
    papers = [published(), published(attack="blend", acc=85.71)]
    first, rerun = record(acc=80.0, commit="aaa1111"), record(acc=81.0, commit="bbb2222")
    other = record(acc=70.0, set={"split_margin": 0.6})
    text = report.comparison_table([first, rerun, other, record(attack="blend", acc=60.0)], papers)
    rows = [line for line in text.splitlines() if line.startswith("| badnets |")]
    assert sorted(row.split(" | ")[3] for row in rows) == ["70.0", "81.0"]  # the rerun, and the other setting
    assert "| blend | 5% | advrbd | 60.0 |" in text


def test_published_tables_put_defenses_down_attacks_across_and_number_the_notes():
    papers = [published(defense="none", acc=92.0, asr=95.2), published(),
              published(attack="sig", acc=87.69, asr=2.64, note="first note"),
              published(paper="dbd", table="2", attack="label_consistent", defense="dbd", rate=0.025, epsilon=16,
                        acc=89.67, asr=0.01, target=3, note="second note"),
              published(paper="dbd", table="2", attack="label_consistent", defense="dbd", rate=0.025, epsilon=32,
                        acc=None, asr=0.34, target=3, note="second note"),
              published(dataset="imagenet", acc=11.11)]
    text = report.published_tables(papers)
    assert text.startswith("### Published figures (CIFAR-10)")
    assert "AdvrBD Table II; model resnet18, target class 1:" in text and "DBD Table 2;" in text
    assert "| defense | badnets (5%) | sig (5%) |" in text
    assert "| No Defense | 92.00 / 95.20 |  |" in text and "| AdvrBD | 85.72 / 0.00 | 87.69 / 2.64 [1] |" in text
    assert "| label_consistent (2.5%, eps 16/255) | label_consistent (2.5%, eps 32/255) |" in text
    assert "| DBD (ours) | 89.67 / 0.01 [2] | – / 0.34 [2] |" in text
    assert text.endswith("- [1] first note\n- [2] second note") and "11.11" not in text
    assert report.published_tables([]) == ""


def test_published_figures_are_written_without_results_and_beside_ours_with_them(tmp_path, monkeypatch):
    papers = tmp_path / "papers.json"
    papers.write_text(json.dumps([published(defense="none", acc=92.0, asr=95.2), published()]))
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(f"# Results\n{report.BEGIN}\n{report.END}\nnotes\n")
    results = tmp_path / "results.json"

    def generated():
        monkeypatch.setattr("sys.argv", ["report.py", "--results", str(results), "--markdown", str(markdown),
                                         "--plot", str(tmp_path / "p.svg"), "--papers", str(papers)])
        report.main()
        return markdown.read_text().split(report.BEGIN)[1].split(report.END)[0]

    text = generated()
    assert "No GPU runs recorded yet." in text and "| AdvrBD | 85.72 / 0.00 |" in text
    assert "Ours beside the papers" not in text
    results.write_text(json.dumps([BASELINE, record(asr=3.0)]))
    text = generated()
    assert "### Ours beside the papers (CIFAR-10)" in text
    assert "| badnets | 5% | none | 89.3 | 100.0 | AdvrBD II |  | 5% | 1 | 92.00 | 95.20 |" in text
    assert "| badnets | 5% | advrbd | 89.0 | 3.0 | AdvrBD II |  | 5% | 1 | 85.72 | 0.00 |" in text


def test_cpu_runs_have_their_own_table_baseline_and_no_time_target(tmp_path, monkeypatch):
    cpu = {"device": "cpu", "arch": "small", "peak_mem_gb": None}
    records = [BASELINE, record(),
               record(method="none", acc=70.0, asr=100.0, recall=None, fpr=None, epochs=8, **cpu),
               record(acc=66.0, asr=2.0, recall=90.5, fpr=13.0, seconds=711.0, quick=True, **cpu),
               {**record(acc=55.0, asr=3.0, quick=True, clean_to_target=2.5, **cpu),
                "dataset": "cifar10-10k"}]  # one shard
    assert report.find_baseline(records[3], records) is records[2]
    assert report.find_baseline(records[4], records) is None  # not the full set's no-defense run
    assert report.find_baseline(records[1], records) is BASELINE
    assert report.missed_targets(records[3], records[2]) == ["ASR 2.0 > 1", "ACC 4.0 pts below no defense (> 2)",
                                                             "recall 90.5 < 98", "FPR 13.0 > 5"]
    results, markdown = tmp_path / "results.json", tmp_path / "RESULTS.md"
    results.write_text(json.dumps(records))
    markdown.write_text(f"# Results\n{report.BEGIN}\n{report.END}\n")
    monkeypatch.setattr("sys.argv", ["report.py", "--results", str(results), "--markdown", str(markdown),
                                     "--plot", str(tmp_path / "p.svg"), "--papers", str(tmp_path / "none.json")])
    report.main()
    gpu, cpu_part = markdown.read_text().split("### On a CPU (`small`)\n")
    cpu_part, subset = cpu_part.split("### On a CPU (`small`, cifar10-10k)\n")
    assert "| 55.0 | 3.0 | 2.5 |" in subset and "55.0" not in cpu_part and "no no-defense run" in subset
    assert "| cpu |" not in gpu and gpu.count("| H100 |") == 2 and "711" not in (tmp_path / "p.svg").read_text()
    assert "| badnets | 5% | none 8 epochs | 70.0 | 100.0 | – |" in cpu_part
    assert "| badnets | 5% | advrbd --quick | 66.0 | 2.0 | – | 90.5 | 13.0 |" in cpu_part and "711 s" not in cpu_part


# The CIFAR-10 rows of the papers' "Average" lines: (ACC, ASR) per defense, in the tables' column order.
ADVRBD_AVERAGES = {
    "II": [87.12, 88.36, 83.94, 92.61, 79.01, 78.70, 80.57, 78.48, 32.57, 30.81, 40.06, 41.01, 70.22, 13.65, 82.20,
           28.72, 85.14, 0.53],
    "III": [83.63, 51.27, 82.93, 60.66, 79.45, 40.07, 71.76, 32.34, 52.56, 3.55, 67.69, 33.52, 74.65, 20.81, 85.71,
            50.26, 82.86, 0.00],
}


def test_papers_json_holds_the_requested_tables_whole_and_well_formed():
    papers = json.loads(PAPERS.read_text())
    keys = set(published())
    assert all(set(p) == keys for p in papers)
    sizes = {}
    for p in papers:
        sizes[p["paper"], p["table"]] = sizes.get((p["paper"], p["table"]), 0) + 1
    assert sizes == {("advrbd", "II"): 45, ("advrbd", "III"): 27, ("advrbd", "IV"): 16,
                     ("advrbd", "V"): 21, ("dbd", "1"): 18, ("dbd", "2"): 12, ("dbd", "3"): 24}
    cells = [(p["paper"], p["table"], p["attack"], p["rate"], p["paper_defense"], p["variant"], p["epsilon"])
             for p in papers]
    assert len(set(cells)) == len(cells)
    ours = {"badnets", "blend", "wanet", "sig", "physicalba", "tact", "adaptive_blend", "adaptive_patch",
            "label_consistent"}
    assert {p["attack"] for p in papers} <= ours and {"none", "advrbd", "dbd"} <= {p["defense"] for p in papers}
    for p in papers:
        assert p["dataset"] == "cifar10" and 0 < p["rate"] < 1
        for metric in ("acc", "asr"):
            assert (p[metric] is None and p["note"]) or 0 <= p[metric] <= 100


def test_papers_json_matches_the_papers_averages_and_spot_checks():
    papers = json.loads(PAPERS.read_text())
    for number, averages in ADVRBD_AVERAGES.items():
        rows = [p for p in papers if p["paper"] == "advrbd" and p["table"] == number]
        for index, defense in enumerate(dict.fromkeys(p["defense"] for p in rows)):
            column = [p for p in rows if p["defense"] == defense]
            for offset, metric in enumerate(("acc", "asr")):
                mean = sum(p[metric] for p in column) / len(column)
                assert abs(mean - averages[2 * index + offset]) < 0.0051, (number, defense, metric)
    # Table V's ratio-0.2 column against its printed average (81.98 / 0.00; the column sums to 81.947...)
    column = [p for p in papers if (p["table"], p["rate"]) == ("V", 0.2)]
    assert len(column) == 7 and abs(sum(p["acc"] for p in column) / 7 - 81.98) < 0.05
    assert {p["asr"] for p in papers if p["table"] == "V"} == {0.0}

    def find(paper, table, attack, defense, variant=None, epsilon=None):
        hits = [(p["acc"], p["asr"]) for p in papers if (p["paper"], p["table"], p["attack"], p["defense"],
                p["variant"], p["epsilon"]) == (paper, table, attack, defense, variant, epsilon)]
        assert len(hits) == 1
        return hits[0]

    assert find("advrbd", "II", "badnets", "advrbd") == (85.72, 0.0)
    assert find("advrbd", "III", "tact", "none") == (82.10, 63.20)
    assert find("advrbd", "IV", "sig", "advrbd", "with relabeling and relearning") == (86.59, 0.22)
    assert [(p["rate"], p["acc"]) for p in papers if (p["table"], p["attack"]) == ("V", "badnets")] == [
        (0.1, 85.82), (0.15, 85.38), (0.2, 82.2)]
    assert find("dbd", "1", "wanet", "dbd") == find("dbd", "3", "wanet", "dbd") == (91.20, 0.39)
    assert find("dbd", "2", "label_consistent", "dbd", epsilon=16) == (89.67, 0.01)
    assert find("dbd", "3", "label_consistent", "none", epsilon=32) == (94.82, 99.19)


def test_runs_made_with_overrides_are_labelled_with_them():
    text = report.table([BASELINE, record(), record(set={"detect_augment": True})])
    assert "| advrbd detect_augment=true |" in text and "| advrbd |" in text
    # The detection augmentation as run is named whether it was set or defaulted.
    text = report.table([BASELINE, record(options={"detect_augment": "flip", "epsilon": 0.03}),
                         record(set={"split_margin": 0.6}, options={"detect_augment": "crop"})])
    assert "| advrbd detect_augment=flip |" in text and "| advrbd detect_augment=crop split_margin=0.6 |" in text
    text = report.table([BASELINE, record(options={"detect_augment": "flip", "enhance_augment": "crop"}),
                         record(options={"detect_augment": "crop", "enhance_augment": "crop"})])
    assert "| advrbd detect_augment=flip enhance_augment=crop |" in text and "| advrbd detect_augment=crop |" in text
    # The GPU rows' no-defense model (ResNet-18, 20 epochs) is the same whether its record names the epochs or not.
    text = report.table([BASELINE, record(method="none", attack="sig", epochs=20, arch="resnet18"),
                         record(method="none", attack="wanet", epochs=8, arch="resnet18")])
    assert "| sig | 5% | none |" in text and "| wanet | 5% | none 8 epochs |" in text


def test_diagnostics_table_shows_only_runs_that_recorded_stage_figures():
    diagnosed = record(diagnostics={"metrics": {"rest_fit_history": [0.61, 0.55]}, "warmup_kl_auroc": 3.25,
                                    "poisons_in_unlearn": 7, "unlearn_size": 5000,
                                    "poisons_by_unlearn_round": [0, 7], "recall_at_fpr5": 91.0,
                                    "split_at": {"0.5": [99.0, 14.7], "0.7": [95.0, 4.0]},
                                    "clean_labels_changed": 1.25, "poisons_relabeled_true": 88.0})
    older = record(attack="blend", diagnostics={"metrics": {}, "recall_at_fpr5": 50.0})  # before the relabel counts
    clean = record(attack="none", diagnostics={"metrics": {}, "clean_labels_changed": 0.5})
    text = report.diagnostics_table([BASELINE, record(), diagnosed, older, clean])
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # the header left out
    assert rows == [
        "| none | 0% | advrbd | – | – | – | – | – | – | 0.5 |",  # the clean set: nothing to restore
        "| badnets | 5% | advrbd | 3.2 | 7 ([0, 7]) | 5000 | 61 55 | 91.0 | 99/14.7 · 95/4.0 | 1.2 · 88.0 |",
        "| blend | 5% | advrbd | – | – | – | – | 50.0 | – | – |"]
    assert report.diagnostics_table([BASELINE, record(diagnostics={"metrics": {}})]) == ""


def test_added_runs_are_appended_once():
    first, second = record(), record(attack="blend")
    assert report.merged([first], [[first, second], [second]]) == [first, second]
