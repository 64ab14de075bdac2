"""benchmarks/bench_ingest.py: throughput per worker count, and where each run's time went."""
import json

from conftest import load_benchmark

from sanitize.formats import readers


def test_each_run_reports_its_phases_and_leaves_the_reader_as_it_was(make_shards, monkeypatch, capsys):
    root = make_shards(60, 20)
    originals = (readers._list, readers.decode_images)
    monkeypatch.setattr("sys.argv", ["bench_ingest.py", "--data", str(root), "--shards", "part-{000000..000002}.tar",
                                     "--workers", "1,2", "--repeat", "2"])
    load_benchmark("bench_ingest").main()
    report = json.loads(capsys.readouterr().out)
    assert [run["workers"] for run in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["samples"] == 60 and run["samples_per_s"] > 0
        assert set(run["phases_s"]) == {"list", "decode"}
        # each figure is rounded to the millisecond: two phases and the total, off by 1.5 ms at most
        assert sum(run["phases_s"].values()) <= run["seconds"] + 0.0015 and run["parent_cpu_s"] > 0
    assert report["runs"][1]["pool_start_s"] > 0 and report["runs"][0]["pool_start_s"] < 0.01  # 1 worker: inline
    assert (readers._list, readers.decode_images) == originals
